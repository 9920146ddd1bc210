// clipdex web page: plain JS over the JSON API (POST /api/search, GET /api/duplicates), no
// build step. Two views: search (the default) and #duplicates.
"use strict";

const $ = (id) => document.getElementById(id);
// lastBody: the request of the results shown (for "More results"); lastView: the filters as
// the user set them for it (for the status line); seq: the latest search sent (older answers
// that arrive late are dropped)
// view: "search" or "duplicates"; status: each view's status line, shown while it is shown;
// dupesSeq: the latest duplicates request; others: the paths of the non-best copies shown
const state = { image: null, imageName: "", imageId: null, offset: 0, lastBody: null,
                lastView: null, seq: 0, filterTimer: null, view: "search",
                status: { search: ["", false], duplicates: ["", false] }, dupesSeq: 0,
                others: [] };
const FILE_TIME = "file time, no camera date";
const MAX_TAGS = 3; // tags shown under a thumbnail, best first

function target() {
  return document.querySelector('input[name="target"]:checked').value;
}

// the status line (and error area) of a view; another view's is kept for when it is back
function setStatus(text, isError = false, view = "search") {
  state.status[view] = [text, isError];
  if (view !== state.view) return;
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// --- the query image: file picker, drag and drop, paste -----------------------------------
function chooseFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus("That is not an image file.", true);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result; // a data: URL; the server accepts it as base64
    state.imageName = file.name;
    state.imageId = null;
    showChosen(reader.result, file.name);
    search();
  };
  reader.readAsDataURL(file);
}

function showChosen(src, name, title = "") {
  $("preview").src = src;
  $("chosen-name").textContent = name;
  $("chosen-name").title = title;
  $("chosen").hidden = false;
  $("drop-hint").hidden = true;
}

function clearImage() {
  state.image = null;
  state.imageId = null;
  $("file").value = "";
  $("chosen").hidden = true;
  $("drop-hint").hidden = false;
}

function wireDropZone() {
  const drop = $("drop");
  drop.addEventListener("click", (e) => {
    if (e.target.id !== "clear-image") $("file").click();
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  $("file").addEventListener("change", () => chooseFile($("file").files[0]));
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    chooseFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
    if (item) chooseFile(item.getAsFile());
  });
  $("clear-image").addEventListener("click", (e) => {
    e.stopPropagation();
    clearImage();
    if (requestBody()) search(); // the text alone, or the filters' listing
  });
}

// --- filters --------------------------------------------------------------------------------
// the filter bar as the user set it; "to" is inclusive here, and sent as `before` the next day
function filterView() {
  return { from: $("from").value, to: $("to").value, camera: $("camera").value.trim(),
           place: $("place").value.trim(), tag: $("tag").value, type: $("type").value,
           sort: $("sort").value };
}

function hasFilters(view) {
  return Boolean(view.from || view.to || view.camera || view.place || view.tag || view.type);
}

function dayAfter(day) { // "2021-12-31" -> "2022-01-01", in UTC so no time zone shifts it
  const date = new Date(`${day}T00:00:00Z`);
  date.setUTCDate(date.getUTCDate() + 1);
  return date.toISOString().slice(0, 10);
}

function filterFields(view) {
  const fields = {};
  if (view.from) fields.after = view.from;
  if (view.to) fields.before = dayAfter(view.to);
  if (view.camera) fields.camera = view.camera;
  if (view.place) fields.place = view.place;
  if (view.tag) fields.tag = view.tag;
  if (view.type) fields.type = view.type;
  if (view.sort !== "relevance") fields.sort = view.sort;
  return fields;
}

// "taken in Lisbon, shot with “canon”, tagged “dog”, from 2021-01-01 to 2021-12-31"; ""
// without filters
function describeFilters(view) {
  const clauses = [];
  if (view.place) clauses.push(`taken in ${view.place}`);
  if (view.camera) clauses.push(`shot with “${view.camera}”`);
  if (view.tag) clauses.push(`tagged “${view.tag}”`);
  if (view.from && view.to) clauses.push(`from ${view.from} to ${view.to}`);
  else if (view.from) clauses.push(`from ${view.from} on`);
  else if (view.to) clauses.push(`up to ${view.to}`);
  return clauses.join(", ");
}

function sortWords(sort, browse) {
  if (sort === "date") return "oldest first";
  if (sort === "-date" || browse) return "newest first"; // filters alone list newest first
  return "";
}

function updateClearButton() {
  const view = filterView();
  $("clear-filters").hidden = !hasFilters(view) && view.sort === "relevance";
}

