// Markdown to safe DOM: marked with raw HTML shown as text, every render sanitised by DOMPurify,
// links limited to http(s)/mailto, images never fetched, code highlighted by highlight.js.
import { Marked } from "../vendor/marked/marked.esm.js";
import DOMPurify from "../vendor/dompurify/purify.es.mjs";
import hljs from "../vendor/highlight/core.min.js";
import bash from "../vendor/highlight/languages/bash.min.js";
import c from "../vendor/highlight/languages/c.min.js";
import cpp from "../vendor/highlight/languages/cpp.min.js";
import css from "../vendor/highlight/languages/css.min.js";
import diff from "../vendor/highlight/languages/diff.min.js";
import go from "../vendor/highlight/languages/go.min.js";
import java from "../vendor/highlight/languages/java.min.js";
import javascript from "../vendor/highlight/languages/javascript.min.js";
import json from "../vendor/highlight/languages/json.min.js";
import markdown from "../vendor/highlight/languages/markdown.min.js";
import python from "../vendor/highlight/languages/python.min.js";
import rust from "../vendor/highlight/languages/rust.min.js";
import shell from "../vendor/highlight/languages/shell.min.js";
import sql from "../vendor/highlight/languages/sql.min.js";
import typescript from "../vendor/highlight/languages/typescript.min.js";
import xml from "../vendor/highlight/languages/xml.min.js";
import yaml from "../vendor/highlight/languages/yaml.min.js";

const LANGUAGES = { bash, c, cpp, css, diff, go, java, javascript, json, markdown, python, rust, shell, sql, typescript, xml, yaml };
for (const [name, grammar] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, grammar);
hljs.configure({ ignoreUnescapedHTML: true });

// Code block labels become a class name: keep them to a harmless alphabet.
const LANG_LABEL = /[^a-z0-9+#-]/gi;
const SAFE_URL = /^(https?:|mailto:)/i;

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (ch) => `&#${ch.charCodeAt(0)};`);
}

function highlight(code, lang) {
  const name = (lang || "").trim().split(/\s+/)[0].toLowerCase();
  try {
    if (name && hljs.getLanguage(name)) return hljs.highlight(code, { language: name }).value;
  } catch {
    // An unfinished block can trip a grammar; plain text is fine until the next render.
  }
  return escapeHtml(code);
}

const marked = new Marked({
  gfm: true,
  breaks: false,
  renderer: {
    // Raw HTML in model output is shown as text, never parsed.
    html({ text }) {
      return escapeHtml(text);
    },
    code({ text, lang }) {
      const label = ((lang || "").trim().split(/\s+/)[0] || "text").replace(LANG_LABEL, "").slice(0, 20) || "text";
      return `<pre><code class="hljs language-${label}">${highlight(text, lang)}</code></pre>\n`;
    },
    link({ href, title, tokens }) {
      const inner = this.parser.parseInline(tokens);
      if (!SAFE_URL.test(href || "")) return `<span class="unsafe-link">${inner}</span>`;
      const t = title ? ` title="${escapeHtml(title)}"` : "";
      return `<a href="${escapeHtml(href)}"${t}>${inner}</a>`;
    },
    // Images are not loaded: a remote image would tell its host who reads the answer.
    image({ href, text }) {
      const alt = escapeHtml(text || "image");
      if (!SAFE_URL.test(href || "")) return `<span class="image-placeholder">[image: ${alt}]</span>`;
      return `<a class="image-placeholder" href="${escapeHtml(href)}">[image: ${alt}]</a>`;
    },
  },
});

const PURIFY = {
  ALLOWED_TAGS: [
    "a", "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del", "s", "code", "pre",
    "blockquote", "ul", "ol", "li", "table", "thead", "tbody", "tr", "th", "td", "span", "input",
  ],
  ALLOWED_ATTR: ["href", "title", "class", "align", "start", "type", "checked", "disabled"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
  ALLOW_DATA_ATTR: false,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    const href = node.getAttribute("href") || "";
    if (!SAFE_URL.test(href)) node.removeAttribute("href");
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
  if (node.tagName === "INPUT" && node.getAttribute("type") !== "checkbox") node.remove();
});

/** Markdown (untrusted) to a sanitised DocumentFragment. */
export function renderFragment(source) {
  return sanitize(marked.parse(source, { async: false }));
}

function sanitize(html) {
  return DOMPurify.sanitize(html, { ...PURIFY, RETURN_DOM_FRAGMENT: true });
}

/** Text as a safe fragment when no markdown is wanted (user messages). */
export function textFragment(text) {
  const p = document.createElement("p");
  p.className = "plain";
  p.textContent = text;
  const fragment = document.createDocumentFragment();
  fragment.append(p);
  return fragment;
}

/**
 * Renders a growing markdown text into `root` without redoing finished blocks.
 *
 * Top-level blocks followed by another block are final: they are rendered once and appended.
 * Only the last block (a paragraph, list, table or code block still being written) is
 * re-rendered, at most once per animation frame, so a long answer costs the same per token
 * as a short one and nothing above the tail flickers.
 */
export class StreamRenderer {
  constructor(root, decorate) {
    this.root = root;
    this.decorate = decorate;
    this.text = "";
    this.offset = 0; // characters already rendered as final blocks
    this.tail = document.createElement("div");
    this.tail.className = "md-tail";
    this.root.replaceChildren(this.tail);
    this.frame = 0;
  }

  set(text) {
    this.text = text;
    if (!this.frame) this.frame = requestAnimationFrame(() => this.flush());
  }

  /** Render now (used at the end of a stream, and when the page is hidden). */
  flush() {
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = 0;
    const rest = this.text.slice(this.offset);
    const tokens = marked.lexer(rest);
    let last = tokens.length - 1;
    while (last > 0 && tokens[last].type === "space") last -= 1;
    let done = 0;
    for (let i = 0; i < last; i += 1) done += tokens[i].raw.length;
    // Never cut inside a reference-style definition or mid-line: only whole raw prefixes.
    if (done > 0 && rest.startsWith(tokens.slice(0, last).map((t) => t.raw).join(""))) {
      const block = document.createElement("div");
      block.className = "md-block";
      block.append(renderFragment(rest.slice(0, done)));
      this.decorate(block);
      this.tail.before(block);
      this.offset += done;
    }
    const fragment = renderFragment(this.text.slice(this.offset));
    this.tail.replaceChildren(fragment);
    this.decorate(this.tail);
  }
}
