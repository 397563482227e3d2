"""The engine: Components + Recipe -> images. Pure compute: no database, no files, no HTTP."""

from spellbook.engine.pipeline import GenerationInputs, StepCallback, generate

__all__ = ["GenerationInputs", "StepCallback", "generate"]
