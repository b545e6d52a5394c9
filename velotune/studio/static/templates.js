// The chat-template editor: the template in use and why, a live render of a sample conversation as text and as
// tokens with the loss mask, Jinja errors with their line, and saving the template with the model or adapter.
import { $, api, el } from "./api.js";
import { tokenView } from "./train.js";

let timer = null;

function schedule() { clearTimeout(timer); timer = setTimeout(render, 250); }

async function render() {
  $("tpl-error").textContent = "";
  let messages;
  try { messages = JSON.parse($("tpl-messages").value); }
  catch (e) { $("tpl-error").textContent = `sample conversation: not JSON (${e.message})`; return; }
  try {
    const p = await api("/api/templates/preview", { model: $("tpl-model").value, template: $("tpl-editor").value,
      messages, add_generation_prompt: $("tpl-genprompt").checked });
    if (p.error) {
      const where = p.error.line ? `line ${p.error.line}: ` : "";
      $("tpl-error").textContent = `${p.error.kind} error: ${where}${p.error.message}`;
      return;
    }
    $("tpl-text").textContent = p.text;
    $("tpl-tokens").replaceChildren(...tokenView(p.tokens).childNodes);
  } catch (e) { $("tpl-error").textContent = e.message; }
}

async function load() {
  $("tpl-error").textContent = ""; $("tpl-saved").textContent = "";
  const adapter = $("tpl-adapter").value.trim();
  try {
    const info = await api(`/api/templates?model=${encodeURIComponent($("tpl-model").value)}` +
                           (adapter ? `&adapter=${encodeURIComponent(adapter)}` : ""));
    $("tpl-source").textContent = `in use: ${info.name ? `'${info.name}'` : "a custom template"} (${info.source}) — ${info.reason}`;
    $("tpl-editor").value = info.text || "";
    if (!$("tpl-messages").value) $("tpl-messages").value = JSON.stringify(info.sample, null, 1);
    await render();
  } catch (e) { $("tpl-error").textContent = e.message; }
}

async function save() {
  const adapter = $("tpl-adapter").value.trim();
  try {
    const r = await api("/api/templates/save", { directory: adapter || $("tpl-model").value, template: $("tpl-editor").value });
    $("tpl-saved").textContent = `saved: ${r.saved}`;
  } catch (e) { $("tpl-error").textContent = e.message; }
}

export function setupTemplates() {
  $("tpl-load").addEventListener("click", load);
  $("tpl-save").addEventListener("click", save);
  for (const id of ["tpl-editor", "tpl-messages"]) $(id).addEventListener("input", schedule);
  $("tpl-genprompt").addEventListener("change", schedule);
}
