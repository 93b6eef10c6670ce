// Streams answers over the WebSocket protocol v1 (/api/ws), or over SSE when no socket opens.
//
// A request is sent once, on one transport, and never again by this module: when a socket
// drops mid-answer the answer ends as "interrupted" and the user decides whether to retry.
// The socket itself is reopened with jittered exponential backoff.

import { apiFetch, socketProtocols } from "./auth.js";

const OPEN_TIMEOUT_MS = 4000;
const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 15000;
const PING_EVERY_MS = 25000;

// The gateway's default `websocket.max_frame_bytes` (1 MiB), with room to spare.
const MAX_FRAME_BYTES = 1000 * 1000;

function frameFits(text) {
  return text.length * 3 <= MAX_FRAME_BYTES || new TextEncoder().encode(text).length <= MAX_FRAME_BYTES;
}

let nextId = 0;
function streamId() {
  nextId += 1;
  return `s${Date.now().toString(36)}-${nextId}`;
}

/**
 * A stream's callbacks: onDelta({text, reasoning, refusal, tool_calls}) (tool_calls in OpenAI's
 * streamed delta shape: fragments to merge by `index`), onDone({finish_reason, usage, ttft_ms,
 * model, cached}), onError({message, type, code, status, retry_after, request_id}). Exactly one
 * of onDone/onError is called, once.
 */
class Stream {
  constructor(handlers) {
    this.id = streamId();
    this.handlers = handlers;
    this.ended = false;
    this.startedAt = performance.now();
    this.firstAt = null;
    this.transport = null;
    this.cancel = () => {};
  }

  delta(part) {
    if (this.ended) return;
    if (this.firstAt === null) this.firstAt = performance.now();
    this.handlers.onDelta(part);
  }

  done(frame) {
    if (this.ended) return;
    this.ended = true;
    const ttft = frame.ttft_ms ?? (this.firstAt === null ? null : this.firstAt - this.startedAt);
    this.handlers.onDone({ ...frame, ttft_ms: ttft, firstAt: this.firstAt, endedAt: performance.now(), transport: this.transport });
  }

  error(error) {
    if (this.ended) return;
    this.ended = true;
    this.handlers.onError(error);
  }
}

export class Transport {
  constructor({ onStatus }) {
    this.onStatus = onStatus;
    this.socket = null;
    this.opened = null; // Promise<boolean>: whether the current socket opened
    this.streams = new Map();
    this.failures = 0;
    this.reconnectTimer = 0;
    this.pingTimer = 0;
    this.mode = "connecting";
    this.connect();
  }

  status(mode, detail = "") {
    this.mode = mode;
    this.onStatus(mode, detail);
  }