function clearFilters() {
  for (const id of ["from", "to", "camera", "place"]) $(id).value = "";
  $("tag").value = "";
  $("type").value = "";
  $("sort").value = "relevance";
  filtersChanged(true);
}

// a filter changed: re-run the current search (or list photos), unless it asks the same again
function filtersChanged(now = false) {
  updateClearButton();
  clearTimeout(state.filterTimer);
  state.filterTimer = setTimeout(() => {
    const body = requestBody();
    if (!body) {
      if (state.lastView?.browse) { // the listing's last filter went: back to the empty page
        state.seq += 1;
        state.lastBody = state.lastView = null;
        $("results").replaceChildren();
        $("more").hidden = true;
        setStatus("Type a query or drop an image.");
      }
      return;
    }
    if (JSON.stringify(body) !== JSON.stringify(state.lastBody)) search();
  }, now ? 0 : 400);
}

function fillOptions(select, values, label = (v) => v) {
  for (const value of values) select.append(el("option", { value, textContent: label(value) }));
}

// the tag filter set to `label` (a tag clicked under a thumbnail), and the search re-run
function setTagFilter(label) {
  const select = $("tag");
  if (![...select.options].some((o) => o.value === label)) { // the filters not loaded yet
    select.append(el("option", { value: label, textContent: label }));
  }
  select.value = label;
  $("tag-filter").hidden = false;
  filtersChanged(true);
}

// the filter bar's choices: the library's cameras, places, tags, formats and date range
async function loadFilters() {
  try {
    const response = await fetch("/api/filters");
    const data = await response.json();
    if (!response.ok) return;
    const tags = data.tags || [];
    fillOptions($("cameras"), data.cameras);
    fillOptions($("places"), data.places);
    const chosen = $("tag").value; // a tag clicked meanwhile stays chosen
    $("tag").replaceChildren(el("option", { value: "", textContent: "any" }));
    fillOptions($("tag"), tags);
    if (chosen) setTagFilter(chosen);
    fillOptions($("type"), data.types, (t) => t.toUpperCase());
    $("camera-filter").hidden = !data.cameras.length;
    $("place-filter").hidden = !data.places.length;
    $("tag-filter").hidden = !tags.length && !chosen;
    if (data.taken) {
      for (const id of ["from", "to"]) {
        if (data.taken.first) $(id).min = data.taken.first.slice(0, 10);
        if (data.taken.last) $(id).max = data.taken.last.slice(0, 10);
      }
    }
  } catch (err) { /* the filters still work typed by hand */ }
}

// --- searching ------------------------------------------------------------------------------
function requestBody() {
  const view = filterView();
  const body = { target: target(), top: Number($("top").value), ...filterFields(view) };
  const text = $("q").value.trim();
  if (text) body.text = text;
  if (state.image) body.image = state.image;
  if (state.imageId !== null) body.image_id = state.imageId;
  if (body.text || body.image || body.image_id !== undefined) return body;
  if (!hasFilters(view) && view.sort === "relevance") return null;
  body.target = "images"; // no query: list the photos the filters keep, by date
  return body;
}

function isBrowse(body) {
  return !body.text && !body.image && body.image_id === undefined;
}

async function search(more = false) {
  clearTimeout(state.filterTimer);
  updateClearButton();
  const body = more ? state.lastBody : requestBody();
  if (!body) {
    setStatus("Type a query or drop an image.");
    return;
  }
  const view = more ? state.lastView : { ...filterView(), browse: isBrowse(body) };
  if (!more && view.from && view.to && view.from > view.to) {
    setStatus(`The date range is empty: “from” ${view.from} is after “to” ${view.to}.`, true);
    return;
  }
  const offset = more ? state.offset + body.top : 0;
  const seq = ++state.seq;
  state.lastBody = body;
  state.lastView = view;
  setStatus(view.browse ? "Listing…" : "Searching…");
  const started = performance.now();
  try {
    const response = await fetch("/api/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...body, offset }),
    });
    const data = await response.json();
    if (seq !== state.seq) return; // a newer search was sent meanwhile
    if (!response.ok) throw new Error(data.error || response.statusText);
    state.offset = offset;
    render(data, more, performance.now() - started, view);
  } catch (err) {
    if (seq !== state.seq) return;
    if (!more) $("results").replaceChildren();
    $("more").hidden = true;
    setStatus(err.message, true);
  }
}

function plural(n, noun) {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}

