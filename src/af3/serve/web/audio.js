// Audio clips on the page: what format a file is, its bytes as base64, microphone recording, time formats.

/** The formats the API takes in an `input_audio` part. */
export const FORMATS = ["wav", "mp3", "webm", "ogg", "flac", "m4a"];

const BY_MIME = {
  "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
  "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/mpeg3": "mp3", "audio/x-mpeg-3": "mp3",
  "audio/webm": "webm", "video/webm": "webm",
  "audio/ogg": "ogg", "application/ogg": "ogg", "audio/opus": "ogg",
  "audio/flac": "flac", "audio/x-flac": "flac",
  "audio/mp4": "m4a", "audio/x-m4a": "m4a", "audio/m4a": "m4a", "audio/aac": "m4a", "video/mp4": "m4a",
};
const BY_EXT = {
  wav: "wav", wave: "wav", mp3: "mp3", webm: "webm", weba: "webm", ogg: "ogg", oga: "ogg", opus: "ogg",
  flac: "flac", m4a: "m4a", mp4: "m4a", aac: "m4a",
};

/** The API format of a file (from its MIME type, then its extension), or null when it is none of FORMATS. */
export function formatOf(name, mime) {
  const base = (mime || "").split(";")[0].trim().toLowerCase();
  if (BY_MIME[base]) return BY_MIME[base];
  const ext = (name || "").toLowerCase().match(/\.([a-z0-9]+)$/);
  return ext && BY_EXT[ext[1]] ? BY_EXT[ext[1]] : null;
}

/** A random id (crypto.randomUUID needs a secure context; getRandomValues does not). */
export function newId() {
  if (globalThis.crypto && typeof crypto.randomUUID === "function") {
    try { return crypto.randomUUID(); } catch { /* insecure context */ }
  }
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** A blob's bytes as base64 (no data: prefix). */
export function toBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => {
      const url = String(reader.result);
      resolve(url.slice(url.indexOf(",") + 1));
    };
    reader.onerror = () => reject(reader.error || new Error("could not read the file"));
    reader.readAsDataURL(blob);
  });
}

/** 3.04 -> "0:03"; 3725 -> "1:02:05". */
export function clock(seconds) {
  const s = Math.max(0, Math.floor(seconds || 0));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

/** A segment time to a tenth of a second: 1.23 -> "00:01.2"; past an hour "1:02:03.4". */
export function stamp(seconds) {
  const tenths = Math.max(0, Math.round((Number(seconds) || 0) * 10));
  const total = Math.floor(tenths / 10);
  const h = Math.floor(total / 3600);
  const m = String(Math.floor((total % 3600) / 60)).padStart(2, "0");
  const s = String(total % 60).padStart(2, "0");
  return `${h ? h + ":" : ""}${m}:${s}.${tenths % 10}`;
}

export function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${Math.round(n / 1024)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

/** Can this page record? (getUserMedia exists only in secure contexts: https or localhost.) */
export function canRecord() {
  return Boolean(navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.MediaRecorder);
}

const RECORD_TYPES = ["audio/webm;codecs=opus", "audio/webm", "audio/ogg;codecs=opus", "audio/ogg", "audio/mp4"];

/** One microphone recording: start() asks for the microphone; stop() resolves to {blob, mime, seconds}. */
export class Recording {
  constructor() {
    this.stream = null;
    this.recorder = null;
    this.chunks = [];
    this.startedAt = 0;
  }

  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const mimeType = RECORD_TYPES.find((t) => MediaRecorder.isTypeSupported(t));
    this.recorder = new MediaRecorder(this.stream, mimeType ? { mimeType } : undefined);
    this.recorder.ondataavailable = (e) => { if (e.data && e.data.size) this.chunks.push(e.data); };
    this.recorder.start(250);
    this.startedAt = performance.now();
  }

  get seconds() {
    return this.startedAt ? (performance.now() - this.startedAt) / 1000 : 0;
  }

  stop() {
    const seconds = this.seconds;
    return new Promise((resolve, reject) => {
      const rec = this.recorder;
      const done = () => {
        this.release();
        const mime = (rec && rec.mimeType) || (this.chunks[0] && this.chunks[0].type) || "audio/webm";
        const blob = new Blob(this.chunks, { type: mime });
        if (!blob.size) reject(new Error("the recording is empty (no sound reached the page)"));
        else resolve({ blob, mime, seconds });
      };
      if (!rec || rec.state === "inactive") { done(); return; }
      rec.onstop = done;
      rec.onerror = (e) => { this.release(); reject(e.error || new Error("recording failed")); };
      rec.stop();
    });
  }

  /** Stop without keeping anything, and free the microphone. */
  cancel() {
    if (this.recorder && this.recorder.state !== "inactive") {
      this.recorder.onstop = null;
      try { this.recorder.stop(); } catch { /* already stopped */ }
    }
    this.release();
  }

  release() {
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    this.stream = null;
  }
}
