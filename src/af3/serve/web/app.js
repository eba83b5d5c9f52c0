// The af3 chat page: attach or record audio, ask about it in a multi-turn chat (streamed replies),
// transcribe a clip into timestamped segments with SRT/VTT downloads. Talks to the server only through
// the public API in api.js. No framework, no build step, no network access beyond the page's own server.

import { ApiError, health, listModels, setApiKey, streamChat, transcribe } from "./api.js";
import { FORMATS, Recording, bytes, canRecord, clock, formatOf, newId, stamp, toBase64 } from "./audio.js";

// ---------------------------------------------------------------------------------------------- helpers
const $ = (sel, root = document) => root.querySelector(sel);

const ICONS = {
  plus: ["M12 5v14", "M5 12h14"],
  sliders: ["M4 21v-7", "M4 10V3", "M12 21v-9", "M12 8V3", "M20 21v-5", "M20 12V3", "M1 14h6", "M9 8h6",
            "M17 16h6"],
  alert: ["M22 12a10 10 0 1 1-20 0 10 10 0 0 1 20 0z", "M12 8v4", "M12 16h.01"],
  x: ["M18 6 6 18", "M6 6l12 12"],
  wave: ["M2 12h1", "M6 8v8", "M10 4v16", "M14 7v10", "M18 10v4", "M21 12h1"],
  clip: ["M21.44 11.05l-9.19 9.19a6 6 0 0 1-8.49-8.49l8.57-8.57A4 4 0 1 1 18 8.84l-8.59 8.57a2 2 0 0 1-2.83-2.83"
         + "l8.49-8.48"],
  mic: ["M9 5a3 3 0 0 1 6 0v6a3 3 0 0 1-6 0z", "M19 10v1a7 7 0 0 1-14 0v-1", "M12 18v4"],
  send: ["M12 19V5", "M5 12l7-7 7 7"],
  stop: ["M8 7h8a1 1 0 0 1 1 1v8a1 1 0 0 1-1 1H8a1 1 0 0 1-1-1V8a1 1 0 0 1 1-1z"],
  text: ["M14 2H6a2 2 0 0 0-2 2v16a2 2 0 0 0 2 2h12a2 2 0 0 0 2-2V8z", "M14 2v6h6", "M16 13H8", "M16 17H8",
         "M10 9H8"],
  download: ["M21 15v4a2 2 0 0 1-2 2H5a2 2 0 0 1-2-2v-4", "M7 10l5 5 5-5", "M12 15V3"],
  copy: ["M11 9h9a2 2 0 0 1 2 2v9a2 2 0 0 1-2 2h-9a2 2 0 0 1-2-2v-9a2 2 0 0 1 2-2z",
         "M5 15H4a2 2 0 0 1-2-2V4a2 2 0 0 1 2-2h9a2 2 0 0 1 2 2v1"],
  check: ["M20 6 9 17l-5-5"],
  upload: ["M21 15v4a2 2 0 0 1-2 2H5a2 2 0 0 1-2-2v-4", "M17 8l-5-5-5 5", "M12 3v12"],
};

function icon(name) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("focusable", "false");
  svg.classList.add("icon-svg", `icon-${name}`);
  for (const d of ICONS[name] || []) {
    const p = document.createElementNS(NS, "path");
    p.setAttribute("d", d);
    svg.append(p);
  }
  return svg;
}

/** A DOM element: h("div", {class, text, dataset, onclick, ...attributes}, ...children). Text is never HTML. */
function h(tag, props = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v == null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) if (kid != null && kid !== false) e.append(kid);
  return e;
}

const store = {
  get(key, fallback) {
    try { const v = localStorage.getItem(key); return v == null ? fallback : JSON.parse(v); } catch { return fallback; }
  },
  set(key, value) {
    try { localStorage.setItem(key, JSON.stringify(value)); } catch { /* storage off: settings last this visit */ }
  },
};
const SETTINGS_KEY = "af3.settings";
const API_KEY_KEY = "af3.apiKey";

