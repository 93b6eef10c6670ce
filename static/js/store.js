// Conversations kept in localStorage: a list of {id, title, messages, updated}, and the open one.

const KEY = "tokenrelay.conversations.v1";
const MODEL_KEY = "tokenrelay.model";
const TOOL_KEY = "tokenrelay.exampleTool";
// A streaming answer is saved this often rather than once per token (and when the page goes).
const SAVE_DELAY_MS = 400;

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
    this.saveTimer = 0;
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
    if (!this.current) this.currentId = this.conversations[0]?.id ?? this.create().id;
  }

  save() {
    clearTimeout(this.saveTimer);
    this.saveTimer = 0;
    try {
      this.storage.setItem(KEY, JSON.stringify({ conversations: this.conversations, currentId: this.currentId }));
      this.onSaved(true);
    } catch {
      // Storage full or disabled: the conversation still works for this page's lifetime.
      this.onSaved(false);
    }
  }

  /** Save within SAVE_DELAY_MS; each save writes everything, so any one is consistent. */
  saveSoon() {
    if (!this.saveTimer) this.saveTimer = setTimeout(() => this.save(), SAVE_DELAY_MS);
  }

  /** Save now what `saveSoon` would have saved later. */
  flush() {
    if (this.saveTimer) this.save();
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
