// The chat page: wires the conversation store, the model picker and the transport to the DOM.
import { Store } from "./store.js";
import { Transport } from "./transport.js";
import { loadCatalogue, loadReadiness, availability, filterGroups, describe } from "./models.js";
import { toMarkdown, toJSON, download } from "./export.js";
import { messageElement, updateAssistant, streamInto, renderToolCalls } from "./messages.js";
import { EXAMPLE_TOOL, DEMO_TOOLS_MODEL, mergeToolCalls, callState, requestMessages } from "./tools.js";
import { wireAttachments, NO_VISION } from "./attachments.js";

const $ = (id) => document.getElementById(id);
const ui = {
  layout: document.querySelector(".layout"),
  list: $("conversations"),
  itemTemplate: $("conversation-item"),
  messages: $("messages"),
  empty: $("empty"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  model: $("model"),
  modelSearch: $("model-search"),
  modelInfo: $("model-info"),
  notice: $("notice"),
  noticeRetry: $("notice-retry"),
  system: $("system"),
  systemPrompt: $("system-prompt"),
  systemState: $("system-state"),
  exportMenu: $("export-menu"),
  connection: $("connection"),
  announcer: $("announcer"),
  toggle: $("toggle-sidebar"),
  exampleTool: $("example-tool"),
  attach: $("attach"),
  attachInput: $("attach-input"),
  tray: $("attachments"),
  composerNote: $("composer-note"),
  storageNote: $("storage-note"),
};

const store = new Store(window.localStorage, {
  onSaved(ok) {
    ui.storageNote.hidden = ok;
  },
});
let catalogue = { groups: [], models: new Map(), note: "", unavailable: [] };
let loaded = false; // whether the model list has been asked for at least once
let active = null; // {stream, message, article, renderer, conversation}

const transport = new Transport({
  onStatus(mode, detail) {
    ui.connection.dataset.mode = mode;
    ui.connection.textContent = mode === "websocket" ? "Live" : mode === "sse" ? "Fallback (SSE)" : "Connecting…";
    ui.connection.title = detail || (mode === "websocket" ? "Streaming over WebSocket" : "");
  },
});

// ---- conversations ------------------------------------------------------------------------

function renderList() {
  ui.list.replaceChildren();
  for (const conversation of store.conversations) {
    const item = ui.itemTemplate.content.firstElementChild.cloneNode(true);
    item.dataset.id = conversation.id;
    const open = item.querySelector(".open");
    open.textContent = conversation.title;
    if (conversation.id === store.currentId) {
      item.classList.add("current");
      open.setAttribute("aria-current", "true");
    }
    item.querySelector(".rename").setAttribute("aria-label", `Rename “${conversation.title}”`);
    item.querySelector(".delete").setAttribute("aria-label", `Delete “${conversation.title}”`);
    ui.list.append(item);
  }
}

function renderConversation() {
  const conversation = store.current;
  const nodes = conversation.messages.map((message, i) => messageElement(message, i));
  ui.messages.replaceChildren(ui.empty, ...nodes);
  ui.empty.hidden = nodes.length > 0;
  ui.systemPrompt.value = conversation.system || "";
  showSystemState();
  refreshLastActions();
  scrollToEnd(true);
}

function refreshLastActions() {
  const messages = store.current.messages;
  for (const article of ui.messages.querySelectorAll("article.assistant")) {
    const i = Number(article.dataset.index);
    updateAssistant(article, messages[i], { last: i === messages.length - 1, calls: callState(messages, i) });
  }
}

ui.list.addEventListener("click", (event) => {
  const item = event.target.closest("li.conversation");
  if (!item) return;
  const id = item.dataset.id;
  if (event.target.closest(".open")) {
    stopActive();
    store.open(id);
    renderList();
    renderConversation();
    ui.layout.classList.remove("sidebar-open");
    ui.prompt.focus();
  } else if (event.target.closest(".rename")) {
    startRename(item, id);
  } else if (event.target.closest(".delete")) {
    const del = event.target.closest(".delete");
    if (del.dataset.confirm !== "yes") {
      del.dataset.confirm = "yes";
      del.textContent = "Delete?";
      setTimeout(() => { if (del.isConnected) { del.dataset.confirm = ""; del.textContent = "✕"; } }, 4000);
      return;
    }
    if (id === store.currentId) stopActive();
    store.remove(id);
    renderList();
    renderConversation();
  }
});

function startRename(item, id) {
  const conversation = store.conversations.find((c) => c.id === id);
  const input = document.createElement("input");
  input.type = "text";
  input.className = "rename-input";
  input.value = conversation.title;
  input.setAttribute("aria-label", "Conversation name");
  item.querySelector(".open").replaceWith(input);
  input.focus();
  input.select();
  let finished = false;
  const finish = (keep) => {
    if (finished) return;
    finished = true;
    if (keep) store.rename(id, input.value);
    renderList();
    ui.list.querySelector(`li[data-id="${CSS.escape(id)}"] .rename`)?.focus();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    if (e.key === "Escape") { e.preventDefault(); e.stopPropagation(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
}

$("new-chat").addEventListener("click", () => {
  stopActive();
  const current = store.current;
  if (current.messages.length) store.create();
  renderList();
  renderConversation();
  ui.layout.classList.remove("sidebar-open");
  ui.prompt.focus();
});

ui.toggle.addEventListener("click", () => {
  const open = ui.layout.classList.toggle("sidebar-open");
  ui.toggle.setAttribute("aria-expanded", String(open));
});

// ---- models -------------------------------------------------------------------------------

async function loadModels() {
  let failure = null;
  const [listed, ready] = await Promise.all([
    loadCatalogue().catch((err) => {
      failure = err;
      return { groups: [], models: new Map(), note: "", unavailable: [] };
    }),
    loadReadiness(),
  ]);
  catalogue = listed;
  loaded = true;
  fillPicker(store.model);
  showAvailability(failure, ready);
  showModelInfo();
  showAttach();
}

/** The picker's options: each model once, only those matching the search; keeps `wanted`. */
function fillPicker(wanted) {
  ui.model.replaceChildren();
  for (const group of filterGroups(catalogue.groups, ui.modelSearch.value)) {
    const optgroup = document.createElement("optgroup");
    optgroup.label = group.label;
    for (const model of group.models) {
      const option = document.createElement("option");
      option.value = model.id;
      option.textContent = model.display_name ? `${model.display_name} (${model.id})` : model.id;
      optgroup.append(option);
    }
    ui.model.append(optgroup);
  }
  if (wanted && [...ui.model.options].some((o) => o.value === wanted)) ui.model.value = wanted;
}

/** A notice above the conversation when providers are missing; when no model is left, why. */
function showAvailability(failure, readiness) {
  const state = failure
    ? { blocking: true, title: "The model list could not be loaded, so messages cannot be sent.", reasons: [failure.message] }
    : availability(catalogue, readiness);
  ui.notice.hidden = !state;
  ui.model.disabled = !catalogue.models.size;
  ui.modelSearch.hidden = !catalogue.models.size;
  if (state) {
    ui.notice.classList.toggle("blocking", state.blocking);
    ui.notice.querySelector(".notice-title").textContent = state.title;
    const list = ui.notice.querySelector(".notice-reasons");
    list.replaceChildren(...state.reasons.map((reason) => {
      const item = document.createElement("li");
      item.textContent = reason;
      return item;
    }));
  }
  showSendable();
}

/** Why nothing can be sent right now, or "" when a message can be sent. */
function cannotSend() {
  if (!loaded) return "The model list is loading.";
  if (!catalogue.models.size) return "No model is available (see the notice above).";
  if (!ui.model.value) return "No model is chosen: clear the model search or pick one.";
  return "";
}

function showSendable() {
  const why = cannotSend();
  ui.send.disabled = Boolean(why);
  ui.send.title = why;
  ui.prompt.placeholder = catalogue.models.size || !loaded ? "Message" : "No model is available";
}

ui.noticeRetry.addEventListener("click", () => loadModels());

/** Whether the chosen model reads images (its catalogue categories include "vision"). */
function hasVision(id = ui.model.value) {
  return Boolean(catalogue.models.get(id)?.categories.includes("vision"));
}

function showAttach() {
  const vision = hasVision();
  ui.attach.hidden = !vision;
  ui.attachInput.disabled = !vision;
  ui.tray.classList.toggle("unreadable", !vision);
  if (!vision && attachments.list.length) note(NO_VISION, "vision");
  else if (vision && ui.composerNote.dataset.kind === "vision") note("");
}

function showModelInfo() {
  const query = ui.modelSearch.value.trim();
  const text = ui.model.value ? describe(catalogue.models.get(ui.model.value)) : query && catalogue.models.size ? `No model matches “${query}”.` : "";
  ui.modelInfo.textContent = [text, catalogue.note].filter(Boolean).join(" — ");
  showSendable();
}

ui.modelSearch.addEventListener("input", () => {
  const before = ui.model.value;
  fillPicker(before || store.model);
  if (ui.model.value && ui.model.value !== before) modelChanged();
  else showModelInfo();
});
ui.modelSearch.addEventListener("keydown", (event) => {
  if (event.key === "Enter") {
    event.preventDefault();
    ui.prompt.focus();
  } else if (event.key === "Escape" && ui.modelSearch.value) {
    event.preventDefault();
    event.stopPropagation();
    ui.modelSearch.value = "";
    ui.modelSearch.dispatchEvent(new Event("input"));
  }
});

ui.model.addEventListener("change", modelChanged);

function modelChanged() {
  store.model = ui.model.value;
  // The demo tools model only shows anything with a tool to call: offer the example one.
  if (ui.model.value === DEMO_TOOLS_MODEL && !ui.exampleTool.checked) {
    ui.exampleTool.checked = true;
    store.exampleTool = true;
  }
  showModelInfo();
  showAttach();
}

ui.exampleTool.checked = store.exampleTool;
ui.exampleTool.addEventListener("change", () => {
  store.exampleTool = ui.exampleTool.checked;
});

// ---- sending and streaming ---------------------------------------------------------------

function send(text, images) {
  if (active || !(text.trim() || images.length)) return;
  const conversation = store.current;
  const message = { role: "user", content: text };
  if (images.length) message.images = images;
  conversation.messages.push(message);
  const article = messageElement(conversation.messages.at(-1), conversation.messages.length - 1);
  ui.messages.append(article);
  answer(conversation);
}

/** Appends an assistant message to `conversation` and streams the answer into it. */
async function answer(conversation) {
  const model = ui.model.value;
  const messages = requestMessages(conversation.messages, { images: hasVision(model) });
  if (conversation.system?.trim()) messages.unshift({ role: "system", content: conversation.system });
  const request = { model, messages };
  if (ui.exampleTool.checked) request.tools = [EXAMPLE_TOOL];
  const message = { role: "assistant", content: "", reasoning: "", status: "streaming", model, meta: {} };
  conversation.messages.push(message);
  store.touch(conversation);
  renderList();
  ui.empty.hidden = true;
  const article = messageElement(message, conversation.messages.length - 1);
  ui.messages.append(article);
  refreshLastActions();
  const current = { message, article, renderer: streamInto(article), conversation, stream: null };
  active = current;
  setBusy(true);
  scrollToEnd(true);
  current.stream = await transport.start(request, follow(current));
}

/**
 * Continues the open conversation's last answer, left streaming by a page that went away,
 * from the last event it saved: the text saved is exactly the text up to `resume.seq`.
 */
function resumeAnswer(conversation, message) {
  const index = conversation.messages.length - 1;
  const article = ui.messages.querySelector(`article.assistant[data-index="${index}"]`);
  const current = { message, article, renderer: streamInto(article), conversation, stream: null };
  current.renderer.set(message.content);
  current.renderer.flush();
  message.reconnecting = true;
  updateAssistant(article, message);
  active = current;
  setBusy(true);
  scrollToEnd(true);
  current.stream = transport.resume(message.resume, follow(current));
}

/** The callbacks that render a stream into its message and keep the message saved. */
function follow({ message, article, renderer, conversation }) {
  return {
    onStarted({ stream_id: streamId }) {
      // Saved at once, so that even a reload before the first token resumes the answer.
      message.resume = { stream_id: streamId, seq: null };
      store.save();
    },
    onDelta({ text, reasoning, refusal, tool_calls: fragments, seq }) {
      if (message.reconnecting) {
        delete message.reconnecting;
        updateAssistant(article, message);
      }
      if (reasoning) {
        message.reasoning += reasoning;
        updateAssistant(article, message);
      }
      if (refusal) {
        message.refusal = (message.refusal || "") + refusal;
        updateAssistant(article, message);
      }
      if (Array.isArray(fragments)) {
        const first = !message.tool_calls;
        message.tool_calls = mergeToolCalls(message.tool_calls || [], fragments);
        if (first) updateAssistant(article, message);
        else renderToolCalls(article, message);
      }
      if (text) {
        const first = !message.content;
        message.content += text;
        renderer.set(message.content);
        if (first) updateAssistant(article, message);
      }
      // The text and the seq it ends at change together, so any saved copy resumes exactly.
      if (message.resume && seq != null) message.resume.seq = seq;
      store.saveAnswerSoon(conversation, message);
      scrollToEnd();
    },
    onReconnecting() {
      if (message.reconnecting) return;
      message.reconnecting = true;
      updateAssistant(article, message);
    },
    onResumed() {
      if (!message.reconnecting) return;
      delete message.reconnecting;
      updateAssistant(article, message);
    },
    onDone(frame) {
      const seconds = frame.firstAt != null ? (frame.endedAt - frame.firstAt) / 1000 : 0;
      const tokens = frame.usage?.completion_tokens;
      settle(message);
      message.status = frame.finish_reason === "cancelled" ? "stopped" : "done";
      message.model = frame.model || message.model;
      message.meta = {
        finish_reason: frame.finish_reason,
        ttft_ms: frame.ttft_ms,
        completion_tokens: tokens ?? null,
        // A resumed answer's tokens came partly before this page's clock started.
        tps: !frame.resumed && tokens > 1 && seconds > 0 ? tokens / seconds : null,
        cached: frame.cached === true,
        transport: frame.transport,
        resumed: frame.resumed === true,
      };
      const calls = message.tool_calls?.length;
      finish(message.status === "stopped" ? "Answer stopped." : calls ? "The model called a tool; its result is asked for below the call." : "Answer complete.");
    },
    onError(error) {
      settle(message);
      message.status = "error";
      message.error = {
        code: error.code, status: error.status, message: error.message,
        retry_after: error.retry_after, request_id: error.request_id, resume_failed: error.resume_failed,
      };
      finish(error.resume_failed ? "The rest of the answer could not be fetched." : "The answer failed.");
    },
  };
}

/** An answer that has ended needs no resume. */
function settle(message) {
  delete message.resume;
  delete message.reconnecting;
}

function finish(announcement) {
  const { renderer, conversation } = active;
  renderer.flush();
  active = null;
  store.touch(conversation);
  if (conversation === store.current) {
    // A reader following the answer also sees what finishing adds (such as the tool result form).
    const following = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 120;
    refreshLastActions();
    if (following) scrollToEnd(true);
  }
  setBusy(false);
  ui.announcer.textContent = announcement;
}

function stopActive() {
  if (active?.stream) transport.stop(active.stream);
}

function setBusy(busy) {
  showSendable();
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.messages.setAttribute("aria-busy", String(busy));
  if (busy && document.activeElement === ui.send) ui.stop.focus();
  if (!busy && document.activeElement === ui.stop) ui.prompt.focus();
}

function scrollToEnd(force = false) {
  const gap = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight;
  if (force || gap < 120) ui.messages.scrollTop = ui.messages.scrollHeight;
}

// Regenerate / retry / edit / copy: one delegated handler for every message.
ui.messages.addEventListener("click", (event) => {
  // A reader who opens or closes the reasoning decides from then on, streaming or not.
  const summary = event.target.closest(".reasoning > summary");
  if (summary) summary.parentElement.dataset.touched = "yes";
  const target = event.target.closest("[data-action]");
  if (!target) return;
  const article = target.closest("article.message");
  const index = Number(article?.dataset.index);
  const conversation = store.current;
  switch (target.dataset.action) {
    case "copy-answer": {
      const text = conversation.messages[index]?.content ?? "";
      navigator.clipboard?.writeText(text).then(() => { target.textContent = "Copied"; }, () => { target.textContent = "Copy failed"; });
      setTimeout(() => { target.textContent = "Copy"; }, 1500);
      break;
    }
    case "copy-code": {
      const code = target.closest(".code")?.querySelector("code")?.textContent ?? "";
      navigator.clipboard?.writeText(code).then(() => { target.textContent = "Copied"; }, () => { target.textContent = "Copy failed"; });
      setTimeout(() => { target.textContent = "Copy"; }, 1500);
      break;
    }
    case "regenerate":
    case "retry":
      if (active) return;
      conversation.messages.splice(index);
      renderConversation();
      answer(conversation);
      break;
    case "edit":
      if (!active) startEdit(article, index);
      break;
    case "zoom-image":
      target.setAttribute("aria-pressed", String(target.getAttribute("aria-pressed") !== "true"));
      break;
    default:
      break;
  }
});

function startEdit(article, index) {
  const conversation = store.current;
  const { content: original, images } = conversation.messages[index];
  const form = document.createElement("form");
  form.className = "edit";
  const area = document.createElement("textarea");
  area.value = original;
  area.setAttribute("aria-label", "Edit message");
  const save = document.createElement("button");
  save.type = "submit";
  save.className = "primary";
  save.textContent = "Send";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.textContent = "Cancel";
  form.append(area, save, cancel);
  article.querySelector(".content").replaceWith(form);
  article.querySelector(".actions").hidden = true;
  area.focus();
  const submit = () => {
    if (active || !(area.value.trim() || images?.length)) return;
    conversation.messages.splice(index);
    conversation.messages.push(images?.length ? { role: "user", content: area.value, images } : { role: "user", content: area.value });
    renderConversation();
    answer(conversation);
  };
  form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
    if (e.key === "Escape") { e.preventDefault(); e.stopPropagation(); renderConversation(); }
  });
  cancel.addEventListener("click", () => renderConversation());
}

// ---- composer and keys ----------------------------------------------------------------------

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value;
  if (active || !(text.trim() || attachments.list.length)) return;
  if (cannotSend()) {
    note(cannotSend());
    return;
  }
  if (attachments.list.length && !hasVision()) {
    note(NO_VISION, "vision");
    return;
  }
  ui.prompt.value = "";
  autosize();
  note("");
  send(text, attachments.take());
});