// ---------------------------------------------------------------------------------------------- elements
const ui = {
  status: $("#server-status"),
  newChat: $("#new-chat"),
  settingsToggle: $("#settings-toggle"),
  settings: $("#settings"),
  settingsClose: $("#settings-close"),
  errorBanner: $("#error-banner"),
  errorTitle: $("#error-title"),
  errorMessage: $("#error-message"),
  errorDismiss: $("#error-dismiss"),
  log: $("#log"),
  empty: $("#empty-state"),
  composer: $("#composer"),
  attachments: $("#attachments"),
  prompt: $("#prompt"),
  fileInput: $("#file-input"),
  attach: $("#attach"),
  record: $("#record"),
  recordTime: $("#record-time"),
  stop: $("#stop"),
  send: $("#send"),
  model: $("#model"),
  think: $("#think"),
  thinkWrap: $("#think-wrap"),
  thinkHint: $("#think-hint"),
  temperature: $("#temperature"),
  temperatureRange: $("#temperature-range"),
  topP: $("#top-p"),
  topPRange: $("#top-p-range"),
  maxTokens: $("#max-tokens"),
  apiKey: $("#api-key"),
  apiKeyShow: $("#api-key-show"),
  dropOverlay: $("#drop-overlay"),
};

const state = {
  modelIds: new Set(),
  turns: [],          // {role: "user", text, clips, el} | {role: "assistant", text, el}
  pending: [],        // clips attached in the composer, not sent yet
  controller: null,   // the running request's AbortController
  recording: null,    // the microphone Recording in progress
  recordTimer: 0,
  chat: 0,            // counts New chats: a request that outlives its conversation leaves no trace
  prefs: store.get(SETTINGS_KEY, {}),
};

// ---------------------------------------------------------------------------------------------- errors
function showError(err, title) {
  const e = typeof err === "string" ? { message: err } : err;
  let heading = title;
  if (!heading) {
    if (e.network) heading = "Network error";
    else if (e.midStream) heading = "The reply was interrupted";
    else if (e.status === 401) heading = "Not authorised (401): check the API key in Settings";
    else if (e.status === 429) heading = "The server is busy (429): try again in a moment";
    else if (e.status >= 500) heading = `Server error (${e.status})`;
    else if (e.status) heading = `The server refused the request (${e.status})`;
    else heading = "Error";
  }
  markInvalidSetting(e.status === 401 ? "api_key" : e.param);
  const stick = nearBottom();
  ui.errorTitle.textContent = heading;
  ui.errorMessage.textContent = e.message || String(err);
  ui.errorBanner.hidden = false;
  if (stick) scrollToEnd();  // the banner takes room from the conversation: keep its end in view
  if (e.network) checkHealth();
}

function hideError() {
  ui.errorBanner.hidden = true;
}

/** When the API names a setting as the culprit (error.param), point at its field. */
function markInvalidSetting(param) {
  const input = { temperature: ui.temperature, top_p: ui.topP, max_tokens: ui.maxTokens,
                  max_completion_tokens: ui.maxTokens, model: ui.model, api_key: ui.apiKey }[param];
  if (!input) return;
  input.setAttribute("aria-invalid", "true");
  const clear = () => input.removeAttribute("aria-invalid");
  input.addEventListener(input.tagName === "SELECT" ? "change" : "input", clear, { once: true });
  if (ui.settings.hidden && !narrow.matches) setSettingsOpen(true);
}

// ---------------------------------------------------------------------------------------------- server status
async function checkHealth() {
  try {
    const body = await health();
    setStatus(body && body.status === "ok" ? "ok" : "degraded", body && body.status === "ok" ? "Online" : "Degraded");
  } catch (e) {
    setStatus("down", e.network ? "Offline" : `Unhealthy${e.status ? ` (${e.status})` : ""}`);
  }
}

function setStatus(kind, label) {
  ui.status.dataset.state = kind;
  $(".label", ui.status).textContent = label;
  ui.status.title = kind === "ok" ? `Server ${location.host} is up` : `Server ${location.host}: ${label}`;
}

// ---------------------------------------------------------------------------------------------- settings
async function loadModels() {
  let ids;
  try {
    ids = await listModels();
  } catch (e) {
    ui.model.replaceChildren(h("option", { value: "", text: "Unavailable" }));
    state.modelIds = new Set();
    updateThink();
    showError(e, e.status === 401 ? undefined : "Could not load the model list");
    return;
  }
  state.modelIds = new Set(ids);
  const choices = ids.filter((id) => !id.endsWith(":think") || !state.modelIds.has(id.slice(0, -6)));
  ui.model.replaceChildren(...(choices.length ? choices.map((id) => h("option", { value: id, text: id }))
                                              : [h("option", { value: "", text: "No models" })]));
  if (state.prefs.model && choices.includes(state.prefs.model)) ui.model.value = state.prefs.model;
  updateThink();
}

