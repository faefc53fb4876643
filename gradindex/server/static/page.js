// The gradindex web page: talks to the /v1 API like any client. Fields a server may not have
// yet (prediction, confidence and loss of a query, `ids` queries, /v1/whoami, positives and
// negatives counts) are detected, never assumed.
"use strict";

const PAGE = 24, SELF_PAGE = 25, FULL_GALLERY_CAP = 5000, MAX_K = 100;
const state = {
  index: null, version: null, view: "query",
  scope: null,           // "admin" | "read" | "keyless" | null (unknown: the server has no whoami)
  canQueryIds: false,    // the influence endpoint takes {"ids": [...]} (train-to-train)
  canPredict: false,     // influence results carry the model's prediction for each query
  canRenderExample: false,  // GET .../examples/{id} takes ?render=true
  galleryParams: new Set(),  // what GET .../gallery takes: filter, misclassified, predict
  selfBounds: false,     // GET .../self-influence takes min_ and max_self_influence
  sawPrediction: false,  // the model's predictions came back (not null): it can tell
  predictions: new Map(),  // gallery id -> prediction, asked for as pages are shown
  labelValues: new Map(),  // a label as the select shows it -> its JSON value, for filters
  gallery: {offset: 0, all: null, total: 0, label: "", misclassified: false},
  query: null,           // {kind: "gallery" | "train" | "payload", id, payload, render, meta}
  shown: null,           // what the result panel shows: the export's content
  seq: 0, gallerySeq: 0, selfSeq: 0,
  self: {offset: 0, bin: null, hist: null},
};
const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("gradindex-key") || "";

// ------------------------------------------------------------------ talking to the API

