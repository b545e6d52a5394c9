// The Train page: pickers, data preview, the config form (generated from the schema), runs and the live chart.
import { $, api, el, fmt, duration } from "./api.js";
import { LineChart } from "./chart.js";

const lossChart = new LineChart($("loss-chart"), { label: "loss" });
const lrChart = new LineChart($("lr-chart"), { label: "learning rate", color: "#d6802f" });
let schemaFields = {}, currentRun = null, source = null, checkTimer = null, runStats = {};

// ---- the form ----------------------------------------------------------------------------------------------
function inputFor(field) {
  let input;
  if (field.choices && field.choices.length) {
    input = el("select", { "data-key": field.key }, el("option", { value: "", text: `(default: ${field.default})` }));
    for (const c of field.choices) input.append(el("option", { value: String(c), text: String(c) }));
  } else if (field.type === "bool") {
    input = el("select", { "data-key": field.key }, el("option", { value: "", text: `(default: ${field.default})` }),
      el("option", { value: "true", text: "true" }), el("option", { value: "false", text: "false" }));
  } else {
    const shown = field.default === null || field.default === undefined ? "" : (Array.isArray(field.default) ? field.default.join(", ") : String(field.default));
    input = el("input", { "data-key": field.key, placeholder: shown });
  }
  input.addEventListener("change", scheduleCheck);
  input.addEventListener("input", scheduleCheck);
  return input;
}

// Values go as typed: the server reads each text as the YAML loader reads it after "key: ".
function typed(field, text) { return text; }

export function formValues() {
  const values = {};
  for (const input of document.querySelectorAll("#config-form [data-key]")) {
    if (input.value === "") continue;
    values[input.dataset.key] = typed(schemaFields[input.dataset.key] || {}, input.value);
  }
  return values;
}

function setFormValues(values) {
  for (const input of document.querySelectorAll("#config-form [data-key]")) {
    const v = values[input.dataset.key];
    input.value = v === undefined || v === null ? "" : (Array.isArray(v) ? v.join(", ") : String(v));
  }
  scheduleCheck();
}

function markErrors(errors) {
  for (const node of document.querySelectorAll("#config-form .field")) {
    node.classList.remove("bad"); const why = node.querySelector(".why"); if (why) why.remove();
  }
  for (const error of errors) {
    const input = document.querySelector(`#config-form [data-key="${error.field}"]`);
    if (!input) continue;
    const row = input.closest(".field"); row.classList.add("bad");
    row.append(el("span", { class: "why", text: error.message }));
  }
}

function scheduleCheck() {
  clearTimeout(checkTimer);
  checkTimer = setTimeout(async () => {
    try {
      const checked = await api("/api/config/check", { values: formValues() });
      markErrors(checked.errors);
      $("start-button").disabled = checked.errors.length > 0;
      if (!$("yaml-view").classList.contains("hidden") && checked.yaml) $("yaml-view").textContent = checked.yaml;
    } catch (e) { $("train-error").textContent = e.message; }
  }, 250);
}

async function buildForm() {
  const schema = await api("/api/config/schema");
  const form = $("config-form"); form.replaceChildren();
  const sections = [{ name: "", help: "", fields: schema.top_level }, ...schema.sections];
  for (const section of sections) {
    const set = el("fieldset", { "data-section": section.name }, el("legend", { text: section.name || "top level" }));
    if (section.objectives) {
      set.dataset.objectives = section.objectives.join(" ");
      set.append(el("p", { class: "hint", text: `read by: ${section.objectives.join(", ")}` }));
    }
    if (section.help) set.append(el("p", { class: "hint", text: section.help }));
    for (const field of section.fields) {
      schemaFields[field.key] = field;
      if (["model.path", "data.path", "train.output_dir", "train.resume", "train.overwrite"].includes(field.key)) continue;
      set.append(el("div", { class: "field", title: `${field.help || ""}${field.bound ? ` (${field.bound.text})` : ""}` },
        el("span", { text: field.key }), inputFor(field)));
    }
    form.append(set);
  }
  const objective = document.querySelector("#config-form [data-key='objective']");
  if (objective) objective.addEventListener("change", showSections);
  showSections();
}

