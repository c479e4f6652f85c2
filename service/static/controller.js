// The search page's controller: URL state -> searches -> rendering.
import * as api from "./api.js";
import * as render from "./render.js";
import * as urlState from "./state.js";

const $ = (id) => document.getElementById(id);
const TYPING_DEBOUNCE_MS = 250;
const READY_POLL_MS = 2000;
const FACET_VALUES = 20; // values listed per facet, most common first
const FACET_FIELDS = 8; // facets offered at most: camera and the first user fields

const page = {
  state: urlState.parse(location.search),
  results: [], // every result loaded for the current query, in order
  response: null, // the last response (bundle, took_ms)
  hasMore: false,
  scale: { top: 1, low: 0 }, // score range of the first page, for the score meters
  loading: false,
  controller: null, // AbortController of the request in flight
  generation: 0, // bumps on every new query, so late answers to old ones are dropped
  bundle: null,
  ready: null,
  typingEntry: false, // the current history entry was made by typing: update it instead of pushing
  viewPushed: false, // the open large view added a history entry (so closing it goes back)
  // The target each kind of query last used: text finds images, an image finds captions by default.
  targetFor: { text: "images", image: "texts" },
  facetGroups: [], // the facets the bundle offers: [{field, label, values: [{value, count}], truncated}]
  facetsBundle: null, // the bundle they were counted on
  filtersShown: false, // the panel was opened for filters once (after that, the user opens and closes it)
};

// ------------------------------------------------------------------------------------- navigation

function navigate(changes, { push = true, typing = false } = {}) {
  const next = { ...page.state, ...changes };
  const url = urlState.format(next);
  if (push && !(typing && page.typingEntry)) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
  page.typingEntry = typing;
  apply(next);
}

/** Make the page show `state`: controls, the query, and the large view. */
function apply(state) {
  const previous = page.state;
  page.state = state;
  syncControls(state);
  const fresh = !urlState.sameQuery(previous, state) || page.response === null;
  if (fresh) runQuery();
  syncView(state);
}

function syncControls(state) {
  const q = $("q");
  if (document.activeElement !== q || q.value.trim() !== state.q.trim()) q.value = state.q;
  $(`target-${state.target}`).checked = true;
  const k = $("k");
  if (![...k.options].some((o) => Number(o.value) === state.k)) k.add(new Option(String(state.k)));
  k.value = String(state.k);
  $("min-score").value = state.min === null ? "" : String(state.min);
  page.targetFor[state.similar || state.upload ? "image" : "text"] = state.target;
  syncFilters(state);
}

/** The Filters panel shows the state's filters (opened when a URL brings some). */
function syncFilters(state) {
  const path = $("f-path");
  if (document.activeElement !== path) path.value = state.path;
  $("f-date").value = state.date;
  $("f-from").value = state.from;
  $("f-to").value = state.to;
  const n = urlState.filterCount(state);
  render.filterCount(n);
  if (n && !page.filtersShown) $("filters").open = true;
  page.filtersShown = page.filtersShown || n > 0;
  render.facets(facetGroups(state), state.facets);
}

/** The offered facets, plus any value the URL checks that they do not list (so it can be unchecked). */
function facetGroups(state) {
  const groups = page.facetGroups.map((g) => ({ ...g, values: [...g.values] }));
  for (const [field, values] of Object.entries(state.facets)) {
    let group = groups.find((g) => g.field === field);
    if (!group) groups.push((group = { field, label: field, values: [], truncated: false }));
    for (const value of values) {
      if (!group.values.some((v) => String(v.value) === value)) group.values.push({ value, count: null });
    }
  }
  return groups;
}

