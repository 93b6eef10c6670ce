// Building and updating one message's DOM. Every untrusted string goes in as text or through the
// sanitising markdown renderer; nothing here assigns HTML.
import { renderFragment, textFragment, StreamRenderer } from "./markdown.js";
import { explain } from "./errors.js";
import { pretty } from "./tools.js";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

function button(label, action, extra = {}) {
  const node = el("button", `link ${action}`, label);
  node.type = "button";
  node.dataset.action = action;
  for (const [key, value] of Object.entries(extra)) node.setAttribute(key, value);
  return node;
}

/** Adds a copy button to each code block in `root` that has none. */
export function decorate(root) {
  for (const pre of root.querySelectorAll("pre")) {
    if (pre.parentElement?.classList.contains("code")) continue;
    const wrap = el("div", "code");
    const bar = el("div", "code-bar");
    const lang = /language-(\S+)/.exec(pre.querySelector("code")?.className || "")?.[1] || "text";
    bar.append(el("span", "code-lang", lang), button("Copy", "copy-code", { "aria-label": `Copy ${lang} code` }));
    pre.replaceWith(wrap);
    wrap.append(bar, pre);
  }
}

const DATA_URL = /^data:image\/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/]+=*$/;

/** Whether `url` is an image data URL this page shows (anything else is never put in an img). */
export function isImageDataUrl(url) {
  return typeof url === "string" && DATA_URL.test(url);
}

/** Thumbnails of a user message's images: data URLs only, anything else is not shown. */
export function imageList(urls, { removable = false } = {}) {
  const list = el("ul", "images");
  list.setAttribute("aria-label", urls.length === 1 ? "1 image" : `${urls.length} images`);
  for (const [i, url] of urls.entries()) {
    if (!isImageDataUrl(url)) continue;
    const item = el("li", "image");
    const img = el("img");
    img.src = url;
    img.alt = `Image ${i + 1}`;
    if (removable) {
      item.append(img, button("✕", "remove-image", { "aria-label": `Remove image ${i + 1}`, "data-index": String(i) }));
    } else {
      const zoom = el("button", "zoom");
      zoom.type = "button";
      zoom.dataset.action = "zoom-image";
      zoom.setAttribute("aria-pressed", "false");
      zoom.setAttribute("aria-label", `Image ${i + 1}: show full size`);
      zoom.append(img);
      item.append(zoom);
    }
    list.append(item);
  }
  return list;
}

export function messageElement(message, index) {
  const article = el("article", `message ${message.role}`);
  article.dataset.index = String(index);
  if (message.role === "tool") return toolResultElement(article, message);
  const who = el("h2", "visually-hidden", message.role === "user" ? "You said" : "Answer");
  article.append(who);
  if (message.role === "user") {
    const body = el("div", "content");
    if (message.content) body.append(textFragment(message.content));
    if (message.images?.length) body.append(imageList(message.images));
    const actions = el("div", "actions");
    actions.append(button("Edit", "edit", { "aria-label": "Edit this message and send again" }));
    article.append(body, actions);
    return article;
  }
  article.append(
    el("details", "reasoning"), el("div", "content markdown"), el("p", "refusal"), el("div", "tool-calls"),
    el("p", "empty-answer", "The model gave an empty answer."), el("div", "tool-reply"),
    el("p", "meta"), el("div", "error"), el("div", "actions"),
  );
  updateAssistant(article, message, { full: true });
  return article;
}

function toolResultElement(article, message) {
  article.append(el("h2", "tool-title", `Result of ${message.name || "a tool"}`));
  article.querySelector(".tool-title").append(el("span", "call-id", ` ${message.tool_call_id || ""}`));
  const pre = el("pre", "tool-output");
  pre.append(el("code", null, pretty(message.content || "")));
  article.append(pre);
  return article;
}

/**
 * Refreshes an assistant message's parts; `full` re-renders its text (not while streaming).
 * `calls` is the state of its tool calls (see tools.js `callState`).
 */
export function updateAssistant(article, message, { full = false, last = false, calls = "none" } = {}) {
  article.dataset.state = message.status || "done";
  article.setAttribute("aria-busy", String(message.status === "streaming"));
  const reasoning = article.querySelector(".reasoning");
  reasoning.hidden = !message.reasoning;
  if (message.reasoning) {
    if (!reasoning.firstChild) reasoning.append(el("summary", null, "Reasoning"), el("p", "plain"));
    reasoning.lastChild.textContent = message.reasoning;
    // Open while the answer streams, so the thinking shows as it comes; folded once done,
    // unless the reader opened or closed it themselves.
    if (!reasoning.dataset.touched) reasoning.open = message.status === "streaming";
  }
  if (full) {
    const content = article.querySelector(".content");
    content.replaceChildren(renderFragment(message.content || ""));
    decorate(content);
  }
  renderRefusal(article.querySelector(".refusal"), message);
  renderToolCalls(article, message);
  renderToolReply(article.querySelector(".tool-reply"), message, calls);
  article.querySelector(".empty-answer").hidden = message.status !== "done" || Boolean(
    message.content || message.refusal || message.tool_calls?.length,
  );
  renderMeta(article.querySelector(".meta"), message);
  renderError(article.querySelector(".error"), message);
  const actions = article.querySelector(".actions");
  actions.replaceChildren();
  if (message.content && message.status !== "streaming") {
    actions.append(button("Copy", "copy-answer", { "aria-label": "Copy the whole answer (Markdown)" }));
  }
  if (message.status === "error" || message.status === "interrupted") actions.append(button("Retry", "retry"));
  else if (last && message.status !== "streaming") actions.append(button("Regenerate", "regenerate"));
}

