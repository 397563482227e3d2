// The Create page: text → image, sketch → image (img2img) and inpaint, as three modes of one form.
// Submit a job, follow it over SSE (progress + live preview), show the images with their recipes and actions.
// The X/Y/Z plot panel submits the same request as a grid, and fills a labelled table cell by cell.
import { imageActions, REMIX_KEY } from "/static/actions.js";
import { api, clearErrors, renderRecipe, showError } from "/static/api.js";
import { MaskPad, SketchPad } from "/static/canvas.js";

const studio = document.getElementById("studio");
const form = document.getElementById("create");
const generate = document.getElementById("generate");
const cancel = document.getElementById("cancel");
const status = document.getElementById("status");
const progress = document.getElementById("progress");
const fill = document.getElementById("progress-fill");
const progressText = document.getElementById("progress-text");
const preview = document.getElementById("preview");
const results = document.getElementById("results");
const gridResults = document.getElementById("grid-results");
const gridGenerate = document.getElementById("grid-generate");
const reuse = document.getElementById("reuse");
const workspace = document.getElementById("workspace");
const strength = form.elements.strength;
const strengthValue = document.getElementById("strength-value");
const hiresDenoiseValue = document.getElementById("hires-denoise-value");
const inpaintImage = document.getElementById("inpaint-image");
const maskCanvas = document.getElementById("mask-canvas");
const inpaintEmpty = document.getElementById("inpaint-empty");

const MODES = {
  txt2img: { path: "/", title: "Create", hint: "Write a prompt and press Generate (or Ctrl+Enter)." },
  img2img: {
    path: "/sketch",
    title: "Sketch",
    hint: "Draw (or upload) a start picture, describe it, and press Generate (or Ctrl+Enter).",
    // Measured with the shapes model (tests/test_web.py): a red blob on the left of a black background with
    // "a red circle" comes back red, on the left, on black for 23-24 of 24 seeds at 0.7 (15-20 at 0.8).
    strength: 0.7,
  },
  inpaint: {
    path: "/inpaint",
    title: "Inpaint",
    hint: "Paint a mask over the picture, say what goes there, and press Generate (or Ctrl+Enter).",
    strength: 1.0,
  },
};
const DRAWING_SIDE = 256; // a small model's canvas is drawn on at about this size, then sent at that size
const LARGEST_PICTURE = 1024;

let mode = studio.dataset.mode;
let current = null; // { kind: "job" | "grid", id, events }
let lastSeed = null;
let modelSizes = {}; // model name -> [width, height] when the model says
let strengthTouched = false;
let sketchTarget = null; // { width, height } the sketch is generated at when the size fields are empty
let inpaintSource = null; // { dataURL, width, height }
let remixExtras = {}; // fields of a remixed recipe with no box on the page (schedule, clip skip, VAE, variation)
let hiresPrompts = {}; // a remixed hires pass's own prompts

const sketch = new SketchPad(document.getElementById("sketch-canvas"));
const maskPad = new MaskPad(maskCanvas);

// --------------------------------------------------------------------------------------------- modes
function setMode(next, { push = true } = {}) {
  mode = MODES[next] ? next : "txt2img";
  studio.dataset.mode = mode;
  for (const element of studio.querySelectorAll("[data-modes]")) {
    element.hidden = !element.dataset.modes.split(" ").includes(mode);
  }
  workspace.hidden = mode === "txt2img";
  for (const link of document.querySelectorAll(".modes a")) {
    if (link.dataset.mode === mode) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (!strengthTouched && MODES[mode].strength) setStrength(MODES[mode].strength);
  document.title = `${MODES[mode].title} · Spellbook`;
  if (!current && !results.childElementCount) status.textContent = MODES[mode].hint;
  if (push && location.pathname !== MODES[mode].path) history.pushState({ mode }, "", MODES[mode].path);
  if (mode === "img2img" && !sketch.ready) newSketch();
}

function setStrength(value) {
  strength.value = String(value);
  strengthValue.textContent = Number(strength.value).toFixed(2);
}

// ---------------------------------------------------------------------------------------- pictures
function blobToDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the browser cannot read this picture (PNG, JPEG or WebP expected)"));
    image.src = src;
  });
}

