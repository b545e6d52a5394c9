// The page's entry: tabs, and each page's setup.
import { $, api } from "./api.js";
import { setupPickers } from "./picker.js";
import { charts, setupTrain } from "./train.js";
import { openChat, setupChat } from "./chat.js";
import { setupArena } from "./arena.js";
import { setupTemplates } from "./templates.js";

function showTab(name) {
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".page").forEach((p) => p.classList.toggle("active", p.id === `page-${name}`));
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
setupPickers();
setupTrain((model, adapter) => { showTab("chat"); openChat(model, adapter); });
setupChat();
setupArena();
setupTemplates();
showTab((location.hash || "#train").slice(1));
// Remembered choices: the last model, data file and adapter of each page, kept in the Studio's database.
const REMEMBERED = ["train-model", "train-data", "chat-model", "chat-adapter", "chat-system", "tpl-model", "tpl-adapter"];
const remembered = api("/api/settings").then(({ values }) => {
  for (const id of REMEMBERED) if (values[id] !== undefined && !$(id).value) $(id).value = values[id];
  for (const id of REMEMBERED) $(id).addEventListener("change", () => api("/api/settings", { values: { [id]: $(id).value } }));
}).catch(() => {});

Promise.all([remembered]).then(() => api("/api/info")).then((info) => { $("version").textContent = `velotune ${info.version}`; document.body.dataset.ready = "1"; });
window.velotuneStudio = { charts };   // what the browser tests read (points drawn)
