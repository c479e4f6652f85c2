// DOM output: result cards, the large view, messages and the status line.
import { showImage } from "./api.js";

const $ = (id) => document.getElementById(id);
const PLACEHOLDER = "Describe what you are looking for…";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) if (child !== null) node.append(child);
  return node;
}

export function label(result) {
  return result.caption ?? result.text ?? result.path ?? `item ${result.id}`;
}

export function formatScore(score) {
  return Number(score).toFixed(3);
}

/** Where a score sits between the first page's lowest (`low`) and highest (`top`) score, in [0.04, 1]:
 * raw cosines of a query cluster tightly (often 0.2-0.3), so the meter shows the spread that matters. */
function meterShare(score, { top, low }) {
  const span = top - low;
  const share = span > 1e-6 ? 0.15 + (0.85 * (score - low)) / span : 1;
  return Math.max(0.04, Math.min(1, share));
}

/** One result as a focusable card; `index` is its position in the result list. */
export function card(result, index, scale) {
  const text = label(result);
  const isImage = result.kind === "image" && result.image_url;
  const share = meterShare(result.score, scale);
  const meter = el("span", { class: "meter", "aria-hidden": "true" }, el("span", { style: `width:${share * 100}%` }));
  const score = el("span", { class: "score", title: "cosine similarity" }, formatScore(result.score));
  let body = el("span", { class: "quote" }, text);
  if (isImage) {
    const img = el("img", { alt: text, loading: "lazy", decoding: "async" });
    showImage(img, result.image_url);
    body = el("span", { class: "thumb" }, img);
  }
  return el(
    "button",
    {
      type: "button",
      class: isImage ? "card" : "card text",
      dataset: { index: String(index), id: String(result.id) },
      "aria-label": `${text} — score ${formatScore(result.score)}`,
    },
    body,
    el("span", { class: "meta" }, isImage ? el("span", { class: "caption" }, text) : null, el("span", { class: "row" }, meter, score)),
  );
}

export function appendResults(results, offset, scale) {
  const frag = document.createDocumentFragment();
  results.forEach((r, i) => frag.append(card(r, offset + i, scale)));
  $("results").append(frag);
}

export function clearResults() {
  $("results").replaceChildren();
}

/** A message above the results; kind is "error", "warn" or "info". Empty text hides it. */
export function message(text, kind = "error", action = null) {
  const box = $("message");
  box.replaceChildren();
  box.hidden = !text;
  if (!text) return;
  box.className = `message ${kind}`;
  box.dataset.kind = kind;
  box.append(el("span", {}, text));
  if (action?.form) box.append(action.form);
  else if (action) {
    const btn = el("button", { type: "button", class: "ghost" }, action.label);
    btn.addEventListener("click", action.run);
    box.append(btn);
  }
}

export function status(text, title = "") {
  $("status").textContent = text;
  $("status").title = title;
}

export function info(text, title = "") {
  $("info").textContent = text;
  $("info").title = title;
}

/** Fill the large view for `result` (metadata from the search, or from /v1/items when opened by URL). */
export function detail(result, { hasPrev, hasNext }) {
  const isImage = result.kind === "image";
  const img = $("detail-img");
  img.hidden = !isImage;
  if (isImage) {
    showImage(img, result.image_url || `/v1/items/${result.id}/image`);
    img.alt = label(result);
  } else {
    img.removeAttribute("src");
  }
  $("detail-title").textContent = label(result);
  $("detail-score").textContent = result.score === undefined ? "—" : formatScore(result.score);
  $("detail-id").textContent = String(result.id);
  $("detail-path").textContent = result.path || "—";
  $("detail-similar").hidden = !isImage;
  $("detail-captions").hidden = !isImage;
  $("detail-text").hidden = isImage;
  $("detail-prev").disabled = !hasPrev;
  $("detail-next").disabled = !hasNext;
}

/** Facet groups as checkbox lists: `groups` is [{field, label, values: [{value, count}], truncated}];
 * `selected` maps a field to its checked values (as text). Rebuilt only when what is listed changes, so
 * the checkbox a keyboard user just toggled keeps its focus. */
export function facets(groups, selected) {
  const box = $("facets");
  const key = JSON.stringify(groups.map((g) => [g.field, g.values.map((v) => [String(v.value), v.count])]));
  if (box.dataset.key !== key) {
    const focused = document.activeElement?.closest?.("#facets") ? document.activeElement : null;
    const again = focused ? { field: focused.dataset.field, value: focused.value } : null;
    box.dataset.key = key;
    box.replaceChildren(
      ...groups.map((g, i) =>
        el(
          "fieldset",
          { class: "facet" },
          el("legend", {}, g.label),
          ...g.values.map((v, j) =>
            el(
              "label",
              { class: "facet-value" },
              el("input", { type: "checkbox", id: `facet-${i}-${j}`, value: String(v.value), dataset: { field: g.field } }),
              el("span", { class: "facet-name" }, String(v.value)),
              v.count === null ? null : el("span", { class: "count" }, Number(v.count).toLocaleString()),
            ),
          ),
          g.truncated ? el("p", { class: "facet-more" }, "more values exist: the most common are listed") : null,
        ),
      ),
    );
    if (again) {
      const match = [...box.querySelectorAll("input")].find((x) => x.dataset.field === again.field && x.value === again.value);
      match?.focus();
    }
  }
  for (const input of box.querySelectorAll("input[type=checkbox]")) {
    input.checked = (selected[input.dataset.field] || []).includes(input.value);
  }
}

/** The number of filters set, on the Filters toggle (hidden at 0). */
export function filterCount(n) {
  const badge = $("filter-count");
  badge.hidden = n === 0;
  badge.textContent = n ? `${n} on` : "";
}

export function queryImage(file) {
  const box = $("query-image");
  const thumb = $("query-thumb");
  if (thumb.src.startsWith("blob:")) URL.revokeObjectURL(thumb.src);
  box.hidden = !file;
  if (file) thumb.src = URL.createObjectURL(file);
  else thumb.removeAttribute("src");
  $("q").placeholder = file ? "Searching with this image; type to search by text instead" : PLACEHOLDER;
}

/** A small form asking for the server's API key; `onKey(key)` runs when it is submitted. */
export function keyForm(onKey) {
  const input = el("input", { type: "password", id: "api-key", autocomplete: "off", "aria-label": "API key", placeholder: "API key" });
  const form = el("form", { class: "key-form" }, input, el("button", { type: "submit", class: "ghost" }, "Use key"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (input.value.trim()) onKey(input.value.trim());
  });
  queueMicrotask(() => input.focus());
  return form;
}
