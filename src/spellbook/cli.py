"""The `spellbook` command. Thin: each command parses, calls the library, prints.

Errors a user can fix print one line on stderr and exit 2; `verify` exits 1 when the image differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from spellbook.cli_context import current_settings, quiet_libraries
from spellbook.concepts.cli import concept_app
from spellbook.errors import SpellbookError, UserError
from spellbook.explorer.cli import app as explore_app
from spellbook.gallery.cli import gallery_app
from spellbook.server.cli import register as register_server_commands

app = typer.Typer(
    help="Spellbook: a self-hosted Stable Diffusion studio.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="List, add and inspect models.", no_args_is_help=True)
toy_app = typer.Typer(help="The embedded shapes model: judge images, train the model.", no_args_is_help=True)
app.add_typer(models_app, name="models")
styles_app = typer.Typer(help="Styles: named prompt templates (A1111's styles.csv).", no_args_is_help=True)
app.add_typer(styles_app, name="styles")
app.add_typer(toy_app, name="toy")
app.add_typer(concept_app, name="concept")
register_server_commands(app)
app.add_typer(gallery_app, name="gallery")
app.add_typer(explore_app, name="explore")


@app.callback()
def root(
    ctx: typer.Context,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle", help="Load pickled checkpoints (.ckpt/.pt/.bin): scanned first, then weights only."
        ),
    ] = False,
) -> None:
    """Spellbook: a self-hosted Stable Diffusion studio."""
    from spellbook.settings import Settings

    # Settings are built once, here; every command reads them from the context (cli_context.current_settings).
    ctx.obj = Settings.from_env(allow_pickle=True if allow_pickle else None)


Out = Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _studio():
    """The studio, with a spinner on a terminal while torch and diffusers load (seconds the user would
    otherwise spend looking at nothing)."""
    from contextlib import nullcontext

    status = nullcontext()
    if sys.stderr.isatty():
        from rich.console import Console

        status = Console(stderr=True).status("loading torch and diffusers…")
    with status:
        quiet_libraries()
        from spellbook.studio import Studio

        return Studio(current_settings())


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=2))


def _progress_bar(label: str, enabled: bool):
    """A rich progress bar on stderr; returns (context manager, callback)."""
    from contextlib import nullcontext

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled:
        return nullcontext(), None
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("loading the model", total=None)  # until the first step: weights, prompt encoding

    def callback(step, total, _latents) -> None:
        bar.update(task, description=label, total=total, completed=step)

    return bar, callback


def _generation_request(
    prompt: str,
    negative: str | None,
    steps: int | None,
    cfg: float | None,
    sampler: str | None,
    schedule: str | None,
    size: str | None,
    seed: int | None,
    batch: int | None,
    model: str | None,
    vae: str | None,
    clip_skip: int | None,
    styles: list[str] | None = None,
):
    """The CLI's adapter: flags -> ImageRequest."""
    from spellbook.recipe import ImageRequest, parse_size

    width, height = parse_size(size) if size else (None, None)
    return ImageRequest(
        prompt=prompt,
        negative_prompt=negative or "",
        steps=steps,
        guidance=cfg,
        sampler=sampler,
        schedule=schedule,
        width=width,
        height=height,
        seed=seed,
        batch_size=batch,
        model=model,
        vae=vae,
        clip_skip=clip_skip,
        styles=tuple(styles or ()),
    )


def _run(studio, request, out: Path, show_progress: bool, count: int = 1, gallery: bool = True) -> list[dict]:
    """Run `count` batches of one request (batch k starts at seed + k * batch size); write them to `out` (and
    file the same files in the gallery unless `gallery` is False); return records."""
    records = []
    recipe = studio.plan(request)
    for run in range(count):
        if run:  # batch k: seed (and variation seed) + k x batch size, as A1111's n_iter
            recipe = recipe.with_(seed=recipe.seed + recipe.batch_size)
            if recipe.subseed is not None:
                recipe = recipe.with_(subseed=recipe.subseed + recipe.batch_size)
        width, height = recipe.output_size
        bar, callback = _progress_bar(f"{recipe.kind} {width}x{height}", show_progress)
        with bar:
            results = studio.run(recipe, on_step=callback)
        written = studio.save(results, out)
        ids = _file_in_gallery(studio, written) if gallery else [None] * len(written)
        for saved, image_id in zip(written, ids, strict=True):
            records.append({"path": str(saved.path), "seed": saved.recipe.image_seed, "recipe": saved.recipe.to_dict()})
            if image_id is not None:
                records[-1]["gallery_id"] = image_id
    return records


def _report(records: list[dict], as_json: bool) -> None:
    if as_json:
        _echo_json(records)
    else:
        for record in records:
            typer.echo(record["path"])


def _file_in_gallery(studio, written) -> list[int]:
    from spellbook.gallery import file_results
    from spellbook.store import Database

    # embed=False: the prompt is embedded by the next search by meaning, so `generate` does not load a
    # second model. The gallery links the written files in: the same bytes, not a second encode.
    db = Database(studio.settings.db_path)
    try:
        return [image.id for image in file_results(db, written, home=studio.settings.home, embed=False)]
    finally:
        db.close()


def _run_and_save(studio, request, out: Path, as_json: bool, count: int = 1, gallery: bool = True) -> None:
    _report(_run(studio, request, out, not as_json and sys.stderr.isatty(), count, gallery), as_json)


