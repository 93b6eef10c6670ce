// Conversations kept in localStorage: a list of {id, title, messages, updated}, and the open one;
// next to them, the answer streaming right now, saved on its own as it grows.

const KEY = "tokenrelay.conversations.v1";
const MODEL_KEY = "tokenrelay.model";
const TOOL_KEY = "tokenrelay.exampleTool";
const ANSWER_KEY = "tokenrelay.streaming.v1";
// A streaming answer is saved this often rather than once per token (and when the page goes),
// and alone: a small write, however large the conversations around it are.
const ANSWER_DELAY_MS = 400;

function newId() {
  return `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
}

export class Store {
  /** `onSaved(ok)` is told after each write whether it worked (it fails when storage is full). */
  constructor(storage = window.localStorage, { onSaved = () => {} } = {}) {
    this.storage = storage;
    this.onSaved = onSaved;
    this.conversations = [];
    this.currentId = null;
    this.answer = null; // {conversation, message} waiting for `saveAnswer`
    this.answerTimer = 0;
    this.load();
  }

  load() {
    try {
      const saved = JSON.parse(this.storage.getItem(KEY) || "null");
      if (saved && Array.isArray(saved.conversations)) {
        this.conversations = saved.conversations.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages));
        this.currentId = saved.currentId;
      }
    } catch {
      this.conversations = []; // unreadable: start afresh rather than fail to load the page
    }
    this.loadAnswer();
    if (!this.current) this.currentId = this.conversations[0]?.id ?? this.create().id;
  }

  /** A streaming answer saved after its conversation replaces the older copy there. */
  loadAnswer() {
    let saved = null;
    try {
      saved = JSON.parse(this.storage.getItem(ANSWER_KEY) || "null");
    } catch {
      return;
    }
    const conversation = this.conversations.find((c) => c.id === saved?.conversation);
    const older = conversation?.messages[saved.index];
    if (older?.role === "assistant" && older.status === "streaming" && saved.message?.status === "streaming") {
      conversation.messages[saved.index] = saved.message;
    }
  }

  save() {
    clearTimeout(this.answerTimer);
    this.answerTimer = 0;
    this.answer = null;
    try {
      this.storage.setItem(KEY, JSON.stringify({ conversations: this.conversations, currentId: this.currentId }));
      this.storage.removeItem(ANSWER_KEY); // what it held is in there now
      this.onSaved(true);
    } catch {
      // Storage full or disabled: the conversation still works for this page's lifetime.
      this.onSaved(false);
    }
  }

  /**
   * Save the streaming answer `message` of `conversation` within ANSWER_DELAY_MS. Each save is a
   * copy of the whole message as it is then, so its text and its resume point always agree.
   */
  saveAnswerSoon(conversation, message) {
    this.answer = { conversation, message };
    if (!this.answerTimer) this.answerTimer = setTimeout(() => this.saveAnswer(), ANSWER_DELAY_MS);
  }

  saveAnswer() {
    clearTimeout(this.answerTimer);
    this.answerTimer = 0;
    const { conversation, message } = this.answer || {};
    this.answer = null;
    const index = conversation?.messages.indexOf(message) ?? -1;
    if (index < 0 || message.status !== "streaming") return;
    try {
      this.storage.setItem(ANSWER_KEY, JSON.stringify({ conversation: conversation.id, index, message }));
    } catch {
      // Storage full: the conversation's own copy is older, but just as consistent.
    }
  }

  /** Save now what `saveAnswerSoon` would have saved later (the page is going away). */
  flush() {
    if (this.answer) this.saveAnswer();
  }

  get current() {
    return this.conversations.find((c) => c.id === this.currentId) || null;
  }

  create() {
    const conversation = { id: newId(), title: "New chat", titled: false, messages: [], updated: Date.now() };
    this.conversations.unshift(conversation);
    this.currentId = conversation.id;
    this.save();
    return conversation;
  }

  open(id) {
    if (this.conversations.some((c) => c.id === id)) {
      this.currentId = id;
      this.save();
    }
  }

  rename(id, title) {
    const conversation = this.conversations.find((c) => c.id === id);
    if (!conversation || !title.trim()) return;
    conversation.title = title.trim().slice(0, 120);
    conversation.titled = true;
    this.save();
  }

  remove(id) {
    this.conversations = this.conversations.filter((c) => c.id !== id);
    if (this.currentId === id) this.currentId = this.conversations[0]?.id ?? this.create().id;
    this.save();
  }

  touch(conversation) {
    conversation.updated = Date.now();
    if (!conversation.titled) {
      const first = conversation.messages.find((m) => m.role === "user");
      if (first) conversation.title = first.content.replace(/\s+/g, " ").trim().slice(0, 60) || (first.images?.length ? "Image" : "New chat");
    }
    this.save();
  }

  get model() {
    return this.storage.getItem(MODEL_KEY);
  }

  set model(id) {
    this.setPreference(MODEL_KEY, id);
  }

  /** Whether requests offer the example tool. */
  get exampleTool() {
    return this.storage.getItem(TOOL_KEY) === "on";
  }

  set exampleTool(on) {
    this.setPreference(TOOL_KEY, on ? "on" : "off");
  }

  setPreference(key, value) {
    try {
      this.storage.setItem(key, value);
    } catch {
      // Not remembered; harmless.
    }
  }
}
