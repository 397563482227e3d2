// The Concepts page: the library (download for A1111 or diffusers, remove), upload a concept file, and train a
// new concept from pictures, followed over SSE with a progress bar.
import { ApiError, api, clearErrors, showError } from "/static/api.js";

const rows = document.getElementById("concept-rows");
const status = document.getElementById("status");
const uploadForm = document.getElementById("upload");
const trainForm = document.getElementById("train");
const trainStart = document.getElementById("train-start");
const trainCancel = document.getElementById("train-cancel");
const trainProgress = document.getElementById("train-progress");
const trainBar = document.getElementById("train-bar");
const trainFill = document.getElementById("train-fill");
const trainText = document.getElementById("train-text");
const trainStatus = document.getElementById("train-status");

let training = null; // { id, events }

function formatSize(bytes) {
  return bytes < 1024 ? `${bytes} B` : `${(bytes / 1024).toFixed(1)} KB`;
}

function link(href, text, download) {
  const a = document.createElement("a");
  a.href = href;
  a.textContent = text;
  if (download) a.download = download;
  return a;
}

function conceptRow(concept) {
  const tr = document.createElement("tr");
  tr.dataset.name = concept.name;
  const sample = document.createElement("td");
  if (concept.sample) {
    const img = document.createElement("img");
    img.src = concept.sample;
    img.alt = `samples of <${concept.name}>`;
    img.className = "concept-sample";
    sample.append(img);
  }
  const name = document.createElement("td");
  name.className = "concept-name";
  name.textContent = concept.bare_word ? `<${concept.name}> or ${concept.name}` : `<${concept.name}>`;
  if (concept.scope === "own") name.append(" ", Object.assign(document.createElement("span"), { className: "badge", textContent: "yours" }));
  if (concept.note) name.title = concept.note;
  const shape = concept.vectors ? `${concept.vectors} × ${concept.dims}` : "?";
  const cells = [shape, concept.trained_for || "–", formatSize(concept.size_bytes), concept.hash || "–"].map((text) => {
    const td = document.createElement("td");
    td.textContent = text;
    return td;
  });
  cells[3].className = "mono";
  const downloads = document.createElement("td");
  downloads.className = "downloads";
  downloads.append(
    link(concept.files.a1111, "A1111", `${concept.name}.safetensors`),
    document.createTextNode(" · "),
    link(concept.files.diffusers, "diffusers", `${concept.name}-diffusers.safetensors`),
  );
  const actions = document.createElement("td");
  if (concept.yours) {
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "Delete";
    remove.addEventListener("click", () => removeConcept(concept.name, remove));
    actions.append(remove);
  }
  tr.append(sample, name, ...cells, downloads, actions);
  return tr;
}

async function load() {
  try {
    const { concepts } = await api("/api/v1/concepts");
    rows.replaceChildren(...concepts.map(conceptRow));
    status.textContent = concepts.length
      ? `${concepts.length} concept${concepts.length === 1 ? "" : "s"}.`
      : "No concepts yet: add a file or train one below.";
  } catch (err) {
    if (err.status === 401) {
      status.replaceChildren("Not signed in: ", link("/account", "sign in on the Account page"), ".");
    } else {
      status.textContent = err.message;
    }
  }
}

// Deleting takes two clicks: the first asks, the second (within a few seconds) deletes.
async function removeConcept(name, button) {
  if (button.dataset.armed !== "yes") {
    button.dataset.armed = "yes";
    button.textContent = "Really delete?";
    setTimeout(() => {
      button.dataset.armed = "";
      button.textContent = "Delete";
    }, 4000);
    return;
  }
  let message;
  try {
    await api(`/api/v1/concepts/${encodeURIComponent(name)}`, { method: "DELETE" });
    message = `Deleted <${name}>.`;
  } catch (err) {
    message = err.message;
  }
  await load();
  status.textContent = message;
}

uploadForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors(uploadForm);
  const file = uploadForm.elements.file.files[0];
  if (!file) {
    showError(uploadForm, new ApiError(400, "invalid", "choose a .safetensors file", "file"));
    return;
  }
  const data = new FormData();
  data.append("file", file);
  const name = uploadForm.elements.name.value.trim();
  if (name) data.append("name", name);
  if (uploadForm.elements.bare_word.checked) data.append("bare_word", "true");
  try {
    const concept = await api("/api/v1/concepts", { method: "POST", body: data });
    uploadForm.reset();
    await load();
    status.textContent = `Added <${concept.name}>: ${concept.vectors} vector(s) × ${concept.dims}.`;
  } catch (err) {
    showError(uploadForm, err);
  }
});

function setTraining(busy) {
  trainStart.disabled = busy;
  trainCancel.hidden = !busy;
  trainProgress.hidden = !busy;
}

function setProgress(step, total, text) {
  const percent = total ? Math.round((100 * step) / total) : 0;
  trainFill.style.width = `${percent}%`;
  trainBar.setAttribute("aria-valuenow", String(percent));
  trainText.textContent = text;
}

trainForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (training) return;
  clearErrors(trainForm);
  const data = new FormData();
  for (const field of ["name", "init_word", "steps", "vectors", "seed"]) {
    const value = trainForm.elements[field].value.trim();
    if (value !== "") data.append(field, value);
  }
  if (trainForm.elements.bare_word.checked) data.append("bare_word", "true");
  for (const picture of trainForm.elements.images.files) data.append("images", picture);
  let job;
  try {
    job = await api("/api/v1/concepts/train", { method: "POST", body: data });
  } catch (err) {
    showError(trainForm, err);
    return;
  }
  setTraining(true);
  setProgress(0, 0, "queued");
  trainStatus.textContent = `Training <${job.concept.name}> (${job.cost} credits)…`;
  follow(job.id, job.concept.name);
});

function follow(jobId, name) {
  const events = new EventSource(`/api/v1/jobs/${encodeURIComponent(jobId)}/events`);
  training = { id: jobId, events };
  events.addEventListener("progress", (message) => {
    const event = JSON.parse(message.data);
    // Embedded mode sends steps; scale-out mode only the fraction its worker last reported.
    if (event.total) setProgress(event.step, event.total, `step ${event.step}/${event.total}`);
    else setProgress(event.progress || 0, 1, event.state);
  });
  for (const final of ["done", "failed", "cancelled"]) {
    events.addEventListener(final, (message) => finish(JSON.parse(message.data), name));
  }
  events.onerror = () => {
    // The stream ends after the final event; if it dropped before, ask for the job once.
    if (training && training.events === events) {
      events.close();
      api(`/api/v1/jobs/${encodeURIComponent(jobId)}`)
        .then((job) => (["done", "failed", "cancelled"].includes(job.state) ? finish(job, name) : follow(jobId, name)))
        .catch((err) => {
          trainStatus.textContent = err.message;
          training = null;
          setTraining(false);
        });
    }
  };
}

async function finish(job, name) {
  if (training) training.events.close();
  training = null;
  setTraining(false);
  if (job.state === "done") {
    const result = job.result || {};
    const loss = typeof result.final_loss === "number" ? `, final loss ${result.final_loss.toFixed(4)}` : "";
    trainStatus.textContent = `Trained <${name}>: ${result.steps} steps${loss}.`;
    trainForm.reset();
    await load();
  } else if (job.state === "cancelled") {
    trainStatus.textContent = "Training cancelled (credits refunded).";
  } else {
    trainStatus.textContent = `Training failed: ${(job.error && job.error.message) || "unknown error"}`;
  }
}

trainCancel.addEventListener("click", async () => {
  if (!training) return;
  // Say it before asking: the stream's final event may arrive before the answer, and must have the last word.
  trainStatus.textContent = "Cancelling…";
  try {
    await api(`/api/v1/jobs/${encodeURIComponent(training.id)}/cancel`, { method: "POST" });
  } catch (err) {
    if (training) trainStatus.textContent = err.message;
  }
});

load();
