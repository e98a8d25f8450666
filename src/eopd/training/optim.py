"""The optimizer and the learning-rate schedule: one home for both, used by the distiller and ``eopd sft``.

The schedule is transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` (linear warmup from 0, then a
half cosine down to ``min_lr_ratio`` of the peak), the curve users of TRL and verl already know. It is
stepped once per optimizer update by our own code and is never passed through ``accelerator.prepare``:
accelerate steps a prepared scheduler once per *process* per call, which would run the schedule N times
too fast under N processes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients (frozen ones, e.g. a LoRA base, are left out)."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    return torch.optim.AdamW(trainable, lr=lr, betas=betas, weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, total_updates: int, warmup_updates: int = 0, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_updates`` then cosine decay to ``min_lr_ratio * lr`` at ``total_updates``.

    Args:
        optimizer: The optimizer whose learning rate is scheduled (its ``lr`` is the peak).
        total_updates: Optimizer updates of the whole run.
        warmup_updates: Updates of linear warmup from 0 (0: start at the peak).
        min_lr_ratio: The floor of the cosine as a fraction of the peak.
    """
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_updates, num_training_steps=total_updates, min_lr_rate=min_lr_ratio
    )


def lr_curve(total_updates: int, warmup_updates: int = 0, min_lr_ratio: float = 0.0) -> list[float]:
    """The schedule's multiplier before each update, ``[total_updates]`` (for tests, docs and plots)."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_scheduler(opt, total_updates=total_updates, warmup_updates=warmup_updates,
                            min_lr_ratio=min_lr_ratio)
    out = []
    for _ in range(total_updates):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out
