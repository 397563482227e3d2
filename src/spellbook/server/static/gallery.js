// The Gallery page: search (words + meaning by default) narrowed by model, sampler and date, or the public
// feed (newest or most remixed) when the box is empty. The grid loads the next page as its end scrolls into
// view. Click an image for its recipe, similar images, Public/Private (its owner) and the image actions
// (→ img2img, → inpaint, remix, copy, download). The search, filters and open image are kept in the address.
import { imageActions, REMIX_KEY } from "/static/actions.js";
import { api, clearErrors, renderRecipe, showError } from "/static/api.js";

const CREATE_PATHS = { txt2img: "/", img2img: "/sketch", inpaint: "/inpaint" };
const MODES = ["hybrid", "words", "meaning"];
const ORDERS = { newest: "newest first", remixed: "most remixed first" };
const FILTERS = ["model", "sampler", "since"];
const SIMILAR_COUNT = 8;

const form = document.getElementById("search");
const grid = document.getElementById("grid");
const more = document.getElementById("more");
const status = document.getElementById("status");
const feedOrder = document.getElementById("feed-order");
const detail = document.getElementById("detail");
const detailTitle = document.getElementById("detail-title");
const detailMeta = document.getElementById("detail-meta");
const detailImg = document.getElementById("detail-img");
const detailRecipe = document.getElementById("detail-recipe");
const visibilitySwitch = document.getElementById("visibility");
const visibilityHint = document.getElementById("visibility-hint");
const visibilityError = detail.querySelector('[data-error-for="visibility"]');
const similarStrip = document.getElementById("similar");

const asked = new URLSearchParams(location.search);
// Images per page: ?limit=N in the address (1-200) overrides the default.
const pageSize = Math.min(200, Math.max(1, Number.parseInt(asked.get("limit"), 10) || 40));

// One listing at a time: a new search or filter starts a new generation, and answers to older ones are dropped.
const listing = { generation: 0, offset: 0, count: 0, done: false, loading: false, seen: new Set() };
let openImage = null; // the image shown in the panel
let opener = null; // the tile that opened it, focused again on close
let detailGeneration = 0;
let timer = null;

// ------------------------------------------------------------------------------------------ the query
function query() {
  const { elements } = form;
  const q = elements.q.value.trim();
  const filters = {};
  for (const name of FILTERS) {
    const value = elements[name].value.trim();
    if (value) filters[name] = value;
  }
  const order = feedOrder.querySelector("input:checked").value;
  return { q, mode: elements.mode.value, filters, order };
}

// The search is kept in the address, so Back (from → img2img, say) and a reload come back to it.
function writeAddress() {
  const { q, mode, filters, order } = query();
  const params = new URLSearchParams();
  if (q) params.set("q", q);
  if (q && mode !== "hybrid") params.set("mode", mode);
  for (const [name, value] of Object.entries(filters)) params.set(name, value);
  if (!q && order !== "newest") params.set("order", order);
  if (asked.has("limit")) params.set("limit", String(pageSize));
  if (openImage) params.set("image", String(openImage.id));
  const text = params.toString();
  history.replaceState(null, "", text ? `?${text}` : location.pathname);
}

function pageUrl(offset) {
  const { q, mode, filters, order } = query();
  const paging = { limit: String(pageSize), offset: String(offset) };
  if (q) return `/api/v1/gallery/search?${new URLSearchParams({ q, mode, ...filters, ...paging })}`;
  return `/api/v1/gallery/feed?${new URLSearchParams({ order, ...paging })}`;
}

function describe() {
  const { q, filters, order } = query();
  const n = listing.count;
  const count = `${n}${listing.done ? "" : "+"} image${n === 1 && listing.done ? "" : "s"}`;
  const narrowed = Object.entries(filters).map(([name, value]) => (name === "since" ? `since ${value}` : value));
  if (q) return `${count} for “${q}”${narrowed.length ? ` · ${narrowed.join(" · ")}` : ""}`;
  const hint = narrowed.length ? " Filters narrow a search: type what to look for." : "";
  if (!n) return `No public images yet. Search to see your own.${hint}`;
  return `The public feed, ${ORDERS[order]}.${hint}`;
}

