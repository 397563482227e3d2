"""Engine overhead on the real SD 1.5 architecture (config only, random weights), CPU, fp32.

One CFG denoising step of the UNet plus one VAE decode, through our engine and through a plain diffusers
StableDiffusionPipeline with default settings, alternated in the same process. Prints one JSON line:
median seconds for each and `ratio` = ours / diffusers (≤ 1.0 means the engine adds no overhead).

    python benchmarks/engine_cpu.py            # 512x512, 5 rounds
    python benchmarks/engine_cpu.py --quick    # 256x256, 2 rounds (CI-sized)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from spellbook.engine.pipeline import generate
from spellbook.engine.samplers import make_scheduler
from spellbook.models.components import Components
from spellbook.models.files import CONFIGS_DIR, load_clip_tokenizer
from spellbook.recipe import ModelRef, make_recipe


def sd15_components() -> Components:
    folder = CONFIGS_DIR / "sd-v1"
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return Components(
        vae,
        text_encoder,
        load_clip_tokenizer(folder / "tokenizer"),
        unet,
        scheduler_config,
        ModelRef("sd15-random", ""),
        "sd-v1",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256x256 and 2 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    size = 256 if args.quick else 512
    rounds = args.rounds or (2 if args.quick else 5)

    c = sd15_components()
    recipe = make_recipe(
        {
            "prompt": "a photo of an otter, by greg rutkowski",
            "negative_prompt": "blurry",
            "seed": 1,
            "steps": 1,
            "sampler": "Euler",
            "schedule": "Automatic",
            "guidance": 7.0,
            "width": size,
            "height": size,
        },
        {},
    )
    reference = StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        unet=c.unet,
        scheduler=make_scheduler("Euler", "Automatic", c.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)

    def ours() -> None:
        generate(c, recipe)

    def theirs() -> None:
        with torch.inference_mode():
            reference(
                recipe.prompt,
                negative_prompt=recipe.negative_prompt,
                num_inference_steps=1,
                guidance_scale=recipe.guidance,
                height=size,
                width=size,
                generator=torch.Generator().manual_seed(1),
                output_type="np",
            )

    ours()  # warm-up both (allocator, kernels)
    theirs()
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    for _ in range(rounds):
        for name, fn in (("ours", ours), ("diffusers", theirs)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    print(
        json.dumps(
            {
                "benchmark": "engine_cpu",
                "size": f"{size}x{size}",
                "rounds": rounds,
                "threads": torch.get_num_threads(),
                "ours_s": round(ours_s, 3),
                "diffusers_s": round(theirs_s, 3),
                "ratio": round(ours_s / theirs_s, 3),
                "ours_all_s": [round(t, 3) for t in times["ours"]],
                "diffusers_all_s": [round(t, 3) for t in times["diffusers"]],
            }
        )
    )


if __name__ == "__main__":
    main()
