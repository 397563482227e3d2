"""What the gallery returns: plain dataclasses that turn into Lexica-like JSON with `to_dict()`."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The columns every query selects for a GalleryImage (`images` aliased as i).
IMAGE_COLUMNS = (
    "i.id, i.path, i.prompt, i.negative_prompt, i.seed, i.guidance, i.model, i.width, i.height, i.sampler, "
    "i.steps, i.owner, i.visibility, i.created, i.source, i.parent_id, i.remix_count"
)


@dataclass(frozen=True)
class GalleryImage:
    """One image. `src` is its path under SPELLBOOK_HOME (what a URL is built from); `path` is absolute.

    `score` says how well it matched: -bm25 for words, cosine similarity for meaning, the reciprocal-rank
    fusion sum for hybrid and similar; None outside a search. Higher is better in every mode.
    """

    id: int
    src: str
    path: str
    prompt: str
    negative_prompt: str
    seed: int | None
    guidance: float | None
    model: str | None
    width: int
    height: int
    sampler: str | None
    steps: int | None
    owner: int | None
    visibility: str
    created: str
    source: str
    parent_id: int | None
    remix_count: int
    score: float | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row, home: Path, score: float | None = None) -> GalleryImage:
        return cls(
            id=row["id"],
            src=row["path"],
            path=str(home / row["path"]),
            prompt=row["prompt"],
            negative_prompt=row["negative_prompt"],
            seed=row["seed"],
            guidance=row["guidance"],
            model=row["model"],
            width=row["width"],
            height=row["height"],
            sampler=row["sampler"],
            steps=row["steps"],
            owner=row["owner"],
            visibility=row["visibility"],
            created=row["created"],
            source=row["source"],
            parent_id=row["parent_id"],
            remix_count=row["remix_count"],
            score=score,
        )

    def with_score(self, score: float | None) -> GalleryImage:
        return GalleryImage(**{**asdict(self), "score": score})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImageDetails:
    """`show`: the image, its full recipe (as stored) and its parent, when it has one visible to the viewer."""

    image: GalleryImage
    recipe: dict[str, Any]
    parent: GalleryImage | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.image.to_dict(),
            "recipe": self.recipe,
            "parent": self.parent.to_dict() if self.parent else None,
        }


@dataclass(frozen=True)
class Remix:
    """An image's recipe as a request to edit and run: `request` is what `make_recipe` takes; `command` is the
    same as one `spellbook` command line."""

    image_id: int
    request: dict[str, Any]
    command: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ImportReport:
    imported: list[GalleryImage] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # files whose pixels the gallery already holds
    without_metadata: list[str] = field(default_factory=list)  # imported with an empty recipe
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, why)

    def to_dict(self) -> dict[str, Any]:
        return {
            "imported": [image.to_dict() for image in self.imported],
            "duplicates": self.duplicates,
            "without_metadata": self.without_metadata,
            "failed": [{"file": name, "error": why} for name, why in self.failed],
        }


def recipe_of_row(row: sqlite3.Row) -> dict[str, Any]:
    return json.loads(row["recipe"] or "{}")
