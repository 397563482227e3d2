// Calls to the native API (/api/v1) and the helpers every page shares: errors beside fields, recipes.
// Credentials travel as the `spellbook_token` cookie (set by session.js), so <img> and EventSource work too.

export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field || null;
  }
}

// `body`: an object sent as JSON, or a FormData (files) sent as multipart.
export async function api(path, { method = "GET", body } = {}) {
  const options = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body instanceof FormData) {
    options.body = body; // the browser sets the multipart Content-Type with its boundary
  } else if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ApiError(0, "network", `cannot reach the server: ${err.message}`, null);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(response.status, error.code || "http", error.message || `HTTP ${response.status}`, error.field);
  }
  return data;
}

// The API names fields as the request does; some share one slot on the page (width and height → size).
const FIELD_ALIASES = { width: "size", height: "size", cfg_scale: "guidance", n_iter: "batch_size" };

export function clearErrors(root) {
  for (const slot of root.querySelectorAll("[data-error-for]")) {
    slot.textContent = "";
  }
  for (const input of root.querySelectorAll("[aria-invalid]")) {
    input.removeAttribute("aria-invalid");
  }
}

// Shows `error` beside the field it names, or in the form's general slot when the field is not on the page.
// A grid names the fields of the request its cells start from as `request.NAME`: those are the form's own.
export function showError(root, error) {
  const path = (error.field || "").split(".");
  const raw = path[0] === "request" && path.length > 1 ? path[1] : path[0];
  // A field of a sub-object (hires.denoise) has its own slot where the page has one (hires_denoise).
  const nested = path.length > 1 && root.querySelector(`[data-error-for="${CSS.escape(path.join("_"))}"]`);
  const field = nested ? path.join("_") : FIELD_ALIASES[raw] || raw;
  let slot = field && root.querySelector(`[data-error-for="${CSS.escape(field)}"]`);
  if (!slot) {
    slot = root.querySelector('[data-error-for=""]');
  }
  slot.textContent = error.message;
  const inputs = field === "size" ? ["width", "height"] : [field];
  for (const name of inputs) {
    const input = name && root.querySelector(`[name="${CSS.escape(name)}"]`);
    if (input) {
      input.setAttribute("aria-invalid", "true");
    }
  }
  return slot;
}

function modelName(model) {
  return model && typeof model === "object" ? model.name : model;
}

function blendText(blend) {
  if (!blend) return null;
  const side = (r) => `“${r.prompt}” (seed ${r.seed + (r.batch_index || 0)})`;
  return `t ${blend.t}: ${side(blend.a)} → ${side(blend.b)}`;
}

function hiresText(hires) {
  if (!hires) return null;
  const steps = hires.steps ? `, ${hires.steps} step${hires.steps === 1 ? "" : "s"}` : "";
  return `${hires.width}×${hires.height} (${hires.upscaler}, denoise ${hires.denoise}${steps})`;
}

// A recipe as a definition list: the fields a person reads first, then the full JSON on demand.
export function renderRecipe(recipe, { seed } = {}) {
  const dl = document.createElement("dl");
  dl.className = "recipe";
  const rows = [
    ["Prompt", recipe.prompt],
    ["Negative", recipe.negative_prompt],
    ["Seed", seed ?? recipe.seed],
    ["Model", modelName(recipe.model)],
    ["Sampler", recipe.sampler],
    ["Steps", recipe.steps],
    ["CFG", recipe.guidance],
    ["Size", recipe.width && recipe.height ? `${recipe.width}×${recipe.height}` : null],
    ["Hires", hiresText(recipe.hires)],
    ["Blend", blendText(recipe.blend)],
  ];
  for (const [name, value] of rows) {
    if (value === null || value === undefined || value === "") {
      continue;
    }
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    dd.dataset.field = name.toLowerCase();
    dl.append(dt, dd);
  }
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = "full recipe";
  const pre = document.createElement("pre");
  pre.textContent = JSON.stringify(recipe, null, 2);
  details.append(summary, pre);
  const wrapper = document.createElement("div");
  wrapper.append(dl, details);
  return wrapper;
}
