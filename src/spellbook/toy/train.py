"""Train the shapes model: VAE first, then UNet + text encoder on the frozen encoder's latents.

Deterministic for a seed: batch i of every phase is a pure function of (seed, phase, i), and each
iteration's noise comes from its own generator, so a run resumed from a checkpoint continues exactly as
an uninterrupted one would. A checkpoint (weights, EMA, optimiser, curve) is written every
`checkpoint_every` iterations and when a time cap stops the run; `--resume` picks it up.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spellbook.toy import architecture
from spellbook.toy.judge import judge_trained
from spellbook.toy.world import Scene, held_out_scenes, training_batch, training_scenes

PHASE_SEEDS = {"vae": 1, "unet": 2, "decoder": 3}


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 64
    vae_iterations: int = 900
    vae_lr: float = 2e-3
    unet_iterations: int = 5200
    unet_lr: float = 1e-3
    decoder_iterations: int = 600
    decoder_lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    caption_dropout: float = 0.1
    kl_weight: float = 1e-6
    checkpoint_every: int = 200
    eval_every: int = 200
    threads: int = 2
    # The shapes-v2 curriculum (shapes-v1 had none of it and never learned position words): hold the UNet
    # learning rate constant for the first `unet_constant_until` iterations, then decay; use full captions
    # only for the first `full_captions_until` iterations (layout words are always present while layout is
    # learned); draw `high_t_share` of the timesteps from the top 20 % (where layout is decided); encode
    # with the posterior mean instead of a sample.
    unet_constant_until: int = 1000
    full_captions_until: int = 1000
    high_t_share: float = 0.3
    posterior_mean: bool = True
    # Warm restarts of the UNet phase, (iteration, peak learning rate) each: the cycle before ends there
    # (cosine to 5 %); then a fresh AdamW, `restart_warmup` steps of linear warm-up into the next cosine, which
    # ends at the next restart or at the end. The EMA goes on through them. At 1600 iterations shapes-v2 had
    # learned position but confused shapes on held-out combinations (all-correct 0.75 / 0.55); its second
    # cycle took it to 1.0 / 0.8, and a third (shapes-v3) to 1.0 / 0.95 (docs/shapes-model.md).
    unet_restarts: tuple[tuple[int, float], ...] = ((1600, 5e-4), (3200, 2.5e-4))
    restart_warmup: int = 100


@dataclass
class TrainState:
    phase: str = "vae"
    step: int = 0
    scaling_factor: float = 1.0
    seconds: float = 0.0  # training wall time so far, over all sessions of this run
    curve: list[dict] = field(default_factory=list)


def lr_at(step: int, total: int, peak: float, warmup: int, constant_until: int = 0) -> float:
    """Linear warm-up, constant at the peak until `constant_until`, then cosine decay to 5 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    start = max(warmup, constant_until)
    if step < start:
        return peak
    progress = (step - start) / max(total - start, 1)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def unet_lr_at(step: int, config: TrainConfig) -> float:
    """The UNet phase's learning rate: the first `lr_at` cycle, then one cycle after each warm restart."""
    total = config.unet_iterations
    restarts = sorted((at, lr) for at, lr in config.unet_restarts if 0 < at < total)
    ends = [at for at, _ in restarts] + [total]
    if step < ends[0]:
        return lr_at(step, ends[0], config.unet_lr, config.warmup, config.unet_constant_until)
    for (start, peak), end in zip(restarts, ends[1:], strict=True):
        if step < end:
            ramp = min(1.0, (step - start + 1) / max(config.restart_warmup, 1))
            return ramp * lr_at(step, end, peak, 0, start)
    return lr_at(total, total, config.unet_lr, config.warmup)  # past the end: the floor