function thinkAvailable() {
  const id = ui.model.value;
  return Boolean(id) && !id.endsWith(":think") && state.modelIds.has(`${id}:think`);
}

function updateThink() {
  const id = ui.model.value;
  const available = thinkAvailable();
  ui.think.disabled = !available;
  ui.think.checked = available && Boolean(state.prefs.think);
  const why = !id ? "No model is selected."
    : available ? `Uses ${id}:think, the thinking adapter.`
    : `Not available: ${id} has no thinking adapter (the server lists no "${id}:think").`;
  ui.thinkWrap.title = why;
  ui.thinkHint.textContent = available ? "Reasons step by step before answering (slower)."
    : id ? `Not available: ${id} has no thinking adapter.` : why;
  ui.thinkWrap.classList.toggle("disabled", !available);
}

/** The model id to send: the selected one, with ":think" when think mode is on and the server lists it. */
function chosenModel() {
  const id = ui.model.value;
  if (!id) return "";
  return ui.think.checked && thinkAvailable() ? `${id}:think` : id;
}

function saveSettings() {
  state.prefs = {
    model: ui.model.value || state.prefs.model,
    think: thinkAvailable() ? ui.think.checked : Boolean(state.prefs.think),
    temperature: ui.temperature.value,
    top_p: ui.topP.value,
    max_tokens: ui.maxTokens.value,
  };
  store.set(SETTINGS_KEY, state.prefs);
}

function restoreSettings() {
  const p = state.prefs;
  if (p.temperature != null) ui.temperature.value = p.temperature;
  if (p.top_p != null) ui.topP.value = p.top_p;
  if (p.max_tokens != null) ui.maxTokens.value = p.max_tokens;
  ui.temperatureRange.value = ui.temperature.value || 0;
  ui.topPRange.value = ui.topP.value || 1;
  const key = store.get(API_KEY_KEY, "");
  ui.apiKey.value = key;
  setApiKey(key);
}

function linkRange(range, number) {
  range.addEventListener("input", () => { number.value = range.value; saveSettings(); });
  number.addEventListener("input", () => { if (number.value !== "") range.value = number.value; saveSettings(); });
}

/** The sampling settings as API fields; an empty field is left out (the server's default). */
function samplingFields() {
  const out = {};
  const fields = [["temperature", ui.temperature, "Temperature"], ["top_p", ui.topP, "Top p"],
                  ["max_tokens", ui.maxTokens, "Max tokens"]];
  for (const [name, input, label] of fields) {
    if (input.validity.badInput) throw new ApiError(`${label} is not a number.`);
    const raw = input.value.trim();
    if (raw === "") continue;
    const value = Number(raw);
    if (!Number.isFinite(value)) throw new ApiError(`${label} is not a number.`);
    out[name] = value;
  }
  return out;
}

const narrow = window.matchMedia("(max-width: 900px)");

function setSettingsOpen(open) {
  ui.settings.hidden = !open;
  ui.settingsToggle.setAttribute("aria-expanded", String(open));
  document.body.classList.toggle("settings-open", open);
  if (open && narrow.matches) ui.model.focus();
}

// ---------------------------------------------------------------------------------------------- clips
function makeClip(blob, name, mime, format, seconds = null, label = name) {
  return { id: newId(), name, label, blob, mime, format, url: URL.createObjectURL(blob), size: blob.size, seconds,
           base64: null, uploaded: false };
}

/** The name a clip is uploaded under: its own, with the format's extension when it has none. */
function uploadName(clip) {
  return /\.[a-z0-9]{2,5}$/i.test(clip.name) ? clip.name : `${clip.name}.${clip.format}`;
}

function addFiles(files) {
  const refused = [];
  for (const file of files) {
    const format = formatOf(file.name, file.type);
    if (!format) refused.push(`${file.name}: not an audio format the server takes (${FORMATS.join(", ")})`);
    else if (!file.size) refused.push(`${file.name}: the file is empty`);
    else state.pending.push(makeClip(file, file.name, file.type, format));
  }
  renderTray();
  if (refused.length) showError(refused.join("; ") + ".", refused.length > 1 ? "Some files were not attached"
                                                                              : "The file was not attached");
}