  connect() {
    clearTimeout(this.reconnectTimer);
    const url = new URL("api/ws", location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    let socket;
    try {
      socket = new WebSocket(url, socketProtocols());
    } catch {
      this.opened = Promise.resolve(false);
      this.scheduleReconnect();
      return;
    }
    this.socket = socket;
    this.opened = new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), OPEN_TIMEOUT_MS);
      socket.addEventListener("open", () => { clearTimeout(timer); resolve(true); });
      socket.addEventListener("close", () => { clearTimeout(timer); resolve(false); });
    });
    socket.addEventListener("open", () => {
      this.failures = 0;
      this.status("websocket");
      this.pingTimer = setInterval(() => this.send({ type: "ping" }), PING_EVERY_MS);
    });
    socket.addEventListener("message", (event) => this.receive(event.data));
    socket.addEventListener("close", () => this.dropped(socket));
    // A handshake refused for a missing or wrong key cannot be read by the page: ask over HTTP,
    // which prompts for a key when that is the reason; the next reconnect then offers it.
    this.opened.then((opened) => {
      if (!opened) apiFetch("api/models", { headers: { accept: "application/json" } }).catch(() => {});
    });
  }

  dropped(socket) {
    if (socket !== this.socket) return;
    clearInterval(this.pingTimer);
    this.socket = null;
    for (const stream of this.streams.values()) {
      stream.error({ code: "connection_lost", message: "The connection to the gateway was lost during the answer." });
    }
    this.streams.clear();
    this.scheduleReconnect();
  }

  scheduleReconnect() {
    this.failures += 1;
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (this.failures - 1));
    const delay = ceiling / 2 + Math.random() * (ceiling / 2); // jitter: no thundering herd
    this.status("sse", `WebSocket unavailable; retrying in ${Math.ceil(delay / 1000)} s`);
    this.reconnectTimer = setTimeout(() => this.connect(), delay);
  }

  send(frame) {
    return this.sendText(JSON.stringify(frame));
  }

  sendText(text) {
    if (this.socket?.readyState !== WebSocket.OPEN) return false;
    this.socket.send(text);
    return true;
  }

  receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    const stream = typeof frame.id === "string" ? this.streams.get(frame.id) : undefined;
    switch (frame.type) {
      case "chat.delta":
        stream?.delta({ text: frame.text, reasoning: frame.reasoning, refusal: frame.refusal, tool_calls: frame.tool_calls });
        break;
      case "chat.done":
        this.streams.delete(frame.id);
        stream?.done(frame);
        break;
      case "chat.error":
        this.streams.delete(frame.id);
        stream?.error(frame.error || {});
        break;
      case "error":
        if (stream) {
          this.streams.delete(frame.id);
          stream.error({ code: frame.code, message: frame.message });
        }
        break;
      default: // pong, cancel.ignored
        break;
    }
  }

  /** Start an answer; returns the Stream (call `stream.cancel()` to stop it). */
  async start(request, handlers) {
    const stream = new Stream(handlers);
    const open = this.socket && (await this.opened);
    const frame = JSON.stringify({ type: "chat.start", id: stream.id, request });
    // A frame over the socket's size limit would close the socket (1009): large requests, such
    // as conversations with images, go over SSE, whose body limit is larger.
    if (open && frameFits(frame) && this.sendText(frame)) {
      stream.transport = "websocket";
      this.streams.set(stream.id, stream);
      stream.cancel = () => this.send({ type: "chat.cancel", id: stream.id });
    } else {
      stream.transport = "sse";
      this.startSse(stream, request);
    }
    return stream;
  }

  startSse(stream, request) {
    const abort = new AbortController();
    stream.cancel = () => {
      abort.abort();
      stream.done({ finish_reason: "cancelled", usage: null, ttft_ms: null, model: request.model });
    };
    const body = { ...request, stream: true, stream_options: { include_usage: true } };
    streamSse(body, stream, abort.signal).catch((err) => {
      if (abort.signal.aborted) return;
      stream.error({ code: "network", message: `The gateway could not be reached (${err.message || err}).` });
    });
  }
}

async function streamSse(body, stream, signal) {
  const response = await apiFetch("api/chat/completions", {
    method: "POST",
    headers: { "content-type": "application/json", accept: "text/event-stream" },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) {
    let error = { message: `HTTP ${response.status}`, status: response.status };
    try {
      error = { status: response.status, ...(await response.json()).error };
    } catch {
      // Not our JSON error shape; keep the status.
    }
    const header = response.headers.get("retry-after");
    if (error.retry_after == null && header) error.retry_after = Number(header);
    stream.error(error);
    return;
  }
  // A replayed cached answer says so in a header (the WebSocket says it in `chat.done`).
  const cached = response.headers.get("x-tokenrelay-cache") === "hit";
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let finish = null;
  let usage = null;
  let chunk0Model = null; // the model that answered (a fallback may answer for another)
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue; // a keepalive comment
      if (data === "[DONE]") {
        stream.done({ finish_reason: finish || "stop", usage, ttft_ms: null, model: chunk0Model || body.model, cached });
        return;
      }
      const chunk = JSON.parse(data);
      if (typeof chunk.model === "string") chunk0Model = chunk.model;
      if (chunk.error) {
        stream.error(chunk.error);
        return;
      }
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (choice?.delta?.reasoning_content) stream.delta({ reasoning: choice.delta.reasoning_content });
      if (choice?.delta?.content) stream.delta({ text: choice.delta.content });
      if (choice?.delta?.refusal) stream.delta({ refusal: choice.delta.refusal });
      if (Array.isArray(choice?.delta?.tool_calls)) stream.delta({ tool_calls: choice.delta.tool_calls });
      if (choice?.finish_reason) finish = choice.finish_reason;
    }
  }
  // The body ended without [DONE]: the answer is incomplete.
  stream.error({ code: "connection_lost", message: "The stream ended before the answer was complete." });
}
