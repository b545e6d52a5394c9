// File pickers: browse the Studio's roots (the server shows nothing outside them) and put a ref in the input.
import { $, api, el } from "./api.js";

let target = null;

async function show(ref) {
  const listing = await api(`/api/files?ref=${encodeURIComponent(ref)}`);
  $("picker-where").textContent = listing.ref;
  const list = $("picker-entries"); list.replaceChildren();
  if (listing.parent !== null) list.append(el("li", { text: "..", onclick: () => show(listing.parent) }));
  for (const entry of listing.entries) {
    const item = el("li", {}, entry.dir ? `${entry.name}/` : entry.name, el("span", { class: "kind", text: entry.kind || "" }));
    item.addEventListener("click", () => (entry.dir && !entry.kind) ? show(entry.ref) : choose(entry.ref));
    if (entry.dir && entry.kind) item.append(el("button", { text: "open", onclick: (e) => { e.stopPropagation(); show(entry.ref); } }));
    list.append(item);
  }
}

function choose(ref) {
  target.value = ref; target.dispatchEvent(new Event("change"));
  $("picker-dialog").classList.add("hidden");
}

export function setupPickers() {
  $("picker-close").addEventListener("click", () => $("picker-dialog").classList.add("hidden"));
  for (const picker of document.querySelectorAll(".picker")) {
    picker.querySelector(".browse").addEventListener("click", async () => {
      target = picker.querySelector("input");
      $("picker-dialog").classList.remove("hidden");
      await show(`${picker.dataset.root}:`);
    });
  }
}