function render(data, more, ms, view) {
  const results = $("results");
  results.className = data.query.target;
  if (!more) results.replaceChildren();
  for (const hit of data.hits) results.append(hit.kind === "image" ? imageCard(hit) : captionCard(hit));
  $("examples").hidden = true; // suggestions are for the empty page
  const shown = results.children.length;
  const filters = describeFilters(view);
  const order = sortWords(view.sort, view.browse);
  const type = view.type ? `${view.type.toUpperCase()} ` : "";
  let text;
  if (view.browse) {
    const what = shown ? plural(shown, `${type}photo`) : `No ${type}photos`;
    text = [what + (filters ? ` ${filters}` : ""), shown ? order : ""].filter(Boolean).join(", ");
    if (view.browse && target() === "captions") text += " · captions need a query text or image";
  } else if (shown) {
    const noun = data.query.target === "images" ? `${type}image` : "caption";
    const of = filters && data.query.target === "captions" ? ` of photos ${filters}` : ` ${filters}`;
    text = plural(shown, noun) + (filters ? of : "") + (order ? `, ${order}` : "");
  } else {
    text = "No results" + (filters || type ? ` for ${type}photos ${filters}`.trimEnd() : "");
  }
  setStatus(shown ? `${text} · ${Math.round(ms)} ms` : `${text}.`);
  $("more").hidden = data.hits.length < data.query.top;
}

// --- result cards ---------------------------------------------------------------------------
function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function thumbLink(imageId, alt, size = 320) {
  const img = el("img", { className: "thumb", loading: "lazy", alt,
                          src: `/api/images/${imageId}/thumbnail?size=${size}` });
  return el("a", { className: "thumb-link", href: `/api/images/${imageId}`, target: "_blank",
                   rel: "noopener", title: "Open the original" }, img);
}

function baseName(path) {
  return path ? path.split(/[\\/]/).pop() : "";
}

function folderOf(path) { // "/photos/2021/a.jpg" -> "/photos/2021/"
  return path ? path.slice(0, path.length - baseName(path).length) : "";
}

function similarButton(hit) {
  const button = el("button", { className: "similar", type: "button", textContent: "similar",
                                title: "Search for images like this one" });
  button.addEventListener("click", () => {
    state.image = null;
    state.imageId = hit.id;
    $("q").value = "";
    showChosen(`/api/images/${hit.id}/thumbnail?size=96`, baseName(hit.path) || `image ${hit.id}`,
               hit.path || "");
    document.getElementById("target-images").checked = true;
    search();
  });
  return button;
}

// the score, or nothing for a photo listed by filters alone (score null)
function scoreSpans(hit) {
  return typeof hit.score === "number" && Number.isFinite(hit.score)
    ? [el("span", { className: "score", textContent: hit.score.toFixed(3) })] : [];
}

// "2021-06-01 14:03" over "Canon EOS R5 · Lisbon": when (the camera's clock, as written, with
// "~" for a file time), then camera and place; nothing where the photo says nothing
function photoLine(meta) {
  const parts = [];
  const when = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2})/.exec(meta?.taken_at || "");
  if (when) {
    const guessed = meta.taken_at_source === "mtime";
    parts.push(el("time", {
      className: guessed ? "taken guessed" : "taken", dateTime: meta.taken_at,
      textContent: `${guessed ? "~" : ""}${when[1]} ${when[2]}`,
      title: guessed ? `${FILE_TIME} (${meta.taken_at})`
                     : `taken ${meta.taken_at} (${meta.taken_at_source || "camera"})`,
    }));
  }
  const where = [];
  if (meta?.camera) {
    where.push(el("span", { className: "camera", textContent: meta.camera,
                            title: meta.lens ? `${meta.camera} · ${meta.lens}` : meta.camera }));
  }
  const place = meta?.city || meta?.place || meta?.country;
  if (place) {
    where.push(el("span", { className: "place", textContent: place, title: meta.place || place }));
  }
  if (where.length) parts.push(el("span", { className: "where" }, ...where));
  return parts.length ? [el("div", { className: "photo" }, ...parts)] : [];
}

// the image's zero-shot tags, best first (at most MAX_TAGS); each a button that filters by it
function tagLine(meta) {
  const best = new Map(); // lower-case label -> its best-scored tag (a label in two groups)
  for (const t of meta?.tags || []) {
    const key = (t?.label || "").toLowerCase();
    if (key && (!best.has(key) || t.score > best.get(key).score)) best.set(key, t);
  }
  const tags = [...best.values()].sort((a, b) => b.score - a.score).slice(0, MAX_TAGS);
  if (!tags.length) return [];
  const buttons = tags.map((t) => {
    const score = typeof t.score === "number" ? ` ${Math.round(t.score * 100)}%` : "";
    const button = el("button", { className: "tag", type: "button", textContent: t.label,
                                  title: `${t.group ? `${t.group}: ` : ""}${t.label}${score}` +
                                         " · show only images tagged so" });
    button.addEventListener("click", () => setTagFilter(t.label));
    return button;
  });
  const line = el("div", { className: "tags" }, ...buttons);
  line.setAttribute("role", "group");
  line.setAttribute("aria-label", "Tags");
  return [line];
}

