// The Arena: one prompt to several models at once, each pane streaming with its own timings; in blind mode the
// names stay hidden (and the sides shuffled) until the vote.
import { $, api, el, fmt, streamChat } from "./api.js";

let round = null;

function addContestant(model = "", adapter = "") {
  const row = el("div", { class: "contestant" },
    el("input", { class: "c-model", placeholder: "models:...", value: model }),
    el("input", { class: "c-adapter", placeholder: "adapter (runs:... or none)", value: adapter }),
    el("button", { text: "remove", onclick: () => row.remove() }));
  $("contestants").append(row);
}

function contestants() {
  return [...document.querySelectorAll(".contestant")].map((r) => {
    const model = r.querySelector(".c-model").value.trim(), adapter = r.querySelector(".c-adapter").value.trim();
    return { model, adapter: adapter || null, name: adapter ? `${model} + ${adapter}` : model };
  }).filter((c) => c.model);
}

export async function refreshBoard() {
  const board = await api("/api/arena/leaderboard");
  const body = document.querySelector("#leaderboard tbody"); body.replaceChildren();
  for (const r of board.ratings) {
    body.append(el("tr", {}, el("td", { text: r.name }), el("td", { text: r.rating.toFixed(0) }),
      el("td", { text: `${r.ci_low.toFixed(0)} – ${r.ci_high.toFixed(0)}` }), el("td", { text: String(r.games) }),
      el("td", { text: `${r.wins} / ${r.losses} / ${r.ties} / ${r.both_bad}` })));
  }
}

async function sendAll() {
  $("arena-error").textContent = "";
  let players = contestants();
  const prompt = $("arena-prompt").value.trim();
  if (players.length < 2) { $("arena-error").textContent = "add at least two contestants"; return; }
  if (!prompt) return;
  const blind = $("arena-blind").checked;
  if (blind) players = players.map((p) => [Math.random(), p]).sort((a, b) => a[0] - b[0]).map((x) => x[1]);
  round = { players, prompt, blind, voted: false };
  const panes = $("arena-panes"); panes.replaceChildren();
  $("arena-vote").classList.add("hidden");
  const labels = players.map((p, i) => String.fromCharCode(65 + i));
  const runs = players.map((p, i) => {
    const out = el("div", { class: "out" }), stats = el("div", { class: "stats" });
    const title = el("h4", { class: "pane-title", text: blind ? `Model ${labels[i]}` : `${labels[i]}: ${p.name}` });
    panes.append(el("div", { class: "pane", "data-pane": labels[i] }, title, out, stats));
    p.title = title;
    return streamChat({ model: p.model, adapter: p.adapter, messages: [{ role: "user", content: prompt }] },
                      (piece) => { out.textContent += piece; })
      .then((r) => { stats.textContent = `first token ${fmt(r.ttftMs, 0)} ms · ${fmt(r.tokensPerS, 1)} tok/s · total ${fmt(r.totalMs, 0)} ms`; })
      .catch((e) => { stats.textContent = `error: ${e.message}`; });
  });
  await Promise.all(runs);
  if (players.length === 2) $("arena-vote").classList.remove("hidden");
}

async function vote(outcome) {
  if (!round || round.voted) return;
  round.voted = true;
  const [a, b] = round.players;
  await api("/api/arena/votes", { model_a: a.name, model_b: b.name, outcome, prompt: round.prompt });
  round.players.forEach((p, i) => { p.title.textContent = `${String.fromCharCode(65 + i)}: ${p.name}`; });
  $("arena-vote").classList.add("hidden");
  await refreshBoard();
}

export function setupArena() {
  addContestant(); addContestant();
  $("arena-add").addEventListener("click", () => addContestant());
  $("arena-send").addEventListener("click", sendAll);
  for (const b of document.querySelectorAll("#arena-vote button")) b.addEventListener("click", () => vote(b.dataset.outcome));
  refreshBoard();
}