function clipCard(clip, { removable = false } = {}) {
  const meta = h("span", { class: "clip-meta" });
  const updateMeta = () => {
    meta.textContent = [clip.seconds != null ? clock(clip.seconds) : null, bytes(clip.size),
                        clip.format.toUpperCase()].filter(Boolean).join(" · ");
  };
  updateMeta();
  const audio = h("audio", { controls: true, preload: "metadata", src: clip.url, "aria-label": `Play ${clip.label}` });
  audio.addEventListener("loadedmetadata", () => {
    if (Number.isFinite(audio.duration) && audio.duration > 0) {
      clip.seconds = audio.duration;
      updateMeta();
    } else if (audio.duration === Infinity) {
      // MediaRecorder's WebM has no duration in its header: seek past the end once so the player learns it.
      const reset = () => { audio.removeEventListener("durationchange", reset); audio.currentTime = 0; };
      audio.addEventListener("durationchange", reset);
      audio.currentTime = 1e7;
    }
  });
  const transcribeButton = h("button", {
    type: "button", class: "btn small subtle transcribe", title: `Transcribe ${clip.label}`,
    disabled: Boolean(state.controller), onclick: () => runTranscription(clip),
  }, icon("text"), h("span", { text: "Transcribe" }));
  const remove = removable && h("button", {
    type: "button", class: "icon-btn clip-remove", "aria-label": `Remove ${clip.label}`, title: "Remove",
    onclick: () => removePending(clip),
  }, icon("x"));
  return h("div", { class: "clip", role: removable ? "listitem" : null, dataset: { clipId: clip.id } },
    h("div", { class: "clip-head" },
      h("span", { class: "clip-icon" }, icon("wave")),
      h("div", { class: "clip-title" }, h("span", { class: "clip-name", text: clip.label, title: clip.name }), meta),
      transcribeButton, remove),
    audio);
}

function renderTray() {
  ui.attachments.replaceChildren(...state.pending.map((c) => clipCard(c, { removable: true })));
  ui.attachments.hidden = state.pending.length === 0;
}

function removePending(clip) {
  state.pending = state.pending.filter((c) => c !== clip);
  URL.revokeObjectURL(clip.url);
  renderTray();
  ui.prompt.focus();
}

// ---------------------------------------------------------------------------------------------- recording
async function toggleRecording() {
  if (state.recording) { await stopRecording(); return; }
  if (!canRecord()) {
    showError("This browser gives the page no microphone here: recording needs https or localhost and "
              + "a browser with MediaRecorder.", "Cannot record");
    return;
  }
  const rec = new Recording();
  try {
    await rec.start();
  } catch (e) {
    rec.release();
    const message = e && e.name === "NotAllowedError"
      ? "Microphone access was denied. Allow it in the browser's site settings, then try again."
      : e && e.name === "NotFoundError" ? "No microphone was found."
      : `The microphone could not start (${(e && e.message) || e}).`;
    showError(message, "Cannot record");
    return;
  }
  state.recording = rec;
  ui.record.classList.add("recording");
  ui.record.setAttribute("aria-pressed", "true");
  $(".btn-label", ui.record).textContent = "Stop";
  ui.record.title = "Stop recording";
  ui.recordTime.hidden = false;
  const tick = () => {
    ui.recordTime.textContent = clock(rec.seconds);
    ui.record.setAttribute("aria-label", `Stop recording (${clock(rec.seconds)} recorded)`);
  };
  tick();
  state.recordTimer = setInterval(tick, 250);
}

async function stopRecording() {
  const rec = state.recording;
  if (!rec) return;
  state.recording = null;
  clearInterval(state.recordTimer);
  ui.record.classList.remove("recording");
  ui.record.setAttribute("aria-pressed", "false");
  ui.record.removeAttribute("aria-label");
  $(".btn-label", ui.record).textContent = "Record";
  ui.record.title = "Record from the microphone";
  ui.recordTime.hidden = true;
  try {
    const { blob, mime, seconds } = await rec.stop();
    const format = formatOf("", mime) || "webm";
    const when = new Date();
    const pad = (n) => String(n).padStart(2, "0");
    const hms = [when.getHours(), when.getMinutes(), when.getSeconds()].map(pad);
    state.pending.push(makeClip(blob, `recording-${hms.join("")}.${format}`, mime, format, seconds,
                                `Recording ${hms.join(":")}`));
    renderTray();
  } catch (e) {
    showError(`The recording could not be kept: ${(e && e.message) || e}.`, "Recording failed");
  }
}

// ---------------------------------------------------------------------------------------------- conversation
function updateEmpty() {
  ui.empty.hidden = Boolean(ui.log.querySelector(".msg, .transcript"));
}

