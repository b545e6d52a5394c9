// Talking to the Studio's API: JSON calls and OpenAI-style streams.
export const $ = (id) => document.getElementById(id);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v); else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

export class ApiError extends Error {
  constructor(message, field, status) { super(message); this.field = field; this.status = status; }
}

async function failure(response) {
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  const error = body && body.error ? body.error : {};
  return new ApiError(error.message || `${response.status} ${response.statusText}`, error.field, response.status);
}

// Every change carries X-Velotune-Studio: a page of another site cannot add it (see guard.py).
export async function api(path, body = undefined, method = undefined) {
  const options = { method: method || (body === undefined ? "GET" : "POST"), headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  if (options.method !== "GET") options.headers["X-Velotune-Studio"] = "1";
  const response = await fetch(path, options);
  if (!response.ok) throw await failure(response);
  return response.json();
}

export async function upload(file) {
  const response = await fetch(`/api/uploads?name=${encodeURIComponent(file.name)}`, {
    method: "POST", body: file, headers: { "X-Velotune-Studio": "1", "Content-Type": "application/octet-stream" } });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// Streams a chat answer: calls onText(piece) per delta; resolves with timings and usage.
// Time to first token counts from the click (the call) to the first text piece.
export async function streamChat(body, onText, onStart = () => {}) {
  const started = performance.now();
  const response = await fetch("/api/chat", { method: "POST",
    headers: { "Content-Type": "application/json", "X-Velotune-Studio": "1" }, body: JSON.stringify(body) });
  if (!response.ok) throw await failure(response);
  onStart(JSON.parse(response.headers.get("X-Velotune-Notices") || "[]"));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", firstAt = null, usage = null, finish = null, text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) { if (firstAt === null) firstAt = performance.now(); text += piece; onText(piece); }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
  const ended = performance.now();
  const tokens = usage ? usage.completion_tokens : null;
  const decodeS = firstAt === null ? null : (ended - firstAt) / 1000;
  return { text, usage, finish, ttftMs: firstAt === null ? null : firstAt - started, totalMs: ended - started,
           tokensPerS: tokens && decodeS > 0 ? (tokens - 1) / decodeS : null };
}

export function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Math.abs(value) >= 1e4 || (Math.abs(value) < 1e-3 && value !== 0)) return value.toExponential(2);
  return Number(value.toFixed(digits)).toString();
}

export function duration(seconds) {
  if (seconds === null || !isFinite(seconds)) return "–";
  const s = Math.round(seconds);
  return s >= 3600 ? `${Math.floor(s / 3600)}h${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`
       : s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s` : `${s}s`;
}