# Shared generation options, as Annotated aliases so each command reads as its flags.
Negative = Annotated[str | None, typer.Option("--negative", "-n", help="Negative prompt.")]
Steps = Annotated[int | None, typer.Option(help="Sampling steps (default: the model's).")]
Cfg = Annotated[float | None, typer.Option("--cfg", help="Guidance (CFG) scale.")]
Sampler = Annotated[str | None, typer.Option(help="Sampler, as A1111 names it: 'Euler a', 'DPM++ 2M Karras', …")]
Schedule = Annotated[str | None, typer.Option(help="Schedule type: Automatic, Karras, Exponential.")]
Size = Annotated[str | None, typer.Option(help="WIDTHxHEIGHT, multiples of 8 (default: the model's native size).")]
Seed = Annotated[int | None, typer.Option(help="Seed; -1 or absent picks one (recorded in the PNG).")]
Batch = Annotated[int | None, typer.Option(help="Images per batch (one forward pass).")]
Count = Annotated[int, typer.Option(help="How many batches to run one after another.")]
Model = Annotated[str | None, typer.Option(help="Model name from `spellbook models list`, or a path.")]
Vae = Annotated[str | None, typer.Option(help="VAE override: a VAE folder or .safetensors.")]
ClipSkip = Annotated[int | None, typer.Option("--clip-skip", help="Clip skip as A1111 counts it (1 = none).")]
NoGallery = Annotated[bool, typer.Option("--no-gallery", help="Do not file the images in the gallery.")]
Styles = Annotated[
    list[str] | None,
    typer.Option("--style", help="A style from `spellbook styles list` (repeatable; applied in order)."),
]

HiresScale = Annotated[
    float | None, typer.Option("--hires-scale", help="Hires fix: draw again at this factor of the size, e.g. 2.")
]
HiresSize = Annotated[str | None, typer.Option("--hires-size", help="Hires fix: draw again at WIDTHxHEIGHT.")]
HiresSteps = Annotated[int | None, typer.Option("--hires-steps", help="Hires pass steps (default: --steps).")]
HiresDenoise = Annotated[
    float | None, typer.Option("--hires-denoise", help="How much the hires pass changes, 0-1 (default 0.7).")
]
HiresUpscaler = Annotated[
    str | None,
    typer.Option("--hires-upscaler", help="'Latent' (default), 'Latent (nearest-exact)', … or 'Lanczos', 'Nearest'."),
]
HiresPrompt = Annotated[str | None, typer.Option("--hires-prompt", help="The hires pass's prompt (default: PROMPT).")]
HiresNegative = Annotated[str | None, typer.Option("--hires-negative", help="The hires pass's negative prompt.")]


