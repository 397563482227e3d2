"""The studio: what the CLI and the server call. Request -> Recipe -> images on disk with their recipe.

It ties models, the engine and provenance together; each of those stays usable on its own.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from spellbook.concepts.library import ConceptLibrary
from spellbook.engine.pipeline import GenerationInputs, ProgressCallback, check_mask_size, generate, to_pil
from spellbook.engine.prompts import check_concepts
from spellbook.errors import NotFound, UserError
from spellbook.models.components import Components
from spellbook.models.loading import ModelCache
from spellbook.provenance import (
    Comparison,
    compare,
    image_sha256,
    open_image,
    read_metadata,
    recipe_from_foreign,
    save_png,
)
from spellbook.recipe import Build, InputRef, Limits, ModelRef, Recipe, make_recipe, validate
from spellbook.settings import Settings

_NUMBERED = re.compile(r"^(\d{5})-")


@dataclass(frozen=True)
class Result:
    image: Image.Image
    recipe: Recipe
    path: Path | None = None


class Studio:
    def __init__(self, settings: Settings | None = None, cache: ModelCache | None = None):
        self.settings = settings or Settings.from_env()
        self.cache = cache or ModelCache(self.settings)
        self.concepts = ConceptLibrary(self.settings)
        if self.settings.threads:
            import torch

            torch.set_num_threads(self.settings.threads)

    @property
    def limits(self) -> Limits:
        s = self.settings
        return Limits(max_pixels=s.max_pixels, max_batch=s.max_batch, max_steps=s.max_steps)

    # ------------------------------------------------------------------------------------- preparing
    def components_for(self, model: str | None, vae: str | None = None, *, allow_paths: bool = True) -> Components:
        components, _ = self._components_and_vae(model, vae, allow_paths=allow_paths)
        return components

    def _components_and_vae(
        self, model: str | None, vae: str | None, *, allow_paths: bool
    ) -> tuple[Components, ModelRef | None]:
        components = self.cache.load(model or "shapes", allow_paths=allow_paths)
        if not vae:
            return components, None
        vae_module, vae_ref = self.cache.load_vae(vae, allow_paths=allow_paths)
        return components.with_vae(vae_module), vae_ref

    def prepare(
        self,
        request: dict[str, Any],
        *,
        init_image: Image.Image | None = None,
        mask: Image.Image | None = None,
        allow_paths: bool = True,
    ) -> tuple[Recipe, GenerationInputs, Components]:
        """Validate a request and resolve everything it names; nothing runs yet."""
        request = dict(request)
        components, request["vae"] = self._components_and_vae(
            request.pop("model", None), request.get("vae"), allow_paths=allow_paths
        )
        defaults = components.recipe_defaults()
        kind = request.get("kind", "txt2img")
        inputs = GenerationInputs()
        if kind in ("img2img", "inpaint"):
            if init_image is None:
                raise UserError(f"{kind} needs an init image", field="init_image")
            if "size" not in request and "width" not in request:
                # The init image's own size, rounded down to a multiple of 8 (at least 8).
                defaults["width"] = max(8, init_image.width // 8 * 8)
                defaults["height"] = max(8, init_image.height // 8 * 8)
            request["init_image"] = self._store_input(init_image, request.pop("init_image_path", ""))
            inputs.init_image = init_image
            if kind == "inpaint":
                if mask is None:
                    raise UserError("inpaint needs a mask", field="mask")
                check_mask_size(init_image, mask)
                request["mask"] = self._store_input(mask, request.pop("mask_path", ""))
                inputs.mask = mask
        request.pop("init_image_path", None)
        request.pop("mask_path", None)
        request.pop("concepts", None)  # decided by the prompt and the library, below
        request["build"] = Build.current(self.settings.device, self.settings.dtype)
        recipe = make_recipe(request, defaults, limits=self.limits)
        recipe = recipe.with_(model=ModelRef(components.ref.name, components.ref.sha256))
        # Concepts: the library's names that the prompts mention, recorded with their file hashes.
        concepts, inputs.concepts = self.concepts.resolve(recipe.prompt, recipe.negative_prompt)
        check_concepts(inputs.concepts, components.text_encoder, components.ref.name)
        return recipe.with_(concepts=concepts), inputs, components

    def store_input(self, image: Image.Image) -> InputRef:
        """Keep an input picture by content hash (inputs/<sha256>.png), as init images and masks are kept."""
        return self._store_input(image, "")

    def _store_input(self, image: Image.Image, original_path: str) -> InputRef:
        """Keep init images and masks by content hash, so `reproduce` finds them later."""
        digest = image_sha256(image)
        target = self.settings.inputs_dir / f"{digest}.png"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp.png")
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

    # ------------------------------------------------------------------------------------ generating
    def run(
        self,
        recipe: Recipe,
        inputs: GenerationInputs,
        components: Components,
        *,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Result]:
        arrays = generate(components, recipe, inputs, progress=progress, cancel=cancel)
        return [Result(image, recipe.for_image(i)) for i, image in enumerate(to_pil(arrays))]

    def save(self, results: list[Result], out_dir: Path) -> list[Result]:
        out_dir.mkdir(parents=True, exist_ok=True)
        number = next_image_number(out_dir)
        saved = []
        for offset, result in enumerate(results):
            path = out_dir / f"{number + offset:05d}-{result.recipe.image_seed}.png"
            save_png(result.image, path, result.recipe)
            saved.append(Result(result.image, result.recipe, path))
        return saved

    # ------------------------------------------------------------------------------------ provenance
    def recipe_of(self, path: Path, model: str | None = None) -> tuple[Recipe, GenerationInputs, Components]:
        """The recipe inside an image, ready to run again (ours exactly; A1111/ComfyUI as far as they say)."""
        meta = read_metadata(path)
        if meta.recipe is not None:
            recipe = meta.recipe
            components = self._recorded_model(recipe, model)
            if model is None and recipe.model.sha256 and components.ref.sha256 != recipe.model.sha256:
                raise UserError(
                    f"model {recipe.model.name!r} has changed since this image was made (sha256 "
                    f"{recipe.model.short_hash} recorded, {components.ref.short_hash} now); pass --model to use "
                    "another model anyway",
                    field="model",
                )
            if recipe.vae:
                components = components.with_vae(self.cache.load_vae(recipe.vae.name)[0])
            inputs = GenerationInputs(
                init_image=self.load_input(recipe.init_image, "init_image") if recipe.init_image else None,
                mask=self.load_input(recipe.mask, "mask") if recipe.mask else None,
                concepts=self.concepts.vectors_for(recipe.concepts),  # each checked against its recorded hash
            )
            return validate(recipe, self.limits), inputs, components
        if meta.foreign is not None:
            # The model the other tool recorded, by name (A1111: "Model", ComfyUI: the checkpoint file), unless
            # the user names one; never silently another model.
            recorded = Path(str(meta.foreign["model"])).stem if meta.foreign.get("model") else None
            request = recipe_from_foreign(meta.foreign, model or recorded)
            recipe, inputs, components = self.prepare(request)
            return recipe, inputs, components
        raise UserError(f"{path} carries no recipe (no Spellbook, A1111 or ComfyUI metadata)", field="image")

    def components_for_recipe(self, recipe: Recipe) -> Components:
        """The components a validated recipe names (model by name or hash, its VAE), as a worker needs them."""
        components = self._recorded_model(recipe, None)
        if recipe.vae:
            components = components.with_vae(self.cache.load_vae(recipe.vae.name, allow_paths=False)[0])
        return components

    def inputs_for_recipe(self, recipe: Recipe) -> GenerationInputs:
        """The init image and mask a recipe references by hash, from the inputs folder."""
        return GenerationInputs(
            init_image=self.load_input(recipe.init_image, "init_image") if recipe.init_image else None,
            mask=self.load_input(recipe.mask, "mask") if recipe.mask else None,
            concepts=self.concepts.vectors_for(recipe.concepts),
        )

    def _recorded_model(self, recipe: Recipe, model: str | None) -> Components:
        """The model a recipe names; found by name, or by content hash when it was run from a path."""
        if model:
            return self.components_for(model)
        try:
            return self.components_for(recipe.model.name)
        except NotFound:
            for entry in self.cache.registry.list():
                if recipe.model.sha256 and self.cache.registry.sha256(entry) == recipe.model.sha256:
                    return self.cache.load_entry(entry)
            raise NotFound(
                f"model {recipe.model.name!r} (hash {recipe.model.short_hash}) is not in the models folder; "
                "add it with `spellbook models add PATH` or pass --model PATH",
                field="model",
            ) from None

    def reproduce(self, path: Path, model: str | None = None, progress: ProgressCallback | None = None) -> Result:
        """Run the recipe again: the whole batch, as it ran, and keep this image's place in it."""
        recipe, inputs, components = self.recipe_of(path, model)
        results = self.run(
            recipe.with_(build=Build.current(self.settings.device, self.settings.dtype)),
            inputs,
            components,
            progress=progress,
        )
        return results[recipe.batch_index]

    def verify(
        self, path: Path, model: str | None = None, progress: ProgressCallback | None = None
    ) -> tuple[Comparison, Result]:
        meta = read_metadata(path)
        if meta.recipe is None:
            raise UserError(f"{path} has no Spellbook recipe; only Spellbook images can be verified", field="image")
        result = self.reproduce(path, model=model, progress=progress)
        recorded = open_image(path)
        return compare(
            recorded, result.image, meta.recipe.build, Build.current(self.settings.device, self.settings.dtype)
        ), result


def next_image_number(out_dir: Path) -> int:
    numbers = [int(m.group(1)) for p in out_dir.glob("*.png") if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=0) + 1
