"use strict";
// The page of `dinotune serve`: one image is uploaded to POST /predict?overlay=1 and its result is
// drawn on a canvas from the answer's overlay.view, which the task's runtime describes: bars (a
// score per name), boxes with labels (filtered by the threshold slider), each box optionally with
// its object's mask (tinted in the box's colour, shown with its box), a label map over the picture,
// a summary line; with an index, the most similar indexed images below. The page knows these
// drawings, never the tasks. No dependencies. When a
// result (or an error) is shown, <body data-state> becomes "done" (or "error"), which tests wait for.

const $ = (id) => document.getElementById(id);
const canvas = $("view");
const ctx = canvas.getContext("2d");
let health = null;   // GET /health: task, classes, model, view (the page's controls), max_upload_mb
let last = null;     // the last prediction record, with its overlay
let picture = null;  // its picture and mask, decoded
let mask = null;
let shapes = [];     // the decoded mask of each of overlay.view.boxes (null for a box without one)

function percent(score) { return (100 * score).toFixed(1) + " %"; }

function setState(state, text) {
  document.body.dataset.state = state;
  $("status").textContent = text || "";
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("result").hidden = true;
  setState("error", "");
}

function loadImage(url) {
  const image = new Image();
  image.src = url;
  return image.decode().then(() => image);
}

async function loadHealth() {
  try {
    const response = await fetch("/health");
    health = await response.json();
    const m = health.model || {};
    const parts = [health.task, `${health.classes.length} classes`];
    if (m.backbone) parts.push(m.backbone + (m.adapter ? ` (${m.adapter})` : ""));
    if (m.backend) parts.push(m.backend);
    if (health.input && health.input.arrays) parts.push(`${health.input.bands}-band arrays (.npy / .tif)`);
    if (health.similar) parts.push(`${health.similar.images} indexed images`);
    $("model").textContent = parts.join(" · ") + ` · uploads up to ${health.max_upload_mb} MB`;
    const view = health.view || {};
    if (view.threshold !== undefined) {
      $("threshold").value = view.threshold;
      $("threshold-row").hidden = false;
    }
  } catch (e) {
    $("model").textContent = "the server did not describe its model: " + e.message;
  }
}

async function upload(file) {
  $("error").hidden = true;
  if (health && file.size > health.max_upload_mb * 1024 * 1024) {
    showError(`${file.name} is ${(file.size / 1048576).toFixed(1)} MB, over the server's limit of ` +
              `${health.max_upload_mb} MB`);
    return;
  }
  setState("busy", `predicting ${file.name} …`);
  const form = new FormData();
  form.append("file", file, file.name);
  let response, body;
  try {
    response = await fetch("/predict?overlay=1", { method: "POST", body: form });
    body = await response.json().catch(() => ({ detail: response.statusText }));
  } catch (e) {
    showError("the server could not be reached: " + e.message);
    return;
  }
  if (!response.ok) {
    showError(`${response.status}: ${body.detail}`);
    return;
  }
  last = body;
  picture = await loadImage(body.overlay.image);
  mask = body.overlay.mask ? await loadImage(body.overlay.mask) : null;
  const boxes = (body.overlay.view && body.overlay.view.boxes) || [];
  shapes = await Promise.all(boxes.map((d) => (d.mask ? loadImage(d.mask.image) : null)));
  render();
  $("result").hidden = false;
  // an index served alone answers the hits from /predict; beside a model they are asked of /similar
  const hits = body.hits || (health && health.similar ? await similar(form) : null);
  renderHits(hits);
  setState("done", `${file.name}: done`);
}

async function similar(form) {
  try {
    const response = await fetch("/similar?k=" + health.similar.k, { method: "POST", body: form });
    const body = await response.json();
    return response.ok ? body.hits : null;
  } catch (e) {
    return null;
  }
}

// The most similar indexed images, each fetched by its row (GET /similar/ROW.jpg) with its score.
function renderHits(hits) {
  $("hits").replaceChildren();
  $("similar").hidden = !hits;
  for (const hit of hits || []) {
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    image.src = `/similar/${hit.row}.jpg`;
    image.alt = hit.name;
    image.loading = "lazy";
    const caption = document.createElement("figcaption");
    caption.textContent = `${hit.score.toFixed(3)} ${hit.label || ""}`;
    caption.title = hit.name;
    figure.append(image, caption);
    figure.dataset.row = String(hit.row);
    $("hits").append(figure);
  }
}

function bar(name, score, colour) {
  const row = document.createElement("div");
  row.className = "bar";
  const label = document.createElement("span");
  label.className = "name";
  label.title = name;
  if (colour) {
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour;
    label.append(swatch);
  }
  label.append(name);
  const track = document.createElement("span");
  track.className = "track";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.display = "block";
  fill.style.width = Math.max(0, Math.min(100, 100 * score)) + "%";
  if (colour) fill.style.background = colour;
  track.append(fill);
  const value = document.createElement("span");
  value.className = "score";
  value.textContent = percent(score);
  row.append(label, track, value);
  row.dataset.class = name;
  row.dataset.score = String(score);
  return row;
}