// Sections that only some objectives read (preference, grpo, embedding) show when one of them is chosen.
function showSections() {
  const input = document.querySelector("#config-form [data-key='objective']");
  const chosen = (input && input.value) || (schemaFields.objective && schemaFields.objective.default) || "sft";
  for (const set of document.querySelectorAll("#config-form fieldset[data-objectives]")) {
    set.classList.toggle("hidden", !set.dataset.objectives.split(" ").includes(chosen));
  }
}

// ---- preview -------------------------------------------------------------------------------------------------
export function tokenView(tokens) {
  const box = el("div", { class: "tokens" });
  for (const t of tokens) box.append(el("span", { class: `tok${t.trained ? " trained" : ""}${t.special ? " special" : ""}`, title: `id ${t.id}`, text: t.text }));
  return box;
}

async function preview() {
  $("train-error").textContent = "";
  const box = $("preview"); box.replaceChildren(el("p", { class: "hint", text: "reading…" }));
  try {
    const p = await api("/api/data/preview", { model: $("train-model").value, data: $("train-data").value, values: formValues() });
    box.replaceChildren(el("p", { id: "preview-format", text: `format: ${p.format} · ${p.rows} rows · template: ${p.template ? (p.template.name || p.template.source || "custom") : "none"}` }));
    for (const w of p.warnings || []) box.append(el("p", { class: "hint", text: w }));
    for (const s of p.samples) {
      box.append(el("pre", { class: "sample-text", text: s.text }));
      box.append(el("p", { class: "hint", text: `${s.trained_tokens} of ${s.tokens_total} tokens trained` }));
      box.append(tokenView(s.tokens));
    }
  } catch (e) { box.replaceChildren(); $("train-error").textContent = e.message; }
}

// ---- runs ----------------------------------------------------------------------------------------------------
export async function refreshRuns() {
  const { runs } = await api("/api/runs");
  const body = document.querySelector("#runs tbody"); body.replaceChildren();
  for (const run of runs) {
    const s = run.summary || {};
    const row = el("tr", { "data-run": run.id, class: currentRun === run.id ? "selected" : "" },
      el("td", { text: run.name }), el("td", { class: "status", text: run.status }),
      el("td", { text: s.total_steps ? `${s.step || 0}/${s.total_steps}` : "" }), el("td", { text: fmt(s.loss) }),
      el("td", {}, el("button", { text: "open", onclick: () => openRun(run.id) })));
    body.append(row);
  }
  return runs;
}

function showStats() {
  const s = runStats;
  const rate = s.elapsed && s.step > s.startStep ? s.elapsed / (s.step - s.startStep) : null;
  const eta = rate && s.total ? rate * (s.total - s.step) : null;
  $("run-stats").textContent = `status ${s.status || "…"} · step ${s.step ?? 0}/${s.total ?? "?"} · loss ${fmt(s.loss)} · lr ${fmt(s.lr)} · ` +
    `${fmt(s.tps, 0)} tok/s · ETA ${s.status === "running" ? duration(eta) : "–"}`;
  $("run-stop").disabled = s.status !== "running";
}

let exportTimer = null;

async function showExports(runId, finished) {
  clearTimeout(exportTimer);
  $("run-exports").classList.toggle("hidden", !finished);
  if (!finished) return;
  const { exports } = await api(`/api/runs/${runId}/exports`);
  $("export-list").replaceChildren(...exports.map((e) => el("li", { "data-export": e.name, class: e.status },
    `${e.name}: ${e.status}${e.status === "done" ? ` → ${e.ref}` : ""}${e.log_tail ? ` (${e.log_tail.join(" ")})` : ""}`)));
  if (exports.some((e) => e.status === "running") && currentRun === runId) exportTimer = setTimeout(() => showExports(runId, true), 1000);
}