/** The values of camera and the user fields (GET /v1/facets), counted once per bundle. */
async function loadFacets(d) {
  if (page.facetsBundle === d.bundle) return;
  page.facetsBundle = d.bundle;
  const fields = ["camera", ...d.userFields].slice(0, FACET_FIELDS);
  const answers = await Promise.all(
    fields.map((field) => api.facets(field, { limit: FACET_VALUES }).catch(() => null)),
  );
  if (answers.includes(null)) page.facetsBundle = null; // a field failed: the next loadInfo asks again
  page.facetGroups = answers
    .filter((a) => a && a.values.length)
    .map((a) => ({ field: a.field, label: a.field === "camera" ? "Camera" : a.field, values: a.values, truncated: a.truncated }));
  syncFilters(page.state);
}

/** The Filters panel's inputs as state changes (the path and dates as typed, the checked facet values). */
function filtersFromPanel() {
  const facets = {};
  for (const input of $("facets").querySelectorAll("input[type=checkbox]:checked")) {
    (facets[input.dataset.field] ||= []).push(input.value);
  }
  return { path: $("f-path").value.trim(), date: $("f-date").value, from: $("f-from").value, to: $("f-to").value, facets };
}

function applyFilters() {
  navigate({ ...filtersFromPanel(), view: null });
}

function clearFilters() {
  navigate({ ...urlState.NO_FILTERS, view: null });
}

// ----------------------------------------------------------------------------------------- search

async function queryImage(state) {
  if (state.similar) return api.itemImage(state.similar);
  if (state.upload) return urlState.getUpload(state.upload);
  return null;
}

async function runQuery() {
  page.controller?.abort();
  page.generation += 1;
  page.results = [];
  page.response = null;
  page.hasMore = false;
  render.clearResults();
  render.status("");
  $("download").disabled = true;
  const state = page.state;
  if (!urlState.hasQuery(state)) {
    render.queryImage(null);
    render.message("");
    $("hint").hidden = false;
    return;
  }
  $("hint").hidden = true;
  await loadPage();
}

async function loadPage() {
  const state = page.state;
  const generation = page.generation;
  page.loading = true;
  page.controller = new AbortController();
  document.body.classList.add("busy");
  try {
    const image = await queryImage(state);
    if ((state.similar || state.upload) && !image) {
      render.queryImage(null);
      render.message("The image of this search was dropped in another tab or session. Drop or pick it again.", "warn");
      return;
    }
    render.queryImage(image);
    const params = {
      k: state.k,
      target: state.target,
      minScore: state.min,
      offset: page.results.length,
      filter: urlState.filterOf(state),
    };
    const signal = page.controller.signal;
    const response = image
      ? await api.searchImage({ ...params, image }, signal)
      : await api.searchText({ ...params, query: state.q.trim() }, signal);
    if (generation !== page.generation) return;
    showPage(response, state);
  } catch (e) {
    if (e.name === "AbortError" || generation !== page.generation) return;
    showError(e, state);
  } finally {
    if (generation === page.generation) {
      page.loading = false;
      document.body.classList.remove("busy");
      $("more").hidden = !page.hasMore;
      if (page.hasMore) fillViewport();
      if (page.state.view && !$("detail").open) syncView(page.state); // a view opened by URL
    }
  }
}

function showPage(response, state) {
  const offset = page.results.length;
  const results = response.results || [];
  if (offset === 0 && results.length) {
    page.scale = { top: results[0].score, low: results[results.length - 1].score };
  }
  page.results.push(...results);
  page.response = response;
  page.hasMore = results.length === state.k;
  render.appendResults(results, offset, page.scale);
  $("download").disabled = page.results.length === 0;
  if (response.bundle && page.bundle && response.bundle !== page.bundle) loadInfo();
  render.message("");
  const filters = urlState.filterCount(state);
  if (page.results.length === 0) {
    const what = state.q ? `“${state.q.trim()}”` : "this image";
    const min = state.min === null ? "" : ` with a score of at least ${state.min}`;
    const within = filters ? " within the filters" : "";
    let tip = state.min !== null ? " Try a lower minimum score." : filters ? " Try fewer filters." : "";
    if (filters && state.target === "texts") {
      tip = " Captions usually carry none of the photo metadata filtered on: find images, or clear the filters.";
    }
    render.message(
      `Nothing matches ${what}${min}${within}.${tip}`,
      "info",
      filters ? { label: "Clear filters", run: clearFilters } : null,
    );
  }
  const noun = state.target === "images" ? "image" : "caption";
  const n = page.results.length;
  const took = `${Number(response.took_ms).toFixed(1)} ms`;
  const filtered = filters ? ` · ${filters} filter${filters === 1 ? "" : "s"}` : "";
  render.status(`${n}${page.hasMore ? "+" : ""} ${noun}${n === 1 ? "" : "s"} · ${took}${filtered}`, `bundle ${response.bundle}`);
}