function nearBottom() {
  const l = ui.log;
  return l.scrollHeight - l.scrollTop - l.clientHeight < 96;
}

function scrollToEnd() {
  ui.log.scrollTop = ui.log.scrollHeight;
}

function appendToLog(node) {
  ui.log.append(node);
  updateEmpty();
  scrollToEnd();
}

function userMessage(turn) {
  return h("article", { class: "msg user", "aria-label": "You" },
    h("div", { class: "msg-main" },
      turn.clips.length ? h("div", { class: "msg-clips" }, turn.clips.map((c) => clipCard(c))) : null,
      turn.text ? h("div", { class: "msg-text", text: turn.text }) : null));
}

function assistantMessage(model) {
  const copy = h("button", { type: "button", class: "icon-btn copy", title: "Copy the reply",
                             "aria-label": "Copy the reply" }, icon("copy"));
  const el = h("article", { class: "msg assistant", "aria-label": "Audio Flamingo", "aria-busy": "true",
                            dataset: { state: "streaming" } },
    h("div", { class: "avatar", "aria-hidden": "true" }, h("img", { src: "/web/icon.svg", alt: "" })),
    h("div", { class: "msg-main" },
      h("div", { class: "msg-head" }, h("span", { class: "who", text: "Audio Flamingo" }),
        h("span", { class: "model-tag", text: model })),
      h("details", { class: "thinking", hidden: true }, h("summary", { text: "Reasoning" }),
        h("div", { class: "thinking-text" })),
      h("div", { class: "msg-text" }),
      h("div", { class: "typing", "aria-hidden": "true" }, h("span"), h("span"), h("span")),
      h("div", { class: "msg-foot" }, h("span", { class: "note" }), copy)));
  return el;
}

/** A reply split into {reasoning, answer}: a leading <think>…</think> block is reasoning (null when none). */
function splitReply(text) {
  const m = /^\s*<think>([\s\S]*?)(<\/think>|$)([\s\S]*)$/.exec(text);
  return m ? { reasoning: m[1].trim(), closed: Boolean(m[2]), answer: m[3].replace(/^\s+/, "") }
           : { reasoning: null, closed: false, answer: text };
}

/** Show a reply's text; reasoning in <think> tags goes into a collapsed "Reasoning" section. */
function renderReply(reply) {
  const { reasoning, closed, answer } = splitReply(reply.text);
  const thinking = $(".thinking", reply.el);
  thinking.hidden = reasoning === null;
  if (reasoning !== null) {
    $("summary", thinking).textContent = closed ? "Reasoning" : "Reasoning…";
    $(".thinking-text", thinking).textContent = reasoning;
  }
  $(".msg-text", reply.el).textContent = answer;
}

function finishReply(reply, stateName, note) {
  const stick = nearBottom();
  reply.el.dataset.state = stateName;
  reply.el.setAttribute("aria-busy", "false");
  $(".note", reply.el).textContent = note || "";
  const copy = $(".copy", reply.el);
  copy.onclick = () => copyText(splitReply(reply.text).answer, copy);
  if (stick) scrollToEnd();
}

/** The API messages for the conversation so far: a clip's bytes go once; later turns name it by uuid. */
async function apiMessages(turns) {
  const messages = [];
  const fresh = [];
  for (const turn of turns) {
    if (turn.role === "assistant") {
      messages.push({ role: "assistant", content: splitReply(turn.text).answer });  // reasoning is not sent back
      continue;
    }
    const content = [];
    for (const clip of turn.clips) {
      if (clip.uploaded) {
        content.push({ type: "input_audio", input_audio: null, uuid: clip.id });
      } else {
        if (!clip.base64) clip.base64 = await toBase64(clip.blob);
        content.push({ type: "input_audio", input_audio: { data: clip.base64, format: clip.format }, uuid: clip.id });
        fresh.push(clip);
      }
    }
    if (turn.text) content.push({ type: "text", text: turn.text });
    messages.push({ role: "user", content });
  }
  return { messages, fresh };
}

