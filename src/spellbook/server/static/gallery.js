// The Gallery page: search (words + meaning by default), or the public feed when the box is empty;
// click an image to see its recipe and act on it (→ img2img, → inpaint, remix, copy, download).
import { imageActions, REMIX_KEY } from "/static/actions.js";
import { api, clearErrors, renderRecipe, showError } from "/static/api.js";

const CREATE_PATHS = { txt2img: "/", img2img: "/sketch", inpaint: "/inpaint" };

const form = document.getElementById("search");
const grid = document.getElementById("grid");
const status = document.getElementById("status");
const detail = document.getElementById("detail");
const detailImg = document.getElementById("detail-img");
const detailRecipe = document.getElementById("detail-recipe");

let generation = 0; // answers to older searches are dropped
let timer = null;

async function load() {
  const q = form.elements.q.value.trim();
  const mode = form.elements.mode.value;
  const mine = ++generation;
  clearErrors(form);
  // The search is kept in the address, so Back (from → img2img, say) comes back to it.
  const address = q ? `?${new URLSearchParams(mode === "hybrid" ? { q } : { q, mode })}` : location.pathname;
  history.replaceState(null, "", address);
  const url = q
    ? `/api/v1/gallery/search?${new URLSearchParams({ q, mode, limit: "60" })}`
    : "/api/v1/gallery/feed?limit=60";
  try {
    const { images } = await api(url);
    if (mine !== generation) return;
    show(images, q);
  } catch (err) {
    if (mine === generation) showError(form, err);
  }
}

function show(images, q) {
  grid.replaceChildren();
  status.textContent = q
    ? `${images.length} image${images.length === 1 ? "" : "s"} for “${q}”`
    : images.length
      ? "The public feed, newest first."
      : "No public images yet. Search to see your own.";
  for (const image of images) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "tile";
    button.dataset.id = image.id;
    button.title = image.prompt;
    const img = document.createElement("img");
    img.src = image.src;
    img.alt = image.prompt;
    img.loading = "lazy";
    const caption = document.createElement("span");
    caption.textContent = image.prompt;
    button.append(img, caption);
    button.addEventListener("click", () => open(image.id));
    grid.append(button);
  }
}

async function open(id) {
  try {
    const image = await api(`/api/v1/gallery/images/${id}`);
    detailImg.src = image.src;
    detailImg.alt = image.prompt;
    const recipe = image.recipe && Object.keys(image.recipe).length ? image.recipe : image;
    detailRecipe.replaceChildren(
      renderRecipe(recipe, { seed: image.seed }),
      imageActions({
        src: image.src,
        imageId: image.id,
        recipe,
        filename: `spellbook-${image.id}.png`,
        // The Create page opens in that mode with the picture loaded.
        onSend: (kind, src) => location.assign(`${CREATE_PATHS[kind]}?${new URLSearchParams({ init: src })}`),
        // Handed over once through sessionStorage; the start picture is the parent (the init image) if known.
        onRemix: (request) => {
          const start = image.parent ? image.parent.src : undefined;
          sessionStorage.setItem(REMIX_KEY, JSON.stringify({ request, start }));
          location.assign(CREATE_PATHS[request.kind || "txt2img"] || "/");
        },
        say: (text) => (status.textContent = text),
      }),
    );
    detail.hidden = false;
    document.getElementById("close").focus();
  } catch (err) {
    status.textContent = err.message;
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  load();
});
form.elements.q.addEventListener("input", () => {
  clearTimeout(timer);
  timer = setTimeout(load, 300);
});
form.elements.mode.addEventListener("change", load);
document.getElementById("close").addEventListener("click", () => {
  detail.hidden = true;
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") detail.hidden = true;
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    load();
  }
});

const asked = new URLSearchParams(location.search);
form.elements.q.value = asked.get("q") || "";
if (["hybrid", "words", "meaning"].includes(asked.get("mode"))) form.elements.mode.value = asked.get("mode");
load();
