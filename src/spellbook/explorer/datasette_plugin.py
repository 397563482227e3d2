"""Datasette plugin: image URLs in explorer databases render as thumbnails linking to the image.

Only databases listed in the plugin's config (set by `datasette_app.metadata`) are touched, so other
databases served by the same Datasette keep their plain URL cells.
"""

from __future__ import annotations

from datasette import hookimpl
from markupsafe import Markup, escape

from spellbook.explorer.datasette_app import PLUGIN_NAME

THUMBNAIL = 160  # pixels, the longer side
# Scores stored as float32 widen to noisy doubles (0.296944924685426); pages show 4 significant digits,
# the JSON and CSV keep the stored value.
SCORE_COLUMNS = {"similarity", "punsafe", "pwatermark", "aesthetic", "share", "bucket_start", "bucket_end"}


def _thumbnail_size(row) -> tuple[int, int]:
    """The thumbnail's box from the row's WIDTH/HEIGHT, so the page does not jump as images arrive and
    an image that cannot load (offline, or gone from its site) still shows where it would be."""
    try:
        width, height = int(row["width"]), int(row["height"])
    except (KeyError, IndexError, TypeError, ValueError):
        return THUMBNAIL, THUMBNAIL
    if width <= 0 or height <= 0:
        return THUMBNAIL, THUMBNAIL
    scale = THUMBNAIL / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


@hookimpl
def render_cell(row, value, column, table, database, datasette):
    if column not in SCORE_COLUMNS and column != "url":
        return None
    config = datasette.plugin_config(PLUGIN_NAME) or {}
    if database not in config.get("databases", []):
        return None
    if column in SCORE_COLUMNS:
        return f"{value:.4g}" if isinstance(value, float) else None
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        return None
    url = escape(value)
    shown = escape(value if len(value) <= 48 else value[:47] + "…")
    width, height = _thumbnail_size(row)
    # no-referrer: the sites see a plain image request, not which search the user ran.
    return Markup(
        f'<a href="{url}" rel="noopener noreferrer"><img src="{url}" loading="lazy" referrerpolicy="no-referrer" '
        f'alt="" width="{width}" height="{height}" style="background:#e8e8e8;object-fit:contain"></a>'
        f'<br><small style="display:inline-block;max-width:{THUMBNAIL}px;word-break:break-all">{shown}</small>'
    )