function imageCard(hit) {
  const meta = el("div", { className: "meta" },
    ...scoreSpans(hit),
    ...photoLine(hit.meta),
    ...tagLine(hit.meta),
    el("span", { className: "name", textContent: baseName(hit.path), title: hit.path || "" }),
    similarButton(hit));
  return el("article", { className: "hit image" }, thumbLink(hit.id, baseName(hit.path)), meta);
}

function captionCard(hit) {
  const body = el("div", { className: "body" },
    el("div", { className: "text", textContent: hit.text }),
    el("div", { className: "meta" },
      ...scoreSpans(hit),
      el("span", { className: "name", textContent: baseName(hit.path), title: hit.path || "" }),
      ...photoLine(hit.meta),
      ...tagLine(hit.meta)));
  const card = el("article", { className: "hit caption" });
  if (hit.image_id !== null) card.append(thumbLink(hit.image_id, hit.text));
  card.append(body);
  return card;
}

// --- the duplicates view -------------------------------------------------------------------
function showView() {
  const view = location.hash === "#duplicates" ? "duplicates" : "search";
  const changed = view !== state.view;
  state.view = view;
  document.body.dataset.view = view;
  for (const [id, shows] of [["view-search", "search"], ["view-duplicates", "duplicates"]]) {
    if (shows === view) $(id).setAttribute("aria-current", "page");
    else $(id).removeAttribute("aria-current");
  }
  document.title = view === "duplicates" ? "clipdex · duplicates" : "clipdex";
  const [text, isError] = state.status[view];
  setStatus(text, isError, view);
  if (view === "duplicates" && (changed || !state.dupesSeq)) loadDuplicates();
}

function formatCosine(value) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(3) : "";
}

function formatBytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function clearDuplicates() {
  $("groups").replaceChildren();
  $("no-dupes").hidden = true;
  state.others = [];
  $("copy-others").hidden = true;
}

async function loadDuplicates() {
  const input = $("threshold");
  const seq = ++state.dupesSeq;
  if (input.validity.badInput || (input.value !== "" && !Number.isFinite(Number(input.value)))) {
    clearDuplicates();
    setStatus("The threshold must be a number in (0, 1], e.g. 0.96.", true, "duplicates");
    return;
  }
  const params = new URLSearchParams();
  if (input.value !== "") params.set("threshold", input.value);
  const under = $("dupes-under").value.trim();
  if (under) params.set("under", under);
  setStatus("Looking for near-duplicates…", false, "duplicates");
  const started = performance.now();
  try {
    const response = await fetch(`/api/duplicates?${params}`);
    const data = await response.json();
    if (seq !== state.dupesSeq) return; // a newer request was sent meanwhile
    if (!response.ok) throw new Error(data.error || response.statusText);
    if (input.value === "") input.value = data.threshold; // the server's default, shown
    renderDuplicates(data, under, performance.now() - started);
  } catch (err) {
    if (seq !== state.dupesSeq) return;
    clearDuplicates();
    setStatus(err.message, true, "duplicates");
  }
}

function renderDuplicates(data, under, ms) {
  clearDuplicates();
  const groups = data.groups || [];
  const threshold = data.threshold;
  const where = under ? ` below ${under}` : "";
  if (!groups.length) {
    $("no-dupes").textContent = `No near-duplicate images${where} at cosine ≥ ${threshold}: ` +
      "no two images are that alike. A lower threshold finds looser copies.";
    $("no-dupes").hidden = false;
    setStatus(`No duplicates at cosine ≥ ${threshold}.`, false, "duplicates");
    return;
  }
  $("groups").append(...groups.map((g, i) => groupRow(g, i + 1)));
  state.others = groups.flatMap((g) => g.others.map((c) => c.path));
  $("copy-others").hidden = !state.others.length;
  const extra = state.others.length;
  setStatus(`${plural(groups.length, "group")} of near-duplicates${where}, ${extra} ` +
            `${extra === 1 ? "copy" : "copies"} besides the best of each, at cosine ≥ ` +
            `${threshold} · ${Math.round(ms)} ms`, false, "duplicates");
}

