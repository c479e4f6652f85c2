// The HTTP API as the page uses it (contract in DESIGN.md). Every URL is relative: the page never
// talks to any origin but the one that served it.

import { parseTerms } from "./terms.js";

/** An API failure with the server's error code and a message a person can read. */
export class ApiError extends Error {
  /** 401/403 on a query route: the server wants an API key (or a different one). */
  get needsKey() {
    return this.status === 401 || (this.status === 403 && this.code === "forbidden");
  }

  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
  /** 503 "not_ready": no verified bundle is loaded yet (the server keeps trying). */
  get notReady() {
    return this.status === 503 && !this.busy;
  }
  /** 422 "invalid_filter": the Filters panel (or a shared URL) holds a filter the bundle refuses. */
  get badFilter() {
    return this.status === 422 && this.code === "invalid_filter";
  }
  /** 503 "overloaded": the query queue is full; retry after `retryAfter` seconds. */
  get busy() {
    return this.status === 503 && this.code === "overloaded";
  }
}

async function errorFrom(res) {
  let code = `http_${res.status}`;
  let message = res.statusText || "request failed";
  try {
    const body = await res.json();
    const err = body.error || body;
    code = err.code || code;
    message = err.message || err.reason || (typeof err.detail === "string" ? err.detail : message);
  } catch {
    // Not JSON (a proxy's HTML error page, say): the status line is all we have.
  }
  const retry = res.headers.get("Retry-After");
  return new ApiError(res.status, code, message, retry === null ? 1 : Number(retry) || 1);
}

// A server started with CLIPSEARCH_API_KEY wants the key on every query route. The page asks for it
// once (see controller.js) and keeps it for this tab only.
const KEY_STORE = "clipsearch:api-key";

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function request(url, init = {}) {
  let res;
  try {
    const headers = { Accept: "application/json", ...authHeaders(), ...(init.headers || {}) };
    res = await fetch(url, { ...init, headers });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "network", "The server cannot be reached. Is clipsearch still running?");
  }
  if (!res.ok) throw await errorFrom(res);
  return res;
}

/** GET /v1/info: bundle version, model, item counts, device. */
export async function info() {
  return (await request("/v1/info")).json();
}

/** GET /readyz: {ready: true} or {ready: false, reason}. */
export async function readiness() {
  try {
    await request("/readyz");
    return { ready: true };
  } catch (e) {
    return { ready: false, reason: e.message, status: e.status };
  }
}

/**
 * POST /v1/search/text, or POST /v1/search when the query uses rclip's `+` / `-` arithmetic
 * (`beach + sunset - people`). `minScore` null means no threshold, `filter` null no filter.
 */
export async function searchText({ query, k, target, minScore, offset, filter }, signal) {
  const terms = parseTerms(query);
  const options = { k, target, min_score: minScore, offset, ...(filter ? { filter } : {}) };
  const body = JSON.stringify(terms ? { terms, ...options } : { query, ...options });
  const res = await request(terms ? "/v1/search" : "/v1/search/text", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body,
    signal,
  });
  return res.json();
}

/** POST /v1/search/image (multipart) with the image as a Blob; the filter goes as a JSON-encoded field. */
export async function searchImage({ image, k, target, minScore, offset, filter }, signal) {
  const form = new FormData();
  form.append("file", image, image.name || "query");
  form.append("k", String(k));
  form.append("target", target);
  form.append("offset", String(offset));
  if (minScore !== null) form.append("min_score", String(minScore));
  if (filter) form.append("filter", JSON.stringify(filter));
  const res = await request("/v1/search/image", { method: "POST", body: form, signal });
  return res.json();
}

/** GET /v1/facets: the most common values of one field (camera or a user field) with their counts. */
export async function facets(field, { target = "images", limit = 20 } = {}) {
  const params = new URLSearchParams({ field, target, limit: String(limit) });
  return (await request(`/v1/facets?${params}`)).json();
}

/** GET /v1/items/{id}: the stored metadata of one image or text. */
export async function item(id) {
  return (await request(`/v1/items/${encodeURIComponent(id)}`)).json();
}

export function itemImageUrl(id) {
  return `/v1/items/${encodeURIComponent(id)}/image`;
}

/** The stored image of an item as a Blob, to search with it ("similar images"). */
export async function itemImage(id) {
  const blob = await (await request(itemImageUrl(id), { headers: { Accept: "image/*" } })).blob();
  return new File([blob], `item-${id}`, { type: blob.type || "application/octet-stream" });
}

/** Show a stored image in `img`: a plain URL, or (with an API key, which <img> cannot send) a blob. */
export function showImage(img, url) {
  if (!apiKey()) {
    img.src = url;
    return;
  }
  request(url, { headers: { Accept: "image/*" } })
    .then((res) => res.blob())
    .then((blob) => {
      if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
      img.src = URL.createObjectURL(blob);
    })
    .catch(() => img.classList.add("broken"));
}

/** Read the counts out of /v1/info, whichever of the documented shapes the server uses. */
export function describeInfo(data) {
  const bundle = data.bundle?.version ?? data.bundle_version ?? data.version ?? data.bundle ?? "?";
  const counts = data.counts ?? data.items ?? {};
  const images = counts.images ?? data.images?.count ?? data.images;
  const texts = counts.texts ?? data.texts?.count ?? data.texts;
  const model = data.model?.name ?? (typeof data.model === "string" ? data.model : null);
  const userFields = Array.isArray(data.user_fields) ? data.user_fields : [];
  return {
    bundle: String(bundle),
    images,
    texts,
    model,
    device: data.device ?? null,
    maxK: data.max_k ?? null,
    userFields,
  };
}
