// What can be done with an image, on the Create page's results and in the Gallery's image panel:
// send it to img2img or inpaint, remix its recipe, blend it with another, upscale it, copy the recipe, download.
import { api } from "/static/api.js";

// Where the Create page picks up a remix started on another page (read once, then removed).
export const REMIX_KEY = "spellbook.remix";
// Picture A of a blend, kept while the user finds picture B (on this page or another).
const BLEND_KEY = "spellbook.blend";

// Blend, pressed on a picture: the first press chooses picture A, the second (on another picture) opens the
// Create page, which queues the picture halfway between them.
function blendWith(imageId, say) {
  let chosen = null;
  try {
    chosen = JSON.parse(sessionStorage.getItem(BLEND_KEY) || "null");
  } catch {
    chosen = null;
  }
  if (!chosen || chosen.id === imageId) {
    sessionStorage.setItem(BLEND_KEY, JSON.stringify({ id: imageId }));
    say(`Image ${imageId} is picture A of a blend: press Blend on the second picture.`);
    return;
  }
  sessionStorage.removeItem(BLEND_KEY);
  location.assign(`/?${new URLSearchParams({ blend: `${chosen.id},${imageId}` })}`);
}

export async function remixRequest(imageId) {
  const remix = await api(`/api/v1/gallery/images/${encodeURIComponent(imageId)}/remix`, { method: "POST" });
  return remix.request;
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return;
    } catch {
      // denied (no permission, no focus): the textarea way below still works in most browsers
    }
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.append(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  if (!copied) throw new Error("the browser refused to copy");
}

function button(label, action, title) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = label;
  element.dataset.action = action;
  element.title = title;
  return element;
}

// A row of actions for one image. `onSend(kind, src)` gets "img2img" or "inpaint"; `onRemix(request)` gets
// the image's recipe as a job request; `say(text)` reports what happened.
export function imageActions({ src, imageId, recipe, filename, onSend, onRemix, say }) {
  const bar = document.createElement("div");
  bar.className = "image-actions";
  const toImg2img = button("→ img2img", "img2img", "start a sketch from this image (img2img)");
  const toInpaint = button("→ inpaint", "inpaint", "paint a mask over this image and draw that part again");
  toImg2img.addEventListener("click", () => onSend("img2img", src));
  toInpaint.addEventListener("click", () => onSend("inpaint", src));
  bar.append(toImg2img, toInpaint);
  // A blend has no form to edit (it is made from two pictures): no Remix, but it can be blended again.
  if (imageId !== undefined && imageId !== null && !(recipe && recipe.kind === "blend")) {
    const remix = button("Remix", "remix", "put this image's recipe in the Create form to edit");
    remix.addEventListener("click", async () => {
      try {
        onRemix(await remixRequest(imageId));
      } catch (err) {
        say(`Remix failed: ${err.message}`);
      }
    });
    bar.append(remix);
  }
  if (imageId !== undefined && imageId !== null) {
    const blend = button("Blend", "blend", "the picture halfway between this one and another: press on both");
    blend.addEventListener("click", () => blendWith(imageId, say));
    const upscale = button("Upscale", "upscale", "this picture twice as large, with the best upscaler installed");
    upscale.addEventListener("click", () => location.assign(`/?${new URLSearchParams({ upscale: imageId })}`));
    bar.append(blend, upscale);
  }
  const copy = button("Copy recipe", "copy", "copy the full recipe (JSON)");
  copy.addEventListener("click", async () => {
    try {
      await copyText(JSON.stringify(recipe, null, 2));
      say("Recipe copied.");
    } catch (err) {
      say(`Could not copy: ${err.message}`);
    }
  });
  const download = document.createElement("a");
  download.href = src;
  download.download = filename;
  download.className = "download";
  download.textContent = "Download PNG";
  bar.append(copy, download);
  return bar;
}
