"""Checkpoints: a run is never left with a half-written one, never overwrites one, and resumes exactly.

Layout under ``OUTPUT_DIR/checkpoints/step_000020/``:

- ``model/``          the student via ``save_pretrained`` (+ tokenizer): loadable by plain transformers
- ``adapter/``        instead of ``model/`` for a LoRA student (``models.lora``): the adapter alone (+ tokenizer),
                      no base weight; resume reloads the base from ``models.student`` (frozen, so unchanged)
- ``trainer.pt``      optimizer, scheduler, RNG states (torch CPU and, on GPU, CUDA; our generators per process),
                      step, data position, adaptive-tau state (``capture_state`` / ``restore_state``)

Everything is written into a hidden temporary folder first, every file synced, and renamed into place
(``eopd.folders``), so a folder named ``step_N`` is complete. Older checkpoints beyond ``keep`` are removed
after the rename.

On resume only proven damage sets a checkpoint aside: a file that is missing or does not parse, or tensors
that disagree with their config (``DamagedFileError``). Such a checkpoint is reported, renamed
``step_N.damaged`` (never deleted) and the one before is used. Anything else (out of memory, a permission
error, a ``trainer.pt`` that would run code when read, another run's settings) stops the run with one line and
changes nothing. Under several processes process 0 alone chooses (and renames) and every process loads its
choice; a failure on any process stops them all with the same line.

A run that starts at step 1 never deletes an earlier run's files: an ``output_dir`` holding its checkpoints
or history stops the run, unless ``start_over=true`` moves them aside to ``earlier_run/``.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from eopd.errors import UserError
from eopd.folders import atomic_folder, save_model_folder
from eopd.models.loading import DamagedFileError
from eopd.tracking import read_metrics
from eopd.training.lora import ADAPTER_DIR, is_lora, save_adapter_folder

T = TypeVar("T")
#: The full student's folder in a checkpoint (a LoRA run writes ``ADAPTER_DIR`` instead).
MODEL_DIR = "model"
STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing or unreadable; the message says which and what to do."""


class CheckpointMismatchError(CheckpointError):
    """A sound checkpoint of other settings than this run's (e.g. LoRA vs full fine-tuning): the run stops and
    the checkpoint is left where it is, never set aside as damaged."""


class CheckpointDamagedError(CheckpointError, DamagedFileError):
    """``trainer.pt`` or the student's folder of a checkpoint is missing or proven damaged (``path``): a
    truncated archive, a checksum that does not match, a pickle that does not parse. Like every
    ``DamagedFileError`` inside a checkpoint, it sets that checkpoint aside (``load_newest``)."""


class UnsafeCheckpointError(CheckpointError):
    """Reading ``trainer.pt`` would call something a checkpoint never holds (a crafted file runs code that
    way): it is not read, nothing runs, and the checkpoint is left where it is (it is not proven damaged)."""


