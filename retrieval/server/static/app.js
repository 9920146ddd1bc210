// clipdex web page: plain JS over the JSON API (POST /api/search), no build step.
"use strict";

const $ = (id) => document.getElementById(id);
// lastBody: the request of the results shown (for "More results"); lastView: the filters as
// the user set them for it (for the status line); seq: the latest search sent (older answers
// that arrive late are dropped)
const state = { image: null, imageName: "", imageId: null, offset: 0, lastBody: null,
                lastView: null, seq: 0, filterTimer: null };
const FILE_TIME = "file time, no camera date";

function target() {
  return document.querySelector('input[name="target"]:checked').value;
}

function setStatus(text, isError = false) {
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
           place: $("place").value.trim(), type: $("type").value, sort: $("sort").value };
}

function hasFilters(view) {
  return Boolean(view.from || view.to || view.camera || view.place || view.type);
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
  if (view.type) fields.type = view.type;
  if (view.sort !== "relevance") fields.sort = view.sort;
  return fields;
}

// "taken in Lisbon, shot with “canon”, from 2021-01-01 to 2021-12-31"; "" without filters
function describeFilters(view) {
  const clauses = [];
  if (view.place) clauses.push(`taken in ${view.place}`);
  if (view.camera) clauses.push(`shot with “${view.camera}”`);
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

// the filter bar's choices: the library's cameras, places, formats and date range
async function loadFilters() {
  try {
    const response = await fetch("/api/filters");
    const data = await response.json();
    if (!response.ok) return;
    fillOptions($("cameras"), data.cameras);
    fillOptions($("places"), data.places);
    fillOptions($("type"), data.types, (t) => t.toUpperCase());
    $("camera-filter").hidden = !data.cameras.length;
    $("place-filter").hidden = !data.places.length;
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

function thumbLink(imageId, alt) {
  const img = el("img", { className: "thumb", loading: "lazy", alt,
                          src: `/api/images/${imageId}/thumbnail?size=320` });
  return el("a", { className: "thumb-link", href: `/api/images/${imageId}`, target: "_blank",
                   rel: "noopener", title: "Open the original" }, img);
}

function baseName(path) {
  return path ? path.split(/[\\/]/).pop() : "";
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

function imageCard(hit) {
  const meta = el("div", { className: "meta" },
    ...scoreSpans(hit),
    ...photoLine(hit.meta),
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
      ...photoLine(hit.meta)));
  const card = el("article", { className: "hit caption" });
  if (hit.image_id !== null) card.append(thumbLink(hit.image_id, hit.text));
  card.append(body);
  return card;
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
  for (const id of ["camera", "place"]) { // typed: wait for a pause; picked or left: at once
    $(id).addEventListener("input", () => filtersChanged());
    $(id).addEventListener("change", () => filtersChanged(true));
  }
  $("clear-filters").addEventListener("click", clearFilters);
  loadStats();
  loadFilters();
  loadExamples();
});
