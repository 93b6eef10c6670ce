// The gateway key, when the gateway asks for one: entered once, kept in this browser's
// localStorage, sent as a Bearer header over HTTP and as a `tokenrelay.auth.<base64url>`
// subprotocol entry on the socket (browsers cannot set headers on a WebSocket). It never goes
// into a URL, so it stays out of address bars, histories and server logs.

const STORAGE = "tokenrelay.key";
const SUBPROTOCOL = "tokenrelay.v1";

export function storedKey() {
  try {
    return localStorage.getItem(STORAGE) || "";
  } catch {
    return "";
  }
}

function storeKey(key) {
  try {
    if (key) localStorage.setItem(STORAGE, key);
    else localStorage.removeItem(STORAGE);
  } catch {
    // Private mode without storage: the key lives for this page only.
  }
  memoryKey = key;
}

let memoryKey = "";
function currentKey() {
  return storedKey() || memoryKey;
}

function base64url(text) {
  let binary = "";
  for (const byte of new TextEncoder().encode(text)) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** The subprotocols to offer when opening the socket. */
export function socketProtocols() {
  const key = currentKey();
  return key ? [SUBPROTOCOL, `tokenrelay.auth.${base64url(key)}`] : [SUBPROTOCOL];
}

function withKey(init = {}) {
  const key = currentKey();
  const headers = new Headers(init.headers || {});
  if (key) headers.set("authorization", `Bearer ${key}`);
  return { ...init, headers };
}

let asking = null;

/** Ask the user for a key (once at a time); resolves when one was entered. */
export function askForKey(reason) {
  if (asking) return asking;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  const note = document.getElementById("key-reason");
  note.textContent = reason;
  input.value = "";
  asking = new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        asking = null;
        const key = input.value.trim();
        input.value = "";
        storeKey(key);
        resolve(Boolean(key));
      },
      { once: true },
    );
  });
  dialog.showModal();
  input.focus();
  return asking;
}

async function isKeyRefusal(response) {
  if (response.status !== 401) return false;
  try {
    return (await response.clone().json())?.error?.code === "invalid_api_key";
  } catch {
    return false;
  }
}

/** `fetch` for the gateway's API: adds the key, and asks for one while the gateway refuses it. */
export async function apiFetch(path, init = {}) {
  let sent = currentKey();
  let response = await fetch(path, withKey(init));
  while (await isKeyRefusal(response)) {
    if (currentKey() !== sent) {
      // A key was entered while this request was on its way: the refusal is of the one before
      // it (or of none). Try again with the new key instead of forgetting it.
      sent = currentKey();
      response = await fetch(path, withKey(init));
      continue;
    }
    storeKey("");
    const entered = await askForKey(
      sent ? "The gateway refused that key. Enter a valid one." : "This gateway needs a key.",
    );
    if (!entered) break; // the user gave up: the caller shows the 401 as an error
    sent = currentKey();
    response = await fetch(path, withKey(init));
  }
  return response;
}

export function forgetKey() {
  storeKey("");
}
