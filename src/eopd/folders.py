"""Writing folders atomically: the one writer behind checkpoints, the final student, built models and worlds.

A folder is written under a hidden temporary sibling (``.NAME.tmp-PID``) and renamed into place in one
step, so a reader never sees a half-written folder; every file and folder in it is synced to disk first, so
the rename never publishes data that is still only in memory. The rename never replaces an existing folder:
on Linux ``rename`` onto a non-empty directory fails, and we check first, so a checkpoint or a trained model
is never overwritten. An exception or Ctrl-C while writing removes the temporary folder; a SIGKILL leaves it,
and the next writer in the same parent removes leftovers whose process is gone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from eopd.errors import UserError


class FolderExistsError(UserError, FileExistsError):
    """The destination folder exists already; it is never overwritten."""


def _tmp_name(final: Path, pid: int) -> Path:
    return final.with_name(f".{final.name}.tmp-{pid}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(parent: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID`` folders in ``parent`` whose writer process no longer runs; returns them."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        _, sep, pid = p.name.rpartition(".tmp-")
        if not (p.name.startswith(".") and sep and pid.isdigit() and p.is_dir()):
            continue
        if int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_folder(final: str | Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder to write into; on success it becomes ``final`` in one rename.

    Args:
        final: The destination; it must not exist yet.
        keep_existing: When ``final`` appears while we write (another process built the same thing), keep
            theirs and discard ours instead of raising.

    Raises:
        FolderExistsError: ``final`` exists (before or at the rename) and ``keep_existing`` is false.
    """
    final = Path(final)
    if final.exists() and not keep_existing:
        raise FolderExistsError(f"{str(final)!r} exists already and is never overwritten; move it away or "
                                "choose another destination")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(final.parent)
    tmp = _tmp_name(final, os.getpid())
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        try:
            os.rename(tmp, final)  # fails when final is a non-empty folder: never replaces one
        except OSError:
            if not final.exists():
                raise
            if not keep_existing:
                raise FolderExistsError(f"{str(final)!r} appeared while it was being written; it was kept and "
                                        "the new copy discarded") from None
        _fsync(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_model_folder(path: Path, model: Any, tokenizer: Any, state_dict: dict[str, Any] | None = None) -> None:
    """``save_pretrained`` a model (safetensors) and, when given, its tokenizer into one folder; ``state_dict``:
    the weights to write instead of the model's own (a sharded model's, gathered whole)."""
    model.save_pretrained(path, safe_serialization=True, **({} if state_dict is None else {"state_dict": state_dict}))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` (subfolders included) to disk, then every folder's entries: after the
    rename the folder is complete on disk, not only in the page cache (a power loss right after a rename of
    unsynced files can leave them empty or truncated under the final name)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
    for folder, _, _ in os.walk(root, topdown=False):
        _fsync(Path(folder))


def _fsync(path: Path) -> None:
    """Flush a file's data or a folder's entries to disk (best effort; not every filesystem supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
