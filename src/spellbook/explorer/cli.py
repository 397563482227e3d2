"""`spellbook explore …`: thin commands over the explorer library (ingest, synth, query, serve).

Only typer is imported at module level: pyarrow, sqlite-utils and Datasette load inside the commands, so
`spellbook --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="Training-data explorer: LAION-style caption data in SQLite, searched, served with Datasette, "
    "linked to prompts.",
    no_args_is_help=True,
)

Db = Annotated[
    Path | None,
    typer.Option("--db", help="Explorer database (default: SPELLBOOK_HOME/explorer.db)."),
]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _db(db: Path | None) -> Path:
    if db is not None:
        return db
    from spellbook.cli_context import current_settings

    return current_settings().home / "explorer.db"


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=2))


def _percent(share: float) -> str:
    return f"{100 * share:.2f} %"


def _progress(enabled: bool):
    """A rich progress bar on stderr (transient) when stderr is a terminal; (context, bar, task)."""
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(), None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    return bar, bar, bar.add_task("starting", total=None)


@app.command()
def ingest(
    files: Annotated[list[Path], typer.Argument(help="LAION-style parquet files (URL, TEXT, … columns).")],
    db: Db = None,
    batch_rows: Annotated[int, typer.Option("--batch-rows", help="Rows per transaction.")] = 10_000,
    as_json: Json = False,
) -> None:
    """Load parquet files into the explorer database (streaming; run again to resume after a kill)."""
    from spellbook.explorer.ingest import ingest as ingest_files

    path = _db(db)
    context, bar, task = _progress(not as_json and sys.stderr.isatty())

    def report_progress(p) -> None:
        label = f"ingest {p.file}" if p.stage == "rows" else f"computing {p.stage}"
        bar.update(task, description=label, total=p.rows_total, completed=p.rows_done)

    try:
        with context:
            report = ingest_files(files, path, batch_rows=batch_rows, progress=report_progress if bar else None)
    except KeyboardInterrupt:
        typer.echo(f"interrupted; what was committed stays in {path}: run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    if as_json:
        _echo_json(report.to_dict())
        return
    for f in report.files:
        line = f"{f.path}: {f.status}, {f.rows_ingested:,} rows"
        if f.status == "resumed":
            line += f" (resumed at row {f.resumed_from_row:,})"
        if f.rows_rejected:
            reasons = ", ".join(f"{reason}: {n:,}" for reason, n in sorted(f.rejected_by_reason.items()))
            line += f", {f.rows_rejected:,} rejected ({reasons}; see the rejected_rows table)"
        if f.missing_columns:
            line += f"; missing columns (stored as NULL): {', '.join(f.missing_columns)}"
        typer.echo(line)
    rate = report.rows_ingested / report.seconds if report.seconds else 0
    typer.echo(
        f"{report.db}: {report.images_total:,} images; this run added {report.rows_ingested:,} "
        f"in {report.seconds:.1f} s ({rate:,.0f} rows/s)"
    )


@app.command()
def synth(
    rows: Annotated[int, typer.Option(help="How many rows.")] = 1_000_000,
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write.")] = Path("synthetic.parquet"),
    seed: Annotated[int, typer.Option(help="Same seed, same rows.")] = 0,
    row_group_rows: Annotated[int, typer.Option("--row-group-rows", help="Rows per parquet row group.")] = 100_000,
) -> None:
    """Write realistic synthetic LAION-style data (no network; deterministic for a seed)."""
    from spellbook.explorer.synth import write_synthetic

    context, bar, task = _progress(sys.stderr.isatty())

    def report_progress(done: int, total: int) -> None:
        bar.update(task, description="synth", total=total, completed=done)

    with context:
        path = write_synthetic(
            out, rows, seed=seed, row_group_rows=row_group_rows, progress=report_progress if bar else None
        )
    typer.echo(f"{path}: {rows:,} synthetic rows (seed {seed})")


@app.command()
def serve(
    db: Db = None,
    host: Annotated[str, typer.Option(help="Address to bind; the default is this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8001,
) -> None:
    """Browse the database in Datasette: search, facets, canned queries, thumbnails (read-only)."""
    from spellbook.explorer.datasette_app import database_name
    from spellbook.explorer.datasette_app import serve as serve_datasette

    path = _db(db)
    shown = f"[{host}]" if ":" in host else host
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"note: bound to {host}: anyone who can reach it can read the whole database", err=True)
    typer.echo(f"explorer: http://{shown}:{port}/{database_name(path)}/images  (Ctrl-C stops)", err=True)
    serve_datasette(path, host=host, port=port)


def _explorer(db: Path | None):
    from spellbook.explorer.query import Explorer

    return Explorer.open(_db(db))


def _sample_lines(samples, indent: str = "    ") -> None:
    for s in samples:
        score = f"{s.aesthetic:.2f}" if s.aesthetic is not None else "  -  "
        typer.echo(f"{indent}{score}  {s.caption}")
        typer.echo(f"{indent}      {s.url}")


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="Words that must all appear in the caption.")],
    db: Db = None,
    limit: Annotated[int, typer.Option(help="How many captions to show.")] = 20,
    phrase: Annotated[bool, typer.Option("--phrase", help="Match the words as one exact phrase.")] = False,
    as_json: Json = False,
) -> None:
    """Captions containing QUERY, with their count."""
    with _explorer(db) as explorer:
        result = explorer.search(query, limit=limit, phrase=phrase)
        total = explorer.images
    if as_json:
        _echo_json(result.to_dict())
        return
    typer.echo(f"{result.count:,} captions contain {query!r} ({_percent(result.share)} of {total:,})")
    _sample_lines(result.rows, indent="")


@app.command()
def domains(
    db: Db = None,
    limit: Annotated[int, typer.Option(help="How many domains.")] = 20,
    as_json: Json = False,
) -> None:
    """The sites most images come from: domain, image count, share."""
    with _explorer(db) as explorer:
        rows = explorer.domains(limit=limit)
    if as_json:
        _echo_json([r.to_dict() for r in rows])
        return
    width = max((len(r.domain) for r in rows), default=6)
    for rank, r in enumerate(rows, 1):
        typer.echo(f"{rank:>4}  {r.domain:<{width}}  {r.count:>12,}  {_percent(r.share):>8}")


@app.command()
def artists(
    db: Db = None,
    limit: Annotated[int | None, typer.Option(help="How many artists (default: all listed).")] = None,
    min_count: Annotated[int, typer.Option("--min-count", help="Only artists named in at least this many.")] = 0,
    as_json: Json = False,
) -> None:
    """Listed artists by how many captions name them."""
    with _explorer(db) as explorer:
        rows = explorer.artists(limit=limit, min_count=min_count)
    if as_json:
        _echo_json([{"artist": r.artist, "count": r.count, "share": r.share, "spellings": r.spellings} for r in rows])
        return
    width = max((len(r.artist) for r in rows), default=6)
    for r in rows:
        typer.echo(f"{r.artist:<{width}}  {r.count:>10,}")


@app.command()
def prompt(
    text: Annotated[str, typer.Argument(metavar="PROMPT", help="A prompt, as you would write it.")],
    db: Db = None,
    samples: Annotated[int, typer.Option(help="Sample captions per phrase and artist.")] = 3,
    as_json: Json = False,
) -> None:
    """How many training captions stand behind each phrase and artist of a prompt."""
    with _explorer(db) as explorer:
        link = explorer.prompt(text, samples=samples)
    if as_json:
        _echo_json(link.to_dict())
        return
    typer.echo(f"{link.images:,} captions in the database")
    for p in link.phrases:
        typer.echo(f"phrase {p.term!r}: {p.count:,} captions ({_percent(p.share)})")
        _sample_lines(p.samples)
    for a in link.artists:
        note = "" if a.known else " (not in the artist list)"
        typer.echo(f"artist {a.artist}{note}: {a.count:,} captions ({_percent(a.share)})")
        _sample_lines(a.samples)