async function onSubmit(event) {
  event.preventDefault();
  if (state.controller) return;
  if (state.recording) await stopRecording();
  const text = ui.prompt.value.trim();
  const clips = state.pending.slice();
  if (!text && !clips.length) { ui.prompt.focus(); return; }
  const model = chosenModel();
  if (!model) {
    showError("There is no model to ask: the server's model list could not be loaded. Check that the server "
              + "is running and the API key (Settings) is right, then reload the page.", "No model");
    return;
  }
  let sampling;
  try { sampling = samplingFields(); } catch (e) { showError(e, "Check the settings"); return; }
  hideError();
  state.pending = [];
  renderTray();
  ui.prompt.value = "";
  autosize();
  const user = { role: "user", text, clips };
  user.el = userMessage(user);
  const reply = { role: "assistant", text: "" };
  reply.el = assistantMessage(model);
  state.turns.push(user, reply);
  appendToLog(user.el);
  appendToLog(reply.el);
  await runChat(user, reply, model, sampling);
}

async function runChat(user, reply, model, sampling) {
  const controller = beginBusy();
  const chat = state.chat;
  const history = state.turns.slice(0, state.turns.indexOf(reply));
  let retried = false;
  try {
    for (;;) {
      let messages, fresh;
      try {
        ({ messages, fresh } = await apiMessages(history));
      } catch (e) {
        throw new ApiError(`An attached clip could not be read (${(e && e.message) || e}).`);
      }
      const reused = history.some((t) => t.clips && t.clips.some((c) => c.uploaded));
      try {
        const { finishReason } = await streamChat({ model, messages, ...sampling }, {
          signal: controller.signal,
          onOpen: () => markUploaded(fresh),
          onDelta: (piece) => {
            const stick = nearBottom();
            reply.text += piece;
            renderReply(reply);
            if (stick) scrollToEnd();
          },
        });
        finishReply(reply, "done", finishReason === "length" ? "Cut off at the max tokens limit." : "");
        reply.el.dataset.finish = finishReason || "";
        return;
      } catch (e) {
        // The server forgot a clip sent earlier (restarted, or its cache evicted it): send the bytes again, once.
        const unknownUuid = e instanceof ApiError && [400, 404, 422].includes(e.status)
          && (e.code === "unknown_uuid" || /uuid/i.test(`${e.message} ${e.param || ""}`));
        if (unknownUuid && reused && !retried && !reply.text) {
          retried = true;
          for (const t of state.turns) for (const c of t.clips || []) c.uploaded = false;
          continue;
        }
        throw e;
      }
    }
  } catch (e) {
    if (chat !== state.chat) return;  // "New chat" stopped it: that conversation is gone
    if (!reply.text) {
      takeBack(user, reply);  // nothing came back: the message returns to the composer, to edit or resend
      if (!e.aborted) showError(e);
    } else if (e.aborted) {
      finishReply(reply, "stopped", "Stopped.");
    } else {
      finishReply(reply, "error", "The reply was interrupted.");
      showError(e);
    }
  } finally {
    endBusy(controller);
  }
}

function markUploaded(clips) {
  for (const c of clips) { c.uploaded = true; c.base64 = null; }
}

function takeBack(user, reply) {
  state.turns = state.turns.filter((t) => t !== user && t !== reply);
  user.el.remove();
  reply.el.remove();
  const typed = ui.prompt.value.trim();
  ui.prompt.value = typed ? `${user.text}\n${typed}` : user.text;
  autosize();
  state.pending = [...user.clips, ...state.pending];
  renderTray();
  updateEmpty();
}

function beginBusy() {
  const c = new AbortController();
  state.controller = c;
  updateBusy();
  return c;
}

function endBusy(c) {
  if (state.controller === c) state.controller = null;
  updateBusy();
}

function updateBusy() {
  const busy = Boolean(state.controller);
  const focusWasOnSend = document.activeElement === ui.send;
  const focusWasOnStop = document.activeElement === ui.stop;
  ui.send.disabled = busy;
  ui.stop.hidden = !busy;
  ui.composer.setAttribute("aria-busy", String(busy));
  for (const b of document.querySelectorAll("button.transcribe")) b.disabled = busy;
  if (busy && focusWasOnSend) ui.stop.focus();
  if (!busy && (focusWasOnStop || document.activeElement === document.body)) ui.prompt.focus();
}

function stopRequest() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  state.chat += 1;
  stopRequest();
  for (const t of state.turns) for (const c of t.clips || []) if (!state.pending.includes(c)) URL.revokeObjectURL(c.url);
  state.turns = [];
  for (const node of ui.log.querySelectorAll(".msg, .transcript")) node.remove();
  hideError();
  updateEmpty();
  ui.prompt.focus();
}

