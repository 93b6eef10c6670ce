// One answer as the page follows it: its callbacks, the gateway's stream id, and the last
// sequence number it rendered, which is where a resume picks up.

let nextId = 0;

/** A fresh client id for a `chat.start` or `chat.resume` on this page. */
export function clientId() {
  nextId += 1;
  return `s${Date.now().toString(36)}-${nextId}`;
}

/**
 * A stream's callbacks: onStarted({stream_id}) once the gateway named a resumable stream;
 * onDelta({text, reasoning, refusal, tool_calls, seq}) (tool_calls in OpenAI's streamed delta
 * shape: fragments to merge by `index`; `seq` the event's sequence number, null when the stream
 * has none); onReconnecting() when the connection dropped and the page is re-attaching,
 * onResumed() once it is attached again; onDone({finish_reason, usage, ttft_ms, model, cached,
 * resumed}), onError({message, type, code, status, retry_after, request_id, resume_failed}).
 * Exactly one of onDone/onError is called, once.
 */
export class Stream {
  constructor(handlers, { streamId = null, seq = -1 } = {}) {
    this.id = clientId(); // the client id of the current attachment (WebSocket frames)
    this.handlers = handlers;
    this.streamId = streamId; // the gateway's id, known for resumable streams
    this.seq = seq; // the last sequence number rendered; -1 before the first
    this.resumed = streamId !== null;
    this.ended = false;
    this.stopping = false;
    this.attaching = false; // a `chat.resume` sent and not yet answered by `chat.started`
    this.startedAt = performance.now();
    this.firstAt = null;
    this.transport = null;
    this.lostAt = null; // when the current run of reconnect attempts began
    this.attempts = 0;
    this.retryTimer = 0;
    this.detach = () => {}; // leaves the current attachment without cancelling the stream
  }

  started(streamId) {
    if (this.streamId === null && typeof streamId === "string" && streamId) {
      this.streamId = streamId;
      this.handlers.onStarted?.({ stream_id: streamId });
    }
  }

  /** Attached again after a drop. */
  reattached() {
    this.handlers.onResumed?.();
  }

  /**
   * Where event `seq` stands: "next" (render it), "seen" (a repeat: skip it) or "gap" (events
   * went missing: re-attach after the last one rendered). Events without a seq are "next".
   */
  place(seq) {
    if (typeof seq !== "number") return "next";
    if (seq <= this.seq) return "seen";
    if (seq > this.seq + 1) return "gap";
    this.seq = seq;
    this.lostAt = null; // something arrived: a later drop starts a fresh run of attempts
    this.attempts = 0;
    return "next";
  }

  delta(part, seq = null) {
    if (this.ended) return;
    if (this.firstAt === null) this.firstAt = performance.now();
    this.handlers.onDelta({ ...part, seq });
  }

  done(frame) {
    if (this.ended) return;
    this.end();
    // A resumed answer's first token came before this page's clock started.
    const ttft = frame.ttft_ms ?? (this.resumed || this.firstAt === null ? null : this.firstAt - this.startedAt);
    this.handlers.onDone({
      ...frame, ttft_ms: ttft, firstAt: this.firstAt, endedAt: performance.now(),
      transport: this.transport, resumed: this.resumed,
    });
  }

  error(error) {
    if (this.ended) return;
    this.end();
    this.handlers.onError(error);
  }

  end() {
    this.ended = true;
    clearTimeout(this.retryTimer);
    this.detach();
    this.detach = () => {};
  }
}
