"""CLI commands of the server: serve, worker, users, token, credits (thin: parse, call, print)."""

from __future__ import annotations

from typing import Annotated

import typer

from spellbook.cli_context import current_settings, quiet_libraries

users_app = typer.Typer(help="Accounts of the server.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens (shown once, stored hashed).", no_args_is_help=True)
credits_app = typer.Typer(help="Credits: grant and inspect.", no_args_is_help=True)


def _given(**values):
    """The flags the user gave (None: not given, so the SPELLBOOK_* setting or the default stands)."""
    return {name: value for name, value in values.items() if value is not None}


def _accounts():
    from spellbook.store.accounts import Accounts
    from spellbook.store.db import Database

    return Accounts(Database(current_settings().db_path))


def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1: this machine only).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 7860, as A1111).")] = None,
    broker: Annotated[
        str | None, typer.Option(help="redis://… : scale-out mode, jobs run on `spellbook worker` processes.")
    ] = None,
) -> None:
    """Serve the API (and the in-process worker unless --broker is given)."""
    import uvicorn

    quiet_libraries()

    from spellbook.server.app import create_app

    settings = current_settings().with_(**_given(host=host, port=port, broker=broker))
    app = create_app(settings)  # refuses to start off loopback without an admin (a SpellbookError: exit 2)
    typer.echo(
        f"Spellbook on http://{settings.host}:{settings.port} ({'scale-out' if settings.broker else 'embedded'})"
    )
    stopping = app.state.services.stopping

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # SIGTERM / Ctrl-C: requests waiting for a job (A1111's synchronous calls) give up at once, so the
            # graceful shutdown is not held by a client that went away; their jobs stay queued.
            stopping.set()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=5
    )
    Server(config).run()


def worker(
    broker: Annotated[str, typer.Option(help="The broker the server dispatches to, e.g. redis://127.0.0.1:6379/0")],
    name: Annotated[str | None, typer.Option(help="Worker name (default: host and pid).")] = None,
) -> None:
    """Run jobs from the broker; keeps models loaded between jobs."""
    from spellbook.queue.celery import run_worker

    quiet_libraries()

    run_worker(current_settings().with_(**_given(broker=broker)), name=name)


@users_app.command("add")
def users_add(
    name: str,
    admin: Annotated[bool, typer.Option("--admin", help="May grant credits and change server settings.")] = False,
    password: Annotated[
        bool, typer.Option("--password", help="Ask for a password (for HTTP Basic / A1111 clients).")
    ] = False,
) -> None:
    """Create a user (with no credits until granted)."""
    secret = typer.prompt("password", hide_input=True, confirmation_prompt=True) if password else None
    user = _accounts().add_user(name, admin=admin, password=secret)
    typer.echo(f"user {user.name} ({user.role}) created")


@users_app.command("list")
def users_list() -> None:
    """Every user: name, role and balance."""
    for user in _accounts().users():
        typer.echo(f"{user.name}\t{user.role}\t{user.balance} credits")


@token_app.command("create")
def token_create(name: str, label: Annotated[str, typer.Option(help="What the token is for.")] = "") -> None:
    """Print a new token for USER (it is not stored and cannot be shown again)."""
    typer.echo(_accounts().create_token(name, label))


@credits_app.command("grant")
def credits_grant(name: str, amount: int, note: Annotated[str, typer.Option(help="Ledger note.")] = "") -> None:
    """Give USER credits (a negative AMOUNT takes them back); written to the ledger."""
    user = _accounts().grant(name, amount, note)
    typer.echo(f"{user.name}: {user.balance} credits")


@credits_app.command("show")
def credits_show(name: str) -> None:
    """USER's balance and newest ledger rows."""
    accounts = _accounts()
    typer.echo(f"{name}: {accounts.user(name).balance} credits")
    for row in accounts.ledger(name):
        typer.echo(f"{row['created']}\t{row['delta']:+d}\t{row['reason']}\t{row['job_id'] or row['note']}")


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(worker)
    app.add_typer(users_app, name="users")
    app.add_typer(token_app, name="token")
    app.add_typer(credits_app, name="credits")
