"""The studio: requests become recipes (`plan`, metadata only), recipes become images (`run`, weights).

Every entry point (CLI, native API, A1111 API, gallery remix, `reproduce`) builds an `ImageRequest` and calls
`plan`, which resolves the model to its `ModelInfo` (no weights), keeps image inputs by content hash and
makes the Recipe. The API process stops there and queues the recipe. `run` is the worker half: it loads the
components the recipe names (checked by hash) and calls the engine. Writing PNGs is provenance's job, filing
them the gallery's.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from spellbook.concepts.library import ConceptLibrary
from spellbook.engine.pipeline import GenerationInputs, StepCallback, check_mask_size, generate, to_pil
from spellbook.engine.prompts import check_concept_widths
from spellbook.errors import NotFound, UserError
from spellbook.models.components import Components
from spellbook.models.info import ModelCatalog, ModelInfo
from spellbook.models.loading import ModelCache
from spellbook.models.registry import ModelEntry
from spellbook.provenance import (
    Comparison,
    Result,
    compare,
    image_sha256,
    open_image,
    read_metadata,
    request_from_foreign,
    write_result,
)
from spellbook.recipe import (
    Blend,
    Build,
    Hires,
    ImageRequest,
    InputRef,
    Limits,
    ModelRef,
    Recipe,
    make_blend,
    make_recipe,
    validate,
)
from spellbook.settings import Settings

_NUMBERED = re.compile(r"^(\d{5})-")
# A1111 infotext keys that change nothing Spellbook would compute differently: versions, hashes recorded for
# reference, the style templates already expanded into the prompt.
_HARMLESS_A1111 = {"Version", "Template", "Negative Template", "Styles array", "Hashes", "User", "Comments",
                   "App", "Emphasis", "Schedule max sigma", "Schedule min sigma", "Schedule rho"}  # fmt: skip
# Keys whose value at A1111's default changes nothing.
_DEFAULT_A1111 = {"ENSD": "0", "Eta": "1", "Eta DDIM": "0", "Token merging ratio": "0",
                  "Noise multiplier": "1", "Emphasis": "Original", "RNG": "CPU"}  # fmt: skip


def unhonoured_settings(extra: Mapping[str, str]) -> dict[str, str]:
    """The A1111 infotext keys of an image that Spellbook cannot honour (all but the harmless ones and those at
    A1111's default): LoRA, face restoration, a hires pass with another sampler, a different noise source, …"""
    found = {}
    for key, value in extra.items():
        if key in _HARMLESS_A1111 and key not in _DEFAULT_A1111:
            continue
        if key in _DEFAULT_A1111 and str(value).strip() == _DEFAULT_A1111[key]:
            continue
        found[key] = value
    return found


DEFAULT_MODEL = "shapes"


class Studio:
    def __init__(self, settings: Settings | None = None, cache: ModelCache | None = None):
        self.settings = settings or Settings.from_env()
        self.cache = cache or ModelCache(self.settings)
        self.catalog = ModelCatalog(self.cache.registry, allow_pickle=self.settings.allow_pickle)
        self.concepts = ConceptLibrary(self.settings)
        # Models and VAEs the local CLI named by path, by content hash: a recipe records only name and hash.
        self._model_paths: dict[str, ModelEntry] = {}
        self._vae_paths: dict[str, Path] = {}
        if self.settings.threads:
            import torch

            torch.set_num_threads(self.settings.threads)

    @property
    def limits(self) -> Limits:
        s = self.settings
        return Limits(max_pixels=s.max_pixels, max_batch=s.max_batch, max_steps=s.max_steps)

    def build(self) -> Build:
        return Build.current(self.settings.device, self.settings.dtype)

    # --------------------------------------------------------------------------- planning (no weights)
    def model_info(self, model: str | None, *, allow_paths: bool = True) -> ModelInfo:
        """A model's metadata by name (or, where allowed, path), read from its files' headers and configs."""
        entry = self.cache.registry.resolve(model or DEFAULT_MODEL, allow_paths=allow_paths)
        info = self.catalog.info_of(entry)
        self._model_paths[info.sha256] = entry  # so `run` loads exactly what was planned, path or name
        return info

    def vae_ref(self, vae: str, *, allow_paths: bool = True) -> ModelRef:
        path, ref = self.cache.vae_ref(vae, allow_paths=allow_paths)
        self._vae_paths[ref.sha256] = path
        return ref

    def plan(
        self, request: ImageRequest | Mapping[str, Any], *, allow_paths: bool = True, concepts_of: int | None = None
    ) -> Recipe:
        """Validate a request and resolve everything it names, without loading any weights; nothing runs yet.
        Concepts are the shared library's, plus user `concepts_of`'s own (a server passes the caller's id)."""
        if not isinstance(request, ImageRequest):
            request = ImageRequest.from_dict(request)
        # 0. Styles: their templates expanded into the prompts (the recipe keeps what ran, and the names).
        if request.styles:
            from spellbook.styles import StyleLibrary, apply_styles

            styles = StyleLibrary(self.settings).get(request.styles)
            prompt, negative = apply_styles(request.prompt, request.negative_prompt, styles)
            request = request.with_(prompt=prompt, negative_prompt=negative, styles=tuple(request.styles))
        # 1. The model and VAE, by metadata.
        info = self.model_info(request.model, allow_paths=allow_paths)
        vae = self.vae_ref(request.vae, allow_paths=allow_paths) if request.vae else None
        defaults = dict(info.defaults)
        # 2. Image inputs, kept by content hash so the recipe can name them.
        init_ref = mask_ref = None
        if request.kind in ("img2img", "inpaint"):
            if request.init_image is None:
                raise UserError(f"{request.kind} needs an init image", field="init_image")
            image = request.init_image
            if request.width is None and request.height is None:
                # The init image's own size, rounded down to a multiple of 8 (at least 8).
                defaults["width"], defaults["height"] = max(8, image.width // 8 * 8), max(8, image.height // 8 * 8)
            init_ref = self._store_input(image, request.init_image_path)
            if request.kind == "inpaint":
                if request.mask is None:
                    raise UserError("inpaint needs a mask", field="mask")
                check_mask_size(image, request.mask)
                mask_ref = self._store_input(request.mask, request.mask_path)
        # 3. Concepts: the library's names that the prompts mention, recorded with their file hashes.
        prompts, negatives = [request.prompt], [request.negative_prompt]
        hires = request.hires.to_dict() if isinstance(request.hires, Hires) else request.hires
        if isinstance(hires, Mapping):  # a hires pass's own prompts may name concepts too
            prompts.append(str(hires.get("prompt") or ""))
            negatives.append(str(hires.get("negative_prompt") or ""))
        concepts, vectors = self.concepts.for_owner(concepts_of).resolve("\n".join(prompts), "\n".join(negatives))
        check_concept_widths(vectors, info.text_width, info.name)
        recipe = make_recipe(
            request,
            defaults,
            model=info.ref,
            vae=vae,
            init_image=init_ref,
            mask=mask_ref,
            concepts=concepts,
            build=self.build(),
            limits=self.limits,
        )
        # 4. A sampler/schedule pair that cannot run on this model's noise schedule is refused now, not in the worker.
        from spellbook.engine.samplers import check_pair

        check_pair(recipe.sampler, recipe.schedule, info.scheduler_config, recipe.steps)
        if recipe.hires is not None:
            check_pair(
                recipe.sampler, recipe.schedule, info.scheduler_config, recipe.hires.inference_steps(recipe.steps)
            )
        return recipe

    def store_input(self, image: Image.Image) -> InputRef:
        """Keep an input picture by content hash (inputs/<sha256>.png), as init images and masks are kept."""
        return self._store_input(image, "")

    def _store_input(self, image: Image.Image, original_path: str) -> InputRef:
        digest = image_sha256(image)
        target = self.settings.inputs_dir / f"{digest}.png"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{digest}.{threading.get_ident()}.tmp.png")
            image.save(tmp)
            tmp.replace(target)
        return InputRef(digest, str(original_path))

    def load_input(self, ref: InputRef, field: str) -> Image.Image:
        candidates = [self.settings.inputs_dir / f"{ref.sha256}.png"]
        if ref.path:
            candidates.append(Path(ref.path))
        for path in candidates:
            if path.is_file():
                image = open_image(path, field)
                if image_sha256(image) == ref.sha256:
                    return image
        raise UserError(
            f"the {field.replace('_', ' ')} this recipe used (sha256 {ref.sha256[:12]}…) is not in "
            f"{self.settings.inputs_dir} nor at {ref.path or 'its recorded path'}",
            field=field,
        )

    # ---------------------------------------------------------------------------- running (workers)
    def components_for(self, model: str | None, *, allow_paths: bool = True) -> Components:
        return self.cache.load(model or DEFAULT_MODEL, allow_paths=allow_paths)

    def components_for_recipe(self, recipe: Recipe, model: str | None = None) -> Components:
        """The components a recipe names (its model by name, checked by hash, or found by hash; its VAE)."""
        if model:
            components = self.components_for(model)
        elif recipe.model.sha256 in self._model_paths:
            components = self.cache.load_entry(self._model_paths[recipe.model.sha256])
        else:
            components = self._recorded_model(recipe)
        if recipe.vae:
            where = self._vae_paths.get(recipe.vae.sha256)
            vae, _ = self.cache.load_vae(str(where) if where else recipe.vae.name, allow_paths=where is not None)
            components = components.with_vae(vae)
        return components

    def _recorded_model(self, recipe: Recipe) -> Components:
        try:
            components = self.components_for(recipe.model.name, allow_paths=False)
            if not recipe.model.sha256 or components.ref.sha256 == recipe.model.sha256:
                return components
        except NotFound:
            components = None
        info = self.catalog.by_hash(recipe.model.sha256)
        if info is not None:
            return self.components_for(info.name, allow_paths=False)
        if components is not None:
            raise UserError(
                f"model {recipe.model.name!r} has changed since this recipe was made (sha256 "
                f"{recipe.model.short_hash} recorded, {components.ref.short_hash} now); pass --model to use "
                "another model anyway",
                field="model",
            )
        raise NotFound(
            f"model {recipe.model.name!r} (hash {recipe.model.short_hash}) is not in the models folder; "
            "add it with `spellbook models add PATH` or pass --model PATH",
            field="model",
        )

    def inputs_for_recipe(self, recipe: Recipe) -> GenerationInputs:
        """The init image, mask and concept vectors a recipe references by hash."""
        by_pictures = recipe.blend is not None and recipe.blend.by_pictures
        return GenerationInputs(
            init_image=self.load_input(recipe.init_image, "init_image") if recipe.init_image else None,
            mask=self.load_input(recipe.mask, "mask") if recipe.mask else None,
            concepts=self.concepts.vectors_for(recipe.concepts),  # each checked against its recorded hash
            blend_image=self.load_input(InputRef(recipe.blend.b_sha256, ""), "blend") if by_pictures else None,
        )

    def run(
        self,
        recipe: Recipe,
        *,
        model: str | None = None,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Result]:
        """The whole batch of one recipe: one Result per image (each with its own batch index)."""
        components = self.components_for_recipe(recipe, model)
        [arrays] = generate(components, [recipe], self.inputs_for_recipe(recipe), on_step=on_step, cancel=cancel)
        return [Result(image, recipe.for_image(i)) for i, image in enumerate(to_pil(arrays))]

    def run_many(
        self,
        recipes: list[Recipe],
        *,
        on_step: StepCallback | None = None,
        on_group: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[list[Result]]:
        """Several recipes' images, in order. Those that can share a forward pass (`queue.jobs.batch_key`: txt2img,
        the same model, size, sampler, steps, CFG, …) run together, `max_jobs_batch` at a time, as the server's
        worker batches jobs; with batching off (`SPELLBOOK_BATCHING=0`) each runs alone, so each verifies bit
        for bit. `on_step` reports each group's steps; `on_group(n)` after each group, n recipes done in all."""
        from spellbook.queue.jobs import batch_key

        groups: list[list[int]] = []
        growing: dict[str, list[int]] = {}
        for index, recipe in enumerate(recipes):
            key = batch_key(recipe) if self.settings.batching else ""
            group = growing.get(key) if key else None
            if group is None or len(group) >= self.settings.max_jobs_batch:
                group = []
                groups.append(group)
                if key:
                    growing[key] = group
            group.append(index)
        results: list[list[Result]] = [[] for _ in recipes]
        done = 0
        for group in groups:
            batch = [recipes[index] for index in group]
            components = self.components_for_recipe(batch[0])
            arrays = generate(components, batch, self.inputs_for_recipe(batch[0]), on_step=on_step, cancel=cancel)
            for index, images in zip(group, arrays, strict=True):
                results[index] = [Result(image, recipes[index].for_image(i)) for i, image in enumerate(to_pil(images))]
            done += len(group)
            if on_group is not None:
                on_group(done)
        return results

    def save(self, results: list[Result], out_dir: Path) -> list[Result]:
        """Write results into a folder as NNNNN-SEED.png (numbering continues what the folder holds)."""
        number = next_image_number(out_dir)
        return [
            write_result(result, out_dir / f"{number + offset:05d}-{result.recipe.image_seed}.png")
            for offset, result in enumerate(results)
        ]

    # ------------------------------------------------------------------------------------ provenance
    def recipe_of(self, path: Path, model: str | None = None, *, lenient: bool = False) -> Recipe:
        """The recipe inside an image, ready to run again (ours exactly; A1111/ComfyUI as far as they say). An
        A1111 setting Spellbook cannot honour (LoRA, face restoration, …) is an error naming it; with
        `lenient` it is dropped (`unhonoured_settings` names them, for the caller to warn about)."""
        meta = read_metadata(path)
        if meta.recipe is not None:
            recipe = meta.recipe
            if model is None and recipe.model.sha256:
                try:
                    info = self.model_info(recipe.model.name, allow_paths=False)
                except NotFound:
                    info = None
                if (
                    info is not None
                    and info.sha256 != recipe.model.sha256
                    and not self.catalog.by_hash(recipe.model.sha256)
                ):
                    raise UserError(
                        f"model {recipe.model.name!r} has changed since this image was made (sha256 "
                        f"{recipe.model.short_hash} recorded, {info.sha256[:10]} now); pass --model to use "
                        "another model anyway",
                        field="model",
                    )
            return validate(recipe, self.limits)
        if meta.foreign is not None:
            # The model the other tool recorded, by name (A1111: "Model", ComfyUI: the checkpoint file), unless
            # the user names one; never silently another model.
            recorded = Path(str(meta.foreign["model"])).stem if meta.foreign.get("model") else None
            unhonoured = unhonoured_settings(meta.foreign.get("extra") or {})
            if unhonoured and not lenient:
                listed = ", ".join(f"{key}: {value}" for key, value in unhonoured.items())
                raise UserError(
                    f"{path.name} was made with settings Spellbook cannot reproduce ({listed}); nothing was run",
                    field="image",
                    hint="pass --lenient to run it without them (the result will differ)",
                )
            return self.plan(request_from_foreign(meta.foreign, model or recorded))
        raise UserError(f"{path} carries no recipe (no Spellbook, A1111 or ComfyUI metadata)", field="image")

    def plan_blend_pictures(
        self,
        a: Image.Image,
        b: Image.Image,
        ts: list[float],
        request: ImageRequest,
        *,
        allow_paths: bool = True,
        concepts_of: int | None = None,
    ) -> list[Recipe]:
        """Blends of two pictures by their pixels: `request` (kind img2img: prompt, strength, seed, size, model…)
        with picture A as its init image; picture B is kept as an input too. Nothing runs yet."""
        strength = 0.6 if request.strength is None else request.strength  # a blend keeps less than img2img's 0.75
        base = self.plan(
            request.with_(kind="img2img", init_image=a, strength=strength),
            allow_paths=allow_paths,
            concepts_of=concepts_of,
        )
        b_ref = self._store_input(b.convert("RGB"), "")
        blends = [Blend(float(t), None, None, base.init_image.sha256, b_ref.sha256) for t in ts]
        return [validate(base.with_(kind="blend", blend=blend), self.limits) for blend in blends]

    def plan_blend(self, a: Path, b: Path, ts: list[float], *, lenient: bool = False) -> list[Recipe]:
        """The recipes of pictures between two images (t 0: A, 1: B), made from the recipes the images carry
        (ours, or A1111's as `reproduce` reads them). Nothing runs yet."""
        parents = []
        for key, path in (("a", a), ("b", b)):
            try:
                recipe = self.recipe_of(path, lenient=lenient)
            except UserError as error:
                raise UserError(
                    f"picture {key.upper()} ({path.name}): {error.message}",
                    field=key,
                    hint="to blend pictures without a usable recipe, give a prompt (spellbook blend --prompt)",
                ) from None
            parents.append((recipe, image_sha256(open_image(path, key))))
        (recipe_a, sha_a), (recipe_b, sha_b) = parents
        build = self.build()
        return [make_blend(recipe_a, recipe_b, t, a_sha256=sha_a, b_sha256=sha_b, build=build) for t in ts]

    def reproduce(
        self, path: Path, model: str | None = None, on_step: StepCallback | None = None, *, lenient: bool = False
    ) -> Result:
        """Run the recipe again: the whole batch, as it ran, and keep this image's place in it."""
        recipe = self.recipe_of(path, model, lenient=lenient)
        results = self.run(recipe.with_(build=self.build()), model=model, on_step=on_step)
        return results[recipe.batch_index]

    def verify(
        self, path: Path, model: str | None = None, on_step: StepCallback | None = None
    ) -> tuple[Comparison, Result]:
        meta = read_metadata(path)
        if meta.recipe is None:
            raise UserError(f"{path} has no Spellbook recipe; only Spellbook images can be verified", field="image")
        result = self.reproduce(path, model=model, on_step=on_step)
        return compare(open_image(path), result.image, meta.recipe.build, self.build()), result


def next_image_number(out_dir: Path) -> int:
    numbers = [int(m.group(1)) for p in out_dir.glob("*.png") if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=0) + 1