function askForKey(e) {
  const text = api.apiKey() ? `The API key was refused: ${e.message}.` : "This server needs an API key.";
  render.message(text, "warn", {
    form: render.keyForm((key) => {
      api.setApiKey(key);
      render.message("");
      loadInfo();
      if (urlState.hasQuery(page.state)) runQuery();
    }),
  });
}

function showError(e, state) {
  if (e instanceof api.ApiError && e.needsKey) {
    askForKey(e);
    return;
  }
  if (e instanceof api.ApiError && e.notReady) {
    notReady(e.message);
    return;
  }
  if (e instanceof api.ApiError && e.busy) {
    render.message(`The server is busy. Trying again in ${e.retryAfter} s…`, "warn");
    setTimeout(() => urlState.sameQuery(state, page.state) && loadPage(), e.retryAfter * 1000);
    return;
  }
  if (e instanceof api.ApiError && e.badFilter) {
    // A 422 naming the field: from a typed date, or a shared URL made for a bundle with other fields.
    page.hasMore = false;
    $("filters").open = true;
    render.message(`The filters were refused: ${e.message}`, "error", { label: "Clear filters", run: clearFilters });
    return;
  }
  if (page.results.length && e.status >= 400 && e.status < 500) {
    // A later page refused (e.g. past the server's max offset): keep what is shown, stop paging.
    page.hasMore = false;
    render.status(`${page.results.length} results · no more can be loaded: ${e.message}`);
    return;
  }
  const isImage = Boolean(state.similar || state.upload);
  const rejected = isImage && [400, 413, 415, 422].includes(e.status);
  const text = rejected ? `This file was rejected: ${e.message}` : e.message;
  render.message(text, "error", page.results.length ? null : { label: "Retry", run: () => runQuery() });
  page.hasMore = false;
}

/** Infinite scroll: load the next page when the end of the grid comes into view. */
function loadMore() {
  if (page.hasMore && !page.loading && page.response) loadPage();
}

function fillViewport() {
  // A tall screen may show the whole first page with the sentinel already visible: keep loading.
  requestAnimationFrame(() => {
    const box = $("sentinel").getBoundingClientRect();
    if (box.top < innerHeight + 400) loadMore(); // the observer's rootMargin
  });
}

// ------------------------------------------------------------------------------ server readiness

async function loadInfo() {
  try {
    const d = api.describeInfo(await api.info());
    page.bundle = d.bundle;
    const parts = [`bundle ${d.bundle}`];
    if (d.images !== undefined) parts.push(`${Number(d.images).toLocaleString()} images`);
    if (d.texts !== undefined) parts.push(`${Number(d.texts).toLocaleString()} captions`);
    if (d.device) parts.push(d.device);
    render.info(parts.join(" · "), d.model ? `model ${d.model}` : "");
    limitPageSizes(d.maxK);
    suggestIdeas(d);
    loadFacets(d);
    page.ready = true;
  } catch (e) {
    if (e instanceof api.ApiError && e.status === 503) notReady(e.message);
    else if (e instanceof api.ApiError && e.needsKey) {
      render.info("API key needed");
      if (!urlState.hasQuery(page.state)) askForKey(e);
    } else render.info("server unavailable");
  }
}