function renderRefusal(node, message) {
  node.hidden = !message.refusal;
  if (!message.refusal) return;
  if (!node.firstChild) node.append(el("strong", null, "The model refused: "), el("span"));
  node.lastChild.textContent = message.refusal;
}

/** One block per call, updated in place so arguments stream in as their fragments arrive. */
export function renderToolCalls(article, message) {
  const root = article.querySelector(".tool-calls");
  const calls = message.tool_calls || [];
  root.hidden = calls.length === 0;
  for (const [i, call] of calls.entries()) {
    if (!call) continue;
    let block = root.children[i];
    if (!block) {
      block = el("section", "tool-call");
      const head = el("h3", "tool-call-head");
      head.append(el("span", "tool-label", "Tool call"), " ", el("code", "tool-name"), el("span", "call-id"));
      const pre = el("pre", "tool-args");
      pre.append(el("code"));
      block.append(head, pre);
      root.append(block);
    }
    block.querySelector(".tool-name").textContent = call.function?.name || "…";
    block.querySelector(".call-id").textContent = call.id ? ` ${call.id}` : "";
    const args = call.function?.arguments || "";
    block.querySelector(".tool-args code").textContent = args ? pretty(args) : message.status === "streaming" ? "…" : "(no arguments)";
  }
}

/** The form asking for the results of pending calls, or a note on calls left unanswered. */
function renderToolReply(node, message, state) {
  if (node.dataset.state === state) return; // keep what the user is typing
  node.dataset.state = state;
  node.replaceChildren();
  if (state === "skipped") {
    node.append(el("p", "tool-note", "Not answered: this call is left out of what is sent to the model."));
  } else if (state === "incomplete") {
    node.append(el("p", "tool-note", "The call did not finish: it is left out of what is sent to the model."));
  } else if (state === "pending") {
    node.append(toolReplyForm(message.tool_calls));
  }
}

function toolReplyForm(calls) {
  const form = el("form", "tool-reply-form");
  form.setAttribute("aria-label", "Tool results");
  form.append(el("p", "tool-note", "This page cannot run tools. Type what each tool returned to let the model go on, or write a new message to skip the call."));
  for (const call of calls) {
    const label = el("label", null, `Result of ${call.function.name}`);
    const area = el("textarea");
    area.rows = 2;
    area.dataset.callId = call.id;
    area.dataset.name = call.function.name;
    area.placeholder = '{"temperature": 21}';
    label.append(area);
    form.append(label);
  }
  const submit = el("button", "primary", calls.length === 1 ? "Send result" : "Send results");
  submit.type = "submit";
  form.append(submit);
  return form;
}

export function streamInto(article) {
  return new StreamRenderer(article.querySelector(".content"), decorate);
}

function renderMeta(node, message) {
  node.replaceChildren();
  const meta = message.meta || {};
  const parts = [];
  if (message.status === "streaming") {
    const started = message.content || message.reasoning || message.refusal || message.tool_calls?.length;
    parts.push(message.reconnecting ? "reconnecting…" : started ? "streaming…" : "waiting for the first token…");
  }
  if (message.status === "stopped") parts.push("stopped");
  if (message.status === "interrupted") parts.push("interrupted");
  if (meta.finish_reason === "length") parts.push("cut off at the token limit");
  if (meta.finish_reason === "content_filter") parts.push("stopped by the content filter");
  if (meta.ttft_ms != null) parts.push(`TTFT ${formatMs(meta.ttft_ms)}`);
  if (meta.tps != null) parts.push(`${meta.tps.toFixed(meta.tps < 10 ? 1 : 0)} tok/s`);
  if (meta.completion_tokens != null) parts.push(`${meta.completion_tokens} tokens`);
  if (message.model) parts.push(message.model);
  if (meta.transport === "sse") parts.push("via SSE");
  if (meta.resumed) parts.push("resumed");
  for (const [i, text] of parts.entries()) {
    if (i) node.append(" · ");
    const span = el("span", null, text);
    if (text === "stopped" || text === "interrupted" || text === "reconnecting…") span.className = "badge warn";
    if (text.startsWith("TTFT")) span.className = "ttft";
    node.append(span);
  }
  if (meta.cached) node.append(" ", el("span", "badge cached", "cache hit"));
}

function renderError(node, message) {
  node.replaceChildren();
  node.hidden = !message.error;
  if (!message.error) return;
  node.setAttribute("role", "alert");
  const info = explain(message.error, message.model);
  node.append(el("strong", null, info.title));
  if (info.detail) node.append(el("span", "detail", ` ${info.detail}`));
  if (info.requestId) node.append(el("span", "request-id", ` (request ${info.requestId})`));
}

function formatMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}