class ApiError extends Error {
  constructor(status, message) { super(status + ": " + message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = Object.assign({"Content-Type": "application/json"}, options.headers || {});
  const key = keyInput.value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  const response = await fetch(path, Object.assign({}, options, {headers}));
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (body.error && body.error.message) || response.statusText;
    throw new ApiError(response.status, message);
  }
  return body;
}
const ixPath = (rest = "") => `/v1/indexes/${encodeURIComponent(state.index)}${rest}`;

function say(text, isError = false) {
  const el = $("status"); el.textContent = text; el.className = isError ? "error" : "muted";
}

async function loadCapabilities() {
  try {
    const spec = await (await fetch("/openapi.json")).json();
    const schemas = (spec.components && spec.components.schemas) || {};
    const request = schemas.InfluenceRequest || {};
    state.canQueryIds = "ids" in (request.properties || {});
    state.canPredict = "prediction" in ((schemas.InfluenceResult || {}).properties || {});
    const params = (path) => new Set(
      ((((spec.paths || {})[path] || {}).get || {}).parameters || []).map((p) => p.name));
    state.canRenderExample = params("/v1/indexes/{name}/examples/{example_id}").has("render");
    state.galleryParams = params("/v1/indexes/{name}/gallery");
    const self = params("/v1/indexes/{name}/self-influence");
    state.selfBounds = self.has("min_self_influence") && self.has("max_self_influence");
  } catch (e) { state.canQueryIds = false; state.canPredict = false; }
}

async function loadScope() {
  try {
    state.scope = (await api("/v1/whoami")).scope || null;
  } catch (e) {
    // 404: a server without whoami; the scope shows itself at the first 403
    state.scope = e.status === 401 ? "none" : null;
  }
  showScope();
}
const isAdmin = () => state.scope !== "read" && state.scope !== "none";
function showScope() {
  const text = {admin: "admin key", read: "read-only key", keyless: "no key needed"};
  $("scope").textContent = text[state.scope] || "";
  if (!isAdmin()) document.querySelectorAll("button.delete").forEach((b) => b.remove());
}

// ------------------------------------------------------------------ rendering examples

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");
function fmt(v) {
  if (typeof v !== "number" || !Number.isFinite(v) || Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a >= 1e4 || a < 1e-3 ? v.toExponential(2) : String(Number(v.toPrecision(3)));
}

function labelOf(item) {
  for (const source of [item.render, item.meta, item.payload]) {
    if (source && typeof source === "object" && !Array.isArray(source)) {
      for (const key of ["label", "y"]) {
        if (source[key] !== undefined && source[key] !== null) return source[key];
      }
    }
  }
  return undefined;
}
const labelText = (item) => { const l = labelOf(item); return l === undefined ? "" : `label ${l}`; };

function drawImage(canvas, render) {
  const [h, w] = render.shape, px = render.pixels || [];
  canvas.width = w; canvas.height = h; canvas.className = "image";
  const ctx = canvas.getContext("2d"), img = ctx.createImageData(w, h);
  const max = Math.max(1e-9, ...px);
  for (let i = 0; i < w * h; i++) {
    const v = 255 - Math.round(255 * Math.min(1, Math.max(0, (px[i] || 0) / max)));
    img.data.set([v, v, v, 255], 4 * i);
  }
  ctx.putImageData(img, 0, 0);
}
function drawBars(canvas, values) {
  // a vector as bars around zero: what a tabular example looks like at a glance
  const n = Math.max(1, values.length), w = 4 * n, h = 40;
  canvas.width = w; canvas.height = h; canvas.className = "bars";
  const ctx = canvas.getContext("2d"), max = Math.max(1e-9, ...values.map(Math.abs));
  ctx.fillStyle = "#d0d7de"; ctx.fillRect(0, h / 2, w, 1);
  values.forEach((v, i) => {
    const bh = (h / 2 - 1) * Math.abs(v) / max;
    ctx.fillStyle = v >= 0 ? "#0969da" : "#bf8700";
    ctx.fillRect(4 * i, v >= 0 ? h / 2 - bh : h / 2, 3, bh);
  });
}
function summarize(v) {
  if (v === null || v === undefined) return String(v);
  if (typeof v === "number") return fmt(v);
  if (typeof v === "string") return v.length > 90 ? v.slice(0, 87) + "…" : v;
  if (typeof v === "boolean") return String(v);
  if (Array.isArray(v)) {
    if (v.length && v.every((x) => typeof x === "number")) {
      return `${v.length} numbers: ${v.slice(0, 3).map(fmt).join(", ")}${v.length > 3 ? ", …" : ""}`;
    }
    return `${v.length} items`;
  }
  const keys = Object.keys(v);
  return `{${keys.slice(0, 3).join(", ")}${keys.length > 3 ? ", …" : ""}}`;
}
function fieldsTable(payload, max = 6) {
  // key fields of a payload the task does not render: readable, not truncated JSON
  const table = document.createElement("table"); table.className = "fields";
  const obj = payload && typeof payload === "object" && !Array.isArray(payload) ? payload
    : {value: payload};
  const keys = Object.keys(obj);
  for (const key of keys.slice(0, max)) {
    const tr = table.insertRow(), th = document.createElement("th"), td = tr.insertCell();
    th.textContent = key; tr.insertBefore(th, td);
    td.textContent = summarize(obj[key]);
    td.title = JSON.stringify(obj[key]).slice(0, 2000);
  }
  if (keys.length > max) {
    const td = table.insertRow().insertCell(); td.colSpan = 2; td.className = "muted";
    td.textContent = `… ${keys.length - max} more fields`;
  }
  return table;
}
function renderInto(el, render, payload) {
  // returns whether the example needed room (a table or text, not a small image)
  if (render && render.kind === "image" && render.shape) {
    const canvas = document.createElement("canvas"); drawImage(canvas, render);
    el.appendChild(canvas); return false;
  }
  if (render && render.kind === "text" && render.text !== undefined) {
    const pre = document.createElement("pre"); pre.textContent = render.text;
    el.appendChild(pre); return true;
  }
  if (render && render.kind === "vector" && Array.isArray(render.values)) {
    const canvas = document.createElement("canvas"); drawBars(canvas, render.values);
    canvas.title = summarize(render.values); el.appendChild(canvas); return false;
  }
  el.appendChild(fieldsTable(payload)); return true;
}
function card(item, captionHtml, className = "card") {
  const el = document.createElement("div"); el.className = className;
  if (renderInto(el, item.render, item.payload)) el.classList.add("wide");
  const caption = document.createElement("div"); caption.className = "caption";
  caption.innerHTML = captionHtml; el.appendChild(caption);
  return el;
}
function pickable(el, onPick) {
  el.classList.add("pick"); el.tabIndex = 0; el.setAttribute("role", "button");
  el.addEventListener("click", onPick);
  el.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); onPick(); } });
  return el;
}
function scoreTitle(hit, side) {
  const normalize = state.shown && state.shown.normalize;
  const what = side === "proponents"
    ? "a proponent: up-weighting it lowers the query's loss, removing it raises it"
    : "an opponent: removing it lowers the query's loss";
  return `${normalize ? "relative influence (score / √self-influence)" : "influence score"} ` +
    `${hit.score}: ${what}. Self-influence ${fmt(hit.self_influence)}.`;
}

// ------------------------------------------------------------------ the page's URL

