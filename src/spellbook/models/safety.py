"""Pickle checkpoints (.ckpt / .pt / .pth / .bin): refused by default, scanned before any load when allowed.

Unpickling runs whatever code the file names, so a `.ckpt` from the internet is a program, not data. We never
unpickle one unless the user passes `--allow-pickle`, and even then two gates stand in front of the tensors:

1. `scan_pickle` reads every pickle stream in the file with `pickletools.genops` (which parses opcodes and
   executes nothing) and lists each import the pickle would perform (GLOBAL, STACK_GLOBAL, INST, EXT*).
   Anything outside `ALLOWED_GLOBALS` refuses the file, naming what it found.
2. `torch.load(..., weights_only=True)` then unpickles with torch's own restricted unpickler.

`ALLOWED_GLOBALS` is what `torch.save(state_dict)` writes and nothing more; it is a strict subset of what
`weights_only=True` accepts, so a file that passes the scan is never refused by torch for its globals.
Deliberately *not* allowed (each would be refused by `weights_only=True` too, or is not needed for tensors):
`numpy.*` (numpy scalars/arrays: `_reconstruct` builds objects from arbitrary dtypes), `pytorch_lightning.*`
(training callbacks), `torch.storage._load_from_bytes` (calls `torch.load` again, without our gates),
`builtins.*` (getattr/eval/exec/open live there), `torch.device`, `torch.Size`.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import pickletools
import tarfile
import zipfile
from pathlib import Path
from typing import Any

from spellbook.errors import Refused, UserError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}

# torch's typed storages, named in the persistent id of every tensor: ("storage", torch.FloatStorage, key, ...).
_STORAGE_NAMES = (
    "Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
    "ComplexFloat", "ComplexDouble",
)  # fmt: skip

ALLOWED_GLOBALS: frozenset[str] = frozenset(
    {
        "collections.OrderedDict",  # the state dict itself
        "torch._utils._rebuild_tensor_v2",  # every tensor
        "torch._utils._rebuild_parameter",  # nn.Parameter values (a model's state saved without .detach())
        "_codecs.encode",  # how protocol-2 pickles spell a `bytes` object; encodes a str, nothing else
    }
    | {f"torch.{name}Storage" for name in _STORAGE_NAMES}
)

# The first pickle of torch's legacy (pre-1.6, non-zip) format holds this number; four more pickles follow,
# then raw storage bytes that are not pickles.
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_TORCH_PICKLES = 5

_STRING_OPCODES = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_MEMO_PUT_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET_OPCODES = {"GET", "BINGET", "LONG_BINGET"}


def scan_pickle(path: Path | str) -> list[str]:
    """The imports in `path`'s pickles that are not in `ALLOWED_GLOBALS` (sorted, deduplicated); [] = clean.

    Reads a torch zip archive (every `*.pkl` record in it) or a raw pickle file (torch's legacy format: its
    five leading pickles; any other pickle: the first one, which is all `torch.load` would read). Nothing is
    unpickled. Raises UserError when the file is neither.
    """
    path = Path(path)
    found: set[str] = set()
    with path.open("rb") as handle:
        is_zip = handle.read(4) == b"PK\x03\x04"  # the same test torch.load uses to pick its reader
    if is_zip:
        for name, data in _zip_pickles(path):
            found |= _scan_stream(io.BytesIO(data), source=f"{path.name}:{name}")
    else:
        if tarfile.is_tarfile(path):
            raise UserError(
                f"{path.name} is an old tar-format torch checkpoint, which Spellbook does not read",
                hint="convert it to .safetensors with a tool you trust",
            )
        found |= _scan_raw_pickles(path)
    return sorted(found - ALLOWED_GLOBALS)


def load_pickled_state_dict(path: Path | str, *, allow_pickle: bool) -> dict[str, Any]:
    """The tensors of a pickle checkpoint, loaded only if allowed, only after a clean scan, only weights_only.

    A top-level `state_dict` entry (Lightning checkpoints) is unwrapped; non-tensor entries (`global_step`, …)
    are dropped.
    """
    path = Path(path)
    # 1. Refuse unless the user opted in: no byte of the pickle is interpreted before this point.
    if not allow_pickle:
        raise Refused(
            f"{path.name} is a pickle file ({path.suffix}): loading it could run code hidden inside it",
            field="model",
            hint="convert it to .safetensors, or pass --allow-pickle to scan it and load only its tensors",
        )
    # 2. Scan: every import the pickle would perform must be one torch uses for plain tensors.
    dangerous = scan_pickle(path)
    if dangerous:
        raise Refused(
            f"{path.name} imports {', '.join(dangerous)} when unpickled, which a checkpoint of plain tensors "
            "never needs; it was not loaded",
            field="model",
            hint="only load it if you trust its source, after converting it to .safetensors with a tool you trust",
        )
    # 3. Load with torch's restricted unpickler as a second gate.
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as error:
        raise UserError(f"could not load {path.name} as a torch checkpoint: {error}", field="model") from error
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise UserError(
            f"{path.name} holds a {type(loaded).__name__}, not a state dict (a mapping of names to tensors)",
            field="model",
        )
    return {str(key): value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def _zip_pickles(path: Path) -> list[tuple[str, bytes]]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in names):
                raise Refused(
                    f"{path.name} is a TorchScript archive (it contains code), not a checkpoint of tensors",
                    field="model",
                )
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:  # readers disagree on which copy wins; torch.save never writes two
                raise Refused(f"{path.name} holds duplicate entries ({', '.join(duplicates)})", field="model")
            pickles = [
                (info.filename, archive.read(info)) for info in archive.infolist() if info.filename.endswith(".pkl")
            ]
    except zipfile.BadZipFile as error:
        raise UserError(f"{path.name} starts like a zip archive but is not one: {error}", field="model") from error
    if not any(name.rsplit("/", 1)[-1] == "data.pkl" for name, _ in pickles):
        raise UserError(f"{path.name} is a zip archive without data.pkl, so not a torch checkpoint", field="model")
    return pickles


def _scan_raw_pickles(path: Path) -> set[str]:
    found: set[str] = set()
    with path.open("rb") as handle:
        size = path.stat().st_size
        first_ops = None
        count = 0
        while handle.tell() < size:
            if count >= (_LEGACY_TORCH_PICKLES if _is_legacy_magic(first_ops) else 1):
                break  # what follows is raw storage data (or nothing torch.load would read)
            start = handle.tell()
            ops = _genops(handle, source=f"{path.name} at byte {start}")
            found |= _imports(ops, source=f"{path.name} at byte {start}")
            if first_ops is None:
                first_ops = ops
            count += 1
    if count == 0:
        raise UserError(f"{path.name} is empty", field="model")
    return found


def _is_legacy_magic(ops: list | None) -> bool:
    if ops is None:
        return False
    values = [arg for op, arg, _ in ops if op.name not in {"PROTO", "STOP", "FRAME"}]
    return values == [_LEGACY_TORCH_MAGIC]


def _scan_stream(stream: io.BytesIO, *, source: str) -> set[str]:
    return _imports(_genops(stream, source=source), source=source)


def _genops(stream, *, source: str) -> list:
    """All opcodes of the one pickle starting at the stream's position (the stream is left after its STOP)."""
    try:
        return list(pickletools.genops(stream))
    except Exception as error:  # genops raises ValueError for bad opcodes, and others for truncated data
        raise UserError(f"{source} is not a readable pickle: {error}", field="model") from error