// ---------------------------------------------------------------------------------------------- transcription
function transcriptCard(clip, model) {
  const list = h("ol", { class: "segments" });
  const body = h("div", { class: "transcript-body" },
    h("div", { class: "transcript-loading", role: "status" }, h("span", { class: "spinner", "aria-hidden": "true" }),
      h("span", { text: `Transcribing ${clip.label}…` })));
  const actions = h("div", { class: "transcript-actions", hidden: true });
  const meta = h("span", { class: "transcript-meta", text: clip.label });
  const el = h("article", { class: "transcript", "aria-label": `Transcript of ${clip.label}`,
                            dataset: { state: "loading" } },
    h("header", { class: "transcript-head" }, h("span", { class: "transcript-icon" }, icon("text")),
      h("h2", { text: "Transcript" }), meta),
    body, actions);
  const stem = uploadName(clip).replace(/\.[^.]+$/, "") || "transcript";
  const cache = {};

  async function download(format, button) {
    button.disabled = true;
    button.classList.add("loading");
    try {
      if (cache[format] == null) {
        cache[format] = await transcribe(clip.blob, uploadName(clip), { model, responseFormat: format });
      }
      saveText(cache[format], `${stem}.${format}`, format === "srt" ? "application/x-subrip" : "text/vtt");
    } catch (e) {
      showError(e, `The ${format.toUpperCase()} file could not be made`);
    } finally {
      button.disabled = false;
      button.classList.remove("loading");
    }
  }

  function show(result) {
    const segments = Array.isArray(result && result.segments) ? result.segments : [];
    const text = (result && typeof result.text === "string" ? result.text : "").trim();
    if (result && Number.isFinite(result.duration)) meta.textContent = `${clip.label} · ${clock(result.duration)}`;
    for (const s of segments) {
      list.append(h("li", { class: "segment" },
        h("span", { class: "ts", text: `[${stamp(s.start)} → ${stamp(s.end)}]` }), " ",
        h("span", { class: "seg-text", text: String(s.text ?? "").trim() })));
    }
    body.replaceChildren(segments.length ? list
      : h("p", { class: text ? "transcript-text" : "transcript-text muted", text: text || "No speech was found." }));
    const srt = h("button", { type: "button", class: "btn small download-srt", title: `Download ${stem}.srt` },
      icon("download"), h("span", { text: "SRT" }));
    const vtt = h("button", { type: "button", class: "btn small download-vtt", title: `Download ${stem}.vtt` },
      icon("download"), h("span", { text: "VTT" }));
    const copy = h("button", { type: "button", class: "btn small subtle copy-transcript" },
      icon("copy"), h("span", { text: "Copy text" }));
    srt.addEventListener("click", () => download("srt", srt));
    vtt.addEventListener("click", () => download("vtt", vtt));
    copy.addEventListener("click", () => copyText(
      segments.length ? segments.map((s) => `[${stamp(s.start)} → ${stamp(s.end)}] ${String(s.text ?? "").trim()}`)
        .join("\n") : text, copy));
    actions.replaceChildren(h("span", { class: "actions-label", text: "Subtitles" }), srt, vtt,
                            h("span", { class: "spacer" }), copy);
    actions.hidden = false;
    el.dataset.state = "done";
  }

  return { el, show };
}

async function runTranscription(clip) {
  if (state.controller) return;
  const model = ui.model.value;  // transcription uses the base model, never ":think"
  hideError();
  const card = transcriptCard(clip, model);
  appendToLog(card.el);
  const controller = beginBusy();
  try {
    const result = await transcribe(clip.blob, uploadName(clip), { model, responseFormat: "verbose_json",
                                                                    signal: controller.signal });
    card.show(result);
    scrollToEnd();
  } catch (e) {
    card.el.remove();
    updateEmpty();
    if (!e.aborted) showError(e);
  } finally {
    endBusy(controller);
  }
}

