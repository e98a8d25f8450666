"""Which checkpoint a run continues from, and whose output folder it is.

Why apart from ``checkpoint`` (which writes and reads one checkpoint): resuming is a decision over all of a run's
checkpoints and processes. Only proven damage sets a checkpoint aside (``DamagedFileError`` inside its folder:
a truncated safetensors file, a ``trainer.pt`` that does not parse, a missing file): it is reported, renamed
``step_N.damaged`` (never deleted) and the one before is used. Anything else (out of memory, a permission error, a
``trainer.pt`` that would run code when read, another run's settings) stops the run with one line and changes
nothing. Under several processes process 0 alone chooses (and renames) and every process loads its choice; a
failure on any process stops them all with the same line, and every process must have resumed at the same step.

A run that starts at step 1 never deletes an earlier run's files: an ``output_dir`` holding its checkpoints or
history stops the run, unless ``start_over=true`` moves them aside to ``earlier_run/``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from eopd.errors import UserError
from eopd.models import DamagedFileError
from eopd.tracking import read_metrics
from eopd.training.agree import failure_line, stop_together
from eopd.training.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    free_name,
    list_checkpoints,
)

T = TypeVar("T")

#: Where ``start_over=true`` moves an earlier run's files (``earlier_run.2``... when that exists).
EARLIER_RUN_DIR = "earlier_run"


#: What of an ``output_dir`` belongs to its run: moved aside together by ``start_over=true``.
RUN_FILES = ("metrics.jsonl", "tb", "checkpoints", "final", "config.json")


def earlier_run(output_dir: str | Path) -> list[str]:
    """What in ``output_dir`` an earlier run left that a run starting at step 1 would lose: its history
    (``metrics.jsonl``, ``tb/``), checkpoints (damaged ones included) and final student; empty when none."""
    out = Path(output_dir)
    found = []
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append(f"metrics.jsonl ({len(read_metrics(metrics))} steps)")
    for name in ("tb", "checkpoints"):
        if (out / name).is_dir() and any(not p.name.startswith(".") for p in (out / name).iterdir()):
            found.append(f"{name}/")
    if (out / "final").exists():
        found.append("final/")
    return found


def claim_output_dir(output_dir: str | Path, *, start_over: bool, resume: bool,
                     say: Callable[[str], None]) -> None:
    """Make ``output_dir`` ready for a run that starts at step 1: nothing of an earlier run there, or, with
    ``start_over``, that run's files moved together to ``earlier_run/`` (never deleted).

    Raises:
        CheckpointError: an earlier run is there and ``start_over`` is false; nothing was changed.
    """
    out = Path(output_dir)
    earlier = earlier_run(out)
    if not earlier:
        return
    if not start_over:
        fix = ("set start_over=true to move that run to earlier_run/ and begin at step 1, or choose another "
               "output_dir (nothing was changed)")
        if list_checkpoints(out):
            raise CheckpointError(f"{out} holds checkpoints of an earlier run; continue it with resume=true, or {fix}")
        what = ", ".join(earlier)
        if resume:
            raise CheckpointError(f"resume=true but {out} holds no usable checkpoint, only an earlier run's {what}; "
                                  f"{fix}")
        raise CheckpointError(f"{out} holds an earlier run's {what} and no checkpoint to continue it from; {fix}")
    aside = free_name(out / EARLIER_RUN_DIR)
    aside.mkdir()
    for name in RUN_FILES:
        if (out / name).exists():
            (out / name).rename(aside / name)
    say(f"start_over=true: moved the earlier run's {', '.join(earlier)} to {aside}; starting at step 1")


def load_newest(output_dir: str | Path, load: Callable[[Path], T], *, say: Callable[[str], None]
                ) -> tuple[Path, T] | None:
    """The newest checkpoint that ``load`` reads, and what it returned (None: no checkpoint).

    Only proven damage of a checkpoint's own files (``DamagedFileError`` inside its folder: a truncated
    safetensors file, a ``trainer.pt`` that does not parse, a missing file) moves on to the one before: it is
    reported in one line naming the damaged file and renamed ``step_N.damaged`` (never deleted: it is the
    user's), so later saves of that step do not collide with it. Any other failure stops the search as it is
    (``load_checkpoint``). Call it on one process only (``resume_choice``).

    Raises:
        CheckpointError: checkpoints exist but every one is damaged, or one failed to load for another reason.
    """
    found = list_checkpoints(output_dir)
    for path in reversed(found):
        try:
            return path, load_checkpoint(path, load)
        except DamagedFileError as err:  # load_checkpoint lets through only damage of this checkpoint's files
            aside = free_name(path.with_name(path.name + ".damaged"))
            path.rename(aside)
            say(f"checkpoint {path.name} is damaged: {err}; moved it to {aside.name}"
                + ("; resuming from the one before" if path != found[0] else ""))
    if found:
        raise CheckpointError(f"none of the {len(found)} checkpoints in {Path(output_dir) / 'checkpoints'} loads "
                              "(each is damaged, see above, and was moved aside as step_N.damaged); start_over=true "
                              "sets that run aside and begins at step 1, or choose another output_dir")
    return None


def load_checkpoint(path: Path, load: Callable[[Path], T]) -> T:
    """``load(path)``, with its failures sorted into what they prove.

    Raises:
        DamagedFileError: a file inside ``path`` is proven damaged (the caller may set ``path`` aside).
        CheckpointMismatchError, UnsafeCheckpointError: as raised (the checkpoint is sound or is not to be read).
        CheckpointError: any other bad input (out of memory, a permission error, a damaged base model outside
            the checkpoint), in one line saying that nothing was changed.
    """
    try:
        return load(path)
    except (CheckpointMismatchError, UnsafeCheckpointError):
        raise
    except DamagedFileError as err:
        if _inside(err.path, path):
            raise
        raise CheckpointError(f"checkpoint {path.name} was not loaded: {err}; that file is not part of the "
                              "checkpoint, which was left as it is") from err
    except UserError as err:
        raise CheckpointError(f"checkpoint {path.name} was not loaded and nothing was changed: {err}") from err


def _inside(file: Path, folder: Path) -> bool:
    return Path(os.path.abspath(file)).is_relative_to(os.path.abspath(folder))


def resume_choice(output_dir: str | Path, load: Callable[[Path], T], *, say: Callable[[str], None], rank: int,
                  world: int) -> tuple[Path, T] | None:
    """The checkpoint to resume from, chosen once and loaded by every process (None: there is none).

    Process 0 alone searches (``load_newest``, which sets proven damage aside) and sends its choice to the
    others, so exactly one process renames and every process resumes from the same checkpoint; each other
    process then loads that one. A failure on any process stops every process with the same line
    (``agree.stop_together``), and nothing else is moved. All processes must call.
    """
    if world == 1:
        return load_newest(output_dir, load, say=say)
    from accelerate.utils import broadcast_object_list

    found, error = None, None
    if rank == 0:
        try:
            found = load_newest(output_dir, load, say=say)
        except Exception as err:  # every process must hear of it, whatever it is
            error = err
    path, line = broadcast_object_list([None if found is None else str(found[0]), failure_line(error, rank)])
    if line is not None:
        raise error if error is not None else CheckpointError(line)
    if path is None:
        return None
    if rank != 0:
        try:
            found = Path(path), load(Path(path))
        except UserError as err:  # whatever it is, it proves nothing against the files process 0 read whole
            error = CheckpointError(f"process {rank} could not load checkpoint {Path(path).name}, which process 0 "
                                    f"loaded; nothing was changed: {err}")
        except Exception as err:  # a bug: its own traceback here, its line on the others
            error = err
    stop_together(error, rank, world)
    return found


def steps_disagree(steps: list[int]) -> str | None:
    """Why processes that resumed at ``steps`` (one per process) cannot go on together, or None."""
    if len(set(steps)) <= 1:
        return None
    each = ", ".join(f"process {rank}: step {step}" for rank, step in enumerate(steps))
    return (f"the processes resumed at different steps ({each}); every process must read the same checkpoints "
            "(one output_dir on storage they share); nothing was changed")


def check_same_step(step: int, world: int) -> None:
    """Stop every process when they did not all resume at the same step (all processes must call).

    Raises:
        CheckpointError: ``steps_disagree``'s line.
    """
    if world == 1:
        return
    from accelerate.utils import gather_object

    if (why := steps_disagree(gather_object([step]))) is not None:
        raise CheckpointError(why)

