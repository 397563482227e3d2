"""Sampler names as AUTOMATIC1111 shows them -> diffusers schedulers, built from the model's own config.

One table, one signature: `make_scheduler(sampler, schedule, model_scheduler_config)`. The mapping follows
diffusers' documented A1111 equivalents. `check_pair` says, from the scheduler config alone (no weights), whether a
sampler and schedule can run on a model, so the API can refuse a pair when it is submitted, not when it runs.

Karras and Exponential spacings start at `SD_SIGMA_MAX` on models whose noise schedule goes beyond it (cosine
and zero-terminal-SNR schedules); docs/samplers.md says why and what was measured.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from spellbook.errors import UserError
from spellbook.recipe import SAMPLERS


@dataclass(frozen=True)
class SamplerSpec:
    scheduler_class: type
    options: dict[str, Any] = field(default_factory=dict)
    # False where the scheduler draws one noise stream for the whole batch (a Brownian tree seeded once):
    # the engine then runs such a batch image by image, so image i still equals a run with seed + i.
    batch_invariant: bool = True
    # Schedules refused on models whose noise schedule goes beyond SD's (`beyond_sd`: cosine, zero terminal SNR),
    # each with why; measured on the shapes model (docs/samplers.md).
    refused_beyond_sd: dict[str, str] = field(default_factory=dict)

    def accepts(self, option: str) -> bool:
        return option in inspect.signature(self.scheduler_class.__init__).parameters


# Why a pair is refused on models beyond SD's noise range ({sigma}: that model's largest sigma).
_FIRST_STEP = (
    "its first Automatic step drops from the model's largest sigma ({{sigma:.0f}}) by orders of magnitude, and {what} "
    "breaks down over it"
)

SAMPLER_SPECS: dict[str, SamplerSpec] = {
    "Euler": SamplerSpec(EulerDiscreteScheduler),
    "Euler a": SamplerSpec(EulerAncestralDiscreteScheduler),
    "Heun": SamplerSpec(
        HeunDiscreteScheduler, refused_beyond_sd={"Automatic": _FIRST_STEP.format(what="its second-order correction")}
    ),
    "DPM2": SamplerSpec(KDPM2DiscreteScheduler),
    "DPM2 a": SamplerSpec(
        KDPM2AncestralDiscreteScheduler, refused_beyond_sd={"Automatic": _FIRST_STEP.format(what="its ancestral step")}
    ),
    "DPM++ 2M": SamplerSpec(DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE": SamplerSpec(DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ SDE": SamplerSpec(DPMSolverSDEScheduler, batch_invariant=False),
    "DPM++ 2S": SamplerSpec(DPMSolverSinglestepScheduler, {"solver_order": 2}),
    "DDIM": SamplerSpec(DDIMScheduler),
    "PLMS": SamplerSpec(
        PNDMScheduler,
        {"skip_prk_steps": True},
        refused_beyond_sd={"Automatic": _FIRST_STEP.format(what="its multistep extrapolation (colours drift)")},
    ),
    "LMS": SamplerSpec(
        LMSDiscreteScheduler,
        refused_beyond_sd={
            "Karras": "diffusers' LMS spaces Karras sigmas up to the model's largest sigma ({sigma:.0f}), ignoring "
            "the cap at SD's 14.6 that the other samplers take, so most of its steps fall on pure noise"
        },
    ),
    "UniPC": SamplerSpec(UniPCMultistepScheduler),
}
SCHEDULE_OPTIONS = {"Karras": "use_karras_sigmas", "Exponential": "use_exponential_sigmas"}
assert set(SAMPLER_SPECS) == set(SAMPLERS), "recipe.SAMPLERS and the scheduler table must name the same samplers"

# The largest sigma of SD 1.x/2.x's noise schedule (scaled_linear, 0.00085 .. 0.012, at t = 999). Karras and
# Exponential spacings start there at most. diffusers, like k-diffusion, spaces the steps between the model's smallest
# and largest sigma; a cosine schedule reaches 20291 (the shapes model) and a zero-terminal-SNR one 4096. Karras
# spacing then spends three quarters of its steps above sigma 13, where the input is pure noise, and the DPM-Solver
# family maps those sigmas to one integer timestep (998, repeated), which breaks diffusers' step indexing: DPM++ 2M
# Karras failed, DPM2 Karras drew NaN. Starting at SD's largest sigma is what the same spacing does on SD, and changes
# nothing on models that stay within it (SD 1.x/2.x/XL: parity with diffusers holds there).
SD_SIGMA_MAX = 14.6146


def largest_sigma(model_config: dict[str, Any]) -> float:
    """The model's noise level at its last training timestep, sqrt((1 - alpha_bar) / alpha_bar)."""
    alphas_cumprod = EulerDiscreteScheduler.from_config(model_config).alphas_cumprod
    return float(((1 - alphas_cumprod[-1]) / alphas_cumprod[-1]) ** 0.5)