// A picture from this server (a result, a gallery image): its own bytes, as a data URL.
async function fetchPicture(url) {
  if (!url.startsWith("/api/v1/")) throw new Error(`only pictures from this server can be loaded, not ${url}`);
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) throw new Error(`could not load ${url}: HTTP ${response.status}`);
  const dataURL = await blobToDataURL(await response.blob());
  return { dataURL, image: await loadImage(dataURL) };
}

async function readFile(file) {
  const dataURL = await blobToDataURL(file);
  return { dataURL, image: await loadImage(dataURL) };
}

function sizeFields() {
  const width = Number(form.elements.width.value);
  const height = Number(form.elements.height.value);
  return width > 0 && height > 0 ? { width, height } : null;
}

function modelSize() {
  const size = modelSizes[form.elements.model.value];
  return size ? { width: size[0], height: size[1] } : { width: 512, height: 512 };
}

function roundTo8(value) {
  return Math.max(8, Math.floor(value / 8) * 8);
}

function drawingScale(width, height) {
  return Math.max(1, Math.floor(DRAWING_SIDE / Math.max(width, height)));
}

// A blank sketch in the size the job will have (the size boxes, or the model's own).
function newSketch(options) {
  const target = sizeFields() || modelSize();
  const scale = drawingScale(target.width, target.height);
  sketch.reset(target.width * scale, target.height * scale, options);
  sketchTarget = { width: target.width, height: target.height };
}

function loadSketchPicture(image) {
  let { naturalWidth: width, naturalHeight: height } = image;
  const shrink = Math.min(1, LARGEST_PICTURE / Math.max(width, height));
  width = Math.round(width * shrink);
  height = Math.round(height * shrink);
  const scale = drawingScale(width, height);
  sketch.load(image, width * scale, height * scale);
  sketchTarget = { width: roundTo8(width), height: roundTo8(height) };
}

function setInpaintSource({ dataURL, image }) {
  inpaintSource = { dataURL, width: image.naturalWidth, height: image.naturalHeight };
  inpaintImage.src = dataURL;
  inpaintImage.hidden = false;
  maskCanvas.hidden = false;
  inpaintEmpty.hidden = true;
  maskPad.reset(image.naturalWidth, image.naturalHeight);
}

// "→ img2img" / "→ inpaint": the picture becomes the sketch's start, or the picture to inpaint.
async function sendTo(kind, url) {
  try {
    const picture = await fetchPicture(url);
    if (kind === "inpaint") setInpaintSource(picture);
    else loadSketchPicture(picture.image);
    setMode(kind);
    status.textContent = kind === "inpaint" ? "Paint a mask over the picture." : "The picture is the sketch's start.";
    workspace.scrollIntoView({ block: "nearest" });
  } catch (err) {
    showError(studio, { field: "init_image", message: err.message });
  }
}

// ----------------------------------------------------------------------------------------- recipes
async function loadChoices() {
  try {
    const [models, samplers] = await Promise.all([api("/api/v1/models"), api("/api/v1/samplers")]);
    const select = form.elements.model;
    for (const model of models) {
      select.add(new Option(model.name + (model.builtin ? " (built in)" : ""), model.name, model.default, model.default));
      if (model.size) modelSizes[model.name] = model.size;
    }
    for (const name of samplers.samplers) {
      form.elements.sampler.add(new Option(name, name));
    }
  } catch (err) {
    showError(form, err);
  }
}

