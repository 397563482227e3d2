"""X/Y/Z plots: one request varied along up to three axes, every cell a recipe of its own, drawn as labelled grids.

An axis is `field=values`: a request field (`seed`, `steps`, `cfg`, `sampler`, `schedule`, `size`, `clip_skip`,
`strength`, `negative_prompt`, `variation_seed`, `variation_strength`, `hires_scale`, `hires_steps`,
`hires_denoise`, `hires_upscaler`, …) or `prompt_sr` (A1111's Prompt S/R:
the first value is searched in the prompt, each value replaces it). Values are comma-separated, with A1111's
CSV quoting (`"a, b"`) and its ranges: `10-30 (+10)` (a step), `3-9 [4]` (a count, evenly spread), `1-4`
(step 1); with a decimal point they are floats. Every cell is planned before anything runs, so a bad value is
an error naming its axis and value, and no credits or minutes are spent. The cells are written like any image
(each PNG has its recipe); the grid PNG lists them in a `spellbook-grid` chunk, so `reproduce` can run the
whole grid again.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from spellbook.errors import SpellbookError, UserError
from spellbook.recipe import ImageRequest, Recipe, parse_size

# Axis names (ours and A1111's words) -> the ImageRequest field they set.
FIELDS = {
    "seed": "seed",
    "steps": "steps",
    "cfg": "guidance",
    "cfg_scale": "guidance",
    "guidance": "guidance",
    "sampler": "sampler",
    "schedule": "schedule",
    "scheduler": "schedule",
    "size": "size",
    "width": "width",
    "height": "height",
    "clip_skip": "clip_skip",
    "strength": "strength",
    "denoising": "strength",
    "negative_prompt": "negative_prompt",
    "model": "model",
    "variation_seed": "subseed",
    "subseed": "subseed",
    "variation_strength": "subseed_strength",
    "subseed_strength": "subseed_strength",
    "prompt_sr": "prompt_sr",
    "prompt s/r": "prompt_sr",
    # the hires pass (the request's own `hires` gives the rest; a scale or size is needed)
    "hires_scale": "hires.scale",
    "hires_steps": "hires.steps",
    "hires steps": "hires.steps",
    "hires_denoise": "hires.denoise",
    "hires_upscaler": "hires.upscaler",
    "hires upscaler": "hires.upscaler",
}
MAX_VALUES = 10_000  # of one axis, ranges expanded (a grid is capped far lower: SPELLBOOK_MAX_GRID_CELLS)
# The fields (as errors name them) an axis's values set, where that is more than the axis's own field.
_SETS = {
    "size": {"size", "width", "height"},
    "width": {"size", "width"},
    "height": {"size", "height"},
    "prompt_sr": {"prompt", "negative_prompt"},
}
_INT_FIELDS = {"seed", "steps", "width", "height", "clip_skip", "subseed", "hires.steps"}
_FLOAT_FIELDS = {"guidance", "strength", "subseed_strength", "hires.scale", "hires.denoise"}
_INT_RANGE = re.compile(r"^\s*([+-]?\d+)\s*-\s*([+-]?\d+)\s*(?:\(\s*([+-]?\d+)\s*\)|\[\s*(\d+)\s*\])?\s*$")
_FLOAT_RANGE = re.compile(
    r"^\s*([+-]?\d*\.?\d+)\s*-\s*([+-]?\d*\.?\d+)\s*(?:\(\s*([+-]?\d*\.?\d+)\s*\)|\[\s*(\d+)\s*\])?\s*$"
)


@dataclass(frozen=True)
class Axis:
    name: str  # as the user wrote it (a label on the grid)
    field: str  # the ImageRequest field, or "prompt_sr"
    values: tuple[str, ...]  # as labels
    option: str = ""  # where the user gave it (`--x`, `x`): errors about its values name it

    def record(self) -> dict:
        """As a grid PNG's `spellbook-grid` chunk and the server's grids table keep it."""
        return {"name": self.name, "field": self.field, "values": list(self.values)}

    @classmethod
    def from_record(cls, record: dict, option: str = "") -> Axis:
        return cls(str(record["name"]), str(record["field"]), tuple(str(v) for v in record["values"]), option)

    def sets(self, field: str | None) -> bool:
        """Whether a cell's error about request field `field` comes from this axis's values."""
        return field in _SETS.get(self.field, {self.field})

    def apply(self, request: ImageRequest, index: int) -> ImageRequest:
        value = self.values[index]
        if self.field == "prompt_sr":
            search = self.values[0]
            if search not in request.prompt and search not in request.negative_prompt:
                raise UserError(  # as A1111: every cell would be the same picture
                    f"{self.name}: {search!r} is in neither the prompt nor the negative prompt; the first value is "
                    "the text each value replaces",
                    field=self.option or "prompt_sr",
                )
            return request.with_(
                prompt=request.prompt.replace(search, value),
                negative_prompt=request.negative_prompt.replace(search, value),
            )
        if self.field == "size":
            width, height = parse_size(value)
            return request.with_(width=width, height=height)
        converted: object = value
        if self.field in _INT_FIELDS:
            converted = int(float(value))
        elif self.field in _FLOAT_FIELDS:
            converted = float(value)
        if self.field.startswith("hires."):
            hires = request.hires.to_dict() if hasattr(request.hires, "to_dict") else dict(request.hires or {})
            if self.field == "hires.scale" or hires.get("scale") is not None:
                hires.pop("width", None), hires.pop("height", None)  # a factor sizes the pass
            return request.with_(hires={**hires, self.field.removeprefix("hires."): converted})
        return request.with_(**{self.field: converted})


def parse_axis(text: str, option: str) -> Axis:
    """'seed=1,2,3' / 'cfg=3-9 [4]' / 'prompt_sr=red,blue' -> Axis; errors name the option."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise UserError(f"{option} {text!r}: write FIELD=VALUES, e.g. seed=1,2,3 or cfg=3-9 [4]", field=option)
    field = FIELDS.get(name.lower())
    if field is None:
        raise UserError(
            f"{option}: unknown field {name!r}; fields: {', '.join(sorted(set(FIELDS)))}",
            field=option,
        )
    values = _values(raw, field, option)
    if not values:
        raise UserError(f"{option} {name}: give at least one value", field=option)
    if field == "prompt_sr" and len(values) < 2:
        raise UserError(f"{option} prompt_sr: give the words to search and at least one replacement", field=option)
    return Axis(name, field, tuple(values), option)


