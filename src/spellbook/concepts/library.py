"""The concepts library: SPELLBOOK_HOME/concepts, one file per concept, named as it is used in prompts.

`charlie.safetensors` is the concept `charlie`, used in a prompt as `<charlie>` or `charlie` (A1111 names
embeddings after their files the same way); `charlie.png`, when present, is its sample image. Files dropped
in by hand work too (`.safetensors`; `.pt` / `.bin` pickles only with allow_pickle). A recipe records each
concept it used by name and sha256 of the file (A1111's "TI hashes"), so a changed file is noticed.

On a server with accounts the folder is the *shared* library (what the admin puts there: everyone's prompts
may use it), and each user has their own under `users/<id>/`, which only that user's prompts see: one user
can never change what another's words mean. `charlie.json` beside a file holds what the file cannot:
`bare_word` (false: only `<charlie>` means the concept, the default for anything uploaded over the API, so a
plain word like `circle` is never taken over silently) and who uploaded it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spellbook.concepts.formats import (
    DIFFUSERS,
    PICKLE_SUFFIXES,
    SUFFIXES,
    Concept,
    default_name,
    looks_like_pickle,
    looks_like_safetensors,
    read_concept,
    write_concept,
)
from spellbook.engine.prompts import concepts_in
from spellbook.errors import Conflict, Forbidden, NotFound, Refused, UserError
from spellbook.recipe import ConceptRef, suggest
from spellbook.settings import Settings

# No spaces: a name is written in prompts. Letters, digits, '_', '-', '.', '+'; starts with a letter or digit.
# \Z, not $: `$` also matches before a trailing newline, which let 'name\n' through (and into a file name).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}\Z")
SAMPLE_SUFFIX = ".png"
META_SUFFIX = ".json"
USERS_FOLDER = "users"
# Names of pickled files (torch, plain pickle), refused by name before their bytes are even looked at.
UPLOAD_PICKLE_SUFFIXES = (*PICKLE_SUFFIXES, ".ckpt", ".pth", ".pkl", ".pickle")


def _scan(folder: Path) -> dict[str, Path]:
    """Concept name -> file in one folder. A .safetensors wins over a pickle of the same name."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    rank = {suffix: i for i, suffix in enumerate(SUFFIXES)}
    paths = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in rank]
    for path in sorted(paths, key=lambda p: (p.stem, rank[p.suffix.lower()])):
        if path.name.startswith(".") or not NAME_PATTERN.match(path.stem):
            continue
        found.setdefault(path.stem, path)
    return found


def upload_meta(bare_word: bool, uploader: str = "") -> dict[str, Any]:
    """What `<name>.json` records for a concept that came over the API."""
    return {"bare_word": bool(bare_word), **({"uploaded_by": uploader} if uploader else {})}


def check_concept_name(name: str) -> str:
    """A concept name as typed, with or without angle brackets: `<charlie>` -> `charlie`."""
    bare = name.strip()
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1]
    if not NAME_PATTERN.match(bare) or ".." in bare:
        raise UserError(
            f"concept name {name!r} is not allowed: use letters, digits, '_', '-', '.' and '+', starting with a "
            "letter or digit, no spaces (the name is what you write in prompts)",
            field="name",
        )
    return bare


@dataclass(frozen=True)
class ConceptInfo:
    """What `concept list` / `concept info` show. `vectors` and `dims` are None for a pickle not allowed."""

    name: str
    path: Path
    sha256: str
    size: int
    layout: str | None
    token: str | None
    vectors: int | None
    dims: int | None
    trained_for: str | None
    sample: Path | None
    metadata: dict[str, str]
    note: str = ""
    bare_word: bool = True  # False: only `<name>` in a prompt means it
    scope: str = "shared"  # "shared" (the library everyone sees) or "own" (the caller's own concept)

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trigger": f"<{self.name}>",
            "bare_word": self.bare_word,
            "scope": self.scope,
            "path": str(self.path),
            "hash": self.short_hash,
            "sha256": self.sha256,
            "size": self.size,
            "format": self.layout,
            "token": self.token,
            "vectors": self.vectors,
            "dims": self.dims,
            "trained_for": self.trained_for,
            "sample": str(self.sample) if self.sample else None,
            "metadata": self.metadata,
            "note": self.note or None,
        }


