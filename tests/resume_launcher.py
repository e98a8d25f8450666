"""``eopd train`` under torchrun, resuming with every model load failing on one process (a test launcher).

``tests/test_resume_processes.py`` runs it under ``torchrun --nproc_per_node 2``:

    torchrun --standalone --nproc_per_node 2 tests/resume_launcher.py FAULT_RANK CONFIG [key=value ...]

On process ``FAULT_RANK`` (``-1``: none) ``from_pretrained`` raises CUDA's out-of-memory error, as on a GPU
that another job has filled. Once the run is built every process prints ``process R resumed from step_N at
step S``; the run then ends as ``eopd train`` ends it (``run_command``: one line on stderr, exit 2).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from eopd.commands import run_command
from eopd.config import load_config
from eopd.training.components import build_components
from eopd.training.trainer import run

MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB (injected on one process)"


def _out_of_memory(*args: Any, **kwargs: Any) -> None:
    raise torch.OutOfMemoryError(MESSAGE)


def main(argv: list[str]) -> int:
    fault_rank, config, *overrides = argv

    def body() -> None:
        if int(os.environ["RANK"]) == int(fault_rank):
            AutoModelForCausalLM.from_pretrained = _out_of_memory  # type: ignore[method-assign]
        c = build_components(load_config(config, overrides))
        where = c.resume_from.name if c.resume_from is not None else None
        print(f"process {c.rank} resumed from {where} at step {c.state.step}", flush=True)
        run(c)

    return run_command("eopd train", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