function queryRef(q) {
  // how a URL names a query: gallery:ID, train:ID, or payload:BASE64 (a pasted payload)
  return q.kind === "payload"
    ? "payload:" + btoa(unescape(encodeURIComponent(JSON.stringify(q.payload))))
    : `${q.kind}:${q.id}`;
}
function writeUrl(push = false) {
  if (state.restoring) return;  // the URL is being read, not written
  const p = new URLSearchParams();
  if (state.index) p.set("index", state.index);
  if (state.view === "self") p.set("view", "self");
  if (state.query) p.set("query", queryRef(state.query));
  p.set("k", String(kValue()));
  if ($("normalize").checked) p.set("relative", "1");
  if ($("filter").value.trim()) p.set("filter", $("filter").value.trim());
  if (state.gallery.label !== "") p.set("label", state.gallery.label);
  if (state.gallery.misclassified) p.set("misclassified", "1");
  if (state.gallery.offset) p.set("gallery", String(state.gallery.offset));
  if (state.self.bin !== null) p.set("bin", String(state.self.bin));
  if (state.self.offset) p.set("self", String(state.self.offset));
  const url = "?" + p.toString();
  if (url === location.search) return;
  if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
}
function readUrl() {
  const p = new URLSearchParams(location.search);
  const k = Number(p.get("k"));
  if (k >= 1) $("k").value = String(Math.min(MAX_K, Math.round(k)));
  $("normalize").checked = p.get("relative") === "1";
  $("filter").value = p.get("filter") || "";
  state.gallery.label = p.get("label") || "";
  state.gallery.misclassified = p.get("misclassified") === "1";
  $("gallery-misclassified").checked = state.gallery.misclassified;
  state.gallery.offset = Math.max(0, Number(p.get("gallery")) || 0);
  state.self.bin = p.has("bin") ? Number(p.get("bin")) : null;
  state.self.offset = Math.max(0, Number(p.get("self")) || 0);
  state.view = p.get("view") === "self" ? "self" : "query";
  return {index: p.get("index"), query: p.get("query")};
}
async function queryFromRef(ref) {
  const at = ref.indexOf(":"), kind = ref.slice(0, at), rest = ref.slice(at + 1);
  if (kind === "payload") {
    return {kind, payload: JSON.parse(decodeURIComponent(escape(atob(rest))))};
  }
  if (kind === "train") {
    const ex = await api(ixPath(`/examples/${encodeURIComponent(rest)}` +
                                (state.canRenderExample ? "?render=true" : "")));
    return {kind, id: ex.id, payload: ex.payload, meta: ex.meta, render: ex.render};
  }
  if (kind === "gallery") {
    const all = await loadFullGallery();
    const item = (all || []).find((g) => g.id === rest);
    if (!item) throw new Error(`the gallery has no example ${rest}`);
    return {kind, id: item.id, payload: item.payload, render: item.render};
  }
  throw new Error(`the link's query ${ref} is not one this page knows`);
}

// ------------------------------------------------------------------ indexes

async function loadIndexes(wanted) {
  try {
    const data = await api("/v1/indexes");
    const select = $("index-select"); select.innerHTML = "";
    for (const ix of data.indexes.filter((i) => i.status === "serving")) {
      const opt = document.createElement("option");
      opt.value = ix.name; opt.textContent = `${ix.name} (${ix.count} examples)`;
      opt.dataset.version = ix.version; select.appendChild(opt);
    }
    if (!select.options.length) { say("no index is being served"); return false; }
    if (wanted && [...select.options].some((o) => o.value === wanted)) select.value = wanted;
    else if (wanted) say(`index ${wanted} is not served here; showing ${select.value}`, true);
    setIndex(select.value);
    if (!wanted || wanted === select.value) say("");
    return true;
  } catch (e) { say(e.message, true); return false; }
}
function setIndex(name) {
  if (name !== state.index) {
    Object.assign(state.gallery, {offset: state.index ? 0 : state.gallery.offset, all: null});
    Object.assign(state.self, {hist: null});
  }
  state.index = name;
  const opt = $("index-select").selectedOptions[0];
  state.version = opt ? Number(opt.dataset.version) : null;
  $("version").textContent = state.version ? `version ${state.version}` : "";
}
$("index-select").addEventListener("change", async (e) => {
  Object.assign(state.gallery, {label: "", misclassified: false});
  $("gallery-misclassified").checked = false;
  Object.assign(state.self, {offset: 0, bin: null});
  setIndex(e.target.value);
  state.query = null; clearResults(); writeUrl(true);
  await loadGallery(); fillLabels();
  if (state.view === "self") loadSelf();
});

// ------------------------------------------------------------------ gallery

