"""`spellbook concept …`: train, list, inspect, export, import and remove concepts. Thin: parse, call, print."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from spellbook.errors import UserError

concept_app = typer.Typer(
    help="Concepts (textual inversion): teach a model a new word from a few pictures; use it as <name>.",
    no_args_is_help=True,
)

Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _library():
    from spellbook.cli_context import current_settings
    from spellbook.concepts.library import ConceptLibrary

    return ConceptLibrary(current_settings())


def _echo_json(data) -> None:
    import json

    typer.echo(json.dumps(data, ensure_ascii=False, indent=2))


@concept_app.command("train")
def train(
    name: Annotated[str, typer.Argument(help="The new word, used in prompts as <NAME> or NAME.")],
    images: Annotated[
        Path, typer.Option("--images", help="Folder of pictures (photo.txt next to photo.png: its captions).")
    ],
    init_word: Annotated[str | None, typer.Option("--init-word", help="Start from this word's embedding.")] = None,
    vectors: Annotated[int, typer.Option("--vectors", help="Vectors (tokens) the concept takes.")] = 1,
    steps: Annotated[int | None, typer.Option("--steps", help="Training steps (default: 400).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate (default: 5e-3).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Pictures per step (default: 8).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="The same seed gives the same concept.")] = 0,
    flip: Annotated[float, typer.Option("--flip", help="Probability of a mirrored picture (0: never).")] = 0.5,
    shift: Annotated[float, typer.Option("--shift", help="Random shift, up to this fraction of the side.")] = 0.0,
    template: Annotated[
        list[str] | None, typer.Option("--template", help="Caption template with {} for the concept (repeatable).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the interrupted training of NAME, with its own settings.")
    ] = False,
    model: Annotated[str | None, typer.Option("--model", help="Model to train for (default: shapes).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a concept of the same name.")] = False,
) -> None:
    """Learn NAME from the pictures in --images (only the new word's vectors are trained)."""
    from spellbook.cli import _studio

    studio = _studio()
    from spellbook.concepts.train import TrainRequest, train_concept

    request = TrainRequest(
        name=name,
        images=images,
        model=model,
        init_word=init_word,
        vectors=vectors,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        flip=flip,
        shift=shift,
        templates=tuple(template or ()),
        resume=resume,
        overwrite=overwrite,
    )
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task(f"training <{name.strip('<>')}>", total=None)

        def report(step: int, total: int, loss: float) -> None:
            bar.update(task, total=total, completed=step, description=f"training <{name.strip('<>')}> loss {loss:.4f}")

        try:
            result = train_concept(studio, request, progress=report)
        except KeyboardInterrupt:
            bar.stop()
            typer.echo("interrupted; the last checkpoint is kept: continue with --resume", err=True)
            raise typer.Exit(130) from None
    info = result.info
    typer.echo(
        f"trained <{info.name}>: {info.vectors} vector(s) x {info.dims}, {result.steps} steps in "
        f"{result.minutes:.1f} min, final loss {result.final_loss:.4f}"
    )
    typer.echo(f"saved {info.path} ({info.size} bytes, hash {info.short_hash})")
    if info.sample:
        typer.echo(f"sample: {info.sample}")


@concept_app.command("list")
def list_(as_json: Json = False) -> None:
    """Concepts in the library (SPELLBOOK_HOME/concepts)."""
    infos = _library().list()
    if as_json:
        _echo_json([i.to_dict() for i in infos])
        return
    if not infos:
        typer.echo("no concepts yet: `spellbook concept train NAME --images DIR` or `spellbook concept import FILE`")
    for i in infos:
        shape = f"{i.vectors}x{i.dims}" if i.vectors else "?"
        typer.echo(
            f"<{i.name}>\t{shape}\t{i.trained_for or '-'}\t{i.short_hash}\t{i.size} B"
            + (f"\t{i.note}" if i.note else "")
        )


@concept_app.command("info")
def info(
    name: Annotated[str, typer.Argument(help="Concept name (with or without <>).")], as_json: Json = False
) -> None:
    """Name, vectors, dims, trained-for model, hash, size, sample image."""
    data = _library().info(name).to_dict()
    if as_json:
        _echo_json(data)
        return
    for key, value in data.items():
        if value not in (None, {}, ""):
            typer.echo(f"{key}: {value}")


@concept_app.command("export")
def export(
    name: Annotated[str, typer.Argument(help="Concept name.")],
    out: Annotated[
        Path, typer.Argument(help="File to write (.safetensors), or a folder (learned_embeds.safetensors).")
    ],
    fmt: Annotated[
        str, typer.Option("--format", help="a1111 ({'emb_params': …}) or diffusers ({'<name>': …}).")
    ] = "a1111",
) -> None:
    """Write a concept for A1111 or diffusers."""
    from spellbook.concepts.formats import FORMATS

    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}", field="format")
    typer.echo(_library().export(name, out, fmt))


@concept_app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="A .safetensors embedding (.pt / .bin with --allow-pickle).")],
    name: Annotated[str | None, typer.Option("--name", help="Name to use in prompts (default: the file name).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a concept of the same name.")] = False,
) -> None:
    """Add an embedding file (A1111 or diffusers layout) to the library."""
    info = _library().import_file(file, name, overwrite=overwrite)
    typer.echo(f"imported <{info.name}>: {info.vectors} vector(s) x {info.dims}, hash {info.short_hash} -> {info.path}")


@concept_app.command("rm")
def rm(name: Annotated[str, typer.Argument(help="Concept name.")]) -> None:
    """Remove a concept (and its sample image) from the library."""
    typer.echo(f"removed {_library().remove(name)}")
