// The Create page: submit a job, follow it over SSE (progress + live preview), show the images and recipes.
import { api, clearErrors, renderRecipe, showError } from "/static/api.js";

const form = document.getElementById("create");
const generate = document.getElementById("generate");
const cancel = document.getElementById("cancel");
const status = document.getElementById("status");
const progress = document.getElementById("progress");
const fill = document.getElementById("progress-fill");
const progressText = document.getElementById("progress-text");
const preview = document.getElementById("preview");
const results = document.getElementById("results");
const reuse = document.getElementById("reuse");

let current = null; // { id, events }
let lastSeed = null;

async function loadChoices() {
  try {
    const [models, samplers] = await Promise.all([api("/api/v1/models"), api("/api/v1/samplers")]);
    const select = form.elements.model;
    for (const model of models) {
      select.add(new Option(model.name + (model.builtin ? " (built in)" : ""), model.name, model.default, model.default));
    }
    for (const name of samplers.samplers) {
      form.elements.sampler.add(new Option(name, name));
    }
  } catch (err) {
    showError(form, err);
  }
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
  return body;
}

function setBusy(busy) {
  generate.disabled = busy;
  cancel.hidden = !busy;
  progress.hidden = !busy;
}

function setProgress(fraction, text) {
  fill.style.width = `${Math.round(Math.max(0, Math.min(1, fraction)) * 100)}%`;
  progressText.textContent = text;
}

async function submit() {
  if (current) return;
  clearErrors(form);
  let job;
  try {
    job = await api("/api/v1/jobs", { method: "POST", body: request() });
  } catch (err) {
    showError(form, err);
    status.textContent = "Not queued: fix the field marked in red.";
    return;
  }
  setBusy(true);
  setProgress(0, "queued");
  status.textContent = `Job ${job.id} queued.`;
  follow(job.id);
}

function follow(jobId) {
  const events = new EventSource(`/api/v1/jobs/${encodeURIComponent(jobId)}/events`);
  current = { id: jobId, events };
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
  } else if (job.state === "cancelled") {
    status.textContent = "Cancelled.";
  } else {
    status.textContent = `Failed: ${job.error || "unknown error"}`;
  }
}

function showResults(job) {
  results.replaceChildren();
  const records = (job.result && job.result.images) || [];
  job.images.forEach((url, index) => {
    const seed = records[index] ? records[index].seed : undefined;
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
    caption.append(renderRecipe(job.recipe || {}, { seed }));
    const download = document.createElement("a");
    download.href = url;
    download.download = `spellbook-${job.id}-${index}.png`;
    download.className = "download";
    download.textContent = "Download PNG";
    caption.append(download);
    figure.append(link, caption);
    results.append(figure);
  });
  if (records.length) {
    lastSeed = records[0].seed;
    reuse.disabled = false;
    reuse.title = `reuse seed ${lastSeed}`;
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    submit();
  }
});
cancel.addEventListener("click", async () => {
  if (!current) return;
  try {
    await api(`/api/v1/jobs/${encodeURIComponent(current.id)}/cancel`, { method: "POST" });
    status.textContent = "Cancelling…";
  } catch (err) {
    status.textContent = err.message;
  }
});
document.getElementById("dice").addEventListener("click", () => {
  form.elements.seed.value = "-1";
});
reuse.addEventListener("click", () => {
  if (lastSeed !== null) form.elements.seed.value = String(lastSeed);
});

loadChoices();