// Small pictures are drawn enlarged (pixels kept sharp), so boxes and labels stay legible.
const MIN_SIDE = 480;

function render() {
  const r = last, o = r.overlay;
  const zoom = Math.max(1, MIN_SIDE / Math.max(o.width, o.height));
  canvas.width = Math.round(o.width * zoom);
  canvas.height = Math.round(o.height * zoom);
  ctx.imageSmoothingEnabled = zoom === 1;
  ctx.drawImage(picture, 0, 0, canvas.width, canvas.height);
  $("bars").replaceChildren();
  $("items").replaceChildren();
  const shown = Object.assign({}, r);
  delete shown.overlay;
  $("json").textContent = JSON.stringify(shown, null, 2);
  const view = o.view || {};
  canvas.dataset.drawn = "picture";
  $("top").textContent = view.summary || "";
  if (mask) renderMask();
  if (view.bars) renderBars(view.bars, !!mask, o);
  if (view.boxes) renderBoxes(view.boxes, o);
}

function renderBars(bars, coloured, o) {
  for (const b of bars) $("bars").append(bar(b.name, b.score, coloured ? o.colors[b.name] : undefined));
}

function renderBoxes(boxes, o) {
  const threshold = parseFloat($("threshold").value) || 0;
  const kept = boxes.filter((d) => d.score >= threshold);
  const sx = canvas.width / o.source_width, sy = canvas.height / o.source_height;
  let masks = 0;
  boxes.forEach((d, i) => {  // masks first: no mask covers another object's box or caption
    if (d.score >= threshold && shapes[i]) {
      renderShape(shapes[i], d.mask.bbox, o.colors[d.name] || "#ff0000", sx, sy);
      masks += 1;
    }
  });
  ctx.lineWidth = Math.max(2, Math.round(canvas.width / 300));
  ctx.font = `${Math.max(12, Math.round(canvas.width / 45))}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  for (const d of kept) {
    const colour = o.colors[d.name] || "#ff0000";
    const [x, y, w, h] = [d.bbox[0] * sx, d.bbox[1] * sy, d.bbox[2] * sx, d.bbox[3] * sy];
    ctx.strokeStyle = colour;
    ctx.strokeRect(x, y, w, h);
    const text = `${d.name} ${d.score.toFixed(2)}`;
    const tw = ctx.measureText(text).width + 6, th = parseInt(ctx.font, 10) + 4;
    const ty = y - th >= 0 ? y - th : y;
    ctx.fillStyle = colour;
    ctx.fillRect(x, ty, tw, th);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, x + 3, ty + 2);
    const item = document.createElement("li");
    item.innerHTML = `<span class="swatch" style="background:${colour}"></span>`;
    item.append(`${d.name} ${d.score.toFixed(3)} at [${d.bbox.map((v) => v.toFixed(1)).join(", ")}]`);
    $("items").append(item);
  }
  const best = boxes.reduce((m, d) => Math.max(m, d.score), 0);
  $("top").textContent = kept.length
    ? `${kept.length} box${kept.length > 1 ? "es" : ""} scoring at least ${threshold}`
    : `no box scores at least ${threshold}` + (boxes.length ? ` (highest ${best.toFixed(3)})` : "");
  canvas.dataset.drawn = "boxes";
  canvas.dataset.boxes = String(kept.length);
  canvas.dataset.masks = String(masks);
}

// A box's mask: an image opaque on the object, placed at bbox (x, y, w, h in the input's pixels),
// tinted in the box's colour and blended over the picture.
function renderShape(shape, bbox, colour, sx, sy) {
  const [x, y, w, h] = [bbox[0] * sx, bbox[1] * sy, bbox[2] * sx, bbox[3] * sy];
  const tint = document.createElement("canvas");
  tint.width = Math.max(1, Math.round(w));
  tint.height = Math.max(1, Math.round(h));
  const t = tint.getContext("2d");
  t.imageSmoothingEnabled = false;
  t.drawImage(shape, 0, 0, tint.width, tint.height);
  t.globalCompositeOperation = "source-in";  // the colour where the object is, nothing elsewhere
  t.fillStyle = colour;
  t.fillRect(0, 0, tint.width, tint.height);
  ctx.globalAlpha = 0.45;
  ctx.drawImage(tint, x, y, w, h);
  ctx.globalAlpha = 1;
}

function renderMask() {
  ctx.globalAlpha = 0.5;
  ctx.drawImage(mask, 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = 1;
  canvas.dataset.drawn = "mask";
}

$("file").addEventListener("change", () => { if ($("file").files.length) upload($("file").files[0]); });
$("threshold").addEventListener("input", () => { if (last && last.overlay.view && last.overlay.view.boxes) render(); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
});
loadHealth();
