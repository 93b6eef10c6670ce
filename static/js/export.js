// A conversation as a file: Markdown to read or share, JSON to keep everything (images,
// tool calls, timings) in the shape the page stores it.

const FORMAT = "tokenrelay.conversation.v1";

/** The conversation as Markdown: a heading per turn, answers as the model wrote them. */
export function toMarkdown(conversation) {
  const out = [`# ${conversation.title || "Conversation"}`, ""];
  if (conversation.system?.trim()) out.push("## System prompt", "", conversation.system.trim(), "");
  for (const m of conversation.messages) {
    if (m.role === "user") {
      out.push("## You", "", m.content || "");
      if (m.images?.length) out.push("", `(${m.images.length} image${m.images.length === 1 ? "" : "s"} attached)`);
      out.push("");
    } else if (m.role === "assistant") {
      out.push(`## Assistant${m.model ? ` (${m.model})` : ""}`, "");
      if (m.reasoning) out.push(...m.reasoning.trim().split("\n").map((line) => `> ${line}`), "");
      if (m.content) out.push(m.content.trimEnd(), "");
      if (m.refusal) out.push(`*Refused:* ${m.refusal}`, "");
      for (const call of m.tool_calls || []) {
        if (!call) continue;
        out.push(`Tool call \`${call.function?.name || "?"}\`:`, "", fence(call.function?.arguments || ""), "");
      }
      if (m.error) out.push(`*Failed:* ${m.error.message || m.error.code || "error"}`, "");
      if (m.status === "stopped") out.push("*(stopped)*", "");
    } else if (m.role === "tool") {
      out.push(`## Result of ${m.name || "a tool"}`, "", fence(m.content || ""), "");
    }
  }
  return `${out.join("\n").trimEnd()}\n`;
}

function fence(text) {
  // A fence longer than any run of backticks inside, so the text cannot close it.
  const longest = Math.max(2, ...[...text.matchAll(/`+/g)].map((m) => m[0].length));
  const ticks = "`".repeat(longest + 1);
  return `${ticks}\n${text}\n${ticks}`;
}

/** The conversation as JSON, every stored field included. */
export function toJSON(conversation) {
  const { title, system, messages, updated } = conversation;
  const body = { format: FORMAT, title, system: system || "", updated: new Date(updated || Date.now()).toISOString(), messages };
  return `${JSON.stringify(body, null, 2)}\n`;
}

/** Offers `text` as a file download named after the conversation. */
export function download(conversation, extension, text) {
  const type = extension === "json" ? "application/json" : "text/markdown";
  const url = URL.createObjectURL(new Blob([text], { type: `${type};charset=utf-8` }));
  const link = document.createElement("a");
  link.href = url;
  link.download = `${slug(conversation.title)}.${extension}`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

function slug(title) {
  const base = (title || "conversation").toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "");
  return base.slice(0, 60) || "conversation";
}
