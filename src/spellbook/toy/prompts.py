"""Reading a shapes-world prompt back into the attributes it names (the rest left free)."""

from __future__ import annotations

import re

from spellbook.toy.world import BACKGROUNDS, COLOURS, POSITIONS, SHAPES


def attributes_of(prompt: str) -> dict[str, str | None]:
    """'a red circle on the left, black background' -> colour red, shape circle, position left, background black."""
    text = prompt.lower()
    words = re.findall(r"[a-z]+", text)

    def first(options, exclude: set[str] = frozenset()) -> str | None:
        for word in words:
            if word in options and word not in exclude:
                return word
        return None

    background = None
    match = re.search(r"\b(" + "|".join(BACKGROUNDS) + r")\s+background\b", text)
    if match:
        background = match.group(1)
    colour_match = re.search(r"\b(" + "|".join(COLOURS) + r")\b(?!\s+background)", text)
    position = None
    match = re.search(r"\b(?:on|at|in) the (" + "|".join(POSITIONS) + r")\b", text)
    if match:
        position = match.group(1)
    return {
        "colour": colour_match.group(1) if colour_match else None,
        "shape": first(SHAPES),
        "position": position,
        "background": background,
    }
