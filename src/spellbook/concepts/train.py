"""Textual inversion: learn the vectors of a new word from a few pictures, with the model frozen.

The recipe (Gal et al. 2022, as diffusers' `textual_inversion.py` and A1111 train it):
1. The concept gets `vectors` new token ids past the end of the vocabulary, initialised from an existing word.
2. Each step draws a batch of the pictures (augmented: flips, small shifts), writes a caption for each from a
   randomised template ("a photo of a {}") or the picture's own caption file, and noises the pictures'
   latents at random timesteps.
3. The frozen UNet predicts the model's own target (epsilon or v) from the captions' encoding; the loss's
   gradient reaches only the new rows. The VAE, UNet, text encoder and tokenizer are never changed: the rows
   live in a per-call view of the text encoder (engine/prompts.py), the same one generation uses.

Deterministic for a seed: step i's batch, augmentation, timesteps and noise come from a generator seeded with
(seed, i). A checkpoint (vectors + optimiser state) is written every `checkpoint_every` steps and when the run
is interrupted (Ctrl-C), so a resumed run goes on exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from spellbook.concepts.formats import Concept
from spellbook.engine.prompts import ConceptTokens, tokenize, with_token_rows
from spellbook.errors import UserError
from spellbook.models.components import Components

if TYPE_CHECKING:
    from spellbook.concepts.library import ConceptInfo, ConceptLibrary
    from spellbook.studio import Studio

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CHECKPOINT = "checkpoint.safetensors"

# The textual-inversion paper's object templates ("imagenet_templates_small").
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a rendition of a {}",
    "a good photo of a {}",
    "a photo of a nice {}",
    "a photo of the small {}",
    "a photo of the large {}",
)
# The shapes model knows only its own caption grammar (docs/shapes-world.md); other words are noise to it.
SHAPES_TEMPLATES = ("a {}", "a {}", "{}")


def default_templates(components: Components) -> tuple[str, ...]:
    return SHAPES_TEMPLATES if components.family == "shapes" else OBJECT_TEMPLATES


@dataclass
class TrainConfig:
    name: str
    init_word: str = "*"  # the vectors start as this word's embedding (A1111's default init text is "*")
    vectors: int = 1
    steps: int = 400
    lr: float = 5e-3
    batch_size: int = 8
    seed: int = 0
    flip: float = 0.5  # probability of a horizontal flip (0 for concepts that are not mirror-symmetric)
    shift: float = 0.0  # random translation, up to this fraction of the side (edges repeated)
    templates: tuple[str, ...] = ()  # "{}" is the concept; empty: the model family's default templates
    high_t_share: float = 0.0  # share of timesteps drawn from the noisier half, where shapes are decided
    checkpoint_every: int = 50
    model: str = ""  # what the concept is trained for (recorded in the file)
    model_sha256: str = ""
    image_hashes: tuple[str, ...] = ()  # the training pictures, so --resume checks they are the same

    def __post_init__(self) -> None:
        if self.vectors < 1 or self.vectors > 75:
            raise UserError(f"vectors {self.vectors}: must be between 1 and 75", field="vectors")
        if self.steps < 1:
            raise UserError(f"steps {self.steps}: must be at least 1", field="steps")
        if not 0 < self.lr <= 1:
            raise UserError(f"lr {self.lr:g}: must be above 0 and at most 1", field="lr")
        if self.batch_size < 1:
            raise UserError(f"batch size {self.batch_size}: must be at least 1", field="batch_size")
        if not 0 <= self.flip <= 1 or not 0 <= self.shift < 0.5:
            raise UserError("flip is a probability (0-1) and shift a fraction below 0.5", field="augmentation")
        for template in self.templates:
            if "{}" not in template:
                raise UserError(f"caption template {template!r} has no '{{}}' for the concept", field="templates")


@dataclass
class TrainState:
    step: int = 0
    seconds: float = 0.0  # training wall time so far, over all sessions of this run
    losses: list[float] = field(default_factory=list)  # mean loss of each block of `checkpoint_every` steps


@dataclass(frozen=True)
class TrainingImage:
    pixels: torch.Tensor  # (3, size, size) in [-1, 1]
    captions: tuple[str, ...]  # from the picture's caption file; empty: use the templates
    sha256: str


def load_images(folder: Path, size: int, trigger: str) -> list[TrainingImage]:
    """The pictures of a folder, centre-cropped to a square and resized to the model's native size.

    `photo.png` may come with `photo.txt`: one caption per line, picked at random each time; `{}` or the
    concept's trigger (`<name>` / `name`) marks where the concept goes.
    """
    from spellbook.provenance import image_sha256, open_image

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of pictures", field="images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UserError(f"{folder} holds no pictures ({', '.join(IMAGE_SUFFIXES)})", field="images")
    images = []
    for path in paths:
        image = open_image(path, "images").convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        if image.size != (size, size):
            image = image.resize((size, size), Image.LANCZOS)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        captions: tuple[str, ...] = ()
        caption_file = path.with_suffix(".txt")
        if caption_file.is_file():
            lines = [line.strip() for line in caption_file.read_text(encoding="utf-8").splitlines() if line.strip()]
            captions = tuple(_as_template(line, trigger) for line in lines)
        images.append(TrainingImage(pixels.contiguous(), captions, image_sha256(image)))
    return images


def _as_template(caption: str, trigger: str) -> str:
    if "{}" in caption:
        return caption
    for form in (f"<{trigger}>", trigger):
        if form in caption:
            return caption.replace(form, "{}", 1)
    raise UserError(f"caption {caption!r} does not name the concept: write {{}} or <{trigger}> in it", field="images")


Progress = Callable[[int, int, float], None]  # (step, total, loss)


class ConceptTrainer:
    def __init__(self, components: Components, images: list[TrainingImage], config: TrainConfig, work_dir: Path):
        if not images:
            raise UserError("textual inversion needs at least one picture", field="images")
        self.components = components
        self.images = images
        self.config = config
        self.work_dir = Path(work_dir)
        self.state = TrainState()
        self.templates = tuple(config.templates) or default_templates(components)
        self.vocab_size = components.text_encoder.get_input_embeddings().num_embeddings
        self.vectors = torch.nn.Parameter(self._initial_vectors())
        self.optimizer = torch.optim.AdamW([self.vectors], lr=config.lr, weight_decay=0.0)
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(components.scheduler_config)
        if not config.image_hashes:
            config.image_hashes = tuple(image.sha256 for image in images)

    def _initial_vectors(self) -> torch.Tensor:
        """Every vector starts as the init word's embedding (the mean of its tokens if it has several)."""
        tokenizer, table = self.components.tokenizer, self.components.text_encoder.get_input_embeddings().weight
        ids = tokenizer(self.config.init_word, add_special_tokens=False).input_ids
        if not ids:
            raise UserError(f"init word {self.config.init_word!r} has no tokens", field="init_word")
        start = table.detach()[ids].float().mean(dim=0)
        return start.repeat(self.config.vectors, 1).clone()

    # ----------------------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / CHECKPOINT

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """The trainable state (a few KB), copied: what a checkpoint of this moment holds."""
        tensors = {"vectors": self.vectors.detach().clone()}
        for key, value in self.optimizer.state.get(self.vectors, {}).items():
            tensors[f"adam.{key}"] = torch.as_tensor(value).detach().clone()
        return tensors

    def save_checkpoint(self, snapshot: dict[str, torch.Tensor] | None = None, state: TrainState | None = None) -> None:
        from safetensors.torch import save_file

        self.work_dir.mkdir(parents=True, exist_ok=True)
        metadata = {"config": json.dumps(asdict(self.config)), "state": json.dumps(asdict(state or self.state))}
        tmp = self.checkpoint_path.with_suffix(".tmp")
        save_file(snapshot or self._snapshot(), str(tmp), metadata=metadata)
        tmp.replace(self.checkpoint_path)  # atomic: an interrupted save never leaves half a checkpoint

    @staticmethod
    def read_config(work_dir: Path) -> TrainConfig:
        from safetensors import safe_open

        with safe_open(str(Path(work_dir) / CHECKPOINT), framework="pt") as handle:
            data = json.loads(handle.metadata()["config"])
        data["templates"] = tuple(data["templates"])
        data["image_hashes"] = tuple(data["image_hashes"])
        return TrainConfig(**data)

    def load_checkpoint(self) -> None:
        from safetensors import safe_open

        with safe_open(str(self.checkpoint_path), framework="pt") as handle:
            names = handle.keys()  # a safetensors handle is not iterable itself
            tensors = {key: handle.get_tensor(key) for key in names}
            state = json.loads(handle.metadata()["state"])
        hashes = tuple(image.sha256 for image in self.images)
        if self.config.image_hashes and hashes != self.config.image_hashes:
            raise UserError(
                "the pictures differ from those this training started with; resume with the same --images folder",
                field="images",
            )
        self.state = TrainState(**state)
        with torch.no_grad():
            self.vectors.copy_(tensors["vectors"])
        adam = {key.removeprefix("adam."): value for key, value in tensors.items() if key.startswith("adam.")}
        if adam:
            saved = self.optimizer.state_dict()
            saved["state"] = {0: adam}
            self.optimizer.load_state_dict(saved)

    # ------------------------------------------------------------------------------------------------ steps
    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)

    def _batch(self, step: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        cfg = self.config
        picks = torch.randint(len(self.images), (cfg.batch_size,), generator=generator).tolist()
        pixels, captions = [], []
        for index in picks:
            image = self.images[index]
            templates = image.captions or self.templates
            template = templates[int(torch.randint(len(templates), (1,), generator=generator))]
            captions.append(template.replace("{}", f"<{cfg.name}>"))
            x = image.pixels
            if float(torch.rand((), generator=generator)) < cfg.flip:
                x = x.flip(-1)
            if cfg.shift:
                x = _shift(x, cfg.shift, generator)
            pixels.append(x)
        return torch.stack(pixels), captions

    def _encode(self, captions: list[str]) -> torch.Tensor:
        """The captions' conditioning, through the same token view generation uses."""
        text_encoder = self.components.text_encoder
        tokens = ConceptTokens.build({self.config.name: self.vectors}, self.vocab_size)
        ids = torch.tensor([tokenize(self.components.tokenizer, c, concepts=tokens).ids[0] for c in captions])
        view = with_token_rows(text_encoder, tokens.rows.to(text_encoder.device, text_encoder.dtype))
        return view(ids.to(text_encoder.device))[0]

    def _loss(self, step: int) -> torch.Tensor:
        c = self.components
        generator = self._generator(step)
        pixels, captions = self._batch(step, generator)
        device, dtype = c.unet.device, c.unet.dtype
        with torch.no_grad():
            posterior = c.vae.encode(pixels.to(device, c.vae.dtype)).latent_dist
            sample = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
            latents = (sample * c.vae.config.scaling_factor).to(dtype)
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(captions),), generator=generator)
        if self.config.high_t_share:
            high = torch.randint(steps // 2, steps, (len(captions),), generator=generator)
            timesteps = torch.where(
                torch.rand(len(captions), generator=generator) < self.config.high_t_share, high, timesteps
            )
        timesteps = timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = c.unet(noisy, timesteps, self._encode(captions).to(dtype)).sample
        return F.mse_loss(prediction.float(), target.float())

    def run(self, progress: Progress | None = None, stop_after: int | None = None) -> bool:
        """Train to `config.steps` (True), or stop early (False) after `stop_after` steps of this session.
        On Ctrl-C the checkpoint of the last finished step is written and KeyboardInterrupt re-raised."""
        total = self.config.steps
        done_this_session = 0
        block: list[float] = []
        # The state after the last finished step (a few KB): an interrupt mid-step may leave the optimiser
        # half applied, so that is what an interrupt saves.
        last_finished = (self._snapshot(), TrainState(**asdict(self.state)))
        try:
            while self.state.step < total:
                if stop_after is not None and done_this_session >= stop_after:
                    self.save_checkpoint()
                    return False
                started = time.monotonic()
                with torch.enable_grad():
                    loss = self._loss(self.state.step)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                self.optimizer.step()
                self.state.step += 1
                self.state.seconds += time.monotonic() - started
                done_this_session += 1
                block.append(float(loss.detach()))
                if self.state.step % self.config.checkpoint_every == 0 or self.state.step == total:
                    self.state.losses.append(round(sum(block) / len(block), 6))
                    block = []
                    self.save_checkpoint()
                last_finished = (self._snapshot(), TrainState(**asdict(self.state)))
                if progress is not None:
                    progress(self.state.step, total, float(loss.detach()))
        except KeyboardInterrupt:
            self.save_checkpoint(*last_finished)
            raise
        return True

    # ------------------------------------------------------------------------------------------------ result
    def concept(self) -> Concept:
        cfg = self.config
        metadata = {
            "name": cfg.name,
            "model": cfg.model,
            "model_sha256": cfg.model_sha256,
            "steps": str(self.state.step),
            "init_word": cfg.init_word,
            "lr": f"{cfg.lr:g}",
            "seed": str(cfg.seed),
            "images": str(len(self.images)),
            "trainer": "spellbook",
        }
        return Concept(cfg.name, self.vectors.detach().clone(), f"<{cfg.name}>", metadata=metadata)


def _shift(x: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Translate by up to `fraction` of the side in each direction, repeating the edge pixels."""
    size = x.shape[-1]
    pad = max(1, round(size * fraction))
    dx, dy = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
    padded = F.pad(x[None], (pad, pad, pad, pad), mode="replicate")[0]
    return padded[:, dy : dy + size, dx : dx + size]


# --- one training run, end to end (what `spellbook concept train` calls) ----------------------------------------


@dataclass(frozen=True)
class TrainRequest:
    """What the user chose; None = the default (or, with `resume`, what the interrupted run used)."""

    name: str
    images: Path
    model: str | None = None
    init_word: str | None = None
    vectors: int = 1
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    seed: int = 0
    flip: float = 0.5
    shift: float = 0.0
    templates: tuple[str, ...] = ()
    resume: bool = False
    overwrite: bool = False
    sample: bool = True  # generate a sample grid ("a <name>", 4 seeds) for `concept info`


@dataclass(frozen=True)
class TrainResult:
    info: ConceptInfo
    steps: int
    minutes: float
    final_loss: float


def training_dir(library: ConceptLibrary, name: str) -> Path:
    return library.folder / ".training" / name


def train_concept(
    studio: Studio, request: TrainRequest, progress: Progress | None = None, stop_after: int | None = None
) -> TrainResult | None:
    """Train a concept into the studio's library. Returns a TrainResult, or None when stopped early
    (`stop_after` steps) with its checkpoint kept; Ctrl-C keeps the checkpoint too and re-raises."""
    import shutil

    from spellbook.concepts.library import check_concept_name

    library = studio.concepts
    # 1. Check everything that can be checked before minutes of training.
    name = check_concept_name(request.name)
    library.check_free(name, request.overwrite)
    work_dir = training_dir(library, name)
    has_checkpoint = (work_dir / CHECKPOINT).is_file()
    if has_checkpoint and not request.resume:
        raise UserError(
            f"an interrupted training of <{name}> is in {work_dir}; pass --resume to continue it, or remove that "
            "folder to start over",
            field="resume",
        )
    if request.resume and not has_checkpoint:
        raise UserError(
            f"there is no interrupted training of <{name}> to resume (looked in {work_dir})", field="resume"
        )
    # 2. The settings: the interrupted run's own on --resume, else the request's over the defaults.
    if request.resume:
        config = ConceptTrainer.read_config(work_dir)
        model = request.model or config.model  # a model given by path is found by --model again
        components = studio.components_for(model)
        if config.model_sha256 and components.ref.sha256 != config.model_sha256:
            raise UserError(
                f"model {config.model!r} has changed since this training started; it cannot be resumed", field="model"
            )
    else:
        model = request.model
        components = studio.components_for(model)
        chosen = {
            "init_word": request.init_word,
            "steps": request.steps,
            "lr": request.lr,
            "batch_size": request.batch_size,
        }
        config = TrainConfig(
            name=name,
            vectors=request.vectors,
            seed=request.seed,
            flip=request.flip,
            shift=request.shift,
            templates=tuple(request.templates),
            model=components.ref.name,
            model_sha256=components.ref.sha256,
            **{k: v for k, v in chosen.items() if v is not None},
        )
    images = load_images(request.images, components.native_size, name)
    # 3. Train.
    trainer = ConceptTrainer(components, images, config, work_dir)
    if request.resume:
        trainer.load_checkpoint()
    if not trainer.run(progress=progress, stop_after=stop_after):
        return None
    # 4. Into the library, with a sample grid; the checkpoint is no longer needed.
    path = library.add(trainer.concept(), overwrite=request.overwrite)
    if request.sample:
        from spellbook.recipe import ImageRequest

        recipe = studio.plan(
            ImageRequest(prompt=f"a <{name}>", seed=0, batch_size=4, model=model or components.ref.name)
        )
        grid = image_grid([r.image for r in studio.run(recipe)], columns=4)
        grid.save(path.with_suffix(".png"))
    shutil.rmtree(work_dir, ignore_errors=True)
    final_loss = trainer.state.losses[-1] if trainer.state.losses else float("nan")
    return TrainResult(library.info(name), trainer.state.step, trainer.state.seconds / 60, final_loss)


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid
