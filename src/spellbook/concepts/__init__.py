"""Concepts (textual inversion): learn a new word from a few pictures, share it as a small file, use it by name.

formats.py reads and writes the files (diffusers and A1111 layouts), library.py keeps them under
SPELLBOOK_HOME/concepts, train.py learns one. Generation uses them through the engine's prompt encoding
(engine/prompts.py); the studio resolves a prompt's concepts from the library.
"""
