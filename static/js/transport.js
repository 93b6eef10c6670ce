// Streams answers over the WebSocket protocol v1 (/api/ws), or over SSE when no socket opens.
//
// A request is sent once, on one transport, and never again by this module. Answers are
// resumable streams: when the connection drops mid-answer (or the page reloads), the page
// re-attaches to the same stream, over the socket (`chat.resume`) or over SSE (GET …/stream),
// after the last sequence number it rendered, so the answer goes on with nothing missing or
// repeated. Attempts back off and stop after RESUME_WINDOW_MS, the gateway's default grace.
// Stop is `chat.cancel` (or POST …/cancel), which stops the upstream at once; a drop is not a
// stop. The socket itself is reopened with jittered exponential backoff.

import { apiFetch, socketProtocols } from "./auth.js";
import { Stream, clientId } from "./stream.js";
import { postStream, resumeStream, cancelStream, streamIdOf, errorOf, follow } from "./sse.js";

const OPEN_TIMEOUT_MS = 4000;
const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 15000;
const PING_EVERY_MS = 25000;
const RESUME_WINDOW_MS = 30000; // the gateway keeps a detached stream this long by default
const RESUME_BACKOFF_MAX_MS = 8000;
const STOP_WAIT_MS = 2000; // a cancelled stream the socket does not end by then ends here

// Resume failures that another attempt will not mend.
const FINAL_RESUME_CODES = new Set(["stream_not_found", "journal_truncated", "journal_unavailable", "invalid_request"]);

// The gateway's default `websocket.max_frame_bytes` (1 MiB), with room to spare.
const MAX_FRAME_BYTES = 1000 * 1000;

function frameFits(text) {
  return text.length * 3 <= MAX_FRAME_BYTES || new TextEncoder().encode(text).length <= MAX_FRAME_BYTES;
}

function jittered(ceiling) {
  return ceiling / 2 + Math.random() * (ceiling / 2); // no thundering herd
}

const LOST = { code: "connection_lost", message: "The connection to the gateway was lost during the answer." };

