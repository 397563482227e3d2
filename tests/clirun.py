"""Run the `spellbook` CLI in-process, as the console script would, for tests."""

from __future__ import annotations

import sys


def run_cli(args, capsys, monkeypatch) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `spellbook ARGS`."""
    from spellbook.cli import main

    monkeypatch.setattr(sys, "argv", ["spellbook", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err