def _values(raw: str, field: str, option: str) -> list[str]:
    items = [item.strip() for item in next(csv.reader(io.StringIO(raw), skipinitialspace=True), [])]
    if field in _INT_FIELDS or field in _FLOAT_FIELDS:
        expanded: list[str] = []
        for item in items:
            expanded += _range(item, field in _INT_FIELDS, option) or [item]
            if len(expanded) > MAX_VALUES:
                raise UserError(f"{option} {field}: more than {MAX_VALUES} values", field=option)
        for value in expanded:
            try:
                number = float(value)
            except ValueError:
                raise UserError(f"{option}: {value!r} is not a number ({field} takes numbers)", field=option) from None
            if not math.isfinite(number):
                raise UserError(f"{option}: {value!r} is not a finite number ({field})", field=option)
            if field in _INT_FIELDS and number != int(number):
                raise UserError(f"{option}: {value!r} is not a whole number ({field})", field=option)
        return expanded
    if field == "size":
        for value in (item for item in items if item != ""):
            try:
                parse_size(value)
            except UserError as error:
                raise UserError(f"{option}: {error.message}", field=option) from None
    return [item for item in items if item != ""] if field != "prompt_sr" else items


def _range(item: str, integer: bool, option: str) -> list[str] | None:
    """A1111's ranges: 'a-b' (step 1), 'a-b (+s)' (step s), 'a-b [n]' (n values, evenly spread)."""
    match = (_INT_RANGE if integer else _FLOAT_RANGE).match(item)
    if not match:
        return None
    start, end = (
        (int(match.group(1)), int(match.group(2))) if integer else (float(match.group(1)), float(match.group(2)))
    )
    if match.group(4):  # a count
        count = int(match.group(4))
        if count < 1:
            raise UserError(f"{option} {item!r}: the count must be at least 1", field=option)
        if count == 1:
            return [_label(start, integer)]
        return [_label(start + (end - start) * i / (count - 1), integer) for i in range(count)]
    step = (int(match.group(3)) if integer else float(match.group(3))) if match.group(3) else 1
    if step == 0 or (end - start) * step < 0:
        raise UserError(f"{option} {item!r}: the step must go from {start} towards {end}", field=option)
    values, value = [], start
    while (value <= end + 1e-9) if step > 0 else (value >= end - 1e-9):
        values.append(_label(value, integer))
        value += step
        if len(values) > MAX_VALUES:
            raise UserError(f"{option} {item!r}: too many values", field=option)
    return values


