// The demo page of zutis-service: send an image and concepts to POST /segment, draw the answer.
// Plain browser JavaScript, no dependencies. Masks are decoded here from COCO compressed RLE.
"use strict";

const $ = (id) => document.getElementById(id);

// Distinct colours (Sasha Trubetskoy's list), one per instance, and one per concept on the semantic map.
const PALETTE = [
  [230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
  [240, 50, 230], [210, 245, 60], [0, 128, 128], [170, 110, 40], [128, 0, 0], [0, 0, 128],
  [128, 128, 0], [255, 225, 25], [220, 190, 255], [170, 255, 195],
];
const colourOf = (i) => PALETTE[i % PALETTE.length];
// The semantic map colours concepts from the other end of the list, so that they do not read as instances.
const conceptColour = (c) => PALETTE[(PALETTE.length - c % PALETTE.length) % PALETTE.length];
const css = ([r, g, b]) => `rgb(${r}, ${g}, ${b})`;

const state = { file: null, bitmap: null, answer: null, masks: [], pinned: null };

// ---- COCO RLE -------------------------------------------------------------------------------------------
// "counts" is pycocotools' string form: run lengths as 6-bit groups offset by 48, 5 data bits each, bit 0x20
// meaning "more groups follow", the last group's 0x10 the sign; from the third run on each is a delta against
// the run two before. Runs alternate 0/1 starting with 0 and walk the mask column by column (Fortran order).

/** Run lengths of a compressed RLE string. */
function decodeCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0, k = 0, more = true;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

/** A {size: [h, w], counts} RLE as a row-major Uint8Array of 0/1, length h * w. */
function decodeRle(rle) {
  const [h, w] = rle.size;
  const mask = new Uint8Array(h * w);
  let j = 0, value = 0;
  for (const run of decodeCounts(rle.counts)) {
    if (value) {
      for (let end = j + run; j < end; j++) mask[(j % h) * w + Math.floor(j / h)] = 1;
    } else {
      j += run;
    }
    value ^= 1;
  }
  return mask;
}

// ---- the form -------------------------------------------------------------------------------------------

function setFile(file) {
  if (!file) return;
  state.file = file;
  $("drop-text").textContent = file.name;
  // EXIF orientation applied, as a camera's viewer shows the photo.
  createImageBitmap(file, { imageOrientation: "from-image" }).then((bitmap) => {
    state.bitmap = bitmap;
    clearAnswer();
    drawPhoto(bitmap.width, bitmap.height);
    $("viewer").classList.remove("empty");
  }, () => showError(`${file.name} cannot be shown by this browser (the service may still read it)`));
}

function sliderValue(id) {
  const input = $(id);
  return input.dataset.touched ? input.value : null;
}

function bindSlider(id) {
  const input = $(id), output = $(`${id}-value`);
  input.addEventListener("input", () => {
    input.dataset.touched = "1";
    output.textContent = Number(input.value).toFixed(2);
  });
}

// The checkpoint's defaults (from demo/defaults.json once the service is ready): where the sliders start (they are
// disabled until then) and where "use the model's defaults" puts them back. Untouched sliders send nothing, so the service applies its own.
const modelDefaults = {};

function resetSliders() {
  for (const id of ["score-threshold", "mask-threshold"]) {
    delete $(id).dataset.touched;
    if (modelDefaults[id] !== undefined) $(id).value = modelDefaults[id];
    $(`${id}-value`).textContent = modelDefaults[id] !== undefined
      ? `model default (${Number(modelDefaults[id]).toFixed(2)})` : "model default";
  }
}

async function loadDefaults() {
  try {
    const response = await fetch("demo/defaults.json", { cache: "no-store" });
    if (!response.ok) return;
    const data = await response.json();
    modelDefaults["score-threshold"] = data.score_threshold;
    modelDefaults["mask-threshold"] = data.mask_threshold;
    for (const id of ["score-threshold", "mask-threshold"]) {
      if (!$(id).dataset.touched) {
        $(id).value = modelDefaults[id];
        $(`${id}-value`).textContent = `model default (${Number(modelDefaults[id]).toFixed(2)})`;
      }
    }
  } catch (_) { /* the sliders keep their place; untouched, they still send nothing */ }
  for (const id of ["score-threshold", "mask-threshold"]) $(id).disabled = false;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function submit(event) {
  event.preventDefault();
  showError("");
  if (!state.file) return showError("Choose an image first.");
  const body = new FormData();
  body.append("image", state.file, state.file.name);
  body.append("concepts", $("concepts").value);
  for (const [field, id] of [["score_threshold", "score-threshold"], ["mask_threshold", "mask-threshold"]]) {
    const value = sliderValue(id);
    if (value !== null) body.append(field, value);
  }
  const headers = {};
  const key = $("api-key").value.trim();
  if (key) headers["X-API-Key"] = key;

  $("submit").disabled = true;
  $("submit").textContent = "Segmenting…";
  try {
    const response = await fetch("segment", { method: "POST", body, headers });
    const text = await response.text();
    let data = null;
    try { data = JSON.parse(text); } catch (_) { /* not JSON: shown as text below */ }
    $("json").textContent = data ? JSON.stringify(data, null, 2) : text;
    if (!response.ok) {
      clearAnswer();
      const retry = response.headers.get("Retry-After");
      showError(data && data.error
        ? `${data.error} (HTTP ${response.status}, ${data.type}${retry ? `; retry in ${retry} s` : ""})`
        : `HTTP ${response.status}: ${text.slice(0, 300)}`);
      return;
    }
    await showAnswer(data);
  } catch (err) {
    showError(`The request failed: ${err.message}`);
  } finally {
    $("submit").disabled = false;
    $("submit").textContent = "Segment";
  }
}

// ---- drawing --------------------------------------------------------------------------------------------

function sizeCanvases(w, h) {
  for (const id of ["photo", "semantic", "masks", "highlight"]) {
    const canvas = $(id);
    canvas.width = w;
    canvas.height = h;
  }
}

function drawPhoto(w, h) {
  sizeCanvases(w, h);
  $("photo").getContext("2d").drawImage(state.bitmap, 0, 0, w, h);
}

function clearAnswer() {
  state.answer = null;
  state.masks = [];
  state.pinned = null;
  for (const id of ["semantic", "masks", "highlight"]) {
    const canvas = $(id);
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  }
  $("labels").replaceChildren();
  document.querySelector("#instances tbody").replaceChildren();
  $("legend").replaceChildren();
  $("legend").hidden = true;
  $("count").textContent = "";
  $("timing").textContent = "";
}

/** Paint 0/1 masks into a canvas as opaque colours; later masks in `layers` cover earlier ones. */
function paint(canvas, layers) {
  const { width: w, height: h } = canvas;
  const image = new ImageData(w, h);
  for (const { mask, rgb } of layers) {
    for (let i = 0; i < mask.length; i++) {
      if (!mask[i]) continue;
      image.data[4 * i] = rgb[0];
      image.data[4 * i + 1] = rgb[1];
      image.data[4 * i + 2] = rgb[2];
      image.data[4 * i + 3] = 255;
    }
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
}

async function showAnswer(answer) {
  clearAnswer();
  state.answer = answer;
  const { width: w, height: h } = answer.image;
  drawPhoto(w, h);
  state.masks = answer.instances.map((inst) => decodeRle(inst.segmentation));
  // Highest score on top: the list is sorted by score, so paint it backwards.
  paint($("masks"), state.masks.map((mask, i) => ({ mask, rgb: colourOf(i) })).reverse());
  await drawSemantic(answer);

  const labels = $("labels"), rows = document.querySelector("#instances tbody");
  answer.instances.forEach((inst, i) => {
    const [x, y, bw, bh] = inst.bbox;
    const label = document.createElement("span");
    label.textContent = `${inst.concept} ${inst.score.toFixed(2)}`;
    label.style.left = `${(100 * x) / w}%`;
    label.style.top = `${(100 * y) / h}%`;
    label.style.background = css(colourOf(i));
    labels.append(label);

    const row = document.createElement("tr");
    row.dataset.index = String(i);
    row.dataset.rgb = colourOf(i).join(",");
    row.innerHTML = `<td><span class="swatch"></span></td><td></td><td>${inst.score.toFixed(3)}</td>` +
      `<td>${inst.area}</td><td>${[x, y, bw, bh].map((v) => Math.round(v)).join(", ")}</td>`;
    row.querySelector(".swatch").style.background = css(colourOf(i));
    row.children[1].textContent = inst.concept;
    row.addEventListener("mouseenter", () => highlight(i));
    row.addEventListener("mouseleave", () => highlight(state.pinned));
    row.addEventListener("click", () => { state.pinned = state.pinned === i ? null : i; highlight(state.pinned); });
    rows.append(row);
  });
  $("count").textContent = `${answer.instances.length} for ${answer.concepts.length - 1} concept(s)`;
  $("timing").textContent = `${answer.model} · ${answer.timings.total_ms.toFixed(0)} ms`;
  updateLayers();
}

async function drawSemantic(answer) {
  const semantic = answer.semantic;
  const canvas = $("semantic");
  if (!semantic) return;
  const { width: w, height: h } = answer.image;
  let indices;
  if (semantic.format === "png") {
    // 8-bit grayscale PNG of concept indices: the red channel is the index (16-bit PNGs, past 255 concepts,
    // would be rounded by the browser; the page does not handle those).
    const picture = new Image();
    picture.src = `data:image/png;base64,${semantic.png}`;
    await picture.decode();
    const scratch = document.createElement("canvas");
    scratch.width = w;
    scratch.height = h;
    const context = scratch.getContext("2d");
    context.drawImage(picture, 0, 0);
    const rgba = context.getImageData(0, 0, w, h).data;
    indices = new Uint16Array(w * h);
    for (let i = 0; i < indices.length; i++) indices[i] = rgba[4 * i];
  } else {
    indices = new Uint16Array(w * h);
    for (const segment of semantic.segments) {
      const mask = decodeRle(segment.segmentation);
      for (let i = 0; i < mask.length; i++) if (mask[i]) indices[i] = segment.concept_index;
    }
  }
  const present = new Set(indices);
  const layers = [];
  for (const c of present) {
    if (c === 0) continue; // background stays transparent
    layers.push({ mask: indices.map((v) => (v === c ? 1 : 0)), rgb: conceptColour(c) });
  }
  paint(canvas, layers);
  const legend = $("legend");
  for (const c of [...present].filter((c) => c > 0).sort((a, b) => a - b)) {
    const item = document.createElement("li");
    item.innerHTML = `<span class="swatch"></span>`;
    item.firstChild.style.background = css(conceptColour(c));
    item.append(answer.concepts[c] ?? `#${c}`);
    legend.append(item);
  }
}

function updateLayers() {
  const semantic = $("show-semantic").checked, masks = $("show-masks").checked;
  $("semantic").hidden = !semantic;
  $("legend").hidden = !semantic || !$("legend").children.length;
  $("masks").hidden = !masks;
  $("labels").hidden = !masks;
  $("highlight").hidden = !masks;
}

/** Emphasise instance `i` (or none): its mask fully opaque above the others, which are dimmed. */
function highlight(i) {
  const canvas = $("highlight");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  const active = i !== null && i !== undefined && state.masks[i];
  $("masks").classList.toggle("dim", Boolean(active));
  document.querySelectorAll("#instances tbody tr").forEach((row, k) => row.classList.toggle("active", k === i));
  document.querySelectorAll("#labels span").forEach((label, k) => label.classList.toggle("active", k === i));
  if (active) paint(canvas, [{ mask: state.masks[i], rgb: colourOf(i) }]);
  canvas.style.opacity = active ? "0.8" : "0";
}

/** The topmost instance under a pointer position on the viewer, or null. */
function instanceAt(event) {
  if (!state.answer) return null;
  const rect = $("photo").getBoundingClientRect();
  const { width: w, height: h } = state.answer.image;
  const x = Math.floor(((event.clientX - rect.left) / rect.width) * w);
  const y = Math.floor(((event.clientY - rect.top) / rect.height) * h);
  if (x < 0 || y < 0 || x >= w || y >= h) return null;
  const k = state.masks.findIndex((mask) => mask[y * w + x]);
  return k < 0 ? null : k;
}

// ---- service status -------------------------------------------------------------------------------------

async function pollReady() {
  const pill = $("status");
  try {
    const response = await fetch("readyz", { cache: "no-store" });
    const data = await response.json();
    pill.textContent = response.ok ? "ready" : `not ready (${data.type})`;
    pill.className = `pill ${response.ok ? "ready" : ""}`;
    if (response.ok) return loadDefaults();
  } catch (_) {
    pill.textContent = "unreachable";
    pill.className = "pill down";
  }
  setTimeout(pollReady, 2000);
}

// ---- wiring ---------------------------------------------------------------------------------------------

$("image").addEventListener("change", (event) => setFile(event.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  setFile(event.dataTransfer.files[0]);
});
bindSlider("score-threshold");
bindSlider("mask-threshold");
$("reset-thresholds").addEventListener("click", resetSliders);
$("form").addEventListener("submit", submit);
$("show-semantic").addEventListener("change", updateLayers);
$("show-masks").addEventListener("change", updateLayers);
$("viewer").addEventListener("mousemove", (event) => highlight(instanceAt(event) ?? state.pinned));
$("viewer").addEventListener("mouseleave", () => highlight(state.pinned));
$("viewer").addEventListener("click", (event) => { state.pinned = instanceAt(event); highlight(state.pinned); });
pollReady();