// A remix (from a result here, or from the Gallery): its recipe in the form, ready to edit.
async function applyRemix(request, { start } = {}) {
  const { elements } = form;
  elements.prompt.value = request.prompt || "";
  elements.negative_prompt.value = request.negative_prompt || "";
  if (request.model && [...elements.model.options].some((o) => o.value === request.model)) {
    elements.model.value = request.model;
  }
  elements.sampler.value = [...elements.sampler.options].some((o) => o.value === request.sampler)
    ? request.sampler
    : "";
  elements.steps.value = request.steps ?? "";
  elements.guidance.value = request.guidance ?? "";
  elements.seed.value = request.seed ?? -1;
  elements.batch_size.value = 1;
  const [width, height] = (request.size || "").split("x");
  elements.width.value = width || "";
  elements.height.value = height || "";
  remixExtras = {};
  for (const key of ["schedule", "clip_skip", "vae", "subseed", "subseed_strength", "seed_resize_from_w",
    "seed_resize_from_h"]) {
    if (request[key] !== undefined) remixExtras[key] = request[key];
  }
  setHires(request.hires, Number(width) || 0);
  const kind = request.kind || "txt2img";
  if (request.strength !== undefined) {
    setStrength(request.strength);
    strengthTouched = true;
  }
  if (start && kind !== "txt2img") await sendTo(kind, start);
  else setMode(kind);
  clearErrors(studio);
  status.textContent =
    kind !== "txt2img" && !start
      ? "Remix loaded. Its start picture is not in the gallery: the canvas keeps what it has."
      : "Remix loaded: edit it and press Generate.";
}

// The job request: empty number fields are left out, so the model's own defaults apply.
function request() {
  const body = { prompt: form.elements.prompt.value, negative_prompt: form.elements.negative_prompt.value };
  if (form.elements.model.value) body.model = form.elements.model.value;
  if (form.elements.sampler.value) body.sampler = form.elements.sampler.value;
  for (const name of ["steps", "batch_size", "width", "height", "seed"]) {
    const text = form.elements[name].value.trim();
    if (text !== "") body[name] = Number.isInteger(Number(text)) ? Number(text) : text;
  }
  const guidance = form.elements.guidance.value.trim();
  if (guidance !== "") body.guidance = Number(guidance);
  Object.assign(body, remixExtras);
  const hires = hiresRequest();
  if (hires && mode === "txt2img") body.hires = hires;
  if (mode === "img2img") {
    body.kind = "img2img";
    body.strength = Number(strength.value);
    body.init_image = sketch.toDataURL();
    // The canvas is drawn larger than a small model's images: say the size it is to be generated at.
    if (body.width === undefined && body.height === undefined && sketchTarget) Object.assign(body, sketchTarget);
  } else if (mode === "inpaint") {
    body.kind = "inpaint";
    body.strength = Number(strength.value);
    body.init_image = inpaintSource.dataURL;
    body.mask = maskPad.toDataURL();
  }
  return body;
}

// The Hires fix box as the request's `hires`, or null when "Upscale by" is empty (off). A remixed pass keeps
// its own prompts (they have no box here).
function hiresRequest() {
  const { elements } = form;
  const scale = elements.hires_scale.value.trim();
  if (scale === "") return null;
  const hires = {
    ...hiresPrompts,
    scale: Number(scale),
    upscaler: elements.hires_upscaler.value,
    denoise: Number(elements.hires_denoise.value),
  };
  const steps = elements.hires_steps.value.trim();
  if (steps !== "") hires.steps = Number(steps);
  return hires;
}

// A remixed hires pass in the box; one sized in pixels becomes the factor that gives that size.
function setHires(hires, width) {
  const { elements } = form;
  hiresPrompts = {};
  let scale = "";
  if (hires) {
    scale = hires.scale ?? (width ? Math.round((hires.width / width) * 100) / 100 : 2);
    for (const key of ["prompt", "negative_prompt"]) if (hires[key]) hiresPrompts[key] = hires[key];
  }
  elements.hires_scale.value = String(scale);
  elements.hires_steps.value = hires && hires.steps ? String(hires.steps) : "";
  if (hires && [...elements.hires_upscaler.options].some((o) => o.value === hires.upscaler)) {
    elements.hires_upscaler.value = hires.upscaler;
  }
  elements.hires_denoise.value = String(hires && hires.denoise ? hires.denoise : 0.7);
  hiresDenoiseValue.textContent = Number(elements.hires_denoise.value).toFixed(2);
  document.getElementById("hires").open = Boolean(hires);
}

