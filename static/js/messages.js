// Building and updating one message's DOM. Every untrusted string goes in as text or through the
// sanitising markdown renderer; nothing here assigns HTML.
import { renderFragment, textFragment, StreamRenderer } from "./markdown.js";
import { explain } from "./errors.js";

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

export function messageElement(message, index) {
  const article = el("article", `message ${message.role}`);
  article.dataset.index = String(index);
  const who = el("h2", "visually-hidden", message.role === "user" ? "You said" : "Answer");
  article.append(who);
  if (message.role === "user") {
    const body = el("div", "content");
    body.append(textFragment(message.content));
    const actions = el("div", "actions");
    actions.append(button("Edit", "edit", { "aria-label": "Edit this message and send again" }));
    article.append(body, actions);
    return article;
  }
  article.append(el("details", "reasoning"), el("div", "content markdown"), el("p", "meta"), el("div", "error"), el("div", "actions"));
  updateAssistant(article, message, { full: true });
  return article;
}

/** Refreshes an assistant message's parts; `full` re-renders its text (not while streaming). */
export function updateAssistant(article, message, { full = false, last = false } = {}) {
  article.dataset.state = message.status || "done";
  article.setAttribute("aria-busy", String(message.status === "streaming"));
  const reasoning = article.querySelector(".reasoning");
  reasoning.hidden = !message.reasoning;
  if (message.reasoning) {
    if (!reasoning.firstChild) reasoning.append(el("summary", null, "Reasoning"), el("p", "plain"));
    reasoning.lastChild.textContent = message.reasoning;
  }
  if (full) {
    const content = article.querySelector(".content");
    content.replaceChildren(renderFragment(message.content || ""));
    decorate(content);
  }
  renderMeta(article.querySelector(".meta"), message);
  renderError(article.querySelector(".error"), message);
  const actions = article.querySelector(".actions");
  actions.replaceChildren();
  if (message.status === "error" || message.status === "interrupted") actions.append(button("Retry", "retry"));
  else if (last && message.status !== "streaming") actions.append(button("Regenerate", "regenerate"));
}

export function streamInto(article) {
  return new StreamRenderer(article.querySelector(".content"), decorate);
}

function renderMeta(node, message) {
  node.replaceChildren();
  const meta = message.meta || {};
  const parts = [];
  if (message.status === "streaming") parts.push(message.content || message.reasoning ? "streaming…" : "waiting for the first token…");
  if (message.status === "stopped") parts.push("stopped");
  if (message.status === "interrupted") parts.push("interrupted");
  if (meta.finish_reason === "length") parts.push("cut off at the token limit");
  if (meta.ttft_ms != null) parts.push(`TTFT ${formatMs(meta.ttft_ms)}`);
  if (meta.tps != null) parts.push(`${meta.tps.toFixed(meta.tps < 10 ? 1 : 0)} tok/s`);
  if (meta.completion_tokens != null) parts.push(`${meta.completion_tokens} tokens`);
  if (message.model) parts.push(message.model);
  if (meta.transport === "sse") parts.push("via SSE");
  for (const [i, text] of parts.entries()) {
    if (i) node.append(" · ");
    const span = el("span", null, text);
    if (text === "stopped" || text === "interrupted") span.className = "badge warn";
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
