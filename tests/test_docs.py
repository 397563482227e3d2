"""The docs keep up with the code (as sqlite-utils checks its own): every command of the `spellbook` CLI is
shown, as `spellbook GROUP CMD`, in the README or a page under docs/, has a one-line help, and the docs name
no subcommand that does not exist. Settings (`SPELLBOOK_*`) are checked against the README's table in
test_settings.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from spellbook.cli import app

ROOT = Path(__file__).parent.parent


def walk(command, path: tuple[str, ...] = ()):
    """(path, command) for every runnable command, e.g. (("models", "list"), <command>); groups are walked."""
    subcommands = getattr(command, "commands", None)
    if subcommands is None:
        yield path, command
        return
    for name, sub in sorted(subcommands.items()):
        if not sub.hidden:
            yield from walk(sub, (*path, name))


COMMANDS = dict(walk(typer.main.get_command(app)))
GROUPS = {path[0] for path in COMMANDS if len(path) > 1}


def docs_text() -> str:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return "\n".join(page.read_text(encoding="utf-8") for page in pages)


def test_the_cli_has_groups_and_commands():
    # The walk itself works (a Typer upgrade that changed how groups are exposed would make every check vacuous).
    assert ("generate",) in COMMANDS and ("models", "list") in COMMANDS
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_command_is_documented(path):
    name = "spellbook " + " ".join(path)
    assert re.search(re.escape(name) + r"(?![\w-])", docs_text()), f"`{name}` is not shown in README.md or docs/*.md"


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_command_has_help(path):
    help_text = (COMMANDS[path].help or "").strip()
    assert help_text, f"`spellbook {' '.join(path)}` has no help text (its docstring is its --help line)"


def test_docs_name_only_commands_that_exist():
    pattern = r"spellbook (" + "|".join(sorted(GROUPS)) + r") ([a-z][\w-]*)"
    named = {(group, cmd) for group, cmd in re.findall(pattern, docs_text())}
    assert named - set(COMMANDS) == set(), "the docs show subcommands the CLI does not have"