let fullGallery = null;  // {index, promise}
function loadFullGallery() {
  // the whole gallery (up to FULL_GALLERY_CAP), for filtering by label and jumping to an id
  if (fullGallery && fullGallery.index === state.index) return fullGallery.promise;
  const index = state.index;
  const promise = (async () => {
    const all = []; let offset = 0, total = 0;
    while (offset !== null && all.length < FULL_GALLERY_CAP) {
      const page = await api(ixPath(`/gallery?limit=500&offset=${offset}`));
      all.push(...page.results); total = page.total; offset = page.next_offset;
    }
    if (index === state.index) { state.gallery.all = all; state.gallery.total = total; }
    return all;
  })();
  promise.catch(() => { fullGallery = null; });
  fullGallery = {index, promise};
  return promise;
}
function isMisclassified(item) {
  const p = state.predictions.get(`${state.index}\n${item.id}`), label = labelOf(item);
  return p !== undefined && p !== null && label !== undefined && String(p) !== String(label);
}
async function predict(items, progress = false) {
  // the model's predictions for gallery examples: influence queries with k = 1, batched
  if (!state.canPredict) return;
  const index = state.index, key = (item) => `${index}\n${item.id}`;
  const todo = items.filter((item) => !state.predictions.has(key(item)));
  for (let at = 0; at < todo.length; at += 64) {
    const batch = todo.slice(at, at + 64);
    if (progress) $("gallery-note").textContent = `asking the model: ${at} of ${todo.length}…`;
    const data = await api(`/v1/indexes/${encodeURIComponent(index)}/influence`, {
      method: "POST", body: JSON.stringify({examples: batch.map((i) => i.payload), k: 1})});
    data.results.forEach((r, i) => remember(batch[i], queryFacts(r).prediction, index));
  }
}
function remember(item, prediction, index = state.index) {
  state.predictions.set(`${index}\n${item.id}`, prediction);
  if (prediction !== undefined && prediction !== null && !state.sawPrediction) {
    state.sawPrediction = true; $("misclassified-box").hidden = false;
  }
}
function markPredictions(grid) {
  for (const el of grid.querySelectorAll(".card[data-id]")) {
    const item = {id: el.dataset.id, ...(el._item || {})};
    const p = state.predictions.get(`${state.index}\n${item.id}`);
    // only the mistakes: what a triage looks for
    if (!isMisclassified(item) || el.querySelector(".predicted")) continue;
    const span = document.createElement("div");
    span.className = "predicted wrong";
    span.textContent = `predicted ${p}`; el.querySelector(".caption").appendChild(span);
  }
}
function galleryItems() {
  const g = state.gallery;
  return g.all.filter((item) => (g.label === "" || String(labelOf(item)) === g.label) &&
    (!g.misclassified || isMisclassified(item)));
}
async function schemaLabels() {
  // the labels the index's metadata holds, where the server records them and filters the
  // gallery itself: no need to fetch the whole gallery to fill the select
  if (!state.galleryParams.has("filter")) return null;
  try {
    const schema = (await api(ixPath())).metadata_schema;
    const label = schema && schema.keys && schema.keys.label;
    return label && Array.isArray(label.values) ? label.values : null;
  } catch (e) { return null; }
}
async function fillLabels() {
  let values = await schemaLabels(), all = null;
  if (values === null) {
    try { all = await loadFullGallery(); } catch (e) { return; }
    values = all.map(labelOf);
  }
  state.labelValues = new Map(values.filter((l) => l !== undefined && l !== null)
    .map((l) => [String(l), l]));
  const labels = [...state.labelValues.keys()]
    .sort((a, b) => (Number(a) - Number(b)) || a.localeCompare(b));
  const select = $("gallery-label"); select.length = 1;
  for (const l of labels) select.add(new Option(`label ${l}`, l));
  select.value = labels.includes(state.gallery.label) ? state.gallery.label : "";
  state.gallery.label = select.value;
  // "misclassified" only where the model's predictions came back
  $("misclassified-box").hidden = !state.sawPrediction;
  $("gallery-note").textContent = all && state.gallery.total > all.length
    ? `filters cover the first ${all.length} of ${state.gallery.total}` : "";
  if (state.gallery.label !== "") loadGallery();
}
async function loadGallery() {
  const seq = ++state.gallerySeq, g = state.gallery;
  let items, total, offset = g.offset;
  const server = serverFilters();
  try {
    if (server !== null) {  // the server filters and predicts: its pages, its total
      const data = await api(ixPath(`/gallery?limit=${PAGE}&offset=${offset}${server}`));
      if (seq !== state.gallerySeq) return;
      items = data.results; total = data.total;
      items.forEach((item) => { if ("prediction" in item) remember(item, item.prediction); });
    } else if (g.all) {
      const filtered = galleryItems(); total = filtered.length;
      if (offset >= total) offset = Math.max(0, Math.floor((total - 1) / PAGE) * PAGE);
      items = filtered.slice(offset, offset + PAGE);
    } else {
      const data = await api(ixPath(`/gallery?limit=${PAGE}&offset=${offset}`));
      if (seq !== state.gallerySeq) return;
      items = data.results; total = data.total;
      items.forEach((item) => { if ("prediction" in item) remember(item, item.prediction); });
    }
  } catch (e) { say(e.message, true); return; }
  g.offset = offset;
  const grid = $("gallery"); grid.innerHTML = "";
  const empty = g.label === "" && !g.misclassified && total === 0;  // the task offers none
  if (g.label === "" && !g.misclassified) g.total = total;
  $("gallery-block").hidden = empty;
  $("json-block").open = empty;
  for (const item of items) {
    const el = card(item, `${esc(item.id)}<br>${esc(labelText(item))}`);
    el.dataset.id = item.id; el._item = item;
    if (state.query && state.query.kind === "gallery" && state.query.id === item.id) {
      el.classList.add("chosen");
    }
    pickable(el, () => choose({kind: "gallery", id: item.id, payload: item.payload,
                               render: item.render}));
    grid.appendChild(el);
  }
  const last = Math.min(offset + PAGE, total), pages = Math.max(1, Math.ceil(total / PAGE));
  $("gallery-pos").textContent = total ? `${offset + 1}–${last} of ${total}` : "no example";
  $("gallery-page").value = String(Math.floor(offset / PAGE) + 1);
  $("gallery-page").max = String(pages);
  $("gallery-pages").textContent = `of ${pages}`;
  $("gallery-prev").disabled = offset === 0;
  $("gallery-next").disabled = last >= total;
  writeUrl();
  markPredictions(grid);
  if (state.canPredict && !state.galleryParams.has("predict")) {
    predict(items).then(() => { if (seq === state.gallerySeq) markPredictions(grid); })
      .catch(() => null);  // a page without predictions is still a page
  }
}
function serverFilters() {
  // query parameters when the server filters the gallery itself (null: filter here)
  const g = state.gallery, has = (p) => state.galleryParams.has(p);
  const predict = has("predict") && state.canPredict ? "&predict=true" : "";
  if (g.label === "" && !g.misclassified) return predict;
  if (!has("filter") || (g.misclassified && !has("misclassified"))) return null;
  let params = predict;
  if (g.label !== "") {
    const value = state.labelValues.get(g.label);
    params += "&filter=" + encodeURIComponent(JSON.stringify({label: value ?? g.label}));
  }
  if (g.misclassified) params += "&misclassified=true";
  return params;
}
function galleryTo(offset) { state.gallery.offset = Math.max(0, offset); loadGallery(); }
$("gallery-prev").onclick = () => galleryTo(state.gallery.offset - PAGE);
$("gallery-next").onclick = () => galleryTo(state.gallery.offset + PAGE);
$("gallery-page").addEventListener("change", (e) => {
  const page = Math.max(1, Math.round(Number(e.target.value) || 1));
  galleryTo((page - 1) * PAGE);
});
$("gallery-label").addEventListener("change", async (e) => {
  state.gallery.label = e.target.value; state.gallery.offset = 0;
  if (serverFilters() === null) await loadFullGallery().catch(() => null);
  loadGallery();
});
$("gallery-misclassified").addEventListener("change", async (e) => {
  state.gallery.misclassified = e.target.checked; state.gallery.offset = 0;
  if (e.target.checked && !(state.galleryParams.has("misclassified") && state.galleryParams.has("filter"))) {
    try { await predict(await loadFullGallery(), true); }
    catch (err) { say(err.message, true); }
    $("gallery-note").textContent = "";
  }
  loadGallery();
});

// ------------------------------------------------------------------ influence

const kValue = () => Math.min(MAX_K, Math.max(1, Math.round(Number($("k").value) || 12)));

function choose(query) {
  state.query = query;
  document.querySelectorAll("#gallery .card.chosen").forEach((c) => c.classList.remove("chosen"));
  if (query.kind === "gallery") {
    const el = document.querySelector(`#gallery .card[data-id="${CSS.escape(query.id)}"]`);
    if (el) el.classList.add("chosen");
  }
  writeUrl(true);
  return attribute();
}
$("payload-go").onclick = () => {
  let payload;
  try { payload = JSON.parse($("payload").value); }
  catch (e) { say("the payload is not valid JSON: " + e.message, true); return; }
  choose({kind: "payload", payload});
};
// k and relative influence re-run the query on screen: never stale cards
$("k").addEventListener("change", () => { $("k").value = String(kValue()); writeUrl(); attribute(); });
$("normalize").addEventListener("change", () => { writeUrl(); attribute(); });
$("filter").addEventListener("change", () => { writeUrl(); attribute(); });
function metadataFilter() {
  // the filter box: JSON on the training examples' metadata, or empty for none
  const text = $("filter").value.trim();
  if (!text) return null;
  const filter = JSON.parse(text);
  if (!filter || typeof filter !== "object" || Array.isArray(filter)) {
    throw new Error('a filter is a JSON object, such as {"label": 3}');
  }
  return filter;
}

function clearResults() {
  for (const id of ["proponents", "opponents"]) { $(id).innerHTML = ""; $(id).classList.remove("busy"); }
  delete $("proponents").dataset.query;
  $("pro-count").textContent = ""; $("opp-count").textContent = "";
  $("query-card").innerHTML = '<span class="muted">Choose an example.</span>';
  state.shown = null; $("export-csv").disabled = true; $("export-json").disabled = true;
}

function queryName(q) {
  return q.kind === "payload" ? "pasted payload" : q.kind === "train" ? `training example ${q.id}` : q.id;
}

function queryFacts(result) {
  // prediction, confidence and loss of a query: on its result, or under its `query`
  return Object.assign({}, result.query || {}, result);
}
function showQueryCard(q, result) {
  const box = $("query-card"); box.innerHTML = "";
  box.appendChild(card(q, esc(queryName(q))));
  const facts = document.createElement("dl"); facts.className = "facts"; facts.id = "query-facts";
  const add = (term, html, id, title) => {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = term; dd.innerHTML = html; if (id) dd.id = id; if (title) dd.title = title;
    facts.append(dt, dd);
  };
  const label = labelOf(q);
  if (label !== undefined) add("label", esc(label), "query-label");
  const r = queryFacts(result || {});
  if (r.prediction !== undefined && r.prediction !== null) {
    const wrong = label !== undefined && String(r.prediction) !== String(label);
    const conf = typeof r.confidence === "number" ? ` (confidence ${(100 * r.confidence).toFixed(1)}%)` : "";
    add("prediction", `${esc(r.prediction)}${esc(conf)}` +
        (wrong ? ' <span class="wrong">≠ label: misclassified</span>' : ""), "query-prediction",
        "The model's predicted class and the probability it gives it");
  }
  if (typeof r.loss === "number") {
    add("loss", esc(fmt(r.loss)), "query-loss", "The model's loss on this example (its label)");
  }
  if (q.kind === "train") add("query", "a training example: itself is left out", "query-kind");
  if (state.version) add("index", `${esc(state.index)} version ${esc(state.version)}`);
  box.appendChild(facts);
}