function groupRow(group, number) {
  const copies = [group.best, ...group.others];
  return el("li", { className: "group" },
    el("h3", { className: "group-title", textContent: `Group ${number} · ${copies.length} copies` }),
    el("ol", { className: "copies" }, ...copies.map((c, i) => copyCard(c, i === 0))));
}

// one copy: its thumbnail, "best" or its cosine to the best copy, its size, name and path
function copyCard(copy, best) {
  const mark = best
    ? el("span", { className: "mark best", textContent: "best",
                   title: "The copy to keep: the most pixels, then the earliest capture, " +
                          "then the shortest path" })
    : el("span", { className: "mark cosine", textContent: formatCosine(copy.cosine),
                   title: `cosine ${copy.cosine} to the best copy` });
  const details = [mark];
  if (copy.width && copy.height) {
    details.push(el("span", { className: "size", textContent: `${copy.width}×${copy.height}`,
                              title: [`${copy.width}×${copy.height} pixels`,
                                      formatBytes(copy.bytes)].filter(Boolean).join(", ") }));
  }
  const name = baseName(copy.path) || `image ${copy.id}`;
  return el("li", { className: best ? "copy best" : "copy" },
    thumbLink(copy.id, name, 256),
    el("div", { className: "meta" }, ...details,
      el("span", { className: "name", textContent: name, title: copy.path || "" }),
      el("span", { className: "path", textContent: folderOf(copy.path), title: copy.path || "" })));
}

async function copyOthers() {
  const paths = state.others;
  if (!paths.length) return;
  const text = paths.join("\n") + "\n";
  let copied = false;
  try {
    await navigator.clipboard.writeText(text);
    copied = true;
  } catch (err) { // no clipboard API (not a secure context) or refused: the old way
    const area = el("textarea", { value: text, readOnly: true });
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    try { copied = document.execCommand("copy"); } catch (e) { copied = false; }
    area.remove();
  }
  if (copied) {
    setStatus(`Copied the paths of ${paths.length} ${paths.length === 1 ? "copy" : "copies"} ` +
              "(all but the best of each group), one a line.", false, "duplicates");
  } else {
    setStatus("The browser did not allow copying to the clipboard.", true, "duplicates");
  }
}

// --- start ----------------------------------------------------------------------------------
async function loadStats() {
  try {
    const response = await fetch("/api/health");
    const data = await response.json();
    if (response.ok) {
      $("stats").textContent = `${data.images} images · ${data.captions} captions` +
                               (data.model ? ` · model ${data.model}` : "");
    }
  } catch (err) { /* the page still works without the counts */ }
}

// a few of the library's own captions as clickable queries; none when it has no captions
async function loadExamples() {
  try {
    const response = await fetch("/api/examples");
    const data = await response.json();
    if (!response.ok || !data.examples.length || state.lastBody) return;
    for (const text of data.examples) {
      const chip = el("button", { className: "example", type: "button", textContent: text,
                                  title: `Search for “${text}”` });
      chip.addEventListener("click", () => { $("q").value = text; search(); });
      $("examples").append(chip);
    }
    $("examples").hidden = false;
  } catch (err) { /* no suggestions, the page still works */ }
}

document.addEventListener("DOMContentLoaded", () => {
  wireDropZone();
  $("search").addEventListener("submit", (e) => { e.preventDefault(); search(); });
  for (const radio of document.querySelectorAll('input[name="target"]')) {
    radio.addEventListener("change", () => { if (state.lastBody) search(); });
  }
  $("top").addEventListener("change", () => { if (state.lastBody) search(); });
  $("more").addEventListener("click", () => search(true));
  for (const id of ["from", "to", "type", "sort"]) {
    $(id).addEventListener("change", () => filtersChanged(true));
  }
  $("tag").addEventListener("change", () => filtersChanged(true));
  for (const id of ["camera", "place"]) { // typed: wait for a pause; picked or left: at once
    $(id).addEventListener("input", () => filtersChanged());
    $(id).addEventListener("change", () => filtersChanged(true));
  }
  $("clear-filters").addEventListener("click", clearFilters);
  $("dupes-form").addEventListener("submit", (e) => { e.preventDefault(); loadDuplicates(); });
  $("threshold").addEventListener("change", () => loadDuplicates());
  $("copy-others").addEventListener("click", copyOthers);
  window.addEventListener("hashchange", showView);
  state.view = "";
  showView();
  loadStats();
  loadFilters();
  loadExamples();
});