// ---- system prompt and export ---------------------------------------------------------------

function showSystemState() {
  const text = (store.current.system || "").replace(/\s+/g, " ").trim();
  ui.systemState.textContent = text ? `— ${text.length > 48 ? `${text.slice(0, 48)}…` : text}` : "— none";
  ui.system.classList.toggle("set", Boolean(text));
}

ui.systemPrompt.addEventListener("input", () => {
  store.current.system = ui.systemPrompt.value;
  store.save();
  showSystemState();
});

$("export-md").addEventListener("click", () => {
  download(store.current, "md", toMarkdown(store.current));
  ui.exportMenu.open = false;
});
$("export-json").addEventListener("click", () => {
  download(store.current, "json", toJSON(store.current));
  ui.exportMenu.open = false;
});
// The menu closes like any menu: a click elsewhere, or Escape.
document.addEventListener("click", (event) => {
  if (ui.exportMenu.open && !ui.exportMenu.contains(event.target)) ui.exportMenu.open = false;
});
ui.exportMenu.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && ui.exportMenu.open) {
    event.preventDefault();
    event.stopPropagation();
    ui.exportMenu.open = false;
    ui.exportMenu.querySelector("summary").focus();
  }
});

// ---- tool results -------------------------------------------------------------------------

/** Sends what the user typed as each pending call's result, then asks the model to go on. */
function sendToolResults(form) {
  if (active) return;
  const areas = [...form.querySelectorAll("textarea")];
  const empty = areas.find((a) => !a.value.trim());
  if (empty) {
    empty.focus();
    return;
  }
  const conversation = store.current;
  for (const area of areas) {
    conversation.messages.push({ role: "tool", tool_call_id: area.dataset.callId, name: area.dataset.name, content: area.value });
  }
  renderConversation();
  ui.prompt.focus();
  answer(conversation);
}

ui.messages.addEventListener("submit", (event) => {
  const form = event.target.closest("form.tool-reply-form");
  if (!form) return;
  event.preventDefault();
  sendToolResults(form);
});

ui.messages.addEventListener("keydown", (event) => {
  const form = event.target.closest?.("form.tool-reply-form");
  if (form && event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    sendToolResults(form);
  }
});

// ---- attachments --------------------------------------------------------------------------

function note(text, kind = "") {
  ui.composerNote.textContent = text;
  ui.composerNote.dataset.kind = kind;
  ui.composerNote.hidden = !text;
}

const attachments = wireAttachments({
  button: ui.attach, input: ui.attachInput, tray: ui.tray, prompt: ui.prompt, dropZone: ui.composer,
  canAttach: () => hasVision(),
  note,
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

function autosize() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 240)}px`;
}
ui.prompt.addEventListener("input", autosize);

ui.stop.addEventListener("click", stopActive);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && active) {
    event.preventDefault();
    stopActive();
  }
});

// ---- start --------------------------------------------------------------------------------

/**
 * Answers left streaming by a page that went away: the open conversation's last one goes on
 * where it was (returned here), when the gateway named its stream; any other is interrupted.
 */
function unfinishedAnswer() {
  let found = null;
  for (const conversation of store.conversations) {
    for (const [i, message] of conversation.messages.entries()) {
      if (message.status !== "streaming") continue;
      const last = i === conversation.messages.length - 1;
      if (!found && last && conversation === store.current && message.resume?.stream_id) {
        found = { conversation, message };
      } else {
        settle(message);
        message.status = "interrupted";
      }
    }
  }
  return found;
}

// The page can go away at any moment: what streamed so far is saved with the seq it ends at.
addEventListener("pagehide", () => store.flush());

const unfinished = unfinishedAnswer();
store.save();
renderList();
renderConversation();
loadModels();
if (unfinished) resumeAnswer(unfinished.conversation, unfinished.message);
ui.prompt.focus();
