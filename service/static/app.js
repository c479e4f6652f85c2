// Entry point of the search page: wires keyboard, mouse, drop and paste input to the controller.
import * as c from "./controller.js";
import { filterOf, keepUpload, NO_FILTERS, parse, sameQuery } from "./state.js";

const $ = (id) => document.getElementById(id);
let typingTimer = 0;
let dateTimer = 0;

function textQuery(q, options) {
  const s = c.page.state;
  const target = s.similar || s.upload ? c.page.targetFor.text : s.target;
  c.navigate({ q, similar: null, upload: null, target, view: null }, options);
}

function onSubmit(event) {
  event.preventDefault();
  clearTimeout(typingTimer);
  const q = $("q").value.trim();
  const s = c.page.state;
  if (!q) return;
  if (q === s.q.trim() && !s.similar && !s.upload && c.page.response) {
    c.page.typingEntry = false; // the next thing typed starts a new history entry
    return;
  }
  textQuery(q, { push: true });
}

function onType() {
  clearTimeout(typingTimer);
  typingTimer = setTimeout(() => {
    const q = $("q").value;
    const s = c.page.state;
    if (q.trim() === s.q.trim() && !s.similar && !s.upload) return;
    if (!q.trim() && (s.similar || s.upload)) return; // an image query stays until removed
    textQuery(q.trim() ? q : "", { typing: true });
  }, c.DEBOUNCE_MS);
}

async function searchWithFile(file) {
  if (!file) return;
  const token = await keepUpload(file);
  $("q").value = "";
  c.navigate({ q: "", upload: token, similar: null, target: c.page.targetFor.image, view: null });
}

function imageFrom(list) {
  return [...(list || [])].find((f) => f.kind === undefined || f.kind === "file");
}

function wireForm() {
  $("search-form").addEventListener("submit", onSubmit);
  $("q").addEventListener("input", onType);
  for (const radio of document.querySelectorAll('input[name="target"]')) {
    radio.addEventListener("change", () => c.navigate({ target: radio.value, view: null }));
  }
  $("k").addEventListener("change", () => c.navigate({ k: Number($("k").value), view: null }));
  $("min-score").addEventListener("change", () => {
    const raw = $("min-score").value.trim();
    const min = raw === "" || !Number.isFinite(Number(raw)) ? null : Math.max(-1, Math.min(1, Number(raw)));
    c.navigate({ min, view: null });
  });
  $("pick").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", () => {
    searchWithFile($("file").files[0]);
    $("file").value = ""; // so picking the same file again still searches
  });
  $("clear-image").addEventListener("click", () => {
    c.navigate({ similar: null, upload: null, view: null });
    $("q").focus();
  });
  $("download").addEventListener("click", download);
  $("load-more").addEventListener("click", c.loadMore);
  $("home").addEventListener("click", (e) => {
    e.preventDefault();
    $("q").value = "";
    c.navigate({ q: "", similar: null, upload: null, min: null, view: null, ...NO_FILTERS });
    $("q").focus();
  });
}

function wireFilters() {
  $("filter-form").addEventListener("submit", (e) => {
    e.preventDefault();
    clearTimeout(dateTimer);
    c.applyFilters();
  });
  $("f-path").addEventListener("change", c.applyFilters);
  $("f-date").addEventListener("change", c.applyFilters);
  for (const id of ["f-from", "f-to"]) {
    // A date typed digit by digit is a valid date several times over: search once it settles.
    $(id).addEventListener("change", () => {
      clearTimeout(dateTimer);
      dateTimer = setTimeout(c.applyFilters, c.DEBOUNCE_MS);
    });
  }
  $("facets").addEventListener("change", (e) => e.target.matches("input[type=checkbox]") && c.applyFilters());
  $("f-clear").addEventListener("click", () => {
    clearTimeout(dateTimer);
    c.clearFilters();
  });
}