async function attribute() {
  const q = state.query;
  if (!q || !state.index) return;
  const seq = ++state.seq, k = kValue(), normalize = $("normalize").checked;
  let filter;
  try { filter = metadataFilter(); }
  catch (e) { say(`the filter is not valid: ${e.message}`, true); return; }
  say("computing…");
  ["proponents", "opponents"].forEach((id) => $(id).classList.add("busy"));
  showQueryCard(q, null);
  try {
    const body = {k, direction: "both", normalize, render: true};
    if (filter) body.filter = filter;
    let exclude = null;
    if (q.kind === "train" && state.canQueryIds) body.ids = [q.id];
    else {
      // a server without `ids` queries: the stored payload, with the example itself left out
      body.examples = [q.payload];
      if (q.kind === "train") { exclude = q.id; body.k = Math.min(1000, k + 1); }
    }
    const data = await api(ixPath("/influence"), {method: "POST", body: JSON.stringify(body)});
    if (seq !== state.seq) return;  // a newer query (or k, or toggle) superseded this one
    const result = Object.assign({}, data.results[0]);
    for (const side of ["proponents", "opponents"]) {
      result[side] = (result[side] || []).filter((h) => h.id !== exclude).slice(0, k);
    }
    state.version = data.version; $("version").textContent = `version ${data.version}`;
    state.shown = {index: data.index, version: data.version, k, normalize, filter, query: q,
                   result};
    showQueryCard(q, result);
    showHits(result);
    // what the result grids show, for whoever reads the page (tests, scripts)
    Object.assign($("proponents").dataset, {query: queryRef(q), k: String(k),
                                             normalize: String(normalize),
                                             filter: filter ? JSON.stringify(filter) : ""});
    $("export-csv").disabled = false; $("export-json").disabled = false;
    say("");
  } catch (e) {
    if (seq !== state.seq) return;
    for (const id of ["proponents", "opponents"]) { $(id).innerHTML = ""; $(id).classList.remove("busy"); }
    delete $("proponents").dataset.query;
    say(e.message, true);
  }
}

function showHits(result) {
  for (const [side, cls, count, total] of [["proponents", "pro", "pro-count", "positives"],
                                           ["opponents", "opp", "opp-count", "negatives"]]) {
    const grid = $(side); grid.innerHTML = ""; grid.classList.remove("busy");
    for (const hit of result[side]) {
      const el = card(hit, `<span class="score ${cls}" title="${esc(scoreTitle(hit, side))}">` +
                           `${hit.score.toPrecision(3)}</span><br>${esc(hit.id)}` +
                           `<br><span class="muted">${esc(labelText(hit))}</span>`);
      el.dataset.id = hit.id; el.title = `Click: which training examples drove ${hit.id}?`;
      pickable(el, () => choose({kind: "train", id: hit.id, payload: hit.payload, meta: hit.meta,
                                 render: hit.render}));
      grid.appendChild(el);
    }
    const n = result[total];
    $(count).textContent = typeof n === "number" ? `${result[side].length} shown of ${n} with a ` +
      `${side === "proponents" ? "positive" : "negative"} score` : "";
  }
}

// ------------------------------------------------------------------ export

function download(name, type, text) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text], {type}));
  a.download = name; document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}
function exportName(ext) {
  const s = state.shown, q = s.query;
  const what = q.kind === "payload" ? "payload" : q.id;
  return `${s.index}-v${s.version}-${what}-influence.${ext}`.replace(/[^\w.-]+/g, "_");
}
function exportRows() {
  const s = state.shown, rows = [];
  for (const side of ["proponents", "opponents"]) {
    s.result[side].forEach((h, i) => rows.push({
      side, rank: i + 1, id: h.id, score: h.score, label: labelOf(h) ?? "",
      self_influence: h.self_influence, meta: h.meta, payload: h.payload}));
  }
  return rows;
}
const csvCell = (v) => {
  const s = typeof v === "object" ? JSON.stringify(v) : String(v);
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
};
$("export-csv").onclick = () => {
  const cols = ["side", "rank", "id", "score", "label", "self_influence", "meta", "payload"];
  const lines = [cols.join(","), ...exportRows().map((r) => cols.map((c) => csvCell(r[c])).join(","))];
  download(exportName("csv"), "text/csv", lines.join("\r\n") + "\r\n");
};
$("export-json").onclick = () => {
  const s = state.shown, q = s.query, r = s.result;
  const out = {index: s.index, version: s.version, k: s.k, normalize: s.normalize,
               filter: s.filter,
               query: {kind: q.kind, id: q.id ?? null, payload: q.payload},
               prediction: queryFacts(r).prediction ?? null,
               confidence: queryFacts(r).confidence ?? null, loss: queryFacts(r).loss ?? null,
               results: exportRows()};
  download(exportName("json"), "application/json", JSON.stringify(out, null, 2));
};
$("copy-link").onclick = async () => {
  writeUrl();
  try { await navigator.clipboard.writeText(location.href); say("link copied"); }
  catch (e) { say("copy this page's address to share the view"); }
};

