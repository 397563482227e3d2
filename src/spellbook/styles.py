"""Styles: named prompt templates, kept in SPELLBOOK_HOME/styles.csv in AUTOMATIC1111's format.

A1111's styles.csv has the columns `name, prompt, negative_prompt`; a style's prompt may hold `{prompt}`, where
the user's prompt goes, else it is appended after a comma (A1111's modules/styles.py `merge_prompts`). Styles
apply in the order given, each to the result of the one before, to the prompt and the negative prompt alike.
A1111's file can be copied in as is (`spellbook styles import styles.csv`). A recipe records the expanded
prompts, which are what ran, and the names of the styles that made them.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from spellbook.errors import Conflict, NotFound, UserError
from spellbook.recipe import suggest
from spellbook.settings import Settings

FIELDS = ("name", "prompt", "negative_prompt")


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def merge(style_prompt: str, prompt: str) -> str:
    """A1111's merge: the prompt in place of `{prompt}`, else both joined by a comma (empty parts left out)."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, styles: list[Style]) -> tuple[str, str]:
    for style in styles:
        prompt = merge(style.prompt, prompt)
        negative_prompt = merge(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt


def read_csv(text: str, source: str = "styles.csv") -> list[Style]:
    """Styles from A1111's CSV (a header with at least `name` and `prompt`; `negative_prompt` optional)."""
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    if "name" not in columns or "prompt" not in columns:
        raise UserError(
            f"{source} is not a styles file: its header must name the columns name, prompt, negative_prompt "
            f"(found {', '.join(columns) or 'no header'})",
            field="file",
        )
    styles, seen = [], set()
    for number, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "") for k, v in row.items()}
        name = row.get("name", "").strip()
        if not name:
            continue  # A1111 writes a nameless "None" row in old files; an empty name is no style
        if name in seen:
            raise UserError(f"{source} line {number}: style {name!r} appears twice", field="file")
        seen.add(name)
        styles.append(Style(name, row.get("prompt", ""), row.get("negative_prompt", "")))
    return styles


def to_csv(styles: list[Style]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for style in styles:
        writer.writerow(style.to_dict())
    return buffer.getvalue()


class StyleLibrary:
    def __init__(self, settings: Settings):
        self.path = settings.home / "styles.csv"

    def list(self) -> list[Style]:
        if not self.path.is_file():
            return []
        return read_csv(self.path.read_text(encoding="utf-8-sig"), str(self.path))

    def get(self, names: list[str] | tuple[str, ...]) -> list[Style]:
        """The styles named, in that order; an unknown name is an error with the closest names."""
        by_name = {style.name: style for style in self.list()}
        found = []
        for name in names:
            if name not in by_name:
                hint = suggest(name, list(by_name)) if by_name else f"there are no styles yet ({self.path})"
                raise NotFound(f"unknown style {name!r}; {hint}", field="styles")
            found.append(by_name[name])
        return found

    def add(self, style: Style, *, overwrite: bool = False) -> Style:
        name = style.name.strip()
        if not name or any(ch in name for ch in "\n\r"):
            raise UserError("a style needs a name on one line", field="name")
        styles = self.list()
        if any(s.name == name for s in styles) and not overwrite:
            raise Conflict(f"a style named {name!r} exists; pass --overwrite to replace it", field="name")
        styles = [s for s in styles if s.name != name] + [Style(name, style.prompt, style.negative_prompt)]
        self._write(styles)
        return styles[-1]

    def remove(self, name: str) -> None:
        styles = self.list()
        if not any(s.name == name for s in styles):
            self.get([name])  # the error, with suggestions
        self._write([s for s in styles if s.name != name])

    def import_file(self, source: Path, *, overwrite: bool = False) -> tuple[list[Style], list[str]]:
        """Add every style of an A1111 styles.csv; returns (added, skipped names that exist) unless overwrite."""
        source = Path(source).expanduser()
        if not source.is_file():
            raise UserError(f"{source} does not exist or is not a file", field="file")
        try:
            incoming = read_csv(source.read_text(encoding="utf-8-sig"), str(source))
        except UnicodeDecodeError:
            raise UserError(f"{source} is not UTF-8 text (A1111's styles.csv is)", field="file") from None
        existing = {s.name: s for s in self.list()}
        added, skipped = [], []
        for style in incoming:
            if style.name in existing and not overwrite:
                skipped.append(style.name)
                continue
            existing[style.name] = style
            added.append(style)
        self._write(list(existing.values()))
        return added, skipped

    def _write(self, styles: list[Style]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".styles-", suffix=".csv")
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(to_csv(styles))
        os.replace(tmp, self.path)
