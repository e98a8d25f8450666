"""Reading a checkpoint's own files (``trainer.pt``, a sharded optimizer) without running code, and telling
damage from a refusal.

Why its own module: unpickling runs whatever the file asks for, so a checkpoint from anywhere else (shared storage,
a colleague's run, a download) would run code on ``resume=true``. ``trainer.pt`` is read with
``weights_only=True``, and when that fails the file's bytes decide what it was: a truncated archive, a failing
CRC-32 or a pickle that does not parse is proven damage (the checkpoint is set aside), a refused call is a crafted
or foreign file (nothing runs, nothing moves), anything else stops the run with one line. A sharded optimizer
(``torch.distributed.checkpoint``, FSDP) keeps its layout in a ``.metadata`` pickle that DCP's own reader loads
with plain ``pickle.load``: ``SafeMetadataReader`` reads it allowing only DCP's metadata classes, and
``check_sharded_folder`` proves every shard file is there and long enough before anything is loaded.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from eopd.training.checkpoint import CheckpointDamagedError, CheckpointError, UnsafeCheckpointError

#: The globals a DCP ``.metadata`` pickle names (torch 2.x): its metadata dataclasses, a path, sizes, dtypes.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_DCP_GLOBALS = {("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("torch", "Size"),
                ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """Read ``trainer.pt`` of a checkpoint folder, running no code.

    ``torch.load(weights_only=True)`` rebuilds tensors, numbers, strings and plain containers only, which is
    everything ``capture_state`` stores: optimizer and scheduler state dicts, generator and RNG states (uint8
    tensors), the adaptive-tau numbers and the config as plain data. No safe globals are added, because none
    is needed. A file that asks for anything else while being read (a crafted checkpoint runs code that way)
    is refused before anything runs.

    Raises:
        CheckpointDamagedError: the file is missing or proven damaged (an archive that is truncated or fails
            its CRC-32 checks, a pickle that does not parse).
        UnsafeCheckpointError: reading it would call something a checkpoint never holds; nothing ran.
        CheckpointError: it could not be read for another reason (permissions, memory), or holds no trainer
            state; the checkpoint is left as it is.
    """
    path = ckpt / "trainer.pt"
    if not path.is_file():
        raise CheckpointDamagedError(path, f"{str(path)!r} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # sorted below by what the file itself shows
        raise _read_failure(path, err) from err
    if not (isinstance(state, dict) and isinstance(state.get("loop"), dict)):
        raise CheckpointError(f"{str(path)!r} holds no trainer state of eopd ({type(state).__name__}); it was "
                              "left as it is")
    return state


def _read_failure(path: Path, err: Exception) -> CheckpointError:
    """The error for a ``trainer.pt`` that ``torch.load`` could not read: damage when the file proves it,
    a refusal when the weights-only reader refused a call, else a one-line stop."""
    damage = _proven_damage(path)
    if damage is not None:
        return CheckpointDamagedError(path, f"{str(path)!r} is damaged ({damage})")
    if isinstance(err, pickle.UnpicklingError):
        named = _unsafe_globals(path) or re.findall(r"GLOBAL (\S+) was not an allowed global", str(err))
        what = f"call {', '.join(named)}" if named else "rebuild something other than tensors and plain data"
        return UnsafeCheckpointError(f"{str(path)!r} was not read: reading it would {what}, which no checkpoint of "
                                     "eopd holds, so nothing ran and nothing was moved; resume only from "
                                     "checkpoints you trust")
    first = (str(err).splitlines() or [type(err).__name__])[0]
    return CheckpointError(f"{str(path)!r} could not be read ({first}); it was left as it is")


def _unsafe_globals(path: Path) -> list[str]:
    """The callables a ``torch.save`` archive names beyond what ``weights_only`` allows (found by scanning its
    pickle's opcodes, never by running them); empty when it cannot tell (e.g. not an archive)."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    try:
        return list(scan(path)) if scan is not None else []
    except Exception:  # a file it cannot scan: the weights-only reader's own message names the call
        return []


def _proven_damage(path: Path) -> str | None:
    """Why ``path`` is proven damaged, or None when its bytes are whole (or cannot be read: no evidence).

    ``torch.save`` writes a zip archive with a CRC-32 per member: a truncated archive or a failing checksum is
    damage. The pickle inside (or a file that is a bare pickle) must parse to its end; ``pickletools`` only
    decodes opcodes, it never calls anything.
    """
    try:
        with path.open("rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
            if not is_zip:
                f.seek(0)
                return _pickle_does_not_parse(f)
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is not None:
                return f"{bad} fails its CRC-32 check"
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return "the archive holds no data.pkl"
            with archive.open(name) as pkl:
                return _pickle_does_not_parse(pkl)
    except (zipfile.BadZipFile, EOFError, struct.error, ValueError) as err:
        return f"not a complete archive: {err}"
    except OSError:
        return None


def _pickle_does_not_parse(f: Any) -> str | None:
    try:
        for _ in pickletools.genops(f):
            pass
    except Exception as err:  # pickletools reports malformed data in several exception types
        return f"its pickle does not parse: {err}"
    return None



class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP metadata and nothing else: any other global stops the read before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module in _DCP_MODULES and not name.startswith("__")) or (module, name) in _DCP_GLOBALS or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a sharded checkpoint's metadata")


def read_sharded_metadata(folder: Path) -> Any:
    """The ``torch.distributed.checkpoint`` metadata of ``folder``, read without running code.

    Raises:
        CheckpointDamagedError: ``.metadata`` is missing or does not parse.
        UnsafeCheckpointError: it names a callable that DCP metadata never holds; nothing ran.
    """
    path = folder / ".metadata"
    if not path.is_file():
        raise CheckpointDamagedError(path, f"{str(path)!r} is missing")
    try:
        with path.open("rb") as f:
            return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        if "is not part of" in str(err):
            raise UnsafeCheckpointError(f"{str(path)!r} was not read: reading it would call {err}; nothing ran and "
                                        "nothing was moved; resume only from checkpoints you trust") from None
        raise CheckpointDamagedError(path, f"{str(path)!r} is damaged ({err})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointDamagedError(path, f"{str(path)!r} is damaged ({type(err).__name__}: {err})") from None


def check_sharded_folder(folder: Path) -> None:
    """Prove that a sharded checkpoint folder is whole: its metadata parses (safely) and every shard file it
    names exists and holds the bytes the metadata points at.

    Raises:
        CheckpointDamagedError: naming the missing or short file.
        UnsafeCheckpointError: the metadata would run code.
    """
    metadata = read_sharded_metadata(folder)
    needed: dict[str, int] = {}
    for info in getattr(metadata, "storage_data", {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = folder / name
        if not shard.is_file():
            raise CheckpointDamagedError(shard, f"{str(shard)!r} is missing (a shard of the sharded optimizer)")
        if shard.stat().st_size < size:
            raise CheckpointDamagedError(shard, f"{str(shard)!r} is truncated ({shard.stat().st_size:,} of at least "
                                                f"{size:,} bytes)")


def safe_sharded_reader(folder: Path) -> Any:
    """DCP's ``FileSystemReader`` for ``folder`` whose metadata is read by ``read_sharded_metadata``."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeMetadataReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata = read_sharded_metadata(folder)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeMetadataReader(str(folder))