def _imports(ops: list, *, source: str) -> set[str]:
    """`module.name` for every import the opcodes perform; an import we cannot resolve counts as dangerous."""
    found: set[str] = set()
    memo: dict[int, str | None] = {}  # memo index -> the string stored there (None: not a string)
    protocol = 0
    for index, (op, arg, _) in enumerate(ops):
        name = op.name
        if name == "PROTO":
            protocol = int(arg)
        elif name in {"GLOBAL", "INST"}:
            module, _, attribute = str(arg).partition(" ")
            found.add(_python3_name(module, attribute, protocol))
        elif name == "STACK_GLOBAL":
            found.add(_stack_global(ops, index, memo))
        elif name in {"EXT1", "EXT2", "EXT4"}:
            found.add(f"copyreg extension {arg}")  # imports whatever the extension registry maps the code to
        elif name == "MEMOIZE":
            memo[len(memo)] = _string_value(ops, index - 1, memo)
        elif name in _MEMO_PUT_OPCODES:
            memo[int(arg)] = _string_value(ops, index - 1, memo)
    return found


def _python3_name(module: str, attribute: str, protocol: int) -> str:
    """`module.attribute` as the unpickler resolves it: protocols 0-2 spell Python 2 names (`__builtin__`)."""
    if protocol < 3:
        module, attribute = _compat_pickle.NAME_MAPPING.get((module, attribute), (module, attribute))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{attribute}"


def _string_value(ops: list, index: int, memo: dict[int, str | None]) -> str | None:
    """The string the opcode at `index` pushes (a literal or a memo fetch), else None."""
    if index < 0:
        return None
    op, arg, _ = ops[index]
    if op.name in _STRING_OPCODES:
        return arg if isinstance(arg, str) else arg.decode("latin-1")
    if op.name in _MEMO_GET_OPCODES:
        return memo.get(int(arg))
    return None


def _stack_global(ops: list, index: int, memo: dict[int, str | None]) -> str:
    """Resolve STACK_GLOBAL as picklescan does: the two strings pushed just before it are module and name."""
    operands: list[str] = []
    position = index - 1
    while position >= 0 and len(operands) < 2:
        op = ops[position][0]
        if op.name in _MEMO_PUT_OPCODES or op.name in {"MEMOIZE", "FRAME"}:
            position -= 1
            continue
        value = _string_value(ops, position, memo)
        if value is None:
            break
        operands.append(value)
        position -= 1
    if len(operands) < 2:
        return "<unresolved STACK_GLOBAL>"  # fail closed: an import we cannot name is not on the allow-list
    name, module = operands
    return f"{module}.{name}"
