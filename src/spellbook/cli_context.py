"""What every `spellbook` command shares: the Settings of the running command (built once by the root command
from SPELLBOOK_* and its flags such as `--allow-pickle`, kept in Typer's context object, read by every command
group through here) and the quieting of the libraries' chatter."""

from __future__ import annotations

import os

from spellbook.settings import Settings


def current_settings() -> Settings:
    # Typer ships its own copy of click; its context stack is the one the running command is on.
    from typer.main import get_current_context

    context = get_current_context(silent=True)
    root = context.find_root() if context is not None else None
    if root is not None and isinstance(root.obj, Settings):
        return root.obj
    return Settings.from_env()


def quiet_libraries() -> None:
    """Keep the libraries' chatter (weight-loading progress bars, hub lookups, info logs) out of a command's
    output; a command that loads models calls this first."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: no network unless asked
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
