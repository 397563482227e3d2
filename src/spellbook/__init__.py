"""Spellbook: a self-hosted Stable Diffusion studio."""

__version__ = "0.1.0"