export class Transport {
  constructor({ onStatus }) {
    this.onStatus = onStatus;
    this.socket = null;
    this.opened = null; // Promise<boolean>: whether the current socket opened
    this.waiters = []; // resolved with the outcome of the next socket attempt
    this.streams = new Map(); // client id -> Stream attached over the socket
    this.failures = 0;
    this.reconnectTimer = 0;
    this.pingTimer = 0;
    this.mode = "connecting";
    // A page going away drops its connections: that is no reason to end its answers, which the
    // next load resumes from what was saved.
    this.unloading = false;
    addEventListener("pagehide", () => { this.unloading = true; });
    addEventListener("pageshow", () => { this.unloading = false; });
    this.waiting = new Set(); // streams between two attempts to re-attach
    addEventListener("online", () => this.retryNow());
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
    const waiters = this.waiters.splice(0);
    let socket;
    try {
      socket = new WebSocket(url, socketProtocols());
    } catch {
      this.opened = Promise.resolve(false);
      for (const resolve of waiters) resolve(false);
      this.scheduleReconnect();
      return;
    }
    this.socket = socket;
    this.opened = new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), OPEN_TIMEOUT_MS);
      socket.addEventListener("open", () => { clearTimeout(timer); resolve(true); });
      socket.addEventListener("close", () => { clearTimeout(timer); resolve(false); });
    });
    this.opened.then((opened) => { for (const resolve of waiters) resolve(opened); });
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
    const attached = [...this.streams.values()];
    this.streams.clear();
    this.scheduleReconnect();
    for (const stream of attached) this.lost(stream, LOST);
  }

  scheduleReconnect() {
    this.failures += 1;
    const delay = jittered(Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (this.failures - 1)));
    this.status("sse", `WebSocket unavailable; retrying in ${Math.ceil(delay / 1000)} s`);
    this.reconnectTimer = setTimeout(() => this.connect(), delay);
  }

  /** Whether a socket is open now, or opens at the next attempt when it just dropped. */
  socketReady() {
    if (this.socket?.readyState === WebSocket.OPEN) return Promise.resolve(true);
    if (this.socket) return this.opened;
    if (this.failures > 1) return Promise.resolve(false); // it keeps failing: SSE it is
    return new Promise((resolve) => this.waiters.push(resolve));
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
    if (!stream) return; // pong, cancel.ignored, or an attachment this page has left
    switch (frame.type) {
      case "chat.started":
        stream.attaching = false;
        stream.started(frame.stream_id);
        if (frame.resumed) stream.reattached();
        break;
      case "chat.delta":
        if (this.inOrder(stream, frame.seq)) {
          stream.delta({ text: frame.text, reasoning: frame.reasoning, refusal: frame.refusal, tool_calls: frame.tool_calls }, frame.seq);
        }
        break;
      case "chat.done":
        if (this.inOrder(stream, frame.seq)) stream.done(frame);
        break;
      case "chat.error":
        // A resume the gateway refused (seq 0, before `chat.started`): the stream is not there.
        if (stream.attaching) stream.error({ ...frame.error, resume_failed: true });
        else if (this.inOrder(stream, frame.seq)) stream.error(frame.error || {});
        break;
      case "error":
        stream.error({ code: frame.code, message: frame.message });
        break;
      default:
        break;
    }
  }

  /** Whether the frame `seq` is the next one; a gap re-attaches after the last one rendered. */
  inOrder(stream, seq) {
    const place = stream.place(seq);
    if (place === "gap") this.lost(stream, LOST);
    return place === "next";
  }

  /** Start an answer; returns the Stream (call `transport.stop(stream)` to stop it). */
  async start(request, handlers) {
    const stream = new Stream(handlers);
    const open = this.socket && (await this.opened);
    const frame = JSON.stringify({ type: "chat.start", id: stream.id, request, resumable: true });
    // A frame over the socket's size limit would close the socket (1009): large requests, such
    // as conversations with images, go over SSE, whose body limit is larger.
    if (open && frameFits(frame)) {
      this.attachSocket(stream);
      if (this.sendText(frame)) return stream;
      stream.detach();
    }
    this.startSse(stream, request);
    return stream;
  }

  /** Follow a stream started earlier (by a page since reloaded) from after `seq`. */
  resume({ stream_id: streamId, seq }, handlers) {
    const stream = new Stream(handlers, { streamId, seq: Number.isInteger(seq) ? seq : -1 });
    stream.lostAt = performance.now();
    this.attach(stream);
    return stream;
  }

  attachSocket(stream) {
    const id = stream.id;
    stream.transport = "websocket";
    this.streams.set(id, stream);
    stream.detach = () => this.streams.delete(id);
  }

  startSse(stream, request) {
    const abort = new AbortController();
    stream.transport = "sse";
    stream.detach = () => abort.abort();
    const body = { ...request, stream: true, stream_options: { include_usage: true } };
    const run = async () => {
      const response = await postStream(body, abort.signal);
      if (!response.ok) return stream.error(await errorOf(response));
      stream.started(streamIdOf(response));
      return this.followed(stream, await follow(response, stream, { model: request.model }));
    };
    run().catch((err) => {
      if (abort.signal.aborted) return;
      this.lost(stream, stream.streamId ? LOST : { code: "network", message: `The gateway could not be reached (${err.message || err}).` });
    });
  }

  followed(stream, outcome) {
    if (outcome === "gap") this.lost(stream, LOST);
    if (outcome === "cut") this.lost(stream, { code: "connection_lost", message: "The stream ended before the answer was complete." });
  }

  /** The connection under `stream` went away: re-attach with backoff, or end it. */
  lost(stream, reason) {
    if (stream.ended || this.unloading) return;
    stream.detach();
    stream.detach = () => {};
    if (stream.stopping) {
      this.stopped(stream);
      return;
    }
    if (stream.streamId === null) {
      stream.error(reason); // not resumable: never sent again
      return;
    }
    stream.lostAt ??= performance.now();
    if (performance.now() - stream.lostAt > RESUME_WINDOW_MS) {
      stream.error({ ...reason, message: `${reason.message} Reconnecting failed for ${RESUME_WINDOW_MS / 1000} s.` });
      return;
    }
    stream.attempts += 1;
    stream.handlers.onReconnecting?.();
    const delay = stream.attempts === 1 ? 0 : jittered(Math.min(RESUME_BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (stream.attempts - 2)));
    this.waiting.add(stream);
    stream.retryTimer = setTimeout(() => this.attach(stream), delay);
  }

  /** The network is back: streams waiting to re-attach try now rather than at their timer. */
  retryNow() {
    for (const stream of this.waiting) {
      clearTimeout(stream.retryTimer);
      this.attach(stream);
    }
  }

  /** Re-attach to `stream` after its last rendered seq, over the socket if one opens. */
  async attach(stream) {
    this.waiting.delete(stream);
    if (stream.ended) return;
    stream.resumed = true;
    // Every other retry goes over SSE: a socket that opens but drops again must not hold it up.
    const viaSse = stream.attempts > 0 && stream.attempts % 2 === 0;
    const open = !viaSse && (await this.socketReady());
    if (stream.ended || stream.stopping) return;
    if (open) {
      stream.id = clientId(); // frames of an attachment this page left are ignored by id
      const frame = { type: "chat.resume", id: stream.id, stream_id: stream.streamId };
      if (stream.seq >= 0) frame.after = stream.seq;
      stream.attaching = true;
      this.attachSocket(stream);
      if (this.send(frame)) return;
      stream.detach();
    }
    this.resumeSse(stream);
  }

  resumeSse(stream) {
    const abort = new AbortController();
    stream.transport = "sse";
    stream.detach = () => abort.abort();
    const run = async () => {
      const response = await resumeStream(stream.streamId, stream.seq, abort.signal);
      if (!response.ok) {
        const error = await errorOf(response);
        if (FINAL_RESUME_CODES.has(error.code)) return stream.error({ ...error, resume_failed: true });
        return this.lost(stream, LOST);
      }
      stream.reattached();
      return this.followed(stream, await follow(response, stream, { model: null }));
    };
    run().catch(() => {
      if (!abort.signal.aborted) this.lost(stream, LOST);
    });
  }

  /** Stop `stream` at once: the gateway closes its upstream, the partial answer stays. */
  stop(stream) {
    if (!stream || stream.ended || stream.stopping) return;
    stream.stopping = true;
    clearTimeout(stream.retryTimer);
    this.waiting.delete(stream);
    if (stream.transport === "websocket" && this.streams.has(stream.id) && this.send({ type: "chat.cancel", id: stream.id })) {
      // The gateway answers with `chat.done` (cancelled); should the socket not, end here.
      setTimeout(() => this.stopped(stream), STOP_WAIT_MS);
      return;
    }
    this.stopped(stream);
  }

  stopped(stream) {
    if (stream.ended) return;
    if (stream.streamId) cancelStream(stream.streamId);
    stream.done({ finish_reason: "cancelled", usage: null, ttft_ms: null, model: null });
  }
}