// ------------------------------------------------------------------------------------- the listing
function restart() {
  clearTimeout(timer);
  clearErrors(form);
  Object.assign(listing, { generation: listing.generation + 1, offset: 0, count: 0, done: false, loading: false });
  listing.seen = new Set();
  grid.replaceChildren();
  feedOrder.hidden = Boolean(query().q);
  writeAddress();
  loadPage();
}

async function loadPage() {
  if (listing.loading || listing.done) return;
  const mine = listing.generation;
  listing.loading = true;
  more.textContent = "Loading…";
  try {
    const { images } = await api(pageUrl(listing.offset));
    if (mine !== listing.generation) return;
    listing.offset += images.length;
    listing.done = images.length < pageSize; // a short page is the last
    // Pages of a ranked search are ranked afresh: an image that moved up a place is not shown twice.
    for (const image of images) {
      if (listing.seen.has(image.id)) continue;
      listing.seen.add(image.id);
      grid.append(tile(image));
      listing.count += 1;
    }
    status.textContent = describe();
  } catch (err) {
    if (mine !== listing.generation) return;
    listing.done = true;
    showError(form, err);
    status.textContent = "";
  } finally {
    if (mine === listing.generation) {
      listing.loading = false;
      more.textContent = listing.done ? (listing.count > pageSize ? "That is all." : "") : "";
      more.dataset.state = listing.done ? "done" : "more";
      // Observing again reports at once whether the end is still in view (a page that did not fill it).
      if (!listing.done) {
        endObserver.unobserve(more);
        endObserver.observe(more);
      }
    }
  }
}

const endObserver = new IntersectionObserver(
  (entries) => {
    if (entries.some((entry) => entry.isIntersecting)) loadPage();
  },
  { rootMargin: "0px 0px 300px 0px" },
);

function tile(image, { small = false } = {}) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = small ? "tile small" : "tile";
  button.dataset.id = image.id;
  button.dataset.visibility = image.visibility;
  button.title = image.prompt;
  const img = document.createElement("img");
  img.src = image.src;
  img.alt = image.prompt;
  img.loading = "lazy";
  button.append(img);
  if (!small) {
    const caption = document.createElement("span");
    caption.textContent = image.prompt;
    button.append(caption);
  }
  button.addEventListener("click", () => open(image.id, button));
  return button;
}

// ---------------------------------------------------------------------------------- one image
async function open(id, from) {
  const mine = ++detailGeneration;
  try {
    const image = await api(`/api/v1/gallery/images/${encodeURIComponent(id)}`);
    if (mine !== detailGeneration) return;
    openImage = image;
    if (from && grid.contains(from)) opener = from;
    detailTitle.textContent = `Image ${image.id}`;
    detailImg.src = image.src;
    detailImg.alt = image.prompt;
    const made = image.created ? image.created.slice(0, 10) : "";
    const remixed = image.remix_count ? `remixed ${image.remix_count}×` : "";
    detailMeta.textContent = [made, remixed].filter(Boolean).join(" · ");
    showVisibility(image);
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
    const wasHidden = detail.hidden;
    detail.hidden = false;
    writeAddress();
    loadSimilar(image.id, mine);
    detail.scrollTop = 0;
    // Focus goes to the panel (on a phone it sits above the grid: this scrolls it into view).
    document.getElementById("close").focus({ preventScroll: !wasHidden });
  } catch (err) {
    if (mine === detailGeneration) status.textContent = `Image ${id}: ${err.message}`;
  }
}

function showVisibility(image) {
  const isPublic = image.visibility === "public";
  visibilityError.textContent = "";
  visibilitySwitch.hidden = !image.yours;
  visibilitySwitch.disabled = false;
  visibilitySwitch.setAttribute("aria-checked", String(isPublic));
  if (image.yours) visibilityHint.textContent = isPublic ? "In the feed: everyone can see it." : "Only you can see it.";
  else visibilityHint.textContent = isPublic ? "Public: in the feed." : "Private.";
}