function wireDropAndPaste() {
  const overlay = $("drop-overlay");
  let depth = 0;
  const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
  addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    depth += 1;
    overlay.hidden = false;
  });
  addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) overlay.hidden = true;
  });
  addEventListener("dragover", (e) => hasFiles(e) && e.preventDefault());
  addEventListener("drop", (e) => {
    depth = 0;
    overlay.hidden = true;
    if (!hasFiles(e)) return;
    e.preventDefault();
    searchWithFile(e.dataTransfer.files[0]);
  });
  addEventListener("paste", (e) => {
    const items = [...(e.clipboardData?.items || [])].filter((i) => i.kind === "file");
    const file = items.map((i) => i.getAsFile()).find(Boolean) || imageFrom(e.clipboardData?.files);
    if (!file) return; // plain text pastes into the search box as usual
    e.preventDefault();
    searchWithFile(file);
  });
}

/** Arrow keys move between result cards, row by row as the grid lays them out. */
function gridKeys(e) {
  const cards = [...$("results").querySelectorAll(".card")];
  const i = cards.indexOf(document.activeElement);
  if (i < 0) return;
  const top = (el) => el.getBoundingClientRect().top;
  const firstOfRow2 = cards.findIndex((el) => top(el) > top(cards[0]) + 1);
  const columns = firstOfRow2 === -1 ? cards.length : firstOfRow2;
  const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns, ArrowUp: -columns, Home: -i, End: cards.length - 1 - i }[e.key];
  if (step === undefined) return;
  e.preventDefault();
  const next = cards[Math.max(0, Math.min(cards.length - 1, i + step))];
  next.focus();
  next.scrollIntoView({ block: "nearest" });
  if (i + step >= cards.length - columns) c.loadMore();
}

function wireResults() {
  $("results").addEventListener("click", (e) => {
    const cardEl = e.target.closest(".card");
    if (cardEl) c.openView(Number(cardEl.dataset.index));
  });
  $("results").addEventListener("keydown", gridKeys);
  new IntersectionObserver((entries) => entries.some((x) => x.isIntersecting) && c.loadMore(), {
    rootMargin: "400px",
  }).observe($("sentinel"));
  addEventListener("keydown", (e) => {
    const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement?.tagName);
    if (e.key === "/" && !typing && !$("detail").open) {
      e.preventDefault();
      $("q").focus();
      $("q").select();
    }
  });
}

function wireView() {
  const dialog = $("detail");
  dialog.addEventListener("close", () => {
    // Back to the card of the result last shown (←/→ may have moved past the one that opened it).
    const card = document.querySelector(`#results .card[data-index="${dialog.dataset.index}"]`);
    if (card) card.focus();
    c.closeView();
  });
  dialog.addEventListener("keydown", (e) => {
    if (e.key === "ArrowLeft") c.stepView(-1);
    if (e.key === "ArrowRight") c.stepView(1);
  });
  dialog.addEventListener("click", (e) => e.target === dialog && dialog.close()); // backdrop click
  $("detail-prev").addEventListener("click", () => c.stepView(-1));
  $("detail-next").addEventListener("click", () => c.stepView(1));
  $("detail-similar").addEventListener("click", () =>
    c.searchFromView({ similar: String(c.currentViewItem().id), target: "images" }),
  );
  $("detail-captions").addEventListener("click", () =>
    c.searchFromView({ similar: String(c.currentViewItem().id), target: "texts" }),
  );
  $("detail-text").addEventListener("click", () => {
    const it = c.currentViewItem();
    c.searchFromView({ q: it.text ?? it.caption ?? "", target: "images" });
  });
  addEventListener("popstate", () => {
    c.page.viewPushed = false;
    c.page.typingEntry = false;
    const next = parse(location.search);
    if (!sameQuery(next, c.page.state)) clearTimeout(typingTimer);
    c.apply(next);
  });
}

function download() {
  const s = c.page.state;
  const data = {
    query: {
      text: s.q || null,
      image_item: s.similar,
      uploaded_image: Boolean(s.upload),
      target: s.target,
      k: s.k,
      min_score: s.min,
      filter: filterOf(s),
    },
    bundle: c.page.response?.bundle ?? null,
    url: location.href,
    results: c.page.results,
  };
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }));
  link.download = `clipsearch-${s.target}-${(s.q || (s.similar ? `item-${s.similar}` : "image")).replace(/[^\w-]+/g, "_").slice(0, 40)}.json`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

wireForm();
wireFilters();
wireDropAndPaste();
wireResults();
wireView();
c.loadInfo();
c.apply(c.page.state);