export async function openRun(runId) {
  if (source) source.close();
  currentRun = runId; lossChart.clear(); lrChart.clear();
  const run = await api(`/api/runs/${runId}`);
  $("run-view").classList.remove("hidden");
  $("run-title").textContent = run.name; $("run-error").textContent = "";
  runStats = { status: run.status, startStep: 0 };
  $("run-resume").disabled = !run.resumable; $("run-chat").disabled = !(run.adapter || run.trained_model);
  $("run-chat").dataset.adapter = run.adapter || ""; $("run-chat").dataset.model = run.trained_model || run.model;
  showStats(); showExports(runId, run.status === "finished");
  document.querySelectorAll("#runs tr").forEach((r) => r.classList.toggle("selected", r.dataset.run === runId));
  // EventSource reconnects by itself with Last-Event-ID; a new page gets every event from the start.
  source = new EventSource(`/api/runs/${runId}/events`);
  source.addEventListener("start", (e) => { const d = JSON.parse(e.data); runStats.total = d.total_steps; runStats.startStep = d.step; runStats.status = "running"; showStats(); });
  source.addEventListener("step", (e) => {
    const d = JSON.parse(e.data), m = d.metrics;
    lossChart.add(d.step, m.loss); lrChart.add(d.step, m.lr);
    Object.assign(runStats, { step: d.step, total: d.total_steps, loss: m.loss, lr: m.lr, tps: m.input_tokens_per_s, elapsed: m.elapsed_s });
    showStats();
  });
  source.addEventListener("stopped", () => { runStats.status = "stopped"; showStats(); });
  source.addEventListener("failed", (e) => { $("run-error").textContent = JSON.parse(e.data).error; });
  source.addEventListener("end", async (e) => {
    source.close(); runStats.status = JSON.parse(e.data).status; showStats();
    const runs = await refreshRuns(); const r = runs.find((x) => x.id === runId);
    if (r) {
      $("run-resume").disabled = !r.resumable; $("run-chat").disabled = !(r.adapter || r.trained_model);
      $("run-chat").dataset.adapter = r.adapter || ""; $("run-chat").dataset.model = r.trained_model || r.model;
      showExports(runId, r.status === "finished");
    }
  });
}

export function setupTrain(goChat) {
  buildForm().then(scheduleCheck).catch((e) => { $("train-error").textContent = e.message; });
  refreshRuns();
  $("preview-button").addEventListener("click", preview);
  $("yaml-button").addEventListener("click", () => { $("yaml-view").classList.toggle("hidden"); scheduleCheck(); });
  $("yaml-load").addEventListener("click", async () => {
    try { setFormValues((await api("/api/config/from-yaml", { yaml: $("yaml-input").value })).values); }
    catch (e) { $("train-error").textContent = e.message; }
  });
  $("start-button").addEventListener("click", async () => {
    $("train-error").textContent = "";
    try {
      const run = await api("/api/runs", { model: $("train-model").value, data: $("train-data").value, name: $("train-name").value || null, values: formValues() });
      await refreshRuns(); await openRun(run.id);
    } catch (e) { $("train-error").textContent = e.message; }
  });
  $("run-stop").addEventListener("click", async () => { await api(`/api/runs/${currentRun}/stop`, {}); $("run-stop").disabled = true; });
  $("run-resume").addEventListener("click", async () => {
    try { await api(`/api/runs/${currentRun}/resume`, {}); await refreshRuns(); await openRun(currentRun); }
    catch (e) { $("run-error").textContent = e.message; }
  });
  $("export-format").addEventListener("change", () => { $("export-quant").disabled = $("export-format").value !== "gguf"; });
  $("export-quant").disabled = true;
  $("export-button").addEventListener("click", async () => {
    $("run-error").textContent = "";
    try {
      await api(`/api/runs/${currentRun}/exports`, { format: $("export-format").value,
        quant: $("export-format").value === "gguf" ? $("export-quant").value : null });
      await showExports(currentRun, true);
    } catch (e) { $("run-error").textContent = e.message; }
  });
  $("run-chat").addEventListener("click", () => goChat($("run-chat").dataset.model, $("run-chat").dataset.adapter));
}

export const charts = { lossChart, lrChart };