#: Where ``start_over=true`` moves an earlier run's files (``earlier_run.2``... when that exists).
EARLIER_RUN_DIR = "earlier_run"
#: What of an ``output_dir`` belongs to its run: moved aside together by ``start_over=true``.
RUN_FILES = ("metrics.jsonl", "tb", "checkpoints", "final", "config.json")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """Folder of the checkpoint taken after ``step``."""
    return Path(output_dir) / "checkpoints" / f"step_{step:06d}"


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: Any,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically and prune old ones.

    Args:
        output_dir: The run folder.
        step: Steps completed.
        model: Unwrapped student (``save_pretrained``; a peft model saves its adapter alone).
        tokenizer: Saved beside the model so the folder is self-contained.
        trainer_state: Everything else resume needs (tensors and plain data; written with ``torch.save``).
        keep: How many step checkpoints to keep.

    Returns:
        The final checkpoint folder.
    """
    final = checkpoint_dir(output_dir, step)
    with atomic_folder(final) as tmp:
        if is_lora(model):
            save_adapter_folder(tmp / ADAPTER_DIR, model, tokenizer)
        else:
            save_model_folder(tmp / MODEL_DIR, model, tokenizer)
        torch.save(trainer_state, tmp / "trainer.pt")
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def student_folder(ckpt: Path, *, lora: bool) -> Path:
    """The student's folder in checkpoint ``ckpt``: ``adapter/`` for a LoRA run, ``model/`` otherwise.

    Raises:
        CheckpointMismatchError: the checkpoint holds the other kind (a run cannot switch between full
            fine-tuning and LoRA on resume).
        CheckpointDamagedError: it holds neither.
    """
    want, other = (ADAPTER_DIR, MODEL_DIR) if lora else (MODEL_DIR, ADAPTER_DIR)
    if (ckpt / want).is_dir():
        return ckpt / want
    if (ckpt / other).is_dir():
        kinds = {MODEL_DIR: "a fully fine-tuned student", ADAPTER_DIR: "a LoRA adapter"}
        run = "LoRA (models.lora)" if lora else "full fine-tuning (no models.lora)"
        raise CheckpointMismatchError(f"{str(ckpt)!r} holds {kinds[other]} but this run is {run}; resume with the "
                                      "run's own models.lora setting")
    raise CheckpointDamagedError(ckpt / want, f"{str(ckpt / want)!r} is missing")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (``.tmp`` leftovers of an interrupted save are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


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
    aside = _free_name(out / EARLIER_RUN_DIR)
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
            aside = _free_name(path.with_name(path.name + ".damaged"))
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
    (``stop_together``), and nothing else is moved. All processes must call.
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
    path, line = broadcast_object_list([None if found is None else str(found[0]), _line(error, rank)])
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


def stop_together(error: BaseException | None, rank: int, world: int) -> None:
    """Raise on every process when any process has ``error`` (all processes must call): the failing process
    raises its own exception, the others a ``CheckpointError`` with the same line, so every process prints the
    same line and none is left waiting in a collective."""
    if world == 1:
        if error is not None:
            raise error
        return
    from accelerate.utils import gather_object

    lines = gather_object([_line(error, rank)])
    first = next((line for line in lines if line is not None), None)
    if first is None:
        return
    if error is not None and _line(error, rank) == first:
        raise error
    raise CheckpointError(first)


def _line(error: BaseException | None, rank: int) -> str | None:
    """The one line every process prints for ``error`` (a bug names its type and the process)."""
    if error is None:
        return None
    if isinstance(error, UserError):
        return str(error)
    first = (str(error).splitlines() or [""])[0]
    return f"process {rank} failed: {type(error).__name__}: {first}"


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


def _free_name(path: Path) -> Path:
    """``path``, or ``path.2``, ``path.3``... whichever does not exist yet."""
    candidate, i = path, 1
    while candidate.exists():
        i += 1
        candidate = path.with_name(f"{path.name}.{i}")
    return candidate


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


def capture_state(
    *,
    loop: dict[str, int],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generators: dict[str, torch.Generator],
    adaptive: Any,
    rank: int,
    world: int,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Everything resume needs beside the model weights (``trainer.pt``). All processes must call: each
    process's generator states are gathered so every rank resumes its own stream."""
    from accelerate.utils import gather_object

    per_rank = gather_object([{"rank": rank, "gens": {k: g.get_state() for k, g in generators.items()},
                               "torch_rng": torch.get_rng_state(), "cuda_rng": _cuda_rng_state()}])
    return {
        "loop": dict(loop),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generators": {d["rank"]: d["gens"] for d in per_rank},
        "torch_rngs": {d["rank"]: d["torch_rng"] for d in per_rank},
        "cuda_rng": {d["rank"]: d["cuda_rng"] for d in per_rank},
        "torch_rng": torch.get_rng_state(),
        "adaptive_tau": None if adaptive is None else adaptive.state_dict(),
        "world_size": world,
        "config": config,
    }


def restore_state(
    state: dict[str, Any],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generators: dict[str, torch.Generator],
    adaptive: Any,
    rank: int,
    world: int,
) -> dict[str, int]:
    """Load what ``capture_state`` saved into the live objects; returns the loop counters.

    Raises:
        CheckpointError: the checkpoint was written by another number of processes.
    """
    if state.get("world_size", 1) != world:
        raise CheckpointError(f"the checkpoint was written by {state['world_size']} processes; resume with the "
                              f"same number (now {world})")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for k, g in generators.items():
        g.set_state(state["generators"][rank][k])
    torch.set_rng_state(state.get("torch_rngs", {}).get(rank, state["torch_rng"]))
    cuda_rng = state.get("cuda_rng", {}).get(rank)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    if adaptive is not None and state["adaptive_tau"] is not None:
        adaptive.load_state_dict(state["adaptive_tau"])
    return dict(state["loop"])


def _cuda_rng_state() -> torch.Tensor | None:
    """This process's global CUDA RNG state (LoRA dropout on GPU draws from it), or None without CUDA."""
    return torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
