// The search state lives in the URL, so a search can be shared and the back button works.
//   ?q=red+car&target=images&k=24&min=0.2   a text query
//   ?similar=17&target=images                a query with the stored image of item 17
//   ?upload=x7f3&target=texts                a query with an image dropped in this tab
//   &view=42                                 the result 42 is open in the large view
// and the Filters panel, sent as the `filter` of every search (docs/api.md, Filters):
//   &path=/photos/2024/                      path starts with
//   &from=2024-06-01&to=2024-06-30&date=mtime  a date range (inclusive days) of taken_at, or of mtime
//   &f.camera=Canon+EOS+R6&f.tone=warm       checked facet values: one param per value, OR within a field

export const PAGE_SIZES = [12, 24, 48, 100];
export const DEFAULT_K = 24;
export const TARGETS = ["images", "texts"];
export const DATE_FIELDS = ["taken_at", "mtime"];
const FACET_PREFIX = "f.";

/** @returns {{q: string, target: string, k: number, min: number|null, similar: string|null,
 *            upload: string|null, view: string|null, path: string, from: string, to: string,
 *            date: string, facets: Object<string, string[]>}} */
export function parse(search) {
  const p = new URLSearchParams(search);
  const image = p.get("similar") || p.get("upload");
  const k = Number.parseInt(p.get("k") || "", 10);
  const min = p.get("min");
  const target = p.get("target");
  const facets = {};
  for (const [key, value] of p) {
    if (!key.startsWith(FACET_PREFIX) || key.length === FACET_PREFIX.length) continue;
    const name = key.slice(FACET_PREFIX.length);
    if (!(facets[name] ||= []).includes(value)) facets[name].push(value);
  }
  return {
    q: image ? "" : (p.get("q") || "").slice(0, 1000),
    target: TARGETS.includes(target) ? target : image ? "texts" : "images",
    k: k >= 1 && k <= 100 ? k : DEFAULT_K,
    min: min !== null && min !== "" && Number.isFinite(Number(min)) ? Number(min) : null,
    similar: p.get("similar") && /^\d+$/.test(p.get("similar")) ? p.get("similar") : null,
    upload: p.get("similar") ? null : p.get("upload"),
    view: p.get("view") && /^\d+$/.test(p.get("view")) ? p.get("view") : null,
    // Kept as typed (even a date that is not one): the server's 422 says what is wrong with it.
    path: p.get("path") || "",
    from: p.get("from") || "",
    to: p.get("to") || "",
    date: DATE_FIELDS.includes(p.get("date")) ? p.get("date") : DATE_FIELDS[0],
    facets,
  };
}

/** The query string for a state (defaults left out, so URLs stay short). */
export function format(state) {
  const p = new URLSearchParams();
  if (state.similar) p.set("similar", state.similar);
  else if (state.upload) p.set("upload", state.upload);
  else if (state.q) p.set("q", state.q);
  const hasQuery = state.similar || state.upload || state.q;
  if (hasQuery) {
    p.set("target", state.target);
    if (state.k !== DEFAULT_K) p.set("k", String(state.k));
    if (state.min !== null) p.set("min", String(state.min));
  }
  // Filters stay in the URL with or without a query: they are kept while the next search is typed.
  if (state.path) p.set("path", state.path);
  if (state.from) p.set("from", state.from);
  if (state.to) p.set("to", state.to);
  if ((state.from || state.to) && state.date !== DATE_FIELDS[0]) p.set("date", state.date);
  for (const name of Object.keys(state.facets || {}).sort()) {
    for (const value of state.facets[name]) p.append(FACET_PREFIX + name, value);
  }
  if (state.view) p.set("view", state.view);
  const s = p.toString();
  return s ? `?${s}` : location.pathname;
}

/** The state's filters as the API's `filter` object, or null when none is set.
 *
 * A facet value is text in the URL; a field's values may be numbers in the bundle, so a value that reads
 * as a number is sent both ways (`"10"` and `10`): `in` matches either, and the URL stays readable. */
export function filterOf(state) {
  const filter = {};
  if (state.path) filter.path = { prefix: state.path };
  if (state.from || state.to) {
    const range = {};
    if (state.from) range.gte = state.from;
    if (state.to) range.lte = state.to; // a bare date: the server counts the whole day
    filter[state.date] = range;
  }
  for (const name of Object.keys(state.facets || {}).sort()) {
    const values = state.facets[name];
    if (!values.length) continue;
    const typed = values.flatMap((v) => (v.trim() !== "" && Number.isFinite(Number(v)) ? [v, Number(v)] : [v]));
    filter[name] = { in: typed };
  }
  return Object.keys(filter).length ? filter : null;
}

/** How many filters are set (the count on the Filters button). */
export function filterCount(state) {
  const facets = Object.values(state.facets || {}).filter((v) => v.length).length;
  return (state.path ? 1 : 0) + (state.from || state.to ? 1 : 0) + facets;
}

export const NO_FILTERS = { path: "", from: "", to: "", date: DATE_FIELDS[0], facets: {} };

/** Two states ask the server the same question (the open view does not matter). */
export function sameQuery(a, b) {
  return (
    a.q === b.q &&
    a.target === b.target &&
    a.k === b.k &&
    a.min === b.min &&
    a.similar === b.similar &&
    a.upload === b.upload &&
    JSON.stringify(filterOf(a)) === JSON.stringify(filterOf(b))
  );
}

export function hasQuery(state) {
  return Boolean(state.q.trim() || state.similar || state.upload);
}

// Dropped images are kept per tab: in memory, and in sessionStorage (when small enough) so a
// reload or the back button can repeat the search. They never leave the browser except to be searched.
const uploads = new Map();
const STORE_PREFIX = "clipsearch:upload:";
const STORE_MAX_BYTES = 3_000_000;

export async function keepUpload(file) {
  const token = Math.random().toString(36).slice(2, 10);
  uploads.set(token, file);
  if (file.size <= STORE_MAX_BYTES) {
    try {
      const dataUrl = await new Promise((resolve, reject) => {
        const reader = new FileReader();
        reader.onload = () => resolve(reader.result);
        reader.onerror = () => reject(reader.error);
        reader.readAsDataURL(file);
      });
      sessionStorage.setItem(STORE_PREFIX + token, JSON.stringify({ name: file.name, dataUrl }));
    } catch {
      // Storage full or disabled: the search still works, only a reload will ask for the image again.
    }
  }
  return token;
}

export async function getUpload(token) {
  if (uploads.has(token)) return uploads.get(token);
  const saved = sessionStorage.getItem(STORE_PREFIX + token);
  if (!saved) return null;
  const { name, dataUrl } = JSON.parse(saved);
  const [head, b64] = dataUrl.split(",", 2);
  const type = head.slice(5).split(";")[0];
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const file = new File([bytes], name || "upload", { type });
  uploads.set(token, file);
  return file;
}
