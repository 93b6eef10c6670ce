// Gateway errors in plain words. Texts from the server are untrusted and only ever set as text.

// The answer was cut by a dropped connection or a reload, and the gateway cannot give the rest
// (refusing the resume, or its journal failing the reader midway).
const RESUME_FAILED = {
  stream_not_found: "The rest of this answer could not be fetched: the gateway no longer has it (it ended too long ago, or a restart lost it). The text above is what arrived.",
  journal_truncated: "The rest of this answer could not be fetched: the gateway no longer keeps the part that was missed. The text above is what arrived.",
  journal_unavailable: "The rest of this answer could not be fetched: the gateway's stream journal is unavailable. The text above is what arrived.",
  other: "The rest of this answer could not be fetched. The text above is what arrived.",
};

/** {title, detail, retryAfter} for an error object of the gateway's JSON error shape. */
export function explain(error, model) {
  const code = error?.code || "";
  const status = Number(error?.status) || 0;
  const retryAfter = Number.isFinite(Number(error?.retry_after)) && error?.retry_after != null ? Number(error.retry_after) : null;
  const detail = typeof error?.message === "string" ? error.message : "";
  let title;
  if (error?.resume_failed || Object.hasOwn(RESUME_FAILED, code)) {
    title = RESUME_FAILED[code] || RESUME_FAILED.other;
  } else if (code === "upstream_rate_limited" || (status === 429 && code !== "too_many_streams")) {
    title = retryAfter != null
      ? `Rate limited by the model's provider. Try again in ${Math.ceil(retryAfter)} s.`
      : "Rate limited by the model's provider. Try again in a moment.";
  } else if (code === "too_many_streams") {
    title = "Too many answers are streaming at once. Stop one, or wait for one to finish.";
  } else if (code === "server_busy") {
    title = retryAfter != null
      ? `The gateway is running as many answers as it can. Try again in ${Math.ceil(retryAfter)} s.`
      : "The gateway is running as many answers as it can. Try again in a moment.";
  } else if (code === "model_not_found") {
    title = `The model “${model}” is not known to this gateway. Pick another model.`;
  } else if (code === "slow_consumer") {
    title = "The answer was cut off because this page did not keep up with the stream.";
  } else if (code === "upstream_timeout") {
    title = "The model's provider did not answer in time.";
  } else if (code === "upstream_unavailable" || code === "upstream_protocol_error" || code === "upstream_error" || status === 502 || status === 503) {
    title = "The model's provider is down or unreachable right now.";
  } else if (code === "upstream_auth_failed") {
    title = "The gateway's key for this provider was refused; the operator needs to fix it.";
  } else if (code === "connection_lost" || code === "network") {
    title = "The connection to the gateway was lost; the answer is incomplete.";
  } else if (code === "unsupported" || code === "invalid_request" || status === 400) {
    title = "The gateway refused the request.";
  } else if (status === 413) {
    title = "The conversation is too long to send.";
  } else {
    title = "Something went wrong while answering.";
  }
  return { title, detail, retryAfter, requestId: typeof error?.request_id === "string" ? error.request_id : null };
}