def _label(value: float, integer: bool) -> str:
    return str(int(value)) if integer else f"{round(value, 6):g}"


@dataclass(frozen=True)
class Cell:
    x: int
    y: int
    z: int
    recipe: Recipe


def plan_cells(
    base: ImageRequest,
    axes: list[Axis | None],
    plan: Callable[[ImageRequest], Recipe],
    max_cells: int,
    *,
    request_field: str | None = None,
) -> list[Cell]:
    """Every cell's recipe (x fastest), planned before anything runs; an error names the cell's axes and values.

    The error's field is the axis whose values set the field that was refused (its option, e.g. `--x`); a field no
    axis sets is the base request's: `request_field` + its name (the server's `request.sampler`), or `grid`."""
    x_axis, y_axis, z_axis = (axes + [None, None, None])[:3]
    sizes = [len(axis.values) if axis else 1 for axis in (x_axis, y_axis, z_axis)]
    total = sizes[0] * sizes[1] * sizes[2]
    if total > max_cells:
        raise UserError(
            f"the grid has {total} cells ({' x '.join(str(n) for n in sizes)}); at most {max_cells} are allowed",
            field="grid",
            hint="use fewer values, or raise SPELLBOOK_MAX_GRID_CELLS",
        )
    import random

    if base.seed in (None, -1):  # one seed for the whole grid, as A1111 fixes it, unless an axis varies it
        base = base.with_(seed=random.SystemRandom().randint(0, 2**32 - 1))
    if base.subseed in (None, -1):  # and one variation seed, should a cell use one (a variation_strength axis)
        base = base.with_(subseed=random.SystemRandom().randint(0, 2**32 - 1))
    cells = []
    for z in range(sizes[2]):
        for y in range(sizes[1]):
            for x in range(sizes[0]):
                request, where = base, []
                for axis, index in ((x_axis, x), (y_axis, y), (z_axis, z)):
                    if axis is not None:
                        request = axis.apply(request, index)
                        where.append(f"{axis.name}={axis.values[index]}")
                try:
                    recipe = plan(request)
                except (SpellbookError, ValueError) as error:
                    # The same kind of error (invalid, refused, not found), saying which cell.
                    kind = type(error) if isinstance(error, SpellbookError) else UserError
                    message = error.message if isinstance(error, SpellbookError) else str(error)
                    field = _blame(error, (x_axis, y_axis, z_axis), request_field)
                    hint = error.hint if isinstance(error, SpellbookError) else None
                    raise kind(f"cell {', '.join(where)}: {message}", field=field, hint=hint) from None
                cells.append(Cell(x, y, z, recipe))
    return cells


def _blame(error: Exception, axes: tuple[Axis | None, ...], request_field: str | None) -> str:
    """The field a cell's error names: the axis whose values set the refused field, else the request's field."""
    field = error.field if isinstance(error, SpellbookError) else None
    for axis in axes:
        if axis is not None and axis.option and axis.sets(field):
            return axis.option
    return f"{request_field}{field}" if field and request_field is not None else "grid"


