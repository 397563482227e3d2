"""The gallery: every image kept with its recipe, found by words, by meaning and by likeness (docs/gallery.md).

Functions take the home's `Database` and a `viewer` (None: the local user, who sees everything; a user id:
that user's images and public ones) and return dataclasses with `to_dict()` for JSON.
"""

from spellbook.gallery.library import (
    add_image,
    export,
    feed,
    file_job_images,
    file_results,
    get_image,
    import_folder,
    newest,
    remix,
    remove,
    set_visibility,
    show,
)
from spellbook.gallery.records import GalleryImage, ImageDetails, ImportReport, Remix
from spellbook.gallery.search import Filters, embed_pending, search, search_meaning, search_words, similar

__all__ = [
    "Filters",
    "GalleryImage",
    "ImageDetails",
    "ImportReport",
    "Remix",
    "add_image",
    "embed_pending",
    "export",
    "feed",
    "file_job_images",
    "file_results",
    "get_image",
    "import_folder",
    "newest",
    "remix",
    "remove",
    "search",
    "search_meaning",
    "search_words",
    "set_visibility",
    "show",
    "similar",
]