// ------------------------------------------------------------------ self-influence

async function loadSelf() {
  if (!state.index) return;
  const seq = ++state.selfSeq;
  try {
    if (!state.self.hist || state.self.hist.index !== state.index) {
      state.self.hist = await api(ixPath("/self-influence/histogram?bins=40&log=true"));
      if (seq !== state.selfSeq) return;
    }
    drawHistogram(state.self.hist);
    const bin = binRange();
    let start = state.self.offset, limit = SELF_PAGE, bounds = "";
    if (bin && state.selfBounds) {  // the server lists a bin by its edges
      const last = bin.i === state.self.hist.counts.length - 1;
      if (bin.i > 0) bounds += `&min_self_influence=${bin.lo}`;
      if (!last) bounds += `&max_self_influence=${bin.hi}`;
    } else if (bin) {  // a bin is a slice of the ranking: those above it come first
      limit = Math.min(SELF_PAGE, bin.count - start); start += bin.start;
    }
    const page = limit > 0
      ? await api(ixPath(`/self-influence?limit=${limit}&offset=${start}&render=true${bounds}`))
      : {results: [], next_offset: null};
    if (seq !== state.selfSeq) return;
    showSelf(page, bin);
  } catch (e) { say(e.message, true); }
}
function binRange() {
  // the examples of one bin are one slice of the ranking: those above it come first
  const h = state.self.hist, i = state.self.bin;
  if (!h || i === null || !(i >= 0 && i < h.counts.length)) return null;
  const start = h.counts.slice(i + 1).reduce((a, b) => a + b, 0);
  return {i, start, count: h.counts[i], lo: h.edges[i], hi: h.edges[i + 1]};
}
function showSelf(page, bin) {
  const body = $("self-table").querySelector("tbody"); body.innerHTML = "";
  const byBounds = bin && state.selfBounds;
  const base = (bin && !byBounds ? bin.start : 0) + state.self.offset;
  page.results.forEach((ex, i) => {
    const tr = document.createElement("tr"); tr.dataset.id = ex.id;
    tr.innerHTML = `<td>${base + i + 1}</td><td class="example"></td><td>${esc(ex.id)}</td>` +
      `<td>${esc(labelText(ex))}</td><td class="si">${ex.self_influence.toPrecision(4)}</td><td></td>`;
    const cell = tr.children[1];
    renderInto(cell, ex.render, ex.payload);
    cell.title = `Click: which training examples drove ${ex.id}?`;
    cell.onclick = () => { show("query"); choose({kind: "train", id: ex.id, payload: ex.payload,
                                                  meta: ex.meta, render: ex.render}); };
    if (isAdmin()) {
      const button = document.createElement("button"); button.className = "delete";
      button.textContent = "delete"; button.onclick = () => removeExample(ex.id);
      tr.children[5].appendChild(button);
    }
    body.appendChild(tr);
  });
  const shownEnd = state.self.offset + page.results.length;
  const of = typeof page.total === "number" ? ` of ${page.total}` : "";
  $("self-pos").textContent = page.results.length
    ? `${base + 1}–${base + page.results.length}${of}` : "no example";
  $("self-prev").disabled = state.self.offset === 0;
  $("self-next").disabled = bin && !byBounds ? shownEnd >= bin.count
    : page.next_offset === null || page.next_offset === undefined;
  const inBin = byBounds && typeof page.total === "number" ? page.total : bin && bin.count;
  $("self-filter").textContent = bin
    ? `Self-influence from ${fmt(bin.lo)} to ${fmt(bin.hi)}: ${inBin} examples` : "";
  $("self-all").hidden = !bin;
  writeUrl();
}
$("self-prev").onclick = () => { state.self.offset = Math.max(0, state.self.offset - SELF_PAGE); loadSelf(); };
$("self-next").onclick = () => { state.self.offset += SELF_PAGE; loadSelf(); };
$("self-all").onclick = () => { state.self.bin = null; state.self.offset = 0; loadSelf(); };
function selectBin(i) { state.self.bin = i; state.self.offset = 0; loadSelf(); }