async function toggleVisibility() {
  const image = openImage;
  if (!image) return;
  const wanted = image.visibility === "public" ? "private" : "public";
  visibilitySwitch.disabled = true;
  visibilityError.textContent = "";
  try {
    const saved = await api(`/api/v1/gallery/images/${encodeURIComponent(image.id)}/visibility`, {
      method: "POST",
      body: { visibility: wanted },
    });
    image.visibility = saved.visibility;
    for (const shown of document.querySelectorAll(`.tile[data-id="${CSS.escape(String(image.id))}"]`)) {
      shown.dataset.visibility = saved.visibility;
    }
    if (openImage === image) showVisibility(image);
  } catch (err) {
    if (openImage === image) visibilityError.textContent = err.message;
  } finally {
    visibilitySwitch.disabled = false;
  }
}

async function loadSimilar(id, mine) {
  similarStrip.replaceChildren();
  similarStrip.setAttribute("aria-busy", "true");
  try {
    const { images } = await api(`/api/v1/gallery/images/${encodeURIComponent(id)}/similar?limit=${SIMILAR_COUNT}`);
    if (mine !== detailGeneration) return;
    if (!images.length) {
      const none = document.createElement("p");
      none.className = "hint";
      none.textContent = "Nothing similar yet.";
      similarStrip.append(none);
    }
    for (const image of images) similarStrip.append(tile(image, { small: true }));
  } catch (err) {
    if (mine !== detailGeneration) return;
    const failed = document.createElement("p");
    failed.className = "error";
    failed.textContent = err.message;
    similarStrip.append(failed);
  } finally {
    if (mine === detailGeneration) similarStrip.removeAttribute("aria-busy");
  }
}

function closeDetail() {
  if (detail.hidden) return;
  detailGeneration += 1;
  detail.hidden = true;
  openImage = null;
  writeAddress();
  if (opener && opener.isConnected) opener.focus();
  opener = null;
}

// ---------------------------------------------------------------------------------- filters
async function loadChoices() {
  const [models, samplers] = await Promise.allSettled([api("/api/v1/models"), api("/api/v1/samplers")]);
  if (models.status === "fulfilled") {
    for (const model of models.value) form.elements.model.add(new Option(model.name, model.name));
  }
  if (samplers.status === "fulfilled") {
    for (const name of samplers.value.samplers) form.elements.sampler.add(new Option(name, name));
  }
  const failed = [models, samplers].find((result) => result.status === "rejected");
  if (failed) showError(form, failed.reason);
}

function applyAddress() {
  const { elements } = form;
  elements.q.value = asked.get("q") || "";
  if (MODES.includes(asked.get("mode"))) elements.mode.value = asked.get("mode");
  for (const name of ["model", "sampler"]) {
    const value = asked.get(name);
    if (!value) continue;
    // A name from an imported image may not be a model this server has: keep it as a choice anyway.
    if (![...elements[name].options].some((option) => option.value === value)) {
      elements[name].add(new Option(value, value));
    }
    elements[name].value = value;
  }
  if (/^\d{4}-\d{2}-\d{2}$/.test(asked.get("since") || "")) elements.since.value = asked.get("since");
  const order = asked.get("order") in ORDERS ? asked.get("order") : "newest";
  feedOrder.querySelector(`input[value="${order}"]`).checked = true;
}

// ---------------------------------------------------------------------------------- events
form.addEventListener("submit", (event) => {
  event.preventDefault();
  restart();
});
form.elements.q.addEventListener("input", () => {
  clearTimeout(timer);
  timer = setTimeout(restart, 300);
});
for (const name of ["mode", ...FILTERS]) form.elements[name].addEventListener("change", restart);
document.getElementById("clear-filters").addEventListener("click", () => {
  for (const name of FILTERS) form.elements[name].value = "";
  restart();
});
feedOrder.addEventListener("change", restart);
visibilitySwitch.addEventListener("click", toggleVisibility);
document.getElementById("close").addEventListener("click", closeDetail);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") closeDetail();
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    restart();
  }
});

await loadChoices();
applyAddress();
restart();
if (/^\d+$/.test(asked.get("image") || "")) open(Number(asked.get("image")));