def beyond_sd(model_config: dict[str, Any]) -> bool:
    """Whether the model's noise schedule reaches beyond SD's largest sigma (cosine, zero terminal SNR)."""
    return largest_sigma(model_config) > SD_SIGMA_MAX * 1.001


def spaced_sigma_max(model_config: dict[str, Any]) -> float | None:
    """Where Karras/Exponential spacing starts on this model if not at its largest sigma (diffusers' default)."""
    if model_config.get("sigma_max") is not None:
        return None  # the model's author chose one
    return SD_SIGMA_MAX if beyond_sd(model_config) else None


def schedules_of(sampler: str) -> list[str]:
    """The schedules `sampler` has in this diffusers (Automatic always)."""
    spec = SAMPLER_SPECS[sampler]
    return ["Automatic"] + [s for s, option in SCHEDULE_OPTIONS.items() if spec.accepts(option)]


def check_pair(sampler: str, schedule: str, model_config: dict[str, Any], steps: int | None = None) -> None:
    """Raise UserError unless `sampler` with `schedule` runs correctly on the model whose scheduler config is
    `model_config` (the dict of its scheduler/scheduler_config.json: no weights needed). With `steps`, also check
    that the first timestep is not repeated (diffusers would then start at the wrong step)."""
    if sampler not in SAMPLER_SPECS:
        raise UserError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLER_SPECS)}", field="sampler")
    if schedule not in ("Automatic", *SCHEDULE_OPTIONS):
        raise UserError(
            f"unknown schedule {schedule!r}; known: Automatic, {', '.join(SCHEDULE_OPTIONS)}", field="schedule"
        )
    beyond = beyond_sd(model_config)

    def works(other_sampler: str, other_schedule: str) -> bool:
        refused = beyond and other_schedule in SAMPLER_SPECS[other_sampler].refused_beyond_sd
        return other_schedule in schedules_of(other_sampler) and not refused

    # What works instead: this sampler with another schedule, or this schedule with another sampler.
    same_sampler = [other for other in schedules_of(sampler) if works(sampler, other)]
    same_schedule = [other for other in SAMPLER_SPECS if works(other, schedule)]
    instead = [f"{sampler!r} with schedule {' or '.join(same_sampler)}"] if same_sampler else []
    instead.append(f"{schedule} with {', '.join(same_schedule)}")
    if schedule not in schedules_of(sampler):
        raise UserError(
            f"sampler {sampler!r} has no {schedule} schedule (diffusers' "
            f"{SAMPLER_SPECS[sampler].scheduler_class.__name__} offers none); use {', or '.join(instead)}",
            field="schedule",
        )
    if not works(sampler, schedule):
        reason = SAMPLER_SPECS[sampler].refused_beyond_sd[schedule].format(sigma=largest_sigma(model_config))
        raise UserError(
            f"sampler {sampler!r} with the {schedule} schedule draws wrong images on this model's noise schedule: "
            f"{reason}; use {', or '.join(instead)}",
            field="schedule" if same_sampler else "sampler",
        )
    if steps is not None:
        scheduler = make_scheduler(sampler, schedule, model_config, noise_seed=0, check=False)
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps.tolist()
        if timesteps.count(timesteps[0]) > 1:
            raise UserError(
                f"sampler {sampler!r} with the {schedule} schedule repeats its first timestep on this model's noise "
                f"schedule at {steps} steps; use schedule Automatic, or another number of steps",
                field="schedule",
            )


def make_scheduler(
    sampler: str,
    schedule: str,
    model_config: dict[str, Any],
    noise_seed: int | None = None,
    *,
    steps: int | None = None,
    check: bool = True,
):
    """A fresh scheduler for one generation (schedulers keep per-run state, so never share one).

    `noise_seed` seeds the Brownian tree of samplers that draw their own noise (DPM++ SDE); without it
    they would pick a random seed and no image could be reproduced. The pair is checked first (`check_pair`, with
    `steps` when given), so a refused pair fails before anything runs.
    """
    if check:
        check_pair(sampler, schedule, model_config, steps)
    spec = SAMPLER_SPECS[sampler]
    options = dict(spec.options)
    config = dict(model_config)
    if spec.accepts("noise_sampler_seed"):
        options["noise_sampler_seed"] = noise_seed
    option = SCHEDULE_OPTIONS.get(schedule)
    if option:
        options[option] = True
        sigma_max = spaced_sigma_max(model_config)
        if sigma_max is not None:
            # In the config, not as a keyword: diffusers keeps config keys of compatible schedulers (EulerDiscrete's
            # sigma_max) in `scheduler.config`, where the Karras/Exponential conversions read it (all but LMS's and
            # DPM++ SDE's Karras in diffusers 0.42: LMS Karras is refused beyond SD, DPM++ SDE Karras measured right).
            config["sigma_max"] = sigma_max
    return spec.scheduler_class.from_config(config, **options)
