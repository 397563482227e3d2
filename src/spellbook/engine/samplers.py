"""Sampler names as AUTOMATIC1111 shows them -> diffusers schedulers, built from the model's own config.

One table, one signature: `make_scheduler(sampler, schedule, model_scheduler_config)`. The mapping follows
diffusers' documented A1111 equivalents.
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

    def accepts(self, option: str) -> bool:
        return option in inspect.signature(self.scheduler_class.__init__).parameters


SAMPLER_SPECS: dict[str, SamplerSpec] = {
    "Euler": SamplerSpec(EulerDiscreteScheduler),
    "Euler a": SamplerSpec(EulerAncestralDiscreteScheduler),
    "Heun": SamplerSpec(HeunDiscreteScheduler),
    "DPM2": SamplerSpec(KDPM2DiscreteScheduler),
    "DPM2 a": SamplerSpec(KDPM2AncestralDiscreteScheduler),
    "DPM++ 2M": SamplerSpec(DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE": SamplerSpec(DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ SDE": SamplerSpec(DPMSolverSDEScheduler, batch_invariant=False),
    "DPM++ 2S": SamplerSpec(DPMSolverSinglestepScheduler, {"solver_order": 2}),
    "DDIM": SamplerSpec(DDIMScheduler),
    "PLMS": SamplerSpec(PNDMScheduler, {"skip_prk_steps": True}),
    "LMS": SamplerSpec(LMSDiscreteScheduler),
    "UniPC": SamplerSpec(UniPCMultistepScheduler),
}
SCHEDULE_OPTIONS = {"Karras": "use_karras_sigmas", "Exponential": "use_exponential_sigmas"}
assert set(SAMPLER_SPECS) == set(SAMPLERS), "recipe.SAMPLERS and the scheduler table must name the same samplers"


def make_scheduler(sampler: str, schedule: str, model_config: dict[str, Any], noise_seed: int | None = None):
    """A fresh scheduler for one generation (schedulers keep per-run state, so never share one).

    `noise_seed` seeds the Brownian tree of samplers that draw their own noise (DPM++ SDE); without it
    they would pick a random seed and no image could be reproduced.
    """
    spec = SAMPLER_SPECS[sampler]
    options = dict(spec.options)
    if spec.accepts("noise_sampler_seed"):
        options["noise_sampler_seed"] = noise_seed
    option = SCHEDULE_OPTIONS.get(schedule)
    if option:
        if not spec.accepts(option):
            raise UserError(
                f"sampler {sampler!r} has no {schedule} schedule; use schedule Automatic, or a sampler such as "
                f"{', '.join(s for s, sp in SAMPLER_SPECS.items() if sp.accepts(option))}",
                field="schedule",
            )
        options[option] = True
    return spec.scheduler_class.from_config(model_config, **options)