// What the page can tell before asking the server.
function localProblem() {
  if (mode === "inpaint" && !inpaintSource) {
    return { field: "init_image", message: "choose a picture to inpaint: upload one, or use → inpaint on an image" };
  }
  if (mode === "inpaint" && maskPad.isEmpty()) {
    return { field: "mask", message: "the mask is empty: paint over the part of the picture to change" };
  }
  return null;
}

// --------------------------------------------------------------------------------------------- jobs
function setBusy(busy) {
  generate.disabled = busy;
  gridGenerate.disabled = busy;
  cancel.hidden = !busy;
  progress.hidden = !busy;
}

function setProgress(fraction, text) {
  fill.style.width = `${Math.round(Math.max(0, Math.min(1, fraction)) * 100)}%`;
  progressText.textContent = text;
}

async function submit() {
  if (current) return;
  clearErrors(studio);
  const problem = localProblem();
  if (problem) {
    showError(studio, problem);
    status.textContent = "Not queued: fix the field marked in red.";
    return;
  }
  let job;
  try {
    job = await api("/api/v1/jobs", { method: "POST", body: request() });
  } catch (err) {
    showError(studio, err);
    status.textContent = "Not queued: fix the field marked in red.";
    return;
  }
  gridResults.hidden = true;
  setBusy(true);
  setProgress(0, "queued");
  status.textContent = `Job ${job.id} queued.`;
  follow(job.id);
}

// ?blend=A,B[&t=0.5] (from Blend pressed on two pictures): the picture between two gallery images, as a job.
async function startBlend(pair, t) {
  const [a, b] = pair.split(",").map(Number);
  const body = { a, b, t: t === null ? 0.5 : Number(t) };
  let job;
  try {
    job = await api("/api/v1/blends", { method: "POST", body });
  } catch (err) {
    status.textContent = `Blend not queued: ${err.message}`;
    return;
  }
  gridResults.hidden = true;
  setBusy(true);
  setProgress(0, "queued");
  status.textContent = `Blend of images ${a} and ${b} (t ${body.t}) queued.`;
  follow(job.id);
}

// ?upscale=ID[&scale=2] (from Upscale on a picture): the gallery image enlarged, by the first upscaler model
// installed (else Lanczos), as a job.
async function startUpscale(imageId, scale) {
  let job;
  let upscaler = "Lanczos";
  try {
    const models = (await api("/api/v1/upscalers")).filter((u) => u.kind === "model");
    if (models.length) upscaler = models[0].name;
    job = await api("/api/v1/upscales", { method: "POST", body: { image_id: imageId, scale, upscaler } });
  } catch (err) {
    status.textContent = `Upscale not queued: ${err.message}`;
    return;
  }
  gridResults.hidden = true;
  setBusy(true);
  setProgress(0, "queued");
  status.textContent = `Upscaling image ${imageId} ${scale}x with ${upscaler}…`;
  follow(job.id);
}

function follow(jobId) {
  const events = new EventSource(`/api/v1/jobs/${encodeURIComponent(jobId)}/events`);
  current = { kind: "job", id: jobId, events };
  events.addEventListener("progress", (message) => {
    const event = JSON.parse(message.data);
    const steps = event.total ? `step ${event.step}/${event.total}` : event.state;
    setProgress(event.progress || 0, steps);
    status.textContent = event.state === "queued" ? "Waiting in the queue…" : "Generating…";
    if (event.preview) {
      preview.src = event.preview;
      preview.hidden = false;
    }
  });
  for (const final of ["done", "failed", "cancelled"]) {
    events.addEventListener(final, (message) => finish(JSON.parse(message.data)));
  }
  events.onerror = () => {
    // The stream ends after the final event; a drop before it is reported once, then we poll the job.
    if (current && current.events === events) {
      events.close();
      api(`/api/v1/jobs/${encodeURIComponent(jobId)}`)
        .then((job) => (["done", "failed", "cancelled"].includes(job.state) ? finish(job) : follow(jobId)))
        .catch((err) => {
          status.textContent = err.message;
          current = null;
          setBusy(false);
        });
    }
  };
}