def draw_grid(images: list, x_axis: Axis | None, y_axis: Axis | None, title: str = ""):
    """One labelled grid (PIL image): column labels on top, row labels on the left, cells scaled up to at least
    128 px (nearest neighbour, so a 32 px image stays crisp) so the labels stay legible."""
    from PIL import Image, ImageDraw, ImageFont

    columns = len(x_axis.values) if x_axis else 1
    rows = len(y_axis.values) if y_axis else 1
    # cells of different sizes (a size or hires axis) are all shown at the largest one's size
    cell_w, cell_h = max(image.width for image in images), max(image.height for image in images)
    font = ImageFont.load_default(size=14)
    # wide enough for the column labels too (up to 512 px a cell; a longer label is shortened with "…")
    widest = max((font.getlength(f"{x_axis.name}: {v}") for v in x_axis.values), default=0) if x_axis else 0
    scale = max(1, -(-128 // min(cell_w, cell_h)), min(-(-int(widest + 12) // cell_w), max(1, 512 // cell_w)))
    cell_w, cell_h = cell_w * scale, cell_h * scale
    left = 12 + max((int(font.getlength(f"{y_axis.name}: {v}")) for v in y_axis.values), default=0) if y_axis else 0
    top = (24 if x_axis else 0) + (24 if title else 0)
    grid = Image.new("RGB", (left + columns * cell_w, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((left, 4), title, fill="black", font=font)
    for index, image in enumerate(images):
        column, row = index % columns, index // columns
        grid.paste(image.resize((cell_w, cell_h), Image.NEAREST), (left + column * cell_w, top + row * cell_h))
    if x_axis:
        for column, value in enumerate(x_axis.values):
            label = f"{x_axis.name}: {value}"
            while font.getlength(label) > cell_w - 8 and len(label) > 2:
                label = label[:-2] + "…"
            width = font.getlength(label)
            draw.text((left + column * cell_w + (cell_w - width) / 2, top - 20), label, fill="black", font=font)
    if y_axis:
        for row, value in enumerate(y_axis.values):
            draw.text((6, top + row * cell_h + cell_h / 2 - 8), f"{y_axis.name}: {value}", fill="black", font=font)
    return grid


def axes_record(axes: list[Axis | None]) -> dict:
    """The axes as a grid records them: {"x": {"name", "field", "values"} | None, "y": …, "z": …}."""
    padded = (list(axes) + [None, None, None])[:3]
    return {key: axis.record() if axis else None for key, axis in zip(("x", "y", "z"), padded, strict=True)}


def axes_from_record(record: dict) -> list[Axis | None]:
    return [Axis.from_record(record[key], key) if record.get(key) else None for key in ("x", "y", "z")]


def grid_png(axes: list[Axis | None], z: int, cells: list[Cell], images: list, files: list[str]) -> bytes:
    """The one grid writer (`spellbook grid`, `reproduce` of a grid, the server's /grids/{id}/images/{z}): the
    labelled grid of Z value `z` from its cells (x fastest) and their pictures, as PNG bytes carrying the
    `spellbook-grid` chunk: the axes, and each cell's place, file name and recipe, so the grid can be run again."""
    from spellbook.provenance import grid_png_bytes

    x_axis, y_axis, z_axis = (list(axes) + [None, None, None])[:3]
    title = f"{z_axis.name}: {z_axis.values[z]}" if z_axis else ""
    image = draw_grid(images, x_axis, y_axis, title)
    record = {
        "axes": axes_record(axes),
        "z": z,
        "cells": [
            {"x": cell.x, "y": cell.y, "file": file, "recipe": cell.recipe.to_dict()}
            for cell, file in zip(cells, files, strict=True)
        ],
    }
    return grid_png_bytes(image, record)
