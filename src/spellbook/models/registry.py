"""The models folder: names, formats and content hashes.

A model is named by what it is called in SPELLBOOK_HOME/models (a diffusers folder, a single-file
`.safetensors`, or a pickle that is only loaded on request) or is the built-in `shapes` model. Names from
requests are confined to that folder: no separators, no `..`, nothing that resolves outside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from spellbook.errors import NotFound, Refused, UserError
from spellbook.models.files import bundled_shapes_model_dir
from spellbook.models.safety import PICKLE_SUFFIXES
from spellbook.recipe import suggest
from spellbook.settings import Settings

BUILTIN = "shapes"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+ -]{0,127}$")
SINGLE_FILE_SUFFIXES = {".safetensors"}
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    format: str  # "diffusers" | "single-file" | "pickle"
    builtin: bool = False


def check_name(name: str, what: str = "model") -> str:
    """A name that is safe to look up inside a folder (no paths, no tricks)."""
    if not NAME_PATTERN.match(name) or ".." in name:
        raise UserError(
            f"{what} name {name!r} is not allowed: use letters, digits, '.', '_', '-', '+' and spaces, "
            "starting with a letter or digit, no '/' or '..'",
            field=what,
        )
    return name


def entry_format(path: Path) -> str | None:
    if path.is_dir() and (path / "model_index.json").is_file():
        return "diffusers"
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return "single-file"
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        return "pickle"
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_folder(path: Path) -> str:
    """A folder's hash: sha256 over each weight/config file's relative path and sha256, sorted."""
    lines = []
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".txt")):
        if file.name in ("README.md",):
            continue
        lines.append(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


class ModelRegistry:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._hash_cache_path = settings.models_dir / ".hashes.json"
        # Digests by (path, size, mtime), for this registry's owner (the server asks on every request); the
        # JSON file keeps them across processes.
        self._hashes: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def folder(self) -> Path:
        return self.settings.models_dir

    def list(self) -> list[ModelEntry]:
        entries = []
        if (bundled_shapes_model_dir() / "model_index.json").is_file():
            entries.append(ModelEntry(BUILTIN, bundled_shapes_model_dir(), "diffusers", builtin=True))
        if self.folder.is_dir():
            for path in sorted(self.folder.iterdir()):
                fmt = entry_format(path)
                if fmt and not path.name.startswith("."):
                    name = path.name if fmt == "diffusers" else path.stem
                    entries.append(ModelEntry(name, path, fmt))
        return entries

    def resolve(self, name_or_path: str, *, allow_paths: bool = True) -> ModelEntry:
        """A name in the models folder; or, where allowed (the local CLI), a path to a model on disk."""
        for entry in self.list():
            if entry.name == name_or_path:
                return entry
        looks_like_path = os.sep in name_or_path or name_or_path.startswith(".") or Path(name_or_path).suffix
        if allow_paths and looks_like_path:
            path = Path(name_or_path).expanduser()
            if path.exists():
                fmt = entry_format(path)
                if fmt is None:
                    raise UserError(
                        f"{path} is not a model: expected a diffusers folder (with model_index.json) or a "
                        ".safetensors checkpoint",
                        field="model",
                    )
                return ModelEntry(path.stem if path.is_file() else path.name, path.resolve(), fmt)
        if not allow_paths and ("/" in name_or_path or "\\" in name_or_path or ".." in name_or_path):
            raise Refused(f"model {name_or_path!r}: only names from the models folder are accepted here", field="model")
        if HUB_ID.match(name_or_path) and not Path(name_or_path).exists():
            return self.download(name_or_path)
        names = [e.name for e in self.list()]
        raise NotFound(f"unknown model {name_or_path!r}; {suggest(name_or_path, names)}", field="model")

    def download(self, repo_id: str) -> ModelEntry:
        """A hub id, fetched once into the models folder (safetensors and configs only) where allowed."""
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise UserError(
                f"model {repo_id!r} is not in the models folder and looks like a hub id; downloads are off "
                "(HF_HUB_OFFLINE=1): set HF_HUB_OFFLINE=0 where the network allows, or download it elsewhere and "
                "`spellbook models add PATH`",
                field="model",
            )
        from huggingface_hub import snapshot_download

        name = check_name(repo_id.replace("/", "--"))
        target = self.folder / name
        try:
            snapshot_download(repo_id, local_dir=target, allow_patterns=["*.json", "*.txt", "*.safetensors"])
        except Exception as exc:  # noqa: BLE001 - network and hub errors come in many types; all mean "not downloaded"
            raise UserError(f"could not download {repo_id!r}: {exc}", field="model") from None
        if entry_format(target) != "diffusers":
            raise UserError(f"{repo_id!r} is not a diffusers Stable Diffusion repository", field="model")
        return ModelEntry(name, target, "diffusers")

    def source_entry(self, source: Path) -> ModelEntry:
        """A model on disk outside the models folder (what `models add` is given), by its format."""
        source = Path(source).expanduser().resolve()
        if not source.exists():
            raise UserError(f"{source} does not exist", field="path")
        fmt = entry_format(source)
        if fmt is None:
            raise UserError(
                f"{source} is not a model: expected a diffusers folder (with model_index.json) or a .safetensors file",
                field="path",
            )
        return ModelEntry(source.stem if source.is_file() else source.name, source, fmt)

    def add(self, source: Path, name: str | None = None, *, copy: bool = False) -> ModelEntry:
        """Register a model under a name: a symlink into the models folder (or a copy with copy=True)."""
        entry = self.source_entry(source)
        source, fmt = entry.path, entry.format
        name = check_name(name or entry.name)
        if name == BUILTIN or any(e.name == name for e in self.list()):
            raise UserError(f"a model named {name!r} already exists; choose another --name", field="name")
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / (name + (source.suffix.lower() if source.is_file() else ""))
        if copy:
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
        else:
            target.symlink_to(source, target_is_directory=source.is_dir())
        return ModelEntry(name, target, fmt)

    def remove(self, name: str) -> str:
        """Take a model out of the models folder: a link is removed (its target stays), a copy is deleted."""
        check_name(name)
        entry = self.resolve(name, allow_paths=False)
        if entry.builtin:
            raise Refused(f"{name!r} is built in and cannot be removed", field="name")
        path = self.folder / entry.path.name
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path)
        return name

    def sha256(self, entry: ModelEntry) -> str:
        """Content hash, cached by (path, size, mtime) so a 4 GB checkpoint is hashed once."""
        path = entry.path.resolve()
        stat = path.stat()
        key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
        if key in self._hashes:
            return self._hashes[key]
        cache = self._read_hash_cache()
        if key in cache:
            self._hashes[key] = cache[key]
            return cache[key]
        digest = sha256_folder(path) if path.is_dir() else sha256_file(path)
        self._hashes[key] = digest
        if not entry.builtin:
            with self._lock:
                cache = self._read_hash_cache()
                cache[key] = digest
                self._write_hash_cache(cache)
        return digest

    def _read_hash_cache(self) -> dict[str, str]:
        try:
            return json.loads(self._hash_cache_path.read_text())
        except (OSError, ValueError):
            return {}

    def _write_hash_cache(self, cache: dict[str, str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self._hash_cache_path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(self._hash_cache_path)