def _hires_options(scale, size, steps, denoise, upscaler, prompt, negative, partial: bool = False) -> dict | None:
    """The --hires-* flags as a request's `hires` (checked with the recipe), or None when none was given.
    `partial` (a grid): the scale may come from an axis, so the other flags stand alone."""
    rest = {"steps": steps, "denoise": denoise, "upscaler": upscaler, "prompt": prompt, "negative_prompt": negative}
    if scale is None and size is None:
        given = [name for name, value in rest.items() if value is not None]
        if given and partial:
            return {name: rest[name] for name in given}
        if given:
            raise UserError(
                f"--hires-{given[0].replace('negative_prompt', 'negative')} needs --hires-scale or --hires-size",
                field="hires",
            )
        return None
    if scale is not None and size is not None:
        raise UserError("give --hires-scale or --hires-size, not both", field="hires")
    from spellbook.recipe import parse_size

    hires = {k: v for k, v in rest.items() if v is not None}
    if size is not None:
        hires["width"], hires["height"] = parse_size(size)
    else:
        hires["scale"] = scale
    return hires


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="What to draw.")] = None,
    negative: Negative = None,
    steps: Steps = None,
    cfg: Cfg = None,
    sampler: Sampler = None,
    schedule: Schedule = None,
    size: Size = None,
    seed: Seed = None,
    batch: Batch = None,
    count: Count = 1,
    model: Model = None,
    vae: Vae = None,
    clip_skip: ClipSkip = None,
    from_file: Annotated[
        Path | None,
        typer.Option("--from-file", help="One prompt per line; line i (from 0, empty lines count) uses seed+i."),
    ] = None,
    out: Out = Path("out"),
    as_json: Json = False,
    no_gallery: NoGallery = False,
    style: Styles = None,
    variation_seed: Annotated[
        int | None, typer.Option("--variation-seed", help="A1111's variation seed (-1 or absent: random).")
    ] = None,
    variation_strength: Annotated[
        float | None,
        typer.Option("--variation-strength", help="How far the noise moves towards the variation seed's, 0-1."),
    ] = None,
    seed_resize_from: Annotated[
        str | None,
        typer.Option("--seed-resize-from", help="WxH: draw the seed's noise at this size, centred (A1111's)."),
    ] = None,
    hires_scale: HiresScale = None,
    hires_size: HiresSize = None,
    hires_steps: HiresSteps = None,
    hires_denoise: HiresDenoise = None,
    hires_upscaler: HiresUpscaler = None,
    hires_prompt: HiresPrompt = None,
    hires_negative: HiresNegative = None,
) -> None:
    """Text to image; with --hires-scale or --hires-size, A1111's hires fix (a second pass, larger)."""
    from spellbook.recipe import parse_size

    if variation_seed is not None and variation_strength is None:
        raise UserError("--variation-seed needs --variation-strength (0-1) to have an effect", field="variation_seed")
    resize_w, resize_h = parse_size(seed_resize_from) if seed_resize_from else (None, None)
    noise = {"subseed": variation_seed, "subseed_strength": variation_strength, "seed_resize_from_w": resize_w,
             "seed_resize_from_h": resize_h}  # fmt: skip
    hires = _hires_options(
        hires_scale, hires_size, hires_steps, hires_denoise, hires_upscaler, hires_prompt, hires_negative
    )
    studio = _studio()
    if from_file is not None:
        if prompt is not None:
            raise UserError("give a prompt or --from-file, not both", field="prompt")
        if not from_file.is_file():
            raise UserError(f"{from_file} does not exist", field="from_file")
        try:
            lines = [line.strip() for line in from_file.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:
            raise UserError(f"{from_file} is not UTF-8 text (one prompt per line)", field="from_file") from None
        # Line i (counting from 0, empty lines included) uses seed + i: editing one line never moves the others.
        prompts = [(i, line) for i, line in enumerate(lines) if line]
        if not prompts:
            raise UserError(f"{from_file} has no prompts (one per line)", field="from_file")
        import random

        base_seed = seed if seed not in (None, -1) else random.SystemRandom().randint(0, 2**31)
        records = []
        for i, line in prompts:
            request = _generation_request(
                line, negative, steps, cfg, sampler, schedule, size, base_seed + i, batch, model, vae, clip_skip, style
            ).with_(hires=hires, **noise)
            records += _run(studio, request, out, not as_json and sys.stderr.isatty(), count, not no_gallery)
        _report(records, as_json)
        return
    if prompt is None:
        raise UserError('give a prompt, e.g. spellbook generate "a red circle"', field="prompt")
    request = _generation_request(
        prompt, negative, steps, cfg, sampler, schedule, size, seed, batch, model, vae, clip_skip, style
    ).with_(hires=hires, **noise)
    _run_and_save(studio, request, out, as_json, count=count, gallery=not no_gallery)


@app.command()
def blend(
    a: Annotated[Path, typer.Argument(help="The first picture (t = 0), with its recipe.")],
    b: Annotated[Path, typer.Argument(help="The second picture (t = 1).")],
    t: Annotated[float, typer.Option("--t", help="Where between them: 0 is A, 1 is B.")] = 0.5,
    frames: Annotated[
        int | None, typer.Option("--frames", help="Instead of --t: N pictures from A to B, evenly spaced.")
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", help="Blend the pictures themselves (photos, sketches): their latents, redrawn."),
    ] = None,
    strength: Annotated[
        float | None, typer.Option("--strength", help="With --prompt: how much is redrawn, 0-1 (default 0.6).")
    ] = None,
    negative: Negative = None,
    steps: Steps = None,
    cfg: Cfg = None,
    sampler: Sampler = None,
    size: Size = None,
    seed: Seed = None,
    model: Model = None,
    out: Out = Path("out"),
    as_json: Json = False,
    no_gallery: NoGallery = False,
) -> None:
    """Pictures between two images ("halfway between these two"). From the recipes they carry: their noises
    slerped, their prompts' encodings interpolated (t = 0 and 1 draw A and B again). With --prompt, from the
    pictures themselves: both VAE-encoded, the latents slerped and drawn again as img2img."""
    if frames is not None and not 2 <= frames <= 100:
        raise UserError(f"--frames {frames}: give 2 to 100 (the first is A, the last B)", field="frames")
    ts = [t] if frames is None else [i / (frames - 1) for i in range(frames)]
    if not all(0.0 <= value <= 1.0 for value in ts):
        raise UserError(f"--t {t:g}: must be between 0 (picture A) and 1 (picture B)", field="t")
    for path, field in ((a, "a"), (b, "b")):
        if not path.is_file():
            raise UserError(f"{path} does not exist", field=field)
    studio = _studio()
    settings = {"negative": negative, "steps": steps, "cfg": cfg, "sampler": sampler, "size": size, "seed": seed,
                "model": model, "strength": strength}  # fmt: skip
    if prompt is None:  # by recipes, everything comes from the two pictures: a setting given here would be ignored
        _refuse_without_prompt(settings, "a blend of the pictures themselves; a blend by their recipes takes every "
                               "setting from them")  # fmt: skip
        recipes = studio.plan_blend(a, b, ts)
    else:
        request = _generation_request(prompt, negative, steps, cfg, sampler, None, size, seed, 1, model, None, None,
                                      None).with_(strength=strength, init_image_path=str(a))  # fmt: skip
        recipes = studio.plan_blend_pictures(_open(a, "a"), _open(b, "b"), ts, request)
    bar, callback = _progress_bar(f"blend of {len(recipes)}", not as_json and sys.stderr.isatty())
    results = []
    with bar:
        for recipe in recipes:
            results += studio.run(recipe, on_step=callback)
    written = studio.save(results, out)
    ids = _file_in_gallery(studio, written) if not no_gallery else [None] * len(written)
    records = []
    for saved, image_id in zip(written, ids, strict=True):
        records.append({"path": str(saved.path), "t": saved.recipe.blend.t, "recipe": saved.recipe.to_dict()})
        if image_id is not None:
            records[-1]["gallery_id"] = image_id
    _report(records, as_json)


@app.command()
def morph(
    keyframes: Annotated[
        list[str] | None,
        typer.Argument(help="Keyframes: prompts, or PNGs with recipes (one prompt and several --seeds also works)."),
    ] = None,
    seeds: Annotated[
        str | None, typer.Option("--seeds", help="Keyframe seeds, e.g. 1,2,3: one per prompt, or several for one.")
    ] = None,
    from_png: Annotated[
        list[Path] | None, typer.Option("--from-png", help="A keyframe from a picture's recipe (repeatable).")
    ] = None,
    frames: Annotated[int, typer.Option("--frames", help="Frames to start with (more where the motion jumps).")] = 24,
    fps: Annotated[int, typer.Option("--fps", help="Frames per second.")] = 12,
    loop: Annotated[bool, typer.Option("--loop", help="Morph on from the last keyframe back to the first.")] = False,
    even: Annotated[bool, typer.Option("--even/--no-even", help="Add frames where a step is large.")] = True,
    scale: Annotated[int, typer.Option("--scale", help="Enlarge the animation (nearest), e.g. 4 for 32 px.")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Keep the frames a stopped run already drew.")] = False,
    out: Annotated[Path, typer.Option("--out", help="The animation: a .gif, .webp or .mp4 file.")] = Path(
        "out/morph.gif"
    ),
    negative: Negative = None,
    steps: Steps = None,
    cfg: Cfg = None,
    sampler: Sampler = None,
    schedule: Schedule = None,
    size: Size = None,
    model: Model = None,
    as_json: Json = False,
) -> None:
    """Morph animation between prompts, seeds or pictures: every frame a blend of two keyframes (noise slerped,
    prompts interpolated), each also a PNG with its recipe; NAME.json lets `spellbook reproduce` draw it again."""
    from spellbook.morph import FORMATS, Morph, check_morph, even_frames, run_morph

    if out.suffix.lower() not in FORMATS:
        raise UserError(f"--out {out}: give a {', '.join(FORMATS)} file", field="out")
    if not 2 <= frames <= 500:
        raise UserError(f"--frames {frames}: give 2 to 500", field="frames")
    if not 1 <= scale <= 16:
        raise UserError(f"--scale {scale}: give 1 to 16", field="scale")
    items = list(keyframes or [])
    pictures = [Path(item) for item in items if item.lower().endswith(".png") and Path(item).is_file()]
    prompts = [item for item in items if Path(item) not in pictures]
    pictures += list(from_png or [])
    seed_list = _seed_list(seeds)
    studio = _studio()
    recipes = []
    if prompts:
        if len(prompts) == 1 and len(seed_list) >= 2:
            pairs = [(prompts[0], seed) for seed in seed_list]
        elif len(seed_list) in (0, 1):
            import random

            shared = seed_list[0] if seed_list else random.SystemRandom().randint(0, 2**32 - 1)
            pairs = [(prompt, shared) for prompt in prompts]
        elif len(seed_list) == len(prompts):
            pairs = list(zip(prompts, seed_list, strict=True))
        else:
            raise UserError(f"--seeds gives {len(seed_list)} seeds for {len(prompts)} prompts: give one per prompt, "
                            "one for all, or several for one prompt", field="seeds")  # fmt: skip
        for prompt, seed in pairs:
            request = _generation_request(prompt, negative, steps, cfg, sampler, schedule, size, seed, 1, model,
                                          None, None, None)  # fmt: skip
            recipes.append(studio.plan(request))
    for path in pictures:
        if not path.is_file():
            raise UserError(f"{path} does not exist", field="from_png")
        recipes.append(studio.recipe_of(path))
    animation = Morph(recipes, even_frames(len(recipes), frames, loop) if len(recipes) >= 2 else [], fps, loop)
    check_morph(animation)
    bar, callback = _progress_bar("morph", not as_json and sys.stderr.isatty())

    def frame_done(count: int) -> None:
        if callback is not None:
            bar.update(bar.task_ids[0], description=f"frame {count}")

    with bar:
        record = run_morph(studio, animation, out, resume=resume, even=even, scale=scale, on_step=callback,
                           on_frame=frame_done)  # fmt: skip
    if as_json:
        _echo_json(record)
    else:
        typer.echo(record["animation"])


def _seed_list(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise UserError(
            f"--seeds {text!r}: give whole numbers separated by commas, e.g. 1,2,3", field="seeds"
        ) from None


@app.command()
def grid(
    prompt: Annotated[str, typer.Argument(help="What to draw; the axes vary it.")],
    x: Annotated[
        str | None, typer.Option("--x", help="FIELD=VALUES, e.g. 'seed=1,2,3' or 'steps=10-30 (+10)'.")
    ] = None,
    y: Annotated[str | None, typer.Option("--y", help="FIELD=VALUES, e.g. 'cfg=3-9 [4]'.")] = None,
    z: Annotated[str | None, typer.Option("--z", help="FIELD=VALUES: one grid per value.")] = None,
    negative: Negative = None,
    steps: Steps = None,
    cfg: Cfg = None,
    sampler: Sampler = None,
    schedule: Schedule = None,
    size: Size = None,
    seed: Seed = None,
    model: Model = None,
    vae: Vae = None,
    clip_skip: ClipSkip = None,
    style: Styles = None,
    out: Out = Path("out"),
    as_json: Json = False,
    no_gallery: NoGallery = False,
    hires_scale: HiresScale = None,
    hires_size: HiresSize = None,
    hires_steps: HiresSteps = None,
    hires_denoise: HiresDenoise = None,
    hires_upscaler: HiresUpscaler = None,
) -> None:
    """X/Y/Z plot: PROMPT varied along up to three axes; a labelled grid PNG per Z value, and every cell."""
    from spellbook.grid import parse_axis

    axes = [parse_axis(text, option) if text else None for text, option in ((x, "--x"), (y, "--y"), (z, "--z"))]
    sized = any(axis and axis.field == "hires.scale" for axis in axes)
    hires = _hires_options(hires_scale, hires_size, hires_steps, hires_denoise, hires_upscaler, None, None, sized)
    if not any(axes):
        raise UserError("give at least one axis, e.g. --x 'seed=1,2,3'", field="x")
    studio = _studio()
    base = _generation_request(
        prompt, negative, steps, cfg, sampler, schedule, size, seed, 1, model, vae, clip_skip, style
    ).with_(hires=hires)
    records = _run_grid(studio, base, axes, out, not as_json and sys.stderr.isatty(), gallery=not no_gallery)
    if as_json:
        _echo_json(records)
    else:
        for record in records["grids"]:
            typer.echo(record)


def _run_grid(studio, base, axes, out: Path, show_progress: bool, gallery: bool = True, cells=None) -> dict:
    """Plan every cell (nothing runs if one is wrong), run them, save them, and draw one grid per Z value."""
    from spellbook.grid import grid_png, plan_cells
    from spellbook.provenance import write_png_bytes
    from spellbook.studio import next_image_number

    if cells is None:
        cells = plan_cells(base, axes, studio.plan, studio.settings.max_grid_cells)
    bar, callback = _progress_bar(f"grid of {len(cells)}", show_progress)

    def cells_done(done: int) -> None:
        if callback is not None:
            bar.update(bar.task_ids[0], description=f"cells {done}/{len(cells)}")

    with bar:  # compatible cells (e.g. seeds or prompts of one size and sampler) share a forward pass
        runs = studio.run_many([cell.recipe for cell in cells], on_step=callback, on_group=cells_done)
    written = studio.save([result for run in runs for result in run], out)
    if gallery:
        _file_in_gallery(studio, written)
    z_axis = axes[2]
    grids = []
    first = next_image_number(out)
    for z in range(len(z_axis.values) if z_axis else 1):
        members = [(cell, saved) for cell, saved in zip(cells, written, strict=True) if cell.z == z]
        png = grid_png(
            axes, z, [cell for cell, _ in members], [s.image for _, s in members], [s.path.name for _, s in members]
        )
        grids.append(str(write_png_bytes(png, out / f"{first + z:05d}-grid.png")))
    return {"grids": grids, "cells": [{"path": str(r.path), "recipe": r.recipe.to_dict()} for r in written]}


def _open(path: Path, field: str):
    from spellbook.provenance import open_image

    return open_image(path, field)


def _refuse_without_prompt(options: dict, why: str) -> None:
    """Options that only a --prompt run uses, given without one: refused by name rather than ignored."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise UserError(f"--{given[0]} needs --prompt ({why})", field=given[0])


@app.command()
def upscale(
    image: Annotated[Path, typer.Argument(help="The picture to enlarge.")],
    scale: Annotated[float, typer.Option("--scale", help="How many times larger, e.g. 2 or 4.")] = 4.0,
    upscaler: Annotated[
        str,
        typer.Option(
            "--upscaler", help="Lanczos, Nearest, an ESRGAN/Real-ESRGAN model in SPELLBOOK_HOME/upscalers, or a path."
        ),
    ] = "Lanczos",
    tile: Annotated[
        int | None,
        typer.Option("--tile", help="Tile side: a model upscaler's input (256), --prompt's img2img (model's size)."),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", help="Then draw it again tile by tile under this prompt (A1111's SD upscale)."),
    ] = None,
    strength: Annotated[
        float | None, typer.Option("--strength", help="With --prompt: how much each tile is redrawn (0.3).")
    ] = None,
    negative: Negative = None,
    steps: Steps = None,
    cfg: Cfg = None,
    sampler: Sampler = None,
    seed: Seed = None,
    model: Model = None,
    out: Out = Path("out"),
    as_json: Json = False,
) -> None:
    """Enlarge a picture with a resampler or an ESRGAN-family model (tiled); with --prompt, then draw it again
    tile by tile as img2img (A1111's SD upscale). The PNG keeps the picture's A1111 parameters with A1111's
    Postprocess keys added; a spellbook-upscale chunk names the source, the model and every tile's recipe."""
    import hashlib

    from spellbook.cli_context import quiet_libraries

    quiet_libraries()  # before spellbook.studio brings diffusers and transformers in
    from spellbook.infotext import read_png_text
    from spellbook.provenance import image_sha256, write_png_bytes
    from spellbook.settings import Settings
    from spellbook.studio import next_image_number
    from spellbook.upscale import resolve_upscaler, upscale_image, upscaled_png

    if not 1.0 <= scale <= 8.0:
        raise UserError(f"--scale {scale:g}: give 1 to 8", field="scale")
    if tile is not None and (tile < 0 or 0 < tile < 16):
        raise UserError(f"--tile {tile}: give 0 (the whole picture at once) or at least 16", field="tile")
    redraw = {"strength": strength, "negative": negative, "steps": steps, "cfg": cfg, "sampler": sampler,
              "seed": seed, "model": model}  # fmt: skip
    if prompt is None:
        _refuse_without_prompt(redraw, "the tiles are drawn again only under a prompt")
    settings = Settings.from_env()
    picture = _open(image, "image")
    size = (round(picture.width * scale), round(picture.height * scale))
    if size[0] * size[1] > settings.max_pixels:
        raise UserError(f"{size[0]}x{size[1]} is over the limit of {settings.max_pixels} pixels", field="scale")
    chosen = resolve_upscaler(upscaler, settings.upscalers_dir)
    tiles = []
    if prompt is None:
        result = upscale_image(picture, scale, chosen, tile=256 if tile is None else tile)
    else:
        from spellbook.upscale import sd_upscale

        request = _generation_request(prompt, negative, steps, cfg, sampler, None, None, seed, 1, model, None, None,
                                      None).with_(strength=0.3 if strength is None else strength)  # fmt: skip
        if request.seed in (None, -1):  # one seed for every tile, recorded
            import random

            request = request.with_(seed=random.SystemRandom().randint(0, 2**32 - 1))
        result, tiles = sd_upscale(_studio(), picture, scale, chosen, request, tile=tile or 0)
    model = chosen
    name = upscaler if isinstance(model, str) else model.name
    record = {"source": image_sha256(picture), "upscaler": name, "scale": scale, "tile": tile,
              "upscaler_sha256": None if isinstance(model, str) else model.sha256}  # fmt: skip
    png = upscaled_png(result, read_png_text(image), {**record, "tiles": tiles} if tiles else record)
    if tiles:
        record["tiles"] = len(tiles)
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(result.tobytes()).hexdigest()[:8]
    path = out / f"{next_image_number(out):05d}-upscaled-{digest}.png"
    write_png_bytes(png, path)  # atomically, as every PNG Spellbook writes
    if as_json:
        _echo_json({"path": str(path), "size": list(result.size), **record})
    else:
        typer.echo(path)


@app.command()
def img2img(
    image: Annotated[Path, typer.Argument(help="The start image (a sketch, a photo).")],
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    strength: Annotated[float | None, typer.Option(help="How much to change, 0-1 (default 0.75).")] = None,
    negative: Negative = None,
    steps: Steps = None,
    cfg: Cfg = None,
    sampler: Sampler = None,
    schedule: Schedule = None,
    size: Size = None,
    seed: Seed = None,
    batch: Batch = None,
    count: Count = 1,
    model: Model = None,
    vae: Vae = None,
    clip_skip: ClipSkip = None,
    out: Out = Path("out"),
    as_json: Json = False,
    no_gallery: NoGallery = False,
    style: Styles = None,
) -> None:
    """Image to image: redraw IMAGE following PROMPT."""
    studio = _studio()
    init = _open(image, "image")
    request = _generation_request(
        prompt, negative, steps, cfg, sampler, schedule, size, seed, batch, model, vae, clip_skip, style
    ).with_(kind="img2img", strength=strength, init_image=init, init_image_path=str(image))
    _run_and_save(studio, request, out, as_json, count, not no_gallery)


@app.command()
def inpaint(
    image: Annotated[Path, typer.Argument(help="The image to change.")],
    mask: Annotated[Path, typer.Argument(help="Same size as IMAGE; white = repaint, black = keep.")],
    prompt: Annotated[str, typer.Argument(help="What to draw in the masked area.")],
    strength: Annotated[
        float | None, typer.Option(help="How much to change inside the mask, 0-1 (default 0.75).")
    ] = None,
    negative: Negative = None,
    steps: Steps = None,
    cfg: Cfg = None,
    sampler: Sampler = None,
    schedule: Schedule = None,
    size: Size = None,
    seed: Seed = None,
    batch: Batch = None,
    count: Count = 1,
    model: Model = None,
    vae: Vae = None,
    clip_skip: ClipSkip = None,
    out: Out = Path("out"),
    as_json: Json = False,
    no_gallery: NoGallery = False,
    style: Styles = None,
) -> None:
    """Inpaint: redraw the masked part of IMAGE following PROMPT."""
    studio = _studio()
    init, mask_image = _open(image, "image"), _open(mask, "mask")
    request = _generation_request(
        prompt, negative, steps, cfg, sampler, schedule, size, seed, batch, model, vae, clip_skip, style
    ).with_(
        kind="inpaint",
        strength=strength,
        init_image=init,
        mask=mask_image,
        init_image_path=str(image),
        mask_path=str(mask),
    )
    _run_and_save(studio, request, out, as_json, count, not no_gallery)


@app.command()
def info(
    image: Annotated[Path, typer.Argument(help="Any PNG: Spellbook's, A1111's or ComfyUI's.")], as_json: Json = False
) -> None:
    """Print the recipe inside an image."""
    from spellbook.provenance import infotext, read_metadata

    meta = read_metadata(image)
    if (
        meta.recipe is None and meta.foreign is None
    ):  # exit 2 with --json too: a script must not read "none" as a recipe
        raise UserError(f"{image} carries no recipe (no Spellbook, A1111 or ComfyUI metadata)", field="image")
    if as_json:
        data = {
            "source": meta.source,
            "recipe": meta.recipe.to_dict() if meta.recipe else None,
            "foreign": meta.foreign,
            "parameters": meta.chunks.get("parameters"),
        }
        _echo_json(data)
        return
    if meta.recipe is not None:
        typer.echo(infotext(meta.recipe))
        typer.echo(f"(source: spellbook; full recipe: spellbook info --json {image})")
    else:
        typer.echo(meta.chunks.get("parameters") or json.dumps(meta.foreign, ensure_ascii=False, indent=2))
        typer.echo(f"(source: {meta.source})")


@app.command()
def reproduce(
    image: Annotated[Path, typer.Argument(help="An image with a recipe.")],
    model: Annotated[str | None, typer.Option(help="Run with this model instead of the recorded one.")] = None,
    out: Out = Path("out"),
    as_json: Json = False,
    lenient: Annotated[
        bool, typer.Option("--lenient", help="Run an A1111 image without the settings Spellbook lacks (warned).")
    ] = False,
) -> None:
    """Run an image's recipe again (a grid's: every cell and the grid; a morph's .json: the animation)."""
    from spellbook.provenance import read_grid

    if image.suffix.lower() == ".json":  # a morph's sidecar: the animation again, its frames as recorded
        from spellbook.morph import load, run_morph

        animation = load(image)
        data = json.loads(image.read_text(encoding="utf-8"))
        target = out / str(data.get("animation") or f"{image.stem}.gif")
        record = run_morph(_studio(), animation, target, even=False, scale=int(data.get("scale") or 1))
        if as_json:
            _echo_json(record)
        else:
            typer.echo(record["animation"])
        return
    grid_data = read_grid(image)
    if grid_data is not None:
        _reproduce_grid(grid_data, out, as_json)
        return
    studio = _studio()
    bar, callback = _progress_bar("reproduce", not as_json and sys.stderr.isatty())
    with bar:
        result = studio.reproduce(image, model=model, on_step=callback, lenient=lenient)
    if lenient:
        from spellbook.provenance import read_metadata
        from spellbook.studio import unhonoured_settings

        foreign = read_metadata(image).foreign or {}
        for key, value in unhonoured_settings(foreign.get("extra") or {}).items():
            typer.echo(f"warning: dropped {key}: {value} (Spellbook cannot honour it; the image will differ)", err=True)
    saved = studio.save([result], out)[0]
    if as_json:
        _echo_json({"path": str(saved.path), "recipe": saved.recipe.to_dict()})
    else:
        typer.echo(saved.path)


def _reproduce_grid(data: dict, out: Path, as_json: bool) -> None:
    from spellbook.grid import Axis, Cell, axes_from_record
    from spellbook.recipe import Recipe, validate

    studio = _studio()
    axes = axes_from_record(data.get("axes", {}))
    z = int(data.get("z", 0))
    cells = [
        Cell(int(c["x"]), int(c["y"]), 0, validate(Recipe.from_dict(c["recipe"]), studio.limits)) for c in data["cells"]
    ]
    title_axis = axes[2]
    if title_axis is not None:  # the one Z value this grid shows
        axes[2] = Axis(title_axis.name, title_axis.field, (title_axis.values[z],), title_axis.option)
    records = _run_grid(studio, None, axes, out, not as_json and sys.stderr.isatty(), cells=cells)
    if as_json:
        _echo_json(records)
    else:
        for record in records["grids"]:
            typer.echo(record)


@app.command()
def verify(
    image: Annotated[Path, typer.Argument(help="A Spellbook image.")],
    model: Annotated[str | None, typer.Option(help="Where the recorded model is now (a name or a path).")] = None,
    as_json: Json = False,
) -> None:
    """Re-run an image's recipe and compare pixels; exit 1 if it differs."""
    studio = _studio()
    bar, callback = _progress_bar("verify", not as_json and sys.stderr.isatty())
    with bar:
        comparison, _ = studio.verify(image, model=model, on_step=callback)
    if as_json:
        _echo_json(
            {
                "identical": comparison.identical,
                "psnr": None if comparison.identical else comparison.psnr,
                "differing_pixels": comparison.differing_pixels,
                "max_abs_diff": comparison.max_abs_diff,
                "build_differences": [
                    dict(zip(("field", "recorded", "current"), d)) for d in comparison.build_differences
                ],
            }
        )
    else:
        typer.echo(comparison.summary())
    if not comparison.identical:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------------ models
# ------------------------------------------------------------------------------------------------ styles
def _styles():
    from spellbook.styles import StyleLibrary

    return StyleLibrary(current_settings())


@styles_app.command("list")
def styles_list(as_json: Json = False) -> None:
    """Every style: name, prompt template and negative prompt."""
    styles = _styles().list()
    if as_json:
        _echo_json([style.to_dict() for style in styles])
        return
    for style in styles:
        typer.echo(f"{style.name}\t{style.prompt}\t{style.negative_prompt}")


@styles_app.command("add")
def styles_add(
    name: Annotated[str, typer.Argument(help="The style's name, as --style takes it.")],
    prompt: Annotated[str, typer.Option("--prompt", help="Template; {prompt} is where the prompt goes.")] = "",
    negative: Annotated[str, typer.Option("--negative", help="Negative prompt template.")] = "",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a style of that name.")] = False,
) -> None:
    """Add a style (without {prompt}, its text is appended to the prompt after a comma)."""
    from spellbook.styles import Style

    style = _styles().add(Style(name, prompt, negative), overwrite=overwrite)
    typer.echo(f"style {style.name} added")


@styles_app.command("rm")
def styles_rm(name: Annotated[str, typer.Argument(help="The style to remove.")]) -> None:
    """Remove a style."""
    _styles().remove(name)
    typer.echo(f"style {name} removed")


@styles_app.command("import")
def styles_import(
    file: Annotated[Path, typer.Argument(help="An A1111 styles.csv (name, prompt, negative_prompt).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace styles of the same names.")] = False,
) -> None:
    """Add every style of an A1111 styles.csv."""
    added, skipped = _styles().import_file(file, overwrite=overwrite)
    typer.echo(f"imported {len(added)} styles")
    for name in skipped:
        typer.echo(f"skipped {name}: a style of that name exists (--overwrite replaces it)")


@models_app.command("list")
def models_list(as_json: Json = False) -> None:
    """Models you can name with --model."""
    from spellbook.models.registry import ModelRegistry

    entries = ModelRegistry(current_settings()).list()
    if as_json:
        _echo_json([{"name": e.name, "format": e.format, "path": str(e.path), "builtin": e.builtin} for e in entries])
        return
    for e in entries:
        typer.echo(f"{e.name}\t{e.format}{' (built in)' if e.builtin else ''}\t{e.path}")


@models_app.command("add")
def models_add(
    path: Annotated[Path, typer.Argument(help="A diffusers folder or a .safetensors checkpoint.")],
    name: Annotated[str | None, typer.Option(help="Name to use with --model (default: the file name).")] = None,
    copy: Annotated[bool, typer.Option(help="Copy into the models folder instead of linking.")] = False,
) -> None:
    """Add a model to the models folder (its files are checked first: format, architecture, no pickles)."""
    from spellbook.models.info import ModelCatalog
    from spellbook.models.registry import ModelRegistry

    settings = current_settings()
    registry = ModelRegistry(settings)
    info = ModelCatalog(registry, allow_pickle=settings.allow_pickle).check_file(path)
    entry = registry.add(path, name, copy=copy)
    typer.echo(f"added {entry.name} ({entry.format}, {info.family}, {info.native_size}px) -> {entry.path}")


@models_app.command("rm")
def models_rm(name: Annotated[str, typer.Argument(help="A model name from `spellbook models list`.")]) -> None:
    """Remove a model from the models folder (a linked model's own file is left where it is)."""
    from spellbook.models.registry import ModelRegistry

    typer.echo(f"removed {ModelRegistry(current_settings()).remove(name)}")


@models_app.command("info")
def models_info(name: Annotated[str, typer.Argument(help="Model name or path.")], as_json: Json = False) -> None:
    """Show a model's format, hash, architecture and defaults (read from its files; no weights are loaded)."""
    from spellbook.models.info import ModelCatalog, parameter_count
    from spellbook.models.registry import ModelRegistry

    settings = current_settings()
    registry = ModelRegistry(settings)
    entry = registry.resolve(name)
    data = ModelCatalog(registry, allow_pickle=settings.allow_pickle).info_of(entry).to_dict()
    data["parameters"] = parameter_count(entry)
    if as_json:
        _echo_json(data)
    else:
        for key, value in data.items():
            typer.echo(f"{key}: {value}")


# -------------------------------------------------------------------------------------------------- toy
@toy_app.command("judge")
def toy_judge(
    image: Annotated[Path, typer.Argument(help="An image of the shapes world.")],
    prompt: Annotated[str | None, typer.Option(help="The prompt it was made from: report what matches.")] = None,
    as_json: Json = False,
) -> None:
    """Say what a shapes-world image shows (background, colour, shape, position)."""
    from spellbook.provenance import open_image
    from spellbook.toy.judge import judge
    from spellbook.toy.prompts import attributes_of

    verdict = judge(open_image(image))
    data = verdict.to_dict()
    if prompt:
        data["asked"] = attributes_of(prompt)
        data["matches"] = verdict.matches(**data["asked"])
    if as_json:
        _echo_json(data)
        if prompt and not all(data["matches"].values()):
            raise typer.Exit(1)
        return
    typer.echo(
        f"background {verdict.background}, colour {verdict.colour}, shape {verdict.shape}, position {verdict.position}"
    )
    if prompt:
        wrong = [k for k, ok in data["matches"].items() if not ok]
        typer.echo("matches the prompt" if not wrong else f"differs from the prompt in: {', '.join(wrong)}")
        if wrong:
            raise typer.Exit(1)


@toy_app.command("demo")
def toy_demo(
    prompt: Annotated[
        str, typer.Argument(help="A shapes-world prompt.")
    ] = "a red circle on the left, black background",
    seed: Annotated[int, typer.Option(help="Seed.")] = 7,
    out: Out = Path("out/demo"),
) -> None:
    """Generate one image with the built-in shapes model; print its path and the judge's verdict."""
    import time

    from spellbook.recipe import ImageRequest
    from spellbook.toy.judge import judge_trained
    from spellbook.toy.prompts import attributes_of

    studio = _studio()
    recipe = studio.plan(ImageRequest(prompt=prompt, seed=seed))
    started = time.perf_counter()
    results = studio.run(recipe)
    seconds = time.perf_counter() - started
    saved = studio.save(results, out)[0]
    verdict = judge_trained(saved.image)
    matches = verdict.matches(**attributes_of(prompt))
    typer.echo(f"image: {saved.path}")
    typer.echo(
        f"prompt: {prompt} (seed {seed}, {recipe.steps} steps {recipe.sampler}, {recipe.width}x{recipe.height},"
        f" {seconds:.2f} s)"
    )
    typer.echo(
        f"judge: background {verdict.background}, colour {verdict.colour}, shape {verdict.shape}, "
        f"position {verdict.position} -> "
        + (
            "matches the prompt"
            if all(matches.values())
            else "differs in " + ", ".join(k for k, ok in matches.items() if not ok)
        )
    )


@toy_app.command("train")
def toy_train(
    out: Annotated[Path, typer.Option(help="Training folder (checkpoints, curve, exported model).")] = Path(
        "toy-train"
    ),
    minutes: Annotated[
        float | None, typer.Option(help="Stop after this long (checkpoint kept; --resume goes on).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Training seed: the same seed gives the same model.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in --out.")] = False,
    unet_iterations: Annotated[int | None, typer.Option(help="UNet iterations (default: as shipped).")] = None,
) -> None:
    """Train the shapes model from scratch (VAE, then UNet + text encoder, then decoder fine-tuning)."""
    quiet_libraries()
    from spellbook.toy.train import TrainConfig, Trainer, export_model

    config = TrainConfig(seed=seed)
    if unet_iterations:
        config.unet_iterations = unet_iterations
    trainer = Trainer(out, config, log=lambda m: typer.echo(m, err=True))
    if (out / "checkpoint.pt").exists():
        if not resume:
            raise UserError(
                f"{out} already has a checkpoint; pass --resume to continue it, or choose another --out", field="out"
            )
        trainer.load_checkpoint()
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        ) as bar:
            task = bar.add_task("training", total=None)

            def report(phase: str, step: int, total: int, loss: float) -> None:
                bar.update(task, total=total, completed=step, description=f"{phase} loss {loss:.4f}")

            finished = trainer.run(minutes=minutes, progress=report)
    else:  # a log file or a pipe: a plain line every 30 seconds and at each phase's end
        import time

        last = {"at": 0.0, "phase": ""}

        def report(phase: str, step: int, total: int, loss: float) -> None:
            now = time.monotonic()
            if now - last["at"] >= 30 or step == total or phase != last["phase"]:
                last.update(at=now, phase=phase)
                typer.echo(f"{phase} {step}/{total} loss {loss:.4f}", err=True)

        finished = trainer.run(minutes=minutes, progress=report)
    if not finished:
        typer.echo(f"stopped at {trainer.state.phase} {trainer.state.step}; continue with --resume")
        return
    typer.echo(export_model(trainer, out / "model"))


def main() -> None:
    try:
        app()
    except SpellbookError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