function finish(job) {
  if (current) current.events.close();
  current = null;
  setBusy(false);
  preview.hidden = true;
  if (job.state === "done") {
    status.textContent = `Done: ${job.images.length} image${job.images.length === 1 ? "" : "s"}.`;
    showResults(job);
    whenFiled(job);
  } else if (job.state === "cancelled") {
    status.textContent = "Cancelled.";
  } else {
    status.textContent = `Failed: ${(job.error && job.error.message) || "unknown error"}`;
  }
}

// A job is done as soon as its PNGs are written; the gallery files them a moment later. Until then a result
// has no gallery id (and no Remix button): ask again a few times, then show the results with their ids.
async function whenFiled(job, attempt = 0) {
  const records = (job.result && job.result.images) || [];
  if (!records.some((record) => record.image_id == null) || attempt >= 20) return;
  await new Promise((resolve) => setTimeout(resolve, 250));
  try {
    const again = await api(`/api/v1/jobs/${encodeURIComponent(job.id)}`);
    const filed = ((again.result && again.result.images) || []).every((record) => record.image_id != null);
    if (filed) showResults(again);
    else whenFiled(again, attempt + 1);
  } catch (err) {
    // The images are there; only the gallery actions wait. Nothing to tell the user.
  }
}

function showResults(job) {
  results.replaceChildren();
  const records = (job.result && job.result.images) || [];
  job.images.forEach((url, index) => {
    const record = records[index] || {};
    const figure = document.createElement("figure");
    figure.className = "result";
    const link = document.createElement("a");
    link.href = url;
    link.target = "_blank";
    const img = document.createElement("img");
    img.src = url;
    img.alt = job.recipe ? job.recipe.prompt : "result";
    link.append(img);
    const caption = document.createElement("figcaption");
    caption.append(renderRecipe(job.recipe || {}, { seed: record.seed }));
    caption.append(
      imageActions({
        src: url,
        imageId: record.image_id,
        recipe: { ...(job.recipe || {}), batch_index: index },
        filename: `spellbook-${job.id}-${index}.png`,
        onSend: sendTo,
        onRemix: (remix) => applyRemix(remix),
        say: (text) => (status.textContent = text),
      }),
    );
    figure.append(link, caption);
    results.append(figure);
  });
  if (records.length) {
    lastSeed = records[0].seed;
    reuse.disabled = false;
    reuse.title = `reuse seed ${lastSeed}`;
  }
}

// --------------------------------------------------------------------------------------------- grids
const AXES = ["x", "y", "z"];
// What each field's values look like, in the syntax of `spellbook grid --x` (the API's too).
const AXIS_EXAMPLES = {
  seed: "1, 2, 3",
  steps: "10-30 (+10)",
  cfg: "3-9 [4]",
  sampler: 'DDIM, "Euler a"',
  schedule: "Automatic, Karras",
  size: "32x32, 64x64",
  clip_skip: "1, 2",
  strength: "0.3, 0.5, 0.7",
  negative_prompt: "blurry, dark",
  prompt_sr: "red, green, blue",
  variation_seed: "1, 2, 3",
  variation_strength: "0, 0.25, 0.5",
};
const FINAL = ["done", "failed", "cancelled"];

function syncAxis(axis) {
  const field = form.elements[`${axis}_field`].value;
  const values = form.elements[axis];
  values.disabled = !field;
  values.placeholder = field ? `e.g. ${AXIS_EXAMPLES[field]}` : "";
}

// The form's request (one image per cell: no batch) and each axis that has a field and values, as FIELD=VALUES.
function gridBody() {
  const body = { request: request() };
  delete body.request.batch_size;
  for (const axis of AXES) {
    const field = form.elements[`${axis}_field`].value;
    const values = form.elements[axis].value.trim();
    if (field && values) body[axis] = `${field}=${values}`;
  }
  return body;
}

