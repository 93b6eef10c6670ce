// Images attached to the next message: read from the file picker, a paste or a drop, checked,
// shrunk to fit the gateway's limits, and kept as data URLs (the page never loads a remote image).
import { imageList, isImageDataUrl } from "./messages.js";
import { IMAGE_BUDGET } from "./tools.js";

export const IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"];
export const NO_VISION = "This model does not read images: pick a model of the vision category to send them.";
const MAX_FILE_BYTES = 10 * 1024 * 1024; // larger files are refused outright
const MAX_IMAGES = 4; // per message
// An image whose data URL is longer, or whose longer side is over MAX_EDGE pixels, is redrawn as
// a JPEG that fits: the gateway counts inline images against its request size limit
// (`[limits] max_chars`, 1 000 000 characters by default), and the conversation must fit in the
// browser's storage. Providers downscale larger images anyway.
const MAX_URL_CHARS = 250_000;
const MAX_EDGE = 1568;

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

/** Redraws the image smaller, as a JPEG, until its data URL fits. */
async function shrink(file) {
  const bitmap = await createImageBitmap(file);
  try {
    let scale = Math.min(1, MAX_EDGE / Math.max(bitmap.width, bitmap.height));
    for (;;) {
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(bitmap.width * scale));
      canvas.height = Math.max(1, Math.round(bitmap.height * scale));
      const context = canvas.getContext("2d");
      context.fillStyle = "#fff"; // JPEG has no transparency: transparent pixels become white
      context.fillRect(0, 0, canvas.width, canvas.height);
      context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
      const url = canvas.toDataURL("image/jpeg", 0.85);
      if (url.length <= MAX_URL_CHARS || canvas.width <= 64) return url;
      scale *= 0.7;
    }
  } finally {
    bitmap.close();
  }
}

async function toDataUrl(file) {
  const url = await readAsDataUrl(file);
  if (url.length <= MAX_URL_CHARS) {
    const bitmap = await createImageBitmap(file); // also proves the file is an image
    const { width, height } = bitmap;
    bitmap.close();
    if (Math.max(width, height) <= MAX_EDGE) return url;
  }
  return shrink(file);
}

/**
 * The pending images. `onChange(list)` is called after every change; `onNote(text)` with a
 * message for the user when a file is refused ("" clears it).
 */
export class Attachments {
  constructor({ onChange, onNote }) {
    this.list = [];
    this.onChange = onChange;
    this.onNote = onNote;
  }

  /** Adds the image files among `files`; refuses others with a note. */
  async add(files) {
    const problems = [];
    for (const file of files) {
      if (!IMAGE_TYPES.includes(file.type)) {
        problems.push(`${file.name || "The pasted file"} is not a PNG, JPEG, GIF or WebP image.`);
      } else if (file.size > MAX_FILE_BYTES) {
        problems.push(`${file.name || "The pasted image"} is over ${MAX_FILE_BYTES / 1024 / 1024} MB.`);
      } else if (this.list.length >= MAX_IMAGES) {
        problems.push(`At most ${MAX_IMAGES} images can go with one message.`);
        break;
      } else {
        try {
          const url = await toDataUrl(file);
          if (!isImageDataUrl(url)) problems.push(`${file.name || "The pasted image"} could not be read.`);
          else if (this.size() + url.length > IMAGE_BUDGET) problems.push(`${file.name || "The pasted image"} would make this message too large; send it with the next one.`);
          else this.list.push({ url, name: file.name || "pasted image" });
        } catch {
          problems.push(`${file.name || "The pasted image"} could not be read as an image.`);
        }
      }
    }
    this.onNote(problems.join(" "));
    this.onChange(this.list);
  }

  /** Characters of the pending data URLs. */
  size() {
    return this.list.reduce((total, a) => total + a.url.length, 0);
  }

  remove(index) {
    this.list.splice(index, 1);
    this.onNote("");
    this.onChange(this.list);
  }

  /** Empties the list and returns the data URLs it held. */
  take() {
    const urls = this.list.map((a) => a.url);
    this.list = [];
    this.onChange(this.list);
    return urls;
  }
}

/**
 * Wires the composer's image controls: the attach `button` opens the file `input`; paste in
 * `prompt` and drop on `dropZone` attach images; `tray` shows removable thumbnails. When
 * `canAttach()` is false, pasted and dropped images are refused with a `note(text, kind)`.
 * Returns the Attachments.
 */
export function wireAttachments({ button, input, tray, prompt, dropZone, canAttach, note }) {
  const attachments = new Attachments({
    onChange(list) {
      tray.replaceChildren(...(list.length ? [imageList(list.map((a) => a.url), { removable: true })] : []));
      tray.hidden = list.length === 0;
    },
    onNote: (text) => note(text),
  });
  const offer = (files) => {
    if (canAttach()) attachments.add(files);
    else note(NO_VISION, "vision");
  };
  button.addEventListener("click", () => input.click());
  input.accept = IMAGE_TYPES.join(",");
  input.addEventListener("change", () => {
    const files = [...input.files];
    input.value = "";
    attachments.add(files);
  });
  tray.addEventListener("click", (event) => {
    const remove = event.target.closest("[data-action=remove-image]");
    if (!remove) return;
    attachments.remove(Number(remove.dataset.index));
    prompt.focus();
  });
  prompt.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
    if (!files.length) return; // text pastes as usual
    event.preventDefault();
    offer(files);
  });
  // Without this, the browser would open a dropped file in place of the page.
  dropZone.addEventListener("dragover", (event) => {
    if ([...(event.dataTransfer?.items || [])].some((i) => i.kind === "file")) event.preventDefault();
  });
  dropZone.addEventListener("drop", (event) => {
    if (!event.dataTransfer?.files.length) return;
    event.preventDefault();
    offer([...event.dataTransfer.files]);
  });
  return attachments;
}