/** A few captions of the bundle as one-click example searches on the empty page. */
async function suggestIdeas(d) {
  const total = Number(d.images || 0) + Number(d.texts || 0);
  const box = $("ideas");
  if (!total || box.dataset.bundle === d.bundle) return;
  box.dataset.bundle = d.bundle;
  const ids = new Set(Array.from({ length: Math.min(12, total) }, () => Math.floor(Math.random() * total)));
  const items = await Promise.all([...ids].map((id) => api.item(id).catch(() => null)));
  const captions = [...new Set(items.filter((it) => it?.text).map((it) => it.text.trim()))].slice(0, 5);
  box.querySelectorAll("button").forEach((b) => b.remove());
  for (const caption of captions) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "idea";
    button.textContent = caption;
    button.addEventListener("click", () => navigate({ q: caption, similar: null, upload: null, view: null }));
    box.append(button);
  }
  box.hidden = captions.length === 0;
}

/** Offer no page size above the server's max_k (a larger k would be refused). */
function limitPageSizes(maxK) {
  if (!maxK) return;
  for (const option of [...$("k").options]) option.disabled = Number(option.value) > maxK;
  if (page.state.k > maxK) navigate({ k: maxK }, { push: false });
}

function notReady(reason) {
  const wasReady = page.ready !== false;
  page.ready = false;
  render.info("not ready");
  render.message(`The search service is not ready yet: ${reason}. This page retries by itself.`, "warn");
  if (wasReady) setTimeout(pollReady, READY_POLL_MS);
}

async function pollReady() {
  const r = await api.readiness();
  if (!r.ready) {
    render.message(`The search service is not ready yet: ${r.reason}. This page retries by itself.`, "warn");
    setTimeout(pollReady, READY_POLL_MS);
    return;
  }
  render.message("");
  await loadInfo();
  if (urlState.hasQuery(page.state)) runQuery();
}

// ----------------------------------------------------------------------------------- large view

function openView(index) {
  const result = page.results[index];
  if (!result) return;
  navigate({ view: String(result.id) });
  page.viewPushed = true;
}

async function syncView(state) {
  const dialog = $("detail");
  if (!state.view) {
    if (dialog.open) dialog.close();
    return;
  }
  const index = page.results.findIndex((r) => String(r.id) === state.view);
  let result = page.results[index];
  if (!result) {
    if (page.loading) return; // showPage calls back once the results are in
    try {
      const it = await api.item(state.view);
      result = { ...it, caption: it.caption ?? it.text, image_url: it.image_url };
    } catch (e) {
      render.message(`Item ${state.view} cannot be shown: ${e.message}`, "error");
      return;
    }
  }
  dialog.dataset.index = String(index);
  render.detail(result, { hasPrev: index > 0, hasNext: index >= 0 && index < page.results.length - 1 });
  if (!dialog.open) dialog.showModal();
}

function closeView() {
  if (!page.state.view) return;
  if (page.viewPushed) {
    page.viewPushed = false;
    history.back();
  } else {
    navigate({ view: null }, { push: false });
  }
}

function stepView(delta) {
  const index = Number($("detail").dataset.index) + delta;
  const result = page.results[index];
  if (!result) return;
  navigate({ view: String(result.id) }, { push: false });
  if (index >= page.results.length - 3) loadMore();
}

function currentViewItem() {
  const index = Number($("detail").dataset.index);
  return page.results[index] || { id: page.state.view, text: $("detail-title").textContent };
}

function searchFromView(changes) {
  page.viewPushed = false;
  $("detail").close();
  navigate({ q: "", similar: null, upload: null, min: null, view: null, ...changes });
}

export {
  apply,
  applyFilters,
  clearFilters,
  closeView,
  currentViewItem,
  loadInfo,
  loadMore,
  navigate,
  openView,
  page,
  searchFromView,
  stepView,
};
export const DEBOUNCE_MS = TYPING_DEBOUNCE_MS;