async function submitGrid() {
  if (current) return;
  clearErrors(studio);
  const body = gridBody();
  const problem =
    localProblem() ||
    (AXES.some((axis) => body[axis]) ? null : { field: "x", message: "give X some values, e.g. 1, 2, 3" });
  if (problem) {
    showError(studio, problem);
    status.textContent = "Not queued: fix the field marked in red.";
    return;
  }
  let grid;
  try {
    grid = await api("/api/v1/grids", { method: "POST", body });
  } catch (err) {
    showError(studio, err);
    status.textContent = "Not queued: fix the field marked in red.";
    return;
  }
  results.replaceChildren();
  preview.hidden = true;
  drawGrid(grid);
  setBusy(true);
  status.textContent = `A grid of ${grid.total} cells queued (${grid.cost} credits).`;
  followGrid(grid.id);
}

// One table per Z value: the X values across, the Y values down, a cell per image (filled as they finish).
function drawGrid(grid) {
  const { x, y, z } = grid.axes;
  const columns = x ? x.values : [null];
  const rows = y ? y.values : [null];
  gridResults.replaceChildren();
  gridResults.hidden = false;
  (z ? z.values : [null]).forEach((zValue, zi) => {
    const section = document.createElement("section");
    section.className = "xyz-plot";
    section.dataset.z = String(zi);
    const heading = document.createElement("h3");
    heading.textContent = z ? `${z.name}: ${zValue}` : "X/Y plot";
    const link = document.createElement("a");
    link.className = "grid-png";
    link.hidden = true;
    link.textContent = "Grid PNG";
    link.title = "the labelled grid, every cell's recipe inside (spellbook reproduce runs it again)";
    heading.append(" ", link);
    const table = document.createElement("table");
    table.className = "xyz-table";
    if (x) {
      const head = table.createTHead().insertRow();
      const corner = document.createElement("th");
      corner.className = "corner";
      corner.textContent = y ? `${y.name} ↓ ${x.name} →` : "";
      if (y) head.append(corner);
      for (const value of columns) {
        const th = document.createElement("th");
        th.scope = "col";
        th.textContent = `${x.name}: ${value}`;
        head.append(th);
      }
    }
    const tbody = table.createTBody();
    rows.forEach((yValue, yi) => {
      const row = tbody.insertRow();
      if (y) {
        const th = document.createElement("th");
        th.scope = "row";
        th.textContent = `${y.name}: ${yValue}`;
        row.append(th);
      }
      columns.forEach((xValue, xi) => {
        const cell = row.insertCell();
        cell.className = "xyz-cell";
        cell.dataset.key = `${xi},${yi},${zi}`;
        cell.dataset.label = [x && `${x.name}: ${xValue}`, y && `${y.name}: ${yValue}`].filter(Boolean).join(", ");
      });
    });
    const scroll = document.createElement("div");
    scroll.className = "xyz-scroll";
    scroll.append(table);
    section.append(heading, scroll);
    gridResults.append(section);
  });
  updateGrid(grid);
}

function updateGrid(grid) {
  for (const cell of grid.cells) {
    const slot = gridResults.querySelector(`[data-key="${cell.x},${cell.y},${cell.z}"]`);
    if (!slot) continue;
    const shown = cell.image ? `image ${cell.image}` : `${cell.state} ${cell.progress}`;
    if (slot.dataset.shown === shown) continue;
    slot.dataset.shown = shown;
    slot.dataset.state = cell.state;
    if (cell.image) {
      const link = document.createElement("a");
      link.href = cell.image;
      link.target = "_blank";
      const img = document.createElement("img");
      img.src = cell.image;
      img.alt = slot.dataset.label || "grid cell";
      img.title = slot.dataset.label;
      link.append(img);
      slot.replaceChildren(link);
    } else {
      const placeholder = document.createElement("div");
      placeholder.className = "xyz-placeholder";
      const running = cell.state === "running" && cell.progress > 0;
      placeholder.textContent = running ? `running ${Math.round(cell.progress * 100)}%` : cell.state;
      if (cell.error) placeholder.title = cell.error.message;
      slot.replaceChildren(placeholder);
    }
  }
  setProgress(grid.progress, `${grid.finished}/${grid.total} cells`);
  (grid.images || []).forEach((url, zi) => {
    const link = gridResults.querySelector(`[data-z="${zi}"] .grid-png`);
    if (!link) return;
    link.href = url;
    link.download = `spellbook-grid-${grid.id}-${zi}.png`;
    link.hidden = false;
  });
}