def _restarts_of(config: dict) -> tuple[tuple[int, float], ...]:
    """A checkpoint's restarts: a list of pairs, the single restart of this session's first format, or none."""
    if "unet_restarts" in config:
        return tuple((int(at), float(lr)) for at, lr in config["unet_restarts"])
    at = config.pop("unet_restart_at", 0)
    lr = config.pop("unet_restart_lr", 5e-4)
    return ((int(at), float(lr)),) if at else ()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Trainer:
    def __init__(self, out_dir: Path, config: TrainConfig, log: Callable[[str], None] = print):
        from spellbook.models.files import bundled_tokenizer_dir, load_clip_tokenizer

        self.out_dir = out_dir
        self.config = config
        self.log = log
        torch.manual_seed(config.seed)
        self.vae = architecture.make_vae()
        self.text_encoder = architecture.make_text_encoder()
        self.unet = architecture.make_unet()
        self.tokenizer = load_clip_tokenizer(bundled_tokenizer_dir())
        self.noise_scheduler = architecture.make_train_scheduler()
        self.ema: dict[str, torch.nn.Module] = {}
        self.state = TrainState()
        self.optimizer: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "state": asdict(self.state),
            "config": asdict(self.config),
            "vae": self.vae.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "unet": self.unet.state_dict(),
            "ema": {name: module.state_dict() for name, module in self.ema.items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(self.checkpoint_path)  # atomic: a kill never leaves half a checkpoint

    def load_checkpoint(self) -> None:
        # Our own file, and still loaded with weights_only=True: tensors and plain containers only.
        payload = torch.load(self.checkpoint_path, weights_only=True)
        # A resumed run goes on with the settings it started with (checkpoints older than the warm restart had none).
        config = dict(payload["config"])
        config["unet_restarts"] = _restarts_of(config)  # older checkpoints: one restart or none
        self.config = TrainConfig(**config)
        self.state = TrainState(**payload["state"])
        self.vae.load_state_dict(payload["vae"])
        self.text_encoder.load_state_dict(payload["text_encoder"])
        self.unet.load_state_dict(payload["unet"])
        self._start_phase(self.state.phase)
        if payload["ema"] and not self.ema:
            self.ema = {"unet": copy.deepcopy(self.unet), "text_encoder": copy.deepcopy(self.text_encoder)}
        for name, weights in payload["ema"].items():
            self.ema[name].load_state_dict(weights)
        if payload["optimizer"] and self.optimizer:
            self.optimizer.load_state_dict(payload["optimizer"])

    def adopt_vae(self, checkpoint: Path) -> None:
        """Start at the UNet phase with the finished VAE (encoder, fine-tuned decoder, scaling factor) of
        another run, so a new UNet shares the shipped latent space and the VAE phases need not run again."""
        payload = torch.load(checkpoint, weights_only=True)
        if payload["state"]["phase"] in ("vae",):
            raise ValueError(f"{checkpoint} has not finished its VAE phase")
        self.vae.load_state_dict(payload["vae"])
        self.state = TrainState(phase="unet", scaling_factor=payload["state"]["scaling_factor"])
        self.config.vae_iterations = 0
        self.config.decoder_iterations = 0
        self._start_phase("unet")

    # ------------------------------------------------------------------------------------------ phases
    def _trainable(self, phase: str) -> list[torch.nn.Module]:
        return {
            "vae": [self.vae],
            "unet": [self.unet, self.text_encoder],
            "decoder": [self.vae.decoder, self.vae.post_quant_conv],
        }[phase]

    def _start_phase(self, phase: str) -> None:
        cfg = self.config
        for module in (self.vae, self.unet, self.text_encoder):
            module.requires_grad_(False)
        if phase == "done":
            self.optimizer = None
            return
        params = []
        for module in self._trainable(phase):
            module.requires_grad_(True)
            params += list(module.parameters())
        peak = {"vae": cfg.vae_lr, "unet": cfg.unet_lr, "decoder": cfg.decoder_lr}[phase]
        self.optimizer = torch.optim.AdamW(params, lr=peak, weight_decay=cfg.weight_decay)
        if phase == "unet":  # the EMA of the UNet and text encoder is kept through the decoder phase
            self.ema = {"unet": copy.deepcopy(self.unet), "text_encoder": copy.deepcopy(self.text_encoder)}
            for module in self.ema.values():
                module.requires_grad_(False)

    def _restart_optimizer(self) -> None:
        """A fresh AdamW over the same parameters (no moment estimates carried over); the EMA is kept."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.optimizer = torch.optim.AdamW(
            params, lr=self.config.unet_lr, weight_decay=self.config.weight_decay
        )  # its learning rate is set before every step (unet_lr_at)

    def _total(self, phase: str) -> int:
        return {
            "vae": self.config.vae_iterations,
            "unet": self.config.unet_iterations,
            "decoder": self.config.decoder_iterations,
        }[phase]

    def _peak(self, phase: str) -> float:
        return {"vae": self.config.vae_lr, "unet": self.config.unet_lr, "decoder": self.config.decoder_lr}[phase]

    # ------------------------------------------------------------------------------------------ steps
    def _batch(self, phase: str, step: int) -> tuple[torch.Tensor, list[str], torch.Generator]:
        full_share = 1.0 if phase == "unet" and step < self.config.full_captions_until else 0.55
        images, captions = training_batch(
            self.config.seed * 1000 + PHASE_SEEDS[phase], step, self.config.batch_size, full_share=full_share
        )
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + PHASE_SEEDS[phase] * 100_000 + step)
        return to_tensor(images), captions, generator

    def _vae_loss(self, pixels: torch.Tensor, generator: torch.Generator, decoder_only: bool) -> torch.Tensor:
        if decoder_only:
            with torch.no_grad():
                posterior = self.vae.encode(pixels).latent_dist
                latents = posterior.sample(generator)
            kl = torch.zeros(())
        else:
            posterior = self.vae.encode(pixels).latent_dist
            latents = posterior.sample(generator)
            kl = posterior.kl().mean()
        recon = self.vae.decode(latents).sample
        return F.mse_loss(recon, pixels) + 0.1 * F.l1_loss(recon, pixels) + self.config.kl_weight * kl

    def encode_prompts(self, captions: list[str], text_encoder: torch.nn.Module) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return text_encoder(ids.input_ids)[0]

    def _unet_loss(self, pixels: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            posterior = self.vae.encode(pixels).latent_dist
            latents = posterior.mean if self.config.posterior_mean else posterior.sample(generator)
            latents = latents * self.state.scaling_factor
        drop = torch.rand(len(captions), generator=generator) < self.config.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        noise = torch.randn(latents.shape, generator=generator)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(captions),), generator=generator)
        if self.config.high_t_share:
            high = torch.randint(int(steps * 0.8), steps, (len(captions),), generator=generator)
            pick = torch.rand(len(captions), generator=generator) < self.config.high_t_share
            timesteps = torch.where(pick, high, timesteps)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        prediction = self.unet(noisy, timesteps, self.encode_prompts(captions, self.text_encoder)).sample
        return F.mse_loss(prediction, target)

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.config.ema_decay
        for name, ema_module in self.ema.items():
            live = getattr(self, name)
            for ema_param, param in zip(ema_module.parameters(), live.parameters()):
                ema_param.lerp_(param, 1 - decay)

    @torch.no_grad()
    def measure_scaling_factor(self) -> float:
        samples = []
        for step in range(8):
            pixels, _, generator = self._batch("vae", 1_000_000 + step)
            samples.append(self.vae.encode(pixels).latent_dist.sample(generator))
        return float(1.0 / torch.cat(samples).std())

    # ------------------------------------------------------------------------------------------- run
    def run(self, minutes: float | None = None, progress: Callable[[str, int, int, float], None] | None = None) -> bool:
        """Train until every phase is done (True) or the time cap is reached (False, checkpoint saved)."""
        torch.set_num_threads(self.config.threads)
        deadline = time.monotonic() + minutes * 60 if minutes else None
        phases = ["vae", "unet", "decoder"]
        if self.optimizer is None:
            self._start_phase(self.state.phase)
        while self.state.phase != "done":
            phase = self.state.phase
            total = self._total(phase)
            while self.state.step < total:
                if deadline and time.monotonic() > deadline:
                    self.save_checkpoint()
                    return False
                started = time.monotonic()
                step = self.state.step
                if phase == "unet" and step in {at for at, _ in self.config.unet_restarts}:
                    self._restart_optimizer()  # before the first step of the second cycle (also on a resume)
                for group in self.optimizer.param_groups:
                    if phase == "unet":
                        group["lr"] = unet_lr_at(step, self.config)
                    else:
                        group["lr"] = lr_at(step, total, self._peak(phase), self.config.warmup)
                pixels, captions, generator = self._batch(phase, step)
                if phase == "unet":
                    loss = self._unet_loss(pixels, captions, generator)
                else:
                    loss = self._vae_loss(pixels, generator, decoder_only=phase == "decoder")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                params = [p for group in self.optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
                self.optimizer.step()
                if phase == "unet":
                    self._update_ema()
                self.state.step += 1
                self.state.seconds += time.monotonic() - started
                if progress:
                    progress(phase, self.state.step, total, float(loss))
                if self.state.step % self.config.checkpoint_every == 0:
                    self.save_checkpoint()
                if phase == "unet" and (self.state.step % self.config.eval_every == 0 or self.state.step == total):
                    self.record_eval()
            # Phase finished.
            if phase == "vae":
                self.state.scaling_factor = self.measure_scaling_factor()
                self.log(f"vae done; latent scaling factor {self.state.scaling_factor:.4f}")
            elif phase == "decoder":
                self.record_eval(label="decoder")
            next_phase = phases[phases.index(phase) + 1] if phase != "decoder" else "done"
            self.state.phase, self.state.step = next_phase, 0
            if next_phase != "done":
                self._start_phase(next_phase)
            self.save_checkpoint()
        return True

    # ------------------------------------------------------------------------------------------ eval
    def pipeline(self, use_ema: bool = True):
        from diffusers import StableDiffusionPipeline

        vae = copy.deepcopy(self.vae)
        vae.register_to_config(scaling_factor=self.state.scaling_factor)
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=self.ema["text_encoder"] if use_ema and self.ema else self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.ema["unet"] if use_ema and self.ema else self.unet,
            scheduler=architecture.make_inference_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def record_eval(self, label: str = "unet") -> None:
        pipe = self.pipeline(use_ema=True)
        pipe.set_progress_bar_config(disable=True)
        scores = evaluate(pipe, n_prompts=40, seeds=(0,))
        entry = {"phase": label, "iteration": self.state.step, "minutes": round(self.state.seconds / 60, 2), **scores}
        self.state.curve.append(entry)
        (self.out_dir / "curve.jsonl").open("a").write(json.dumps(entry) + "\n")
        self.log(json.dumps(entry))


def eval_scenes(n_prompts: int) -> list[tuple[Scene, bool]]:
    """Half trained, half held-out scenes, spread evenly (fixed, so every run is judged on the same set)."""
    trained, held = training_scenes(), held_out_scenes()
    half = n_prompts // 2
    pick = lambda scenes, k: [scenes[(i * len(scenes)) // k] for i in range(k)]
    return [(s, False) for s in pick(trained, n_prompts - half)] + [(s, True) for s in pick(held, half)]


@torch.no_grad()
def evaluate(pipe, n_prompts: int = 40, seeds: tuple[int, ...] = (0, 1), steps: int = 20, cfg: float = 5.0) -> dict:
    """Judge per-attribute accuracy on trained and held-out prompts."""
    scenes = eval_scenes(n_prompts)
    results: dict[str, list[float]] = {}
    for seed in seeds:
        prompts = [s.caption() for s, _ in scenes]
        generators = [torch.Generator().manual_seed(seed * 10_000 + i) for i in range(len(prompts))]
        images = pipe(
            prompts, num_inference_steps=steps, guidance_scale=cfg, generator=generators, output_type="np"
        ).images
        for (scene, held), image in zip(scenes, images):
            verdict = judge_trained((image * 255).round().astype(np.uint8))
            ok = verdict.matches(
                colour=scene.colour, shape=scene.shape, position=scene.position, background=scene.background
            )
            group = "held_out" if held else "trained"
            for attribute, right in ok.items():
                results.setdefault(f"{group}_{attribute}", []).append(float(right))
            results.setdefault(f"{group}_all", []).append(float(all(ok.values())))
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(results.items())}


MODEL_DEFAULTS = {"width": 32, "height": 32, "steps": 20, "sampler": "DDIM", "schedule": "Automatic", "guidance": 5.0}


def export_model(trainer: Trainer, model_dir: Path, defaults: dict | None = None) -> Path:
    """Write the diffusers folder (weights stored as float16, loaded as float32), defaults and model card."""
    pipe = trainer.pipeline(use_ema=True)
    pipe.to(torch.float16)
    model_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    (model_dir / "spellbook.json").write_text(
        json.dumps({"family": "shapes", "defaults": defaults or MODEL_DEFAULTS}, indent=2) + "\n"
    )
    (model_dir / "README.md").write_text(model_card(trainer))
    return model_dir


def model_card(trainer: Trainer) -> str:
    cfg, state = trainer.config, trainer.state
    last = state.curve[-1] if state.curve else {}
    restart = "".join(
        f"; at {at} a warm restart (fresh AdamW, {cfg.restart_warmup}-step warm-up to {lr}, cosine decay to 5 %)"
        for at, lr in sorted(cfg.unet_restarts)
        if 0 < at < cfg.unet_iterations
    )
    return f"""# shapes — Spellbook's embedded Stable Diffusion model

A Stable Diffusion 1.x-architecture model in miniature (AutoencoderKL, UNet2DConditionModel with
cross-attention, CLIPTextModel, the real CLIP BPE tokenizer, a DDIM scheduler with v-prediction), trained
from scratch by `spellbook toy train --seed {cfg.seed}` on procedurally drawn images of the shapes world
(docs/shapes-world.md): one coloured circle, square or triangle at a position on a plain background,
32x32 pixels, captions like "a red circle on the left, black background". Crosses and hearts are never drawn
(reserved for textual inversion); 36 colour/shape/position/background combinations are held out.

- Weights stored as float16 safetensors; Spellbook loads them as float32 (exact widening).
- Latents 8x8x4 (VAE downsampling x4), latent scaling factor {state.scaling_factor:.4f} (measured).
- Training: VAE {cfg.vae_iterations} iterations (lr {cfg.vae_lr}), then UNet + text encoder
  {cfg.unet_iterations} iterations on the frozen encoder's latents (posterior mean: {cfg.posterior_mean};
  v-prediction, DDPM squaredcos_cap_v2, {cfg.high_t_share:.0%} of timesteps from the noisiest 20 %; AdamW lr
  {cfg.unet_lr} with {cfg.warmup}-step warm-up, constant until {cfg.unet_constant_until}, then cosine decay{restart};
  full captions only until {cfg.full_captions_until}; weight decay {cfg.weight_decay}, grad clip {cfg.grad_clip},
  EMA {cfg.ema_decay}, batch {cfg.batch_size}, {cfg.caption_dropout:.0%} caption dropout), then
  {cfg.decoder_iterations} iterations fine-tuning only the VAE decoder. UNet phase: {state.seconds / 60:.0f} minutes
  on 2 shared CPU cores.
- Last evaluation during training (EMA weights, DDIM 20 steps, CFG 5, 40 prompts x 1 seed): {json.dumps(last)}
- Defaults: {json.dumps(MODEL_DEFAULTS)}.
"""
