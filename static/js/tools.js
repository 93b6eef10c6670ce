// Tool calls and what a request sends: the example tool the page can offer, merging streamed
// call fragments, which calls of a conversation have been answered, and the history as
// Chat Completions messages (with the images that fit).
//
// The page runs no tools. A call is answered by the user typing its result, which is sent as a
// `tool` message; a call left unanswered (the user wrote a new message instead, or the answer
// was stopped mid-call) is left out of the history sent with later requests, so every request
// stays valid: an assistant turn with `tool_calls` is always followed by a result for each call.

// The characters of data URLs one request carries at most: the gateway counts inline images
// against `[limits] max_chars` (1 000 000 by default), and text needs room too.
export const IMAGE_BUDGET = 900_000;

/** The built-in example tool, offered when the toolbar's "Example tool" box is checked. */
export const EXAMPLE_TOOL = {
  type: "function",
  function: {
    name: "get_weather",
    description: "The current weather in a city.",
    parameters: {
      type: "object",
      properties: {
        city: { type: "string", description: "The city's name, e.g. Lisbon." },
        unit: { type: "string", enum: ["celsius", "fahrenheit"] },
      },
      required: ["city"],
    },
  },
};

/** The model id that calls any tool it is given, so picking it turns the example tool on. */
export const DEMO_TOOLS_MODEL = "demo/tools";

/**
 * Merges streamed `tool_calls` fragments (OpenAI's delta shape) into `calls`, the message's
 * OpenAI-shaped list: the first fragment of an `index` brings its id and name, later ones add
 * pieces of the JSON `arguments`.
 */
export function mergeToolCalls(calls, fragments) {
  for (const fragment of fragments) {
    if (!fragment || typeof fragment !== "object") continue;
    const index = Number.isInteger(fragment.index) ? fragment.index : calls.length;
    calls[index] ??= { id: "", type: "function", function: { name: "", arguments: "" } };
    const call = calls[index];
    if (typeof fragment.id === "string" && fragment.id) call.id = fragment.id;
    const fn = fragment.function || {};
    if (typeof fn.name === "string" && fn.name) call.function.name = fn.name;
    if (typeof fn.arguments === "string") call.function.arguments += fn.arguments;
  }
  return calls;
}

/** JSON text pretty-printed when it parses, else the text as it is. */
export function pretty(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

/** The assistant message's calls that can be answered: complete, with an id and a name. */
export function completeCalls(message) {
  const calls = (message.tool_calls || []).filter(Boolean);
  if (!calls.length || message.status !== "done") return null;
  return calls.every((c) => c.id && c.function?.name) ? calls : null;
}

/**
 * The state of the calls in `messages[index]`: "none" (no calls), "streaming", "incomplete"
 * (stopped or cut off mid-call), "pending" (last message, waiting for the user's results),
 * "answered" (every call has a result right after it), or "skipped" (the conversation went on
 * without results).
 */
export function callState(messages, index) {
  const message = messages[index];
  if (!message?.tool_calls?.length) return "none";
  if (message.status === "streaming") return "streaming";
  const calls = completeCalls(message);
  if (!calls) return "incomplete";
  if (index === messages.length - 1) return "pending";
  return answeredBy(messages, index, calls) ? "answered" : "skipped";
}

/** Whether the `tool` messages right after `messages[index]` answer every one of `calls`. */
function answeredBy(messages, index, calls) {
  const answered = new Set();
  for (let i = index + 1; i < messages.length && messages[i].role === "tool"; i += 1) {
    answered.add(messages[i].tool_call_id);
  }
  return calls.every((c) => answered.has(c.id));
}

const NOT_READ = "[an image this model cannot read]";
const LEFT_OUT = "[an earlier image, left out to keep the request small]";

function userContent(message, images, keep) {
  const urls = images ? message.images || [] : [];
  if (!urls.length) return message.content || (message.images?.length ? NOT_READ : "");
  const parts = message.content ? [{ type: "text", text: message.content }] : [];
  for (const [i, url] of urls.entries()) {
    if (keep?.has(i)) parts.push({ type: "image_url", image_url: { url, detail: "auto" } });
    else parts.push({ type: "text", text: LEFT_OUT });
  }
  return parts;
}

/** Which images (message -> set of indexes) fit in IMAGE_BUDGET characters, newest first. */
function imagesToSend(messages) {
  let left = IMAGE_BUDGET;
  const keep = new Map();
  for (const m of [...messages].reverse()) {
    if (m.role !== "user" || !m.images?.length) continue;
    const indexes = new Set();
    for (const [i, url] of m.images.entries()) {
      if (url.length <= left) {
        left -= url.length;
        indexes.add(i);
      }
    }
    keep.set(m, indexes);
  }
  return keep;
}

/**
 * The conversation as Chat Completions messages. Answered tool calls go with their results;
 * unanswered ones, and results of calls that are left out, are not sent. A refusal is sent
 * as the assistant's text. `images: false` (a model without vision) leaves images out; so does
 * an image that would take the request's images over IMAGE_BUDGET characters, oldest first.
 */
export function requestMessages(messages, { images = true } = {}) {
  const out = [];
  const kept = new Set();
  const keep = imagesToSend(messages);
  for (const [i, m] of messages.entries()) {
    if (m.role === "user") {
      out.push({ role: "user", content: userContent(m, images, keep.get(m)) });
    } else if (m.role === "assistant") {
      const text = m.content || m.refusal || "";
      if (callState(messages, i) === "answered") {
        const calls = completeCalls(m).map((c) => ({ id: c.id, type: "function", function: { name: c.function.name, arguments: c.function.arguments } }));
        for (const c of calls) kept.add(c.id);
        out.push({ role: "assistant", content: text || null, tool_calls: calls });
      } else if (text) {
        out.push({ role: "assistant", content: text });
      }
    } else if (m.role === "tool" && kept.has(m.tool_call_id)) {
      out.push({ role: "tool", tool_call_id: m.tool_call_id, content: m.content });
    }
  }
  return out;
}
