"""Checkpoints: a run is never left with a half-written one, never overwrites one, and resumes exactly.

Layout under ``OUTPUT_DIR/checkpoints/step_000020/``:

- ``model/``          the student via ``save_pretrained`` (+ tokenizer): loadable by plain transformers
- ``adapter/``        instead of ``model/`` for a LoRA student (``models.lora``): the adapter alone (+ tokenizer),
                      no base weight; resume reloads the base from ``models.student`` (frozen, so unchanged)
- ``trainer.pt``      optimizer, scheduler, RNG states (torch CPU and, on GPU, CUDA; our generators per process),
                      step, data position, adaptive-tau state (``capture_state`` / ``restore_state``)

Everything is written into a hidden temporary folder first, every file synced, and renamed into place
(``eopd.folders``), so a folder named ``step_N`` is complete. Older checkpoints beyond ``keep`` are removed
after the rename. Which checkpoint a run resumes from (proven damage only is set aside, several processes
agree) is ``eopd.training.resume``; reading ``trainer.pt`` without running code is ``trainer_state``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, TypeVar

import torch

from eopd.errors import UserError
from eopd.folders import atomic_folder, save_model_folder
from eopd.models import DamagedFileError
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
    ``DamagedFileError`` inside a checkpoint, it sets that checkpoint aside (``resume.load_newest``)."""


class UnsafeCheckpointError(CheckpointError):
    """Reading ``trainer.pt`` would call something a checkpoint never holds (a crafted file runs code that
    way): it is not read, nothing runs, and the checkpoint is left where it is (it is not proven damaged)."""


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """Folder of the checkpoint taken after ``step``."""
    return Path(output_dir) / "checkpoints" / f"step_{step:06d}"


def staging_dir(output_dir: str | Path, step: int, name: str) -> Path:
    """Where every process writes its part of ``name`` (a sharded optimizer) before the main process moves it into
    the checkpoint of ``step``: hidden, so it is never taken for a checkpoint, and emptied before each write."""
    return Path(output_dir) / "checkpoints" / f".step_{step:06d}.{name}.staged"


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: Any,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    keep: int = 2,
    *,
    model_state: dict[str, Any] | None = None,
    shards: dict[str, Path] | None = None,
) -> Path:
    """Write a checkpoint atomically and prune old ones (the main process; the others wrote ``shards`` already).

    Args:
        output_dir: The run folder.
        step: Steps completed.
        model: Unwrapped student (``save_pretrained``; a peft model saves its adapter alone).
        tokenizer: Saved beside the model so the folder is self-contained.
        trainer_state: Everything else resume needs (tensors and plain data; written with ``torch.save``).
        keep: How many step checkpoints to keep.
        model_state: The whole student's state dict when ``model`` holds only a shard (FSDP).
        shards: Folders every process wrote into (a sharded optimizer), moved into the checkpoint under their key.

    Returns:
        The final checkpoint folder.
    """
    final = checkpoint_dir(output_dir, step)
    with atomic_folder(final) as tmp:
        if is_lora(model):
            save_adapter_folder(tmp / ADAPTER_DIR, model, tokenizer)
        else:
            save_model_folder(tmp / MODEL_DIR, model, tokenizer, state_dict=model_state)
        torch.save(trainer_state, tmp / "trainer.pt")
        for name, folder in (shards or {}).items():
            folder.rename(tmp / name)
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


def free_name(path: Path) -> Path:
    """``path``, or ``path.2``, ``path.3``... whichever does not exist yet."""
    candidate, i = path, 1
    while candidate.exists():
        i += 1
        candidate = path.with_name(f"{path.name}.{i}")
    return candidate


def capture_state(
    *,
    loop: dict[str, int],
    optimizer_state: dict[str, Any] | None,
    scheduler: Any,
    generators: dict[str, torch.Generator],
    adaptive: Any,
    rank: int,
    world: int,
    config: dict[str, Any],
    strategy: str = "ddp",
) -> dict[str, Any]:
    """Everything resume needs beside the model weights (``trainer.pt``). All processes must call: each
    process's generator states are gathered so every rank resumes its own stream. ``optimizer_state`` is None
    when the optimizer is saved apart (sharded, ``OPTIMIZER_DIR``); ``strategy`` names who wrote it."""
    from accelerate.utils import gather_object

    per_rank = gather_object([{"rank": rank, "gens": {k: g.get_state() for k, g in generators.items()},
                               "torch_rng": torch.get_rng_state(), "cuda_rng": _cuda_rng_state()}])
    return {
        "loop": dict(loop),
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "generators": {d["rank"]: d["gens"] for d in per_rank},
        "torch_rngs": {d["rank"]: d["torch_rng"] for d in per_rank},
        "cuda_rng": {d["rank"]: d["cuda_rng"] for d in per_rank},
        "torch_rng": torch.get_rng_state(),
        "adaptive_tau": None if adaptive is None else adaptive.state_dict(),
        "world_size": world,
        "strategy": strategy,
        "config": config,
    }


def restore_state(
    state: dict[str, Any],
    *,
    scheduler: Any,
    generators: dict[str, torch.Generator],
    adaptive: Any,
    rank: int,
    world: int,
    any_world: bool = False,
) -> dict[str, int]:
    """Load what ``capture_state`` saved (but the optimizer: ``Strategy.load_optimizer``) into the live objects;
    returns the loop counters.

    ``any_world``: the checkpoint may come from another number of processes (a sharded optimizer reshards on load):
    a process the checkpoint has no random streams for keeps the fresh ones it was built with.

    Raises:
        CheckpointError: the checkpoint was written by another number of processes and ``any_world`` is false.
    """
    saved_world = state.get("world_size", 1)
    if saved_world != world and not any_world:
        raise CheckpointError(f"the checkpoint was written by {saved_world} processes; resume with the same number "
                              f"(now {world}), or with parallel.strategy=fsdp, whose checkpoints reshard")
    scheduler.load_state_dict(state["scheduler"])
    if rank in state["generators"]:
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