class ConceptLibrary:
    """The concepts one caller sees: the shared library, plus their own when `owner` is a user id."""

    def __init__(self, settings: Settings, owner: int | None = None):
        self.settings = settings
        self.owner = owner
        # (path, size, mtime_ns) -> (sha256, concept): a file is read and hashed once while it is unchanged.
        self._loaded: dict[tuple[str, int, int], tuple[str, Concept]] = {}
        self._lock = threading.Lock()

    def for_owner(self, owner: int | None) -> ConceptLibrary:
        """The library as user `owner` sees it (None: the shared library alone), sharing this one's cache."""
        if owner == self.owner:
            return self
        view = ConceptLibrary(self.settings, owner)
        view._loaded, view._lock = self._loaded, self._lock
        return view

    @property
    def folder(self) -> Path:
        """The shared library."""
        return self.settings.concepts_dir

    @property
    def own_folder(self) -> Path:
        """Where this caller's concepts are written: their own folder, or the shared library for the admin."""
        return self.folder if self.owner is None else self.folder / USERS_FOLDER / str(int(self.owner))

    # ------------------------------------------------------------------------------------------ finding
    def files(self) -> dict[str, Path]:
        """Concept name -> file. A .safetensors wins over a pickle of the same name; the caller's own concept
        over a shared one of the same name (they named it so themselves)."""
        found = _scan(self.folder)
        if self.owner is not None:
            found.update(_scan(self.own_folder))
        return found

    def is_own(self, path: Path) -> bool:
        """Whether `path` is in this caller's own folder (theirs to change)."""
        return path.parent == self.own_folder

    @staticmethod
    def meta(path: Path) -> dict[str, Any]:
        """What `<name>.json` beside a concept file says (nothing for a file dropped in by hand)."""
        side = path.with_suffix(META_SUFFIX)
        try:
            data = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else {}
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def bare_word(self, path: Path) -> bool:
        return bool(self.meta(path).get("bare_word", True))

    def set_meta(self, name: str, **changes: Any) -> ConceptInfo:
        """Change a concept's `<name>.json` (e.g. bare_word), in this caller's own folder only."""
        path = self.path_of(name)
        if not self.is_own(path):
            raise Forbidden(
                f"concept {path.stem!r} is in the shared library; only an admin can change it", field="name"
            )
        meta = {**self.meta(path), **changes}
        side = path.with_suffix(META_SUFFIX)
        tmp = side.with_name(f".{side.name}.tmp")
        tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        tmp.replace(side)
        return self._info(path)

    def names(self) -> list[str]:
        return list(self.files())

    def path_of(self, name: str) -> Path:
        bare = check_concept_name(name)
        files = self.files()
        if bare in files:
            return files[bare]
        by_lower = {n.lower(): n for n in files}
        if bare.lower() in by_lower:
            return files[by_lower[bare.lower()]]
        hint = suggest(bare, list(files)) if files else f"the library ({self.folder}) is empty"
        raise NotFound(f"unknown concept {bare!r}; {hint}", field="concept")

    def load(self, name: str) -> tuple[Concept, str]:
        """(concept, sha256 of its file)."""
        sha256, concept = self._load_path(self.path_of(name))
        return concept, sha256

    def _load_path(self, path: Path) -> tuple[Concept, str]:
        from spellbook.models.registry import sha256_file

        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._loaded:
                return self._loaded[key]
        concept = read_concept(path, path.stem, allow_pickle=self.settings.allow_pickle)
        entry = (sha256_file(path), concept)
        with self._lock:
            self._loaded[key] = entry
        return entry

    def sample_path(self, name: str) -> Path:
        """Where this caller's concept `name` keeps its sample image (beside its file)."""
        return self.own_folder / f"{check_concept_name(name)}{SAMPLE_SUFFIX}"

    def info(self, name: str) -> ConceptInfo:
        return self._info(self.path_of(name))

    def _info(self, path: Path) -> ConceptInfo:
        from spellbook.models.registry import sha256_file

        sample = path.with_suffix(SAMPLE_SUFFIX)
        common = {
            "name": path.stem,
            "path": path,
            "size": path.stat().st_size,
            "sample": sample if sample.is_file() else None,
            "bare_word": self.bare_word(path),
            "scope": "own" if self.owner is not None and self.is_own(path) else "shared",
        }
        try:
            sha256, concept = self._load_path(path)
        except Refused as error:  # a pickle while pickles are off: listed, but not read
            return ConceptInfo(
                sha256=sha256_file(path), layout=None, token=None, vectors=None, dims=None, trained_for=None,
                metadata={}, note=f"{error.message} ({error.hint})" if error.hint else error.message, **common,
            )  # fmt: skip
        return ConceptInfo(
            sha256=sha256,
            layout=concept.layout,
            token=concept.token,
            vectors=concept.n_vectors,
            dims=concept.width,
            trained_for=concept.trained_for,
            metadata=dict(sorted(concept.metadata.items())),
            **common,
        )

    def list(self) -> list[ConceptInfo]:
        """Every concept in the library; a file that cannot be read is listed with a note, not an error."""
        infos = []
        for path in self.files().values():
            try:
                infos.append(self._info(path))
            except UserError as error:
                infos.append(
                    ConceptInfo(path.stem, path, "", path.stat().st_size, None, None, None, None, None, None, {},
                                note=error.message, bare_word=self.bare_word(path))
                )  # fmt: skip
        return infos

    # ------------------------------------------------------------------------------------------ changing
    def add(self, concept: Concept, *, overwrite: bool = False, sample: Any = None) -> Path:
        """Write a concept (ours: diffusers layout, safetensors) as `<name>.safetensors`; `sample` a PIL image."""
        name = check_concept_name(concept.name)
        self.check_free(name, overwrite)
        path = write_concept(concept, self.own_folder / f"{name}.safetensors", DIFFUSERS)
        if sample is not None:
            sample.save(path.with_suffix(SAMPLE_SUFFIX))
        return path

    def import_file(
        self, source: Path, name: str | None = None, *, overwrite: bool = False, meta: dict[str, Any] | None = None
    ) -> ConceptInfo:
        """Add a concept file. A .safetensors is copied byte for byte, so its hash (TI hashes) stays the one
        A1111 and Civitai show; a pickle (only with allow_pickle) is converted to safetensors. `meta` (e.g.
        {"bare_word": False}) is written beside it; without it the concept takes the bare word, as in A1111."""
        source = Path(source).expanduser()
        if not source.is_file():
            raise UserError(f"{source} does not exist or is not a file", field="file")
        concept = read_concept(source, allow_pickle=self.settings.allow_pickle)  # checks the content first
        name = check_concept_name(name or default_name(source, {concept.token: None}))
        self.check_free(name, overwrite)
        self.own_folder.mkdir(parents=True, exist_ok=True)
        target = self.own_folder / f"{name}.safetensors"
        side = target.with_suffix(META_SUFFIX)
        if meta:
            side.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        else:
            side.unlink(missing_ok=True)
        if source.suffix.lower() in PICKLE_SUFFIXES:
            from spellbook.models.registry import sha256_file

            metadata = {**concept.metadata, "converted_from": f"{source.name} sha256 {sha256_file(source)}"}
            write_concept(Concept(name, concept.vectors, concept.token, concept.layout, metadata), target)
        else:
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(source, tmp)
            tmp.replace(target)
        return self._info(target)

    def import_bytes(
        self,
        data: bytes,
        filename: str = "",
        name: str | None = None,
        *,
        check: Callable[[Concept], None] | None = None,
        bare_word: bool = False,
        uploader: str = "",
    ) -> ConceptInfo:
        """Add a concept sent as bytes (an upload). Safetensors only, whatever allow_pickle says: bytes from the
        network are never unpickled. The concept is named `name`, else after `filename` (its last part only);
        `check` may refuse it (e.g. a text-encoder width that does not fit) before it joins the library. Only
        `<name>` means it in prompts unless `bare_word` (then the plain word does too, as for A1111's files)."""
        base = re.split(r"[/\\]", filename or "")[-1]
        stem, dot, suffix = base.rpartition(".")
        if not dot:
            stem, suffix = base, ""
        suffix = f".{suffix.lower()}" if suffix else ""
        refused_hint = "convert it to .safetensors first (A1111 and diffusers both read safetensors embeddings)"
        if suffix in UPLOAD_PICKLE_SUFFIXES:
            raise Refused(
                f"{base} is a pickle file ({suffix}): the server never loads pickles, which can run code when loaded",
                field="file",
                hint=refused_hint,
            )
        if looks_like_pickle(data):
            raise Refused(
                f"{base or 'the upload'} holds a pickle (a torch .pt/.bin file), not safetensors: the server never "
                "loads pickles, which can run code when loaded",
                field="file",
                hint=refused_hint,
            )
        if suffix not in ("", ".safetensors") or not looks_like_safetensors(data):
            raise UserError(
                f"{base or 'the upload'} is not a .safetensors file; a concept file is a safetensors embedding "
                "(A1111 or diffusers layout)",
                field="file",
            )
        if not name and not stem:
            raise UserError("give the concept a name (the file has none)", field="name")
        if name is not None:
            name = check_concept_name(name)
        with tempfile.TemporaryDirectory(prefix="spellbook-upload-") as folder:
            # diffusers' generic file name means "name me after my token", as import_file does for files.
            generic = stem == "learned_embeds" and not name
            path = Path(folder) / ("learned_embeds.safetensors" if generic else "upload.safetensors")
            path.write_bytes(data)
            concept = read_concept(path, name or (None if generic else check_concept_name(stem)))
            if check is not None:
                check(concept)
            return self.import_file(path, concept.name, meta=upload_meta(bare_word, uploader))

    def remove(self, name: str) -> Path:
        path = self.path_of(name)
        path.unlink()
        for suffix in (SAMPLE_SUFFIX, META_SUFFIX):
            path.with_suffix(suffix).unlink(missing_ok=True)
        return path

    def export(self, name: str, out: Path, fmt: str = DIFFUSERS) -> Path:
        concept, _ = self.load(name)
        return write_concept(concept, out, fmt)

    def check_free(self, name: str, overwrite: bool) -> None:
        """A new concept's name must not be one this caller already sees (theirs or shared): a name in a prompt
        means one thing."""
        taken = {n.lower(): n for n in self.files()}
        if name.lower() in taken and not (overwrite and taken[name.lower()] == name):
            raise Conflict(
                f"a concept named {taken[name.lower()]!r} already exists"
                + ("" if overwrite else "; choose another --name or remove it first"),
                field="name",
            )

    # ------------------------------------------------------------------------------------------ prompts
    def resolve(self, prompt: str, negative_prompt: str = "") -> tuple[tuple[ConceptRef, ...], dict[str, torch.Tensor]]:
        """The library's concepts that a prompt pair mentions: their refs (for the recipe) and vectors."""
        files = self.files()
        # A bracket-only concept is looked for as `<name>` (concept_pattern then matches only that form).
        names = [name if self.bare_word(path) else f"<{name}>" for name, path in files.items()]
        used = concepts_in(prompt, names)
        used += [n for n in concepts_in(negative_prompt, names) if n not in used]
        refs, vectors = [], {}
        for key in used:
            name = key.strip("<>")
            sha256, concept = self._load_path(files[name])
            refs.append(ConceptRef(name, sha256, bare_word=not key.startswith("<")))
            vectors[name] = concept.vectors
        return tuple(refs), vectors

    def vectors_for(self, refs: tuple[ConceptRef, ...] | list[ConceptRef]) -> dict[str, torch.Tensor]:
        """The vectors of the concepts a recipe recorded, each checked against its recorded hash (found by name,
        or by hash under another name); a changed or missing file is a clear error."""
        vectors: dict[str, torch.Tensor] = {}
        files = self.files()
        for ref in refs:
            path = files.get(ref.name)
            sha256, concept = self._load_path(path) if path else ("", None)
            if sha256 != ref.sha256:
                renamed = self._find_by_hash(ref.sha256)
                if renamed is not None:
                    sha256, concept = renamed
                elif path is not None:
                    raise UserError(
                        f"concept {ref.name!r} has changed since this recipe was made (TI hash {ref.short_hash} "
                        f"recorded, {sha256[:12]} now in {path})",
                        field="concepts",
                        hint="put back the file it was made with to reproduce it",
                    )
                else:
                    raise NotFound(
                        f"concept {ref.name!r} (TI hash {ref.short_hash}) is not in {self.folder}",
                        field="concepts",
                        hint="import it with `spellbook concept import FILE`",
                    )
            vectors[ref.name] = concept.vectors
        return vectors

    def _find_by_hash(self, sha256: str) -> tuple[str, Concept] | None:
        """A concept file with this content anywhere in the library, users' folders included: a recipe names
        its concepts by hash, and the caller who planned it was allowed to use them (Studio.plan resolves names
        only among the caller's own and the shared ones)."""
        users = self.folder / USERS_FOLDER
        folders = [self.folder, *(sorted(p for p in users.iterdir() if p.is_dir()) if users.is_dir() else [])]
        for path in (path for folder in folders for path in _scan(folder).values()):
            try:
                found = self._load_path(path)
            except (UserError, Refused):
                continue
            if found[0] == sha256:
                return found
        return None