function followGrid(gridId) {
  const events = new EventSource(`/api/v1/grids/${encodeURIComponent(gridId)}/events`);
  current = { kind: "grid", id: gridId, events };
  events.addEventListener("progress", (message) => {
    const grid = JSON.parse(message.data);
    updateGrid(grid);
    status.textContent =
      grid.state === "queued" ? "Waiting in the queue…" : `Making the grid: ${grid.finished} of ${grid.total} cells…`;
  });
  for (const final of FINAL) {
    events.addEventListener(final, (message) => finishGrid(JSON.parse(message.data)));
  }
  events.onerror = () => {
    // As for a job: the stream ends after the final event; a drop before it, and we ask for the grid.
    if (current && current.events === events) {
      events.close();
      api(`/api/v1/grids/${encodeURIComponent(gridId)}`)
        .then((grid) => (FINAL.includes(grid.state) ? finishGrid(grid) : followGrid(gridId)))
        .catch((err) => {
          status.textContent = err.message;
          current = null;
          setBusy(false);
        });
    }
  };
}

function finishGrid(grid) {
  if (current) current.events.close();
  current = null;
  setBusy(false);
  updateGrid(grid);
  if (grid.state === "done") {
    status.textContent = `Done: a grid of ${grid.total} cells.`;
  } else if (grid.state === "cancelled") {
    status.textContent = "Cancelled.";
  } else {
    const failed = grid.cells.find((cell) => cell.state === "failed");
    status.textContent = `Failed: ${(failed && failed.error && failed.error.message) || "a cell failed"}`;
  }
}