function niceTicks(max, count = 4) {
  const step0 = max / count, mag = 10 ** Math.floor(Math.log10(Math.max(step0, 1e-12)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0) || step0;
  const ticks = []; for (let t = 0; t <= max + 1e-9; t += step) ticks.push(t);
  return ticks;
}
function drawHistogram(hist) {
  const NS = "http://www.w3.org/2000/svg", svg = $("histogram");
  const W = 760, H = 230, L = 56, R = 16, T = 24, B = 48, iw = W - L - R, ih = H - T - B;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.innerHTML = "";
  const el = (name, attrs, text) => {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const n = hist.counts.length, max = Math.max(1, ...hist.counts), ticks = niceTicks(max);
  const top = Math.max(max, ticks[ticks.length - 1]), bw = iw / Math.max(1, n);
  const y = (c) => T + ih - ih * c / top;
  svg.appendChild(el("text", {x: L, y: 14}, `${hist.count} examples by self-influence` +
                     `${hist.log ? " (log scale)" : ""}; tallest bin ${max}`));
  for (const t of ticks) {  // y axis: example counts
    svg.appendChild(el("line", {x1: L - 4, x2: L, y1: y(t), y2: y(t), class: "axis"}));
    svg.appendChild(el("text", {x: L - 7, y: y(t) + 4, "text-anchor": "end", class: "ytick"},
                       String(Math.round(t))));
  }
  svg.appendChild(el("line", {x1: L, x2: L, y1: T, y2: T + ih, class: "axis"}));
  svg.appendChild(el("line", {x1: L, x2: L + iw, y1: T + ih, y2: T + ih, class: "axis"}));
  svg.appendChild(el("text", {x: 14, y: T + ih / 2, "text-anchor": "middle",
                              transform: `rotate(-90 14 ${T + ih / 2})`}, "examples"));
  svg.appendChild(el("text", {x: L + iw / 2, y: H - 6, "text-anchor": "middle"},
                     `self-influence${hist.log ? " (log scale)" : ""}`));
  hist.counts.forEach((count, i) => {
    const g = el("g", {class: "bin-group" + (state.self.bin === i ? " selected" : ""),
                       "data-bin": String(i), "data-count": String(count),
                       "data-lo": String(hist.edges[i]), "data-hi": String(hist.edges[i + 1])});
    g.appendChild(el("title", {}, `${fmt(hist.edges[i])} – ${fmt(hist.edges[i + 1])}: ` +
                                  `${count} examples (click to list them)`));
    g.appendChild(el("rect", {class: "bin", x: L + i * bw + 0.5, y: y(count),
                              width: Math.max(1, bw - 1), height: T + ih - y(count)}));
    g.appendChild(el("rect", {class: "hit", x: L + i * bw, y: T, width: bw, height: ih}));
    g.addEventListener("click", () => selectBin(i));
    svg.appendChild(g);
  });
  const tickEvery = Math.max(1, Math.ceil(n / 6));  // x axis: bin edges, every few bins
  const tickAt = [];
  for (let i = 0; i <= n; i += tickEvery) tickAt.push(i);
  if (n - tickAt[tickAt.length - 1] >= tickEvery / 2) tickAt.push(n); else tickAt[tickAt.length - 1] = n;
  for (const i of tickAt) {
    const x = L + i * bw;
    svg.appendChild(el("line", {x1: x, x2: x, y1: T + ih, y2: T + ih + 4, class: "axis"}));
    svg.appendChild(el("text", {x, y: T + ih + 16, "text-anchor": "middle", class: "xtick"},
                       fmt(hist.edges[i])));
  }
}

async function removeExample(id) {
  if (!confirm(`Remove ${id} from every result, for good?`)) return;
  try {
    await api(ixPath(`/examples/${encodeURIComponent(id)}`), {method: "DELETE"});
    say(`deleted ${id}`); state.self.hist = null; await loadSelf();
  } catch (e) {
    if (e.status === 403) { state.scope = "read"; showScope(); }
    say(e.message, true);
  }
}

// ------------------------------------------------------------------ views and start-up

function show(view) {
  state.view = view === "self" ? "self" : "query";
  const self = state.view === "self";
  $("view-query").hidden = self; $("view-self").hidden = !self;
  $("tab-query").setAttribute("aria-selected", String(!self));
  $("tab-self").setAttribute("aria-selected", String(self));
  writeUrl();
  if (self && state.index) loadSelf();
}
$("tab-query").onclick = () => show("query");
$("tab-self").onclick = () => show("self");

async function restore() {
  // the view a URL names: index, query, k, relative influence, gallery page, histogram bin
  state.restoring = true;
  let query = null;
  try {
    const wanted = readUrl();
    show(state.view);
    if (!(await loadIndexes(wanted.index))) return;
    await loadGallery();
    fillLabels();
    if (state.view === "self") loadSelf();
    if (wanted.query) {
      try { query = await queryFromRef(wanted.query); }
      catch (e) { say(`the link's query cannot be shown: ${e.message}`, true); }
    }
  } finally { state.restoring = false; }
  state.query = query;
  if (query) await attribute(); else clearResults();
}
window.addEventListener("popstate", restore);
keyInput.addEventListener("change", async () => {
  localStorage.setItem("gradindex-key", keyInput.value.trim());
  await loadScope();
  if (await loadIndexes(state.index)) {
    fullGallery = null; state.gallery.all = null;
    await loadGallery(); fillLabels();
    if (state.view === "self") loadSelf();
  }
});

Promise.all([loadCapabilities(), loadScope()]).then(restore);
