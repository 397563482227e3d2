"""`spellbook gallery …`: thin commands over spellbook.gallery, as the local user (who sees every image)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

gallery_app = typer.Typer(
    help="Search, show, remix, import and export the images Spellbook keeps.", no_args_is_help=True
)

Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
Limit = Annotated[int, typer.Option(help="At most this many results.")]


def _database():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from spellbook.cli_context import current_settings
    from spellbook.store import Database

    return Database(current_settings().db_path)


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=2))


def _print_list(images, as_json: bool) -> None:
    if as_json:
        _echo_json([image.to_dict() for image in images])
        return
    for image in images:
        score = f"{image.score:.3f}" if image.score is not None else "-"
        prompt = image.prompt.replace("\n", " ")
        prompt = prompt if len(prompt) <= 70 else prompt[:69] + "…"
        typer.echo(
            f"{image.id}\t{score}\t{image.model or '-'}\t{image.seed if image.seed is not None else '-'}\t"
            f"{image.width}x{image.height}\t{prompt}\t{image.path}"
        )


def _image_id(value: str) -> int:
    from spellbook.errors import UserError

    if not value.isdigit():
        raise UserError(f"{value!r} is not an image id (a number from `spellbook gallery search`)", field="id")
    return int(value)


@gallery_app.command("search")
def search_command(
    query: Annotated[str, typer.Argument(help="Words or a description, e.g. 'otter in a hat'.")],
    model: Annotated[str | None, typer.Option(help="Only images made with this model.")] = None,
    sampler: Annotated[str | None, typer.Option(help="Only images made with this sampler, e.g. 'Euler a'.")] = None,
    since: Annotated[str | None, typer.Option(help="Only images made on or after this date (YYYY-MM-DD).")] = None,
    owner: Annotated[str | None, typer.Option(help="Only this user's images (a name, an id, or 'local').")] = None,
    mode: Annotated[str, typer.Option(help="hybrid (words and meaning), words, or meaning.")] = "hybrid",
    limit: Limit = 20,
    as_json: Json = False,
) -> None:
    """Find images by the words and the meaning of their prompts."""
    from spellbook.gallery import search

    db = _database()
    results = search(db, query, mode=mode, model=model, sampler=sampler, since=since, owner=owner, limit=limit)
    _print_list(results, as_json)


@gallery_app.command("similar")
def similar_command(
    image: Annotated[str, typer.Argument(help="A gallery image id, or any image file.")],
    limit: Limit = 20,
    as_json: Json = False,
) -> None:
    """Images that look like IMAGE (perceptual hash) or were asked for in the same words (prompt meaning)."""
    from spellbook.gallery import similar

    db = _database()
    target: int | Path = int(image) if image.isdigit() and not Path(image).exists() else Path(image)
    _print_list(similar(db, target, limit=limit), as_json)


@gallery_app.command("show")
def show_command(image_id: Annotated[str, typer.Argument(help="Image id.")], as_json: Json = False) -> None:
    """An image's record and its full recipe."""
    from spellbook.gallery import show

    details = show(_database(), _image_id(image_id))
    if as_json:
        _echo_json(details.to_dict())
        return
    for key, value in details.image.to_dict().items():
        if key != "score":
            typer.echo(f"{key}: {value}")
    typer.echo("recipe: " + json.dumps(details.recipe, ensure_ascii=False))


@gallery_app.command("remix")
def remix_command(
    image_id: Annotated[str, typer.Argument(help="Image id.")],
    cli: Annotated[bool, typer.Option("--cli", help="Print a `spellbook` command line instead of JSON.")] = False,
) -> None:
    """Print an image's recipe to edit and run: a JSON request, or a command line with --cli."""
    from spellbook.gallery import remix

    result = remix(_database(), _image_id(image_id))
    typer.echo(result.command if cli else json.dumps(result.request, ensure_ascii=False, indent=2))


@gallery_app.command("rm")
def rm_command(image_id: Annotated[str, typer.Argument(help="Image id.")]) -> None:
    """Remove an image from the gallery and delete its file."""
    from spellbook.gallery import remove

    image = remove(_database(), _image_id(image_id))
    typer.echo(f"removed {image.id} ({image.path})")


@gallery_app.command("export")
def export_command(
    query: Annotated[str, typer.Argument(help="What to export: a search ('' or '*': every image).")],
    out: Annotated[Path, typer.Argument(help="The zip file to write.")],
    mode: Annotated[str, typer.Option(help="words (images whose prompts hold the words), meaning, hybrid.")] = "words",
    limit: Limit = 1000,
) -> None:
    """Write the images a search finds, and a manifest.json of their recipes, to a zip."""
    from spellbook.gallery import export

    written = export(_database(), query, out, mode=mode, limit=limit)
    typer.echo(f"{len(written)} images -> {out}")


@gallery_app.command("import")
def import_command(
    folder: Annotated[Path, typer.Argument(help="A folder of PNGs (searched recursively).")],
    public: Annotated[bool, typer.Option(help="Make the imported images public.")] = False,
    as_json: Json = False,
) -> None:
    """Import images from A1111, ComfyUI or Spellbook with their recipes; others with an empty one."""
    import sys

    from spellbook.gallery import import_folder

    db = _database()
    report = import_folder(
        db,
        folder,
        visibility="public" if public else "private",
        progress=(lambda done, total: typer.echo(f"{done}/{total}", err=True)) if sys.stderr.isatty() else None,
    )
    if as_json:
        _echo_json(report.to_dict())
        return
    typer.echo(
        f"imported {len(report.imported)}, already in the gallery {len(report.duplicates)}, "
        f"not images {len(report.failed)}"
    )
    for name in report.without_metadata:
        typer.echo(f"no recipe (imported with an empty one): {name}")
    for name, why in report.failed:
        typer.echo(f"skipped: {why}")


@gallery_app.command("publish")
def publish_command(
    image_id: Annotated[str, typer.Argument(help="Image id.")],
    private: Annotated[bool, typer.Option("--private", help="Make it private again.")] = False,
) -> None:
    """Make an image public (in the feed, visible to every user), or private again."""
    from spellbook.gallery import set_visibility

    image = set_visibility(_database(), _image_id(image_id), "private" if private else "public")
    typer.echo(f"{image.id} is {image.visibility}")


@gallery_app.command("feed")
def feed_command(
    order: Annotated[str, typer.Option(help="newest or remixed.")] = "newest",
    limit: Limit = 20,
    as_json: Json = False,
) -> None:
    """Public images, newest or most remixed first."""
    from spellbook.gallery import feed

    _print_list(feed(_database(), order=order, limit=limit), as_json)
