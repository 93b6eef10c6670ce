// Images attached to the next message: read from the file picker, a paste or a drop, checked,
// shrunk to fit the gateway's limits, and kept as data URLs (the page never loads a remote image).

export const IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"];
const MAX_FILE_BYTES = 10 * 1024 * 1024; // larger files are refused outright
const MAX_IMAGES = 4; // per message
// An image whose data URL is longer, or whose longer side is over MAX_EDGE pixels, is redrawn as
// a JPEG that fits: the gateway counts inline images against its request size limit
// (`[limits] max_chars`, 1 000 000 characters by default), and the conversation must fit in the
// browser's storage. Providers downscale larger images anyway.
const MAX_URL_CHARS = 250_000;
const MAX_EDGE = 1568;
/** The characters of data URLs one request carries at most (see tools.js `requestMessages`). */
export const IMAGE_BUDGET = 900_000;
const DATA_URL = /^data:image\/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/]+=*$/;

/** Whether `url` is an image data URL this page shows (anything else is never put in an img). */
export function isImageDataUrl(url) {
  return typeof url === "string" && DATA_URL.test(url);
}

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
