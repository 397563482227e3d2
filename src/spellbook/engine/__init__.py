"""The engine: Components + Recipe -> images. Pure compute: no database, no files, no HTTP.

The package itself imports nothing heavy: `spellbook.engine.schedule` (the prompt language) is read by the
recipe without torch; `generate` and friends load torch when first asked for.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GenerationInputs", "StepCallback", "generate"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from spellbook.engine import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'spellbook.engine' has no attribute {name!r}")