// --------------------------------------------------------------------------------------------- wiring
form.addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    submit();
    return;
  }
  // Undo/redo on the canvas, unless a text box has the focus (it keeps its own undo).
  const typing = event.target.closest && event.target.closest("textarea, input:not([type=range]):not([type=radio])");
  if (mode === "txt2img" || typing || !(event.ctrlKey || event.metaKey)) return;
  const pad = mode === "img2img" ? sketch : maskPad;
  const key = event.key.toLowerCase();
  if (key === "z" && !event.shiftKey) pad.undo();
  else if ((key === "z" && event.shiftKey) || key === "y") pad.redo();
  else return;
  event.preventDefault();
});
cancel.addEventListener("click", async () => {
  if (!current) return;
  // Say it before asking: the stream's final event may arrive before the answer, and must have the last word.
  status.textContent = "Cancelling…";
  const what = current.kind === "grid" ? "grids" : "jobs";
  try {
    await api(`/api/v1/${what}/${encodeURIComponent(current.id)}/cancel`, { method: "POST" });
  } catch (err) {
    if (current) status.textContent = err.message;
  }
});
gridGenerate.addEventListener("click", submitGrid);
for (const axis of AXES) {
  form.elements[`${axis}_field`].addEventListener("change", () => syncAxis(axis));
  // Enter in a values box makes the grid (not one image: the form's own submit)
  form.elements[axis].addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || event.ctrlKey || event.metaKey) return;
    event.preventDefault();
    submitGrid();
  });
}
document.getElementById("dice").addEventListener("click", () => {
  form.elements.seed.value = "-1";
});
reuse.addEventListener("click", () => {
  if (lastSeed !== null) form.elements.seed.value = String(lastSeed);
});
// A sketch nobody has drawn on yet follows the model and the size boxes.
for (const name of ["model", "width", "height"]) {
  form.elements[name].addEventListener("change", () => {
    if (sketch.ready && !sketch.history.past.length) newSketch();
  });
}
form.elements.hires_denoise.addEventListener("input", () => {
  hiresDenoiseValue.textContent = Number(form.elements.hires_denoise.value).toFixed(2);
});
strength.addEventListener("input", () => {
  strengthTouched = true;
  setStrength(strength.value);
});
for (const link of document.querySelectorAll(".modes a")) {
  link.addEventListener("click", (event) => {
    if (event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
    event.preventDefault();
    setMode(link.dataset.mode);
  });
}
window.addEventListener("popstate", () => {
  const found = Object.entries(MODES).find(([, m]) => m.path === location.pathname);
  setMode(found ? found[0] : "txt2img", { push: false });
});

// Sketch tools
const brushColour = document.getElementById("brush-colour");
function setColour(hex) {
  sketch.colour = hex;
  brushColour.value = hex;
  for (const swatch of document.querySelectorAll(".swatch")) {
    swatch.setAttribute("aria-pressed", String(swatch.dataset.colour === hex));
  }
}
for (const swatch of document.querySelectorAll(".swatch")) {
  swatch.addEventListener("click", () => setColour(swatch.dataset.colour));
}
brushColour.addEventListener("input", () => setColour(brushColour.value));
for (const radio of document.querySelectorAll('input[name="sketch-tool"]')) {
  radio.addEventListener("change", () => (sketch.tool = radio.value));
}
const sketchSize = document.getElementById("sketch-size");
sketchSize.addEventListener("input", () => (sketch.size = Number(sketchSize.value)));
document.getElementById("sketch-undo").addEventListener("click", () => sketch.undo());
document.getElementById("sketch-redo").addEventListener("click", () => sketch.redo());
document.getElementById("sketch-clear").addEventListener("click", () => {
  sketch.record(); // a clear can be undone
  newSketch({ keepHistory: true });
});
document.getElementById("sketch-upload").addEventListener("change", async (event) => {
  const [file] = event.target.files;
  event.target.value = "";
  if (!file) return;
  try {
    loadSketchPicture((await readFile(file)).image);
    clearErrors(studio);
  } catch (err) {
    showError(studio, { field: "init_image", message: err.message });
  }
});

// Inpaint tools
for (const radio of document.querySelectorAll('input[name="mask-tool"]')) {
  radio.addEventListener("change", () => (maskPad.tool = radio.value));
}
const maskSize = document.getElementById("mask-size");
maskSize.addEventListener("input", () => (maskPad.size = Number(maskSize.value)));
document.getElementById("mask-undo").addEventListener("click", () => maskPad.undo());
document.getElementById("mask-redo").addEventListener("click", () => maskPad.redo());
document.getElementById("mask-invert").addEventListener("click", () => maskPad.invert());
document.getElementById("mask-clear").addEventListener("click", () => maskPad.clear());
document.getElementById("inpaint-upload").addEventListener("change", async (event) => {
  const [file] = event.target.files;
  event.target.value = "";
  if (!file) return;
  try {
    setInpaintSource(await readFile(file));
    clearErrors(studio);
  } catch (err) {
    showError(studio, { field: "init_image", message: err.message });
  }
});

// --------------------------------------------------------------------------------------------- start
async function start() {
  setColour(sketch.colour);
  sketch.size = Number(sketchSize.value);
  maskPad.size = Number(maskSize.value);
  setStrength(MODES[mode].strength || strength.value);
  for (const axis of AXES) syncAxis(axis);
  await loadChoices();
  setMode(mode, { push: false });
  // ?init=URL (from the Gallery's → img2img / → inpaint) and a remix handed over by the Gallery.
  const params = new URLSearchParams(location.search);
  const init = params.get("init");
  if (init && mode !== "txt2img") await sendTo(mode, init);
  if (params.get("blend")) await startBlend(params.get("blend"), params.get("t"));
  if (params.get("upscale")) await startUpscale(Number(params.get("upscale")), Number(params.get("scale") || 2));
  const handed = sessionStorage.getItem(REMIX_KEY);
  if (handed) {
    sessionStorage.removeItem(REMIX_KEY);
    try {
      const remix = JSON.parse(handed);
      await applyRemix(remix.request, { start: remix.start });
    } catch (err) {
      status.textContent = `Could not load the remix: ${err.message}`;
    }
  }
}

start();
