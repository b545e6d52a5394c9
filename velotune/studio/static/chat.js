// The Chat page: a model (+ adapter), its generation settings with where each value comes from, files as
// context, and a streaming conversation that is saved as it goes.
import { $, api, el, fmt, streamChat, upload } from "./api.js";

let defaults = null, overrides = {}, messages = [], files = [], chatId = null, contextLength = null;

function modelBody() {
  const adapter = $("chat-adapter").value.trim();
  return { model: $("chat-model").value.trim(), adapter: adapter || null };
}

function showSettings() {
  const body = document.querySelector("#chat-settings tbody"); body.replaceChildren();
  if (!defaults) return;
  for (const [name, value] of Object.entries(defaults.values)) {
    const mine = name in overrides;
    const input = el("input", { "data-setting": name, value: mine ? overrides[name] : (value ?? "") });
    input.addEventListener("change", () => {
      if (input.value === "" || input.value === String(defaults.values[name] ?? "")) delete overrides[name];
      else overrides[name] = Number(input.value);
      showSettings();
    });
    body.append(el("tr", {}, el("td", { text: name }), el("td", {}, input),
      el("td", { class: `source${mine ? " you" : ""}`, "data-source": name, text: mine ? "you" : defaults.sources[name] })));
  }
}

async function load() {
  $("chat-error").textContent = "";
  try {
    defaults = await api(`/api/chat/settings?model=${encodeURIComponent(modelBody().model)}` +
                         (modelBody().adapter ? `&adapter=${encodeURIComponent(modelBody().adapter)}` : ""));
    contextLength = defaults.context_length;
    showSettings(); await refreshPrompt();
  } catch (e) { $("chat-error").textContent = e.message; }
}

function requestBody(withDraft) {
  const draft = $("chat-input").value;
  const convo = withDraft ? [...messages, { role: "user", content: draft || "…" }] : messages;
  return { ...modelBody(), system: $("chat-system").value || null, messages: convo,
           settings: overrides, attachments: files.map((f) => f.id) };
}

function showFiles(fitted) {
  const list = $("chat-file-list"); list.replaceChildren();
  files.forEach((f, i) => {
    const fit = fitted ? fitted[i] : null;
    const counts = f.kind === "image" ? `${f.bytes} bytes` : fit ? `${fit.tokens}${fit.truncated ? ` of ${fit.original_tokens}` : ""} tokens of ${contextLength}` : `${f.chars} characters`;
    const row = el("div", { class: "file", "data-file": f.name }, `${f.name} (${f.kind}) · ${counts} `,
      el("button", { text: "remove", onclick: () => { files.splice(i, 1); refreshPrompt(); } }));
    if (fit && fit.notice) row.append(el("span", { class: "notice", text: fit.notice }));
    list.append(row);
  });
}

async function refreshPrompt() {
  if (!defaults) { showFiles(null); return; }
  try {
    const p = await api("/api/chat/prompt", requestBody(true));
    $("chat-prompt").textContent = p.prompt;
    $("chat-rule").textContent = files.length ? p.rule : "";
    showFiles(p.files.length ? p.files : null);
  } catch (e) { $("chat-error").textContent = e.message; }
}

function bubble(role, text) {
  const node = el("div", { class: `msg ${role}` }, el("span", { class: "role", text: role }), el("span", { class: "text", text }));
  $("chat-log").append(node); return node.querySelector(".text");
}

async function send() {
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-error").textContent = ""; $("chat-send").disabled = true;
  const before = messages.length;
  messages.push({ role: "user", content: text });
  bubble("user", text); $("chat-input").value = "";
  const out = bubble("assistant", "");
  try {
    const body = requestBody(false);
    // the exact prompt is fetched beside the answer, not before it: it must not delay the first token
    api("/api/chat/prompt", body).then((p) => { $("chat-prompt").textContent = p.prompt; }).catch(() => {});
    const result = await streamChat(body, (piece) => { out.textContent += piece; });
    messages.push({ role: "assistant", content: result.text });
    $("chat-stats").textContent = `first token ${fmt(result.ttftMs, 0)} ms · ${fmt(result.tokensPerS, 1)} tok/s · ` +
      `${result.usage ? result.usage.completion_tokens : "?"} tokens · ${fmt(result.totalMs, 0)} ms · ${result.finish}`;
    files = [];   // the files went with this message
    showFiles(null);
    const saved = await api("/api/chats", { id: chatId, title: messages[0].content.slice(0, 60), model: modelBody(), messages, settings: overrides });
    chatId = saved.id;
    await refreshHistory();
  } catch (e) {
    messages.length = before; $("chat-error").textContent = e.message; out.parentNode.remove();
  } finally { $("chat-send").disabled = false; }
}

async function refreshHistory() {
  const { chats } = await api("/api/chats");
  const select = $("chat-history");
  select.replaceChildren(el("option", { value: "", text: "(a new chat)" }),
    ...chats.map((c) => el("option", { value: c.id, text: `${c.title} · ${new Date(c.updated * 1000).toLocaleString()}` })));
  if (chatId) select.value = chatId;
}

async function reopen(id) {
  if (!id) { messages = []; chatId = null; $("chat-log").replaceChildren(); return; }
  const chat = await api(`/api/chats/${id}`);
  $("chat-model").value = chat.model.model || ""; $("chat-adapter").value = chat.model.adapter || "";
  overrides = chat.settings || {};
  await load();
  messages = chat.messages; chatId = chat.id;
  $("chat-log").replaceChildren();
  for (const m of messages) bubble(m.role, m.content);
}

export function openChat(model, adapter) {
  $("chat-model").value = model || ""; $("chat-adapter").value = adapter || "";
  messages = []; chatId = null; $("chat-log").replaceChildren();
  return load();
}

export function setupChat() {
  refreshHistory();
  $("chat-history").addEventListener("change", (e) => reopen(e.target.value).catch((err) => { $("chat-error").textContent = err.message; }));
  $("chat-load").addEventListener("click", () => openChat($("chat-model").value, $("chat-adapter").value));
  $("chat-send").addEventListener("click", send);
  $("chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
  $("chat-files").addEventListener("change", async (e) => {
    $("chat-error").textContent = "";
    for (const file of e.target.files) {
      try { files.push(await upload(file)); } catch (err) { $("chat-error").textContent = err.message; }
    }
    e.target.value = "";
    await refreshPrompt();
  });
}
