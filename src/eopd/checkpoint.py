"""Atomic checkpoints: a run is never left with a half-written checkpoint, and resume continues exactly.

Layout under ``OUTPUT_DIR/checkpoints/step_000020/``:

- ``model/``          the student via ``save_pretrained`` (+ tokenizer): loadable by plain transformers
- ``trainer.pt``      optimizer, scheduler, RNG states (torch CPU/CUDA, our generators), step, data position,
                      adaptive-tau state

Everything is written into ``step_000020.tmp`` first and renamed into place at the end; a folder without
the ``.tmp`` suffix is therefore complete. Older checkpoints beyond ``keep`` are removed after the rename.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from eopd.errors import UserError
from eopd.folders import atomic_folder, save_model_folder

STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing or unreadable; the message says which and what to do."""


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
        model: Unwrapped student (``save_pretrained``).
        tokenizer: Saved beside the model so the folder is self-contained.
        trainer_state: Everything else resume needs (tensors and plain data; written with ``torch.save``).
        keep: How many step checkpoints to keep.

    Returns:
        The final checkpoint folder.
    """
    final = checkpoint_dir(output_dir, step)
    with atomic_folder(final) as tmp:
        save_model_folder(tmp / "model", model, tokenizer)
        torch.save(trainer_state, tmp / "trainer.pt")
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """Read ``trainer.pt`` of a checkpoint folder.

    Raises:
        CheckpointError: the file is missing or unreadable.
    """
    path = ckpt / "trainer.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has no trainer.pt; it is not an eopd checkpoint "
                              "(delete it or start without resume=true)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # any unpickling failure means the same thing to the user
        raise CheckpointError(f"could not read {str(path)!r} ({err}); delete that checkpoint folder to resume "
                              "from the one before it") from err


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

    per_rank = gather_object([{"rank": rank, "gens": {k: g.get_state() for k, g in generators.items()}}])
    return {
        "loop": dict(loop),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generators": {d["rank"]: d["gens"] for d in per_rank},
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
    torch.set_rng_state(state["torch_rng"])
    if adaptive is not None and state["adaptive_tau"] is not None:
        adaptive.load_state_dict(state["adaptive_tau"])
    return dict(state["loop"])
