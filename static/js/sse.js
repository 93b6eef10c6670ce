// The SSE side of the gateway's streams: start (POST), resume (GET …/stream with Last-Event-ID),
// cancel (POST …/cancel), and reading a response's events into a Stream.
//
// A resumable stream's events come in records: each record's last event carries `id: <seq>`
// (a delta is one event; the end is the finish chunk, the usage chunk and `[DONE]`). Events
// before that id are held until it arrives, so what is rendered always ends on a whole record
// and a resume after that seq neither repeats nor misses anything.

import { apiFetch } from "./auth.js";

const RESUMABLE = "x-tokenrelay-resumable";
const STREAM_ID = "x-tokenrelay-stream-id";

function streamUrl(streamId, action) {
  return `api/chat/completions/${encodeURIComponent(streamId)}/${action}`;
}

/** POST a streamed completion, asking for a resumable stream. */
export function postStream(body, signal) {
  return apiFetch("api/chat/completions", {
    method: "POST",
    headers: { "content-type": "application/json", accept: "text/event-stream", [RESUMABLE]: "true" },
    body: JSON.stringify(body),
    signal,
  });
}

/** GET the rest of a stream: every event after `seq` (from the start when seq < 0), then live. */
export function resumeStream(streamId, seq, signal) {
  const headers = { accept: "text/event-stream" };
  if (seq >= 0) headers["last-event-id"] = String(seq);
  return apiFetch(streamUrl(streamId, "stream"), { headers, signal });
}

/** Stop a stream wherever it runs; `keepalive` lets the request outlive the page. */
export function cancelStream(streamId) {
  return apiFetch(streamUrl(streamId, "cancel"), { method: "POST", keepalive: true }).catch(() => null);
}

/** The stream id a response names, or null (a stream that is not resumable). */
export function streamIdOf(response) {
  return response.headers.get(STREAM_ID);
}

/** The gateway's JSON error of a refused request, with its status and Retry-After. */
export async function errorOf(response) {
  let error = { message: `HTTP ${response.status}`, status: response.status };
  try {
    error = { status: response.status, ...(await response.json()).error };
  } catch {
    // Not our JSON error shape; keep the status.
  }
  const header = response.headers.get("retry-after");
  if (error.retry_after == null && header) error.retry_after = Number(header);
  return error;
}

/** Each event of an SSE body as {id, data}; comments (keepalives) give an empty data. */
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const lines = buffer.slice(0, end).split(/\r?\n/);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      const idLine = lines.find((l) => l.startsWith("id:"));
      const id = idLine === undefined ? null : Number(idLine.slice(3).trim());
      yield { id: Number.isInteger(id) ? id : null, data };
    }
  }
}

/**
 * Renders a response's events into `stream` until the stream ends; returns "ended", or
 * "gap" when events went missing (the caller re-attaches), or "cut" when the body ended early.
 */
export async function follow(response, stream, { model }) {
  const cached = response.headers.get("x-tokenrelay-cache") === "hit";
  const journalled = stream.streamId !== null;
  const answer = { finish: null, usage: null, model: null };
  let held = [];
  for await (const { id, data } of events(response)) {
    if (!data || stream.ended) continue;
    if (journalled && id === null && data !== "[DONE]") {
      held.push(data); // part of a record whose id comes with its last event
      continue;
    }
    const record = [...held, data];
    held = [];
    const place = stream.place(id);
    if (place === "gap") return "gap";
    if (place === "seen") continue;
    for (const item of record) {
      if (item === "[DONE]") {
        stream.done({ finish_reason: answer.finish || "stop", usage: answer.usage, ttft_ms: null, model: answer.model || model, cached });
        return "ended";
      }
      const chunk = JSON.parse(item);
      if (chunk.error) {
        stream.error(chunk.error);
        return "ended";
      }
      apply(chunk, stream, answer, id);
    }
  }
  return "cut";
}

function apply(chunk, stream, answer, seq) {
  if (typeof chunk.model === "string") answer.model = chunk.model; // a fallback may answer for another
  if (chunk.usage) answer.usage = chunk.usage;
  const choice = chunk.choices?.[0];
  const delta = choice?.delta;
  if (delta?.reasoning_content) stream.delta({ reasoning: delta.reasoning_content }, seq);
  if (delta?.content) stream.delta({ text: delta.content }, seq);
  if (delta?.refusal) stream.delta({ refusal: delta.refusal }, seq);
  if (Array.isArray(delta?.tool_calls)) stream.delta({ tool_calls: delta.tool_calls }, seq);
  if (choice?.finish_reason) answer.finish = choice.finish_reason;
}
