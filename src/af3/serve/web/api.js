// The page's only contact with the server: af3's public, OpenAI-compatible HTTP API.
//   GET  /health                     -> {"status": "ok"}
//   GET  /v1/models                  -> {"object": "list", "data": [{"id": ...}, ...]}
//   POST /v1/chat/completions        -> server-sent events (stream: true)
//   POST /v1/audio/transcriptions    -> verbose_json | json | srt | vtt
// Every failure becomes an ApiError whose message is the one a person should read.

/** An API or network failure. `status` is the HTTP status (0 for network errors and mid-stream errors). */
export class ApiError extends Error {
  constructor(message, { status = 0, type = null, param = null, code = null,
                         network = false, aborted = false, midStream = false } = {}) {
    super(message);
    this.name = "ApiError";
    Object.assign(this, { status, type, param, code, network, aborted, midStream });
  }
}

let apiKey = "";

/** The bearer token sent with every API request (empty: no Authorization header). */
export function setApiKey(key) {
  apiKey = (key || "").trim();
}

function withAuth(headers = {}) {
  return apiKey ? { ...headers, Authorization: `Bearer ${apiKey}` } : { ...headers };
}

function isAbort(e, signal) {
  return (signal && signal.aborted) || (e && e.name === "AbortError");
}

async function send(path, { signal, headers, ...init } = {}) {
  let res;
  try {
    res = await fetch(path, { ...init, signal, headers: withAuth(headers), cache: "no-store" });
  } catch (e) {
    if (isAbort(e, signal)) throw new ApiError("Stopped.", { aborted: true });
    throw new ApiError(`Could not reach the server at ${location.origin} (${e.message || e}).`,
                       { network: true });
  }
  if (!res.ok) throw await errorFrom(res);
  return res;
}

/** The ApiError for a non-2xx response: the API's `error.message` when it sent one. */
async function errorFrom(res) {
  let text = "";
  try { text = await res.text(); } catch { /* body unreadable: fall back to the status line */ }
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  const err = body && body.error;
  if (err && typeof err === "object" && err.message) {
    return new ApiError(String(err.message), { status: res.status, type: err.type ?? null,
                                               param: err.param ?? null, code: err.code ?? null });
  }
  if (typeof err === "string" && err) return new ApiError(err, { status: res.status });
  if (body && body.detail) {  // a plain FastAPI error
    const d = body.detail;
    const msg = typeof d === "string" ? d
      : Array.isArray(d) ? d.map((x) => [x.loc && x.loc.join("."), x.msg].filter(Boolean).join(": ")).join("; ")
      : JSON.stringify(d);
    return new ApiError(msg, { status: res.status });
  }
  const snippet = text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim().slice(0, 200);
  const line = `HTTP ${res.status}${res.statusText ? " " + res.statusText : ""}`;
  return new ApiError(snippet ? `${line}: ${snippet}` : line, { status: res.status });
}

export async function health({ signal } = {}) {
  const res = await send("/health", { signal });
  return res.json();
}

/** The ids the server serves, in its order. */
export async function listModels({ signal } = {}) {
  const res = await send("/v1/models", { signal });
  const body = await res.json();
  return (body && Array.isArray(body.data) ? body.data : []).map((m) => m && m.id).filter(Boolean);
}

/** Server-sent events from a fetch body: yields each event's `data` (multi-line data joined with "\n"). */
export async function* readSSE(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  const boundary = /\r\n\r\n|\n\n|\r\r/;
  let buf = "";
  let finished = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let m;
      while ((m = boundary.exec(buf))) {
        const data = eventData(buf.slice(0, m.index));
        buf = buf.slice(m.index + m[0].length);
        if (data !== null) yield data;
      }
    }
    finished = true;
    buf += decoder.decode();
    const data = eventData(buf);
    if (data !== null) yield data;
  } finally {
    if (!finished) reader.cancel().catch(() => {});
    else reader.releaseLock();
  }
}

function eventData(block) {
  const data = [];
  for (const line of block.split(/\r\n|\r|\n/)) {
    if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return data.length ? data.join("\n") : null;
}

/**
 * POST /v1/chat/completions with `stream: true`; calls onDelta(text) for each piece of the reply as it arrives.
 * onOpen() runs once the server accepted the request (HTTP 2xx). Resolves to {finishReason}.
 * Throws ApiError: before streaming (status set), mid-stream (midStream: true), on Stop (aborted: true).
 */
export async function streamChat(body, { signal, onDelta, onOpen }) {
  const res = await send("/v1/chat/completions", {
    method: "POST", signal, body: JSON.stringify({ ...body, stream: true }),
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
  });
  if (onOpen) onOpen();
  const ctype = res.headers.get("content-type") || "";
  try {
    if (!ctype.includes("text/event-stream")) {  // a server that answered in one piece
      const json = await res.json();
      const c = json && json.choices && json.choices[0];
      if (c && c.message && c.message.content) onDelta(c.message.content);
      return { finishReason: (c && c.finish_reason) || null };
    }
    let finishReason = null;
    let sawDone = false;
    for await (const data of readSSE(res.body)) {
      if (data.trim() === "[DONE]") { sawDone = true; break; }
      let event;
      try { event = JSON.parse(data); } catch {
        throw new ApiError(`The server sent an unreadable event: ${data.slice(0, 120)}`, { midStream: true });
      }
      if (event && event.error) {
        const e = event.error;
        throw new ApiError(String((e && e.message) || e), { midStream: true, type: e.type ?? null,
                                                            param: e.param ?? null, code: e.code ?? null });
      }
      const choice = event && event.choices && event.choices[0];
      if (!choice) continue;
      const piece = choice.delta && choice.delta.content;
      if (piece) onDelta(piece);
      if (choice.finish_reason) finishReason = choice.finish_reason;
    }
    if (!sawDone && !finishReason) {
      throw new ApiError("The connection closed before the reply was complete.", { midStream: true, network: true });
    }
    return { finishReason };
  } catch (e) {
    if (e instanceof ApiError) throw e;
    if (isAbort(e, signal)) throw new ApiError("Stopped.", { aborted: true, midStream: true });
    throw new ApiError(`The connection dropped while the reply was streaming (${e.message || e}).`,
                       { network: true, midStream: true });
  }
}

/**
 * POST /v1/audio/transcriptions (multipart: file, model, response_format).
 * verbose_json / json resolve to the parsed object; srt / vtt / text to the text.
 */
export async function transcribe(blob, filename, { model, responseFormat = "verbose_json", signal } = {}) {
  const form = new FormData();
  form.append("file", blob, filename);
  if (model) form.append("model", model);
  form.append("response_format", responseFormat);
  const res = await send("/v1/audio/transcriptions", { method: "POST", body: form, signal });
  try {
    return responseFormat === "json" || responseFormat === "verbose_json" ? await res.json() : await res.text();
  } catch (e) {
    if (isAbort(e, signal)) throw new ApiError("Stopped.", { aborted: true });
    throw new ApiError(`The connection dropped while the transcription arrived (${e.message || e}).`,
                       { network: true });
  }
}
