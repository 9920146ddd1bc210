// clipdex web page: plain JS over the JSON API (POST /api/search), no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, imageName: "", imageId: null, offset: 0, lastBody: null };

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
    if ($("q").value.trim()) search();
  });
}

// --- searching ------------------------------------------------------------------------------
function requestBody() {
  const body = { target: target(), top: Number($("top").value) };
  const text = $("q").value.trim();
  if (text) body.text = text;
  if (state.image) body.image = state.image;
  if (state.imageId !== null) body.image_id = state.imageId;
  return body.text || body.image || body.image_id !== undefined ? body : null;
}

async function search(more = false) {
  const body = more ? state.lastBody : requestBody();
  if (!body) {
    setStatus("Type a query or drop an image.");
    return;
  }
  state.offset = more ? state.offset + body.top : 0;
  state.lastBody = body;
  setStatus("Searching…");
  const started = performance.now();
  try {
    const response = await fetch("/api/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...body, offset: state.offset }),
    });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    render(data, more, performance.now() - started);
  } catch (err) {
    if (!more) $("results").replaceChildren();
    $("more").hidden = true;
    setStatus(err.message, true);
  }
}

function render(data, more, ms) {
  const results = $("results");
  results.className = data.query.target;
  if (!more) results.replaceChildren();
  for (const hit of data.hits) results.append(hit.kind === "image" ? imageCard(hit) : captionCard(hit));
  $("examples").hidden = true; // suggestions are for the empty page
  const shown = results.children.length;
  const noun = data.query.target === "images" ? "image" : "caption";
  setStatus(shown ? `${shown} ${noun}${shown === 1 ? "" : "s"} · ${Math.round(ms)} ms`
                  : "No results.");
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

function imageCard(hit) {
  const meta = el("div", { className: "meta" },
    el("span", { className: "score", textContent: hit.score.toFixed(3) }),
    el("span", { className: "name", textContent: baseName(hit.path), title: hit.path || "" }),
    similarButton(hit));
  return el("article", { className: "hit image" }, thumbLink(hit.id, baseName(hit.path)), meta);
}

function captionCard(hit) {
  const body = el("div", { className: "body" },
    el("div", { className: "text", textContent: hit.text }),
    el("div", { className: "meta" },
      el("span", { className: "score", textContent: hit.score.toFixed(3) }),
      el("span", { className: "name", textContent: baseName(hit.path), title: hit.path || "" })));
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
  loadStats();
  loadExamples();
});
