"""Held-out eval splits for data that comes as one list of prompts: a seeded fraction, never trained on.

A prompt file, a Hub dataset split or a math training set has no eval split of its own; evaluating on its
training prompts would measure memorisation. ``hold_out`` sets a fraction aside, disjoint from training by
prompt text, reproducibly from a seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from eopd.tasks.base import DataError, Problem


def hold_out(
    problems: Sequence[Problem], fraction: float, seed: int, source: str
) -> tuple[list[Problem], list[Problem]]:
    """Split ``problems`` into ``(train, held_out)``: a seeded ``fraction`` of the distinct prompts held out.

    All copies of a repeated prompt go to the same side, so the two sides share no prompt text. Both keep
    the input order. The same problems, fraction and seed give the same split on any machine.

    Args:
        problems: All problems of the source, in file order.
        fraction: Share of the distinct prompts to hold out, in (0, 1).
        seed: Seed of the choice (``data.split_seed``).
        source: Names the data in error messages.

    Raises:
        DataError: the fraction leaves no prompt on one side.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    distinct = list(dict.fromkeys(p.prompt for p in problems))
    k = round(len(distinct) * fraction)
    if not 0 < k < len(distinct):
        side = "the eval split" if k == 0 else "training"
        raise DataError(f"{source}: data.eval_fraction={fraction} of {len(distinct)} distinct prompts leaves "
                        f"{side} empty; use a fraction that holds out at least one prompt and keeps one")
    held = set(random.Random(seed).sample(distinct, k))
    return [p for p in problems if p.prompt not in held], [p for p in problems if p.prompt in held]