function saveText(text, filename, mime) {
  const url = URL.createObjectURL(new Blob([text], { type: `${mime};charset=utf-8` }));
  const a = h("a", { href: url, download: filename, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

async function copyText(text, button) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch {
    const area = h("textarea", { class: "visually-hidden", readonly: true });
    area.value = text;
    document.body.append(area);
    area.select();
    try { ok = document.execCommand("copy"); } catch { ok = false; }
    area.remove();
  }
  if (!button) return;
  const label = button.querySelector("span");
  const before = label ? label.textContent : null;
  button.classList.add(ok ? "done" : "failed");
  if (label) label.textContent = ok ? "Copied" : "Copy failed";
  button.title = ok ? "Copied" : "Copy failed";
  setTimeout(() => {
    button.classList.remove("done", "failed");
    if (label) label.textContent = before;
    button.title = "Copy";
  }, 1500);
}

// ---------------------------------------------------------------------------------------------- composer
function autosize() {
  const p = ui.prompt;
  p.style.height = "auto";
  p.style.height = `${Math.min(p.scrollHeight, 220)}px`;
}

function hasFiles(event) {
  return Boolean(event.dataTransfer) && Array.from(event.dataTransfer.types || []).includes("Files");
}

let dragDepth = 0;

function wire() {
  for (const slot of document.querySelectorAll(".icon[data-icon]")) slot.replaceChildren(icon(slot.dataset.icon));

  ui.composer.addEventListener("submit", onSubmit);
  ui.prompt.addEventListener("input", autosize);
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      ui.composer.requestSubmit();
    }
  });
  ui.prompt.addEventListener("paste", (e) => {
    const files = Array.from((e.clipboardData && e.clipboardData.files) || []);
    if (files.length) { e.preventDefault(); addFiles(files); }
  });
  ui.attach.addEventListener("click", () => ui.fileInput.click());
  ui.fileInput.addEventListener("change", () => {
    addFiles(Array.from(ui.fileInput.files || []));
    ui.fileInput.value = "";
  });
  ui.record.addEventListener("click", toggleRecording);
  if (!canRecord()) {
    ui.record.setAttribute("aria-disabled", "true");
    ui.record.classList.add("unavailable");
    ui.record.title = "Recording needs https or localhost (the browser gives no microphone here)";
  }
  ui.stop.addEventListener("click", stopRequest);
  ui.newChat.addEventListener("click", newChat);
  ui.errorDismiss.addEventListener("click", () => { hideError(); ui.prompt.focus(); });
  for (const b of document.querySelectorAll(".suggestion")) {
    b.addEventListener("click", () => { ui.prompt.value = b.textContent; autosize(); ui.prompt.focus(); });
  }

  ui.settingsToggle.addEventListener("click", () => setSettingsOpen(ui.settings.hidden));
  ui.settingsClose.addEventListener("click", () => { setSettingsOpen(false); ui.settingsToggle.focus(); });
  narrow.addEventListener("change", (e) => setSettingsOpen(!e.matches));
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    if (state.controller) { stopRequest(); return; }
    if (narrow.matches && !ui.settings.hidden) { setSettingsOpen(false); ui.settingsToggle.focus(); }
  });
  document.addEventListener("pointerdown", (e) => {  // on narrow screens the settings float: a click outside closes
    if (narrow.matches && !ui.settings.hidden && !ui.settings.contains(e.target)
        && !ui.settingsToggle.contains(e.target)) setSettingsOpen(false);
  });

  $("#settings-form").addEventListener("submit", (e) => { e.preventDefault(); loadModels(); });
  ui.model.addEventListener("change", () => { updateThink(); saveSettings(); });
  ui.think.addEventListener("change", () => { state.prefs.think = ui.think.checked; saveSettings(); });
  linkRange(ui.temperatureRange, ui.temperature);
  linkRange(ui.topPRange, ui.topP);
  ui.maxTokens.addEventListener("input", saveSettings);
  ui.apiKey.addEventListener("input", () => { store.set(API_KEY_KEY, ui.apiKey.value.trim()); setApiKey(ui.apiKey.value); });
  ui.apiKey.addEventListener("change", () => { hideError(); loadModels(); });
  ui.apiKeyShow.addEventListener("click", () => {
    const show = ui.apiKey.type === "password";
    ui.apiKey.type = show ? "text" : "password";
    ui.apiKeyShow.textContent = show ? "Hide" : "Show";
    ui.apiKeyShow.setAttribute("aria-pressed", String(show));
  });

  window.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth += 1;
    ui.dropOverlay.hidden = false;
  });
  window.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
  });
  window.addEventListener("dragleave", (e) => {
    if (!hasFiles(e)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) ui.dropOverlay.hidden = true;
  });
  window.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth = 0;
    ui.dropOverlay.hidden = true;
    addFiles(Array.from(e.dataTransfer.files || []));
  });
  window.addEventListener("focus", checkHealth);
  setInterval(() => { if (document.visibilityState === "visible") checkHealth(); }, 30_000);
}

restoreSettings();
wire();
setSettingsOpen(!narrow.matches);
updateEmpty();
document.body.dataset.ready = "true";
checkHealth();
loadModels().finally(() => { document.body.dataset.models = "loaded"; });
