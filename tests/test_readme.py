"""The README's short tour runs as written, line by line, in a fresh home (a docs test, as sqlite-utils has)."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

from clirun import run_cli

ROOT = Path(__file__).resolve().parent.parent


def tour_commands() -> list[list[str]]:
    """The commands of the first code block under '## A short tour' (continuations joined, comments dropped)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A short tour") :]
    block = re.search(r"```\n(.*?)```", section, re.DOTALL).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


def test_the_tour_is_what_this_test_runs():
    commands = tour_commands()
    assert len(commands) >= 10 and all(command[0] == "spellbook" for command in commands)
    assert any("Karras" in " ".join(command) for command in commands)


def test_every_line_of_the_readme_tour_runs(home, tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    for command in tour_commands():
        code, out, err = run_cli(command[1:], capsys, monkeypatch)
        assert code == 0, f"`{shlex.join(command)}` exited {code}: {err or out}"
    assert (tmp_path / "out" / "00001-7.png").is_file()
