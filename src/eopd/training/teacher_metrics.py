"""Per-teacher step metrics of a run with several teachers: each teacher's loss and terms beside the totals.

Why this file exists: with several teachers routed per prompt, a step's totals mix them; the per-teacher loss,
terms and student entropy need each token's loss parts, which only the update computes. The update already sums
those parts per token role as raw sums, merged over micro-batches and processes by one rule
(``update.role_sums``, ``step_metrics``), so they do not depend on either. A run with several teachers sends each
token's (role, teacher) pair through that channel and splits the sums back before the step's reduction: each task
role gets its own sums unchanged, each teacher ``teacher/NAME/<part>`` token sums, which the trainer finishes
with the teacher-side ones (``TeacherSet.token_sums``: share, gate, entropy, tokens/s) by
``eopd.teachers.finish_teacher_metrics``. Like every per-role metric they need ``optim.diagnostics``.
"""

from __future__ import annotations

import dataclasses

import torch

from eopd.training.collect import Batch
from eopd.training.step_metrics import RAW, ROLE_PARTS

#: Joins a token's role and its teacher in the role names the update sees (teacher names never hold it).
SEP = "@"
ROLE = f"{RAW}role/"


def with_teacher_roles(batch: Batch) -> Batch:
    """``batch`` whose token roles are (role, teacher) pairs, ``"ROLE@TEACHER"`` (``"@TEACHER"`` for a task
    without roles); a batch of one teacher comes back as it is."""
    if batch.teacher_ids_BT is None:
        return batch
    n = len(batch.teacher_names)
    if batch.role_ids_BT is None:
        return dataclasses.replace(batch, role_ids_BT=batch.teacher_ids_BT,
                                   role_names=tuple(f"{SEP}{t}" for t in batch.teacher_names))
    valid_BT = batch.teacher_ids_BT >= 0
    pairs_BT = torch.where(valid_BT, batch.role_ids_BT * n + batch.teacher_ids_BT, -1)
    names = tuple(f"{role}{SEP}{t}" for role in batch.role_names for t in batch.teacher_names)
    return dataclasses.replace(batch, role_ids_BT=pairs_BT, role_names=names)


def split_teacher_roles(sums: dict[str, float]) -> None:
    """In place: each raw sum of a (role, teacher) pair is added to its role's raw sum (a task with roles) and,
    for the update's parts (``ROLE_PARTS``), to the teacher's token sum ``teacher/NAME/<part>``; the pair's own
    key is dropped. Every process holds the same pairs (``update.all_role_names``), so the same keys result."""
    for key in [k for k in sums if k.startswith(ROLE)]:
        name, part = key[len(ROLE):].rsplit("/", 1)
        if SEP not in name:
            continue
        role, teacher = name.rsplit(SEP, 1)
        value = sums.pop(key)
        if role:
            sums[f"{ROLE}{role}/{part}"] = sums.get(f"{ROLE}{role}/{part}", 0.0) + value
        if part in ROLE_PARTS:
            sums[f"teacher/{teacher}/{part}"] = sums.get(f"teacher/{teacher}/{part}", 0.0) + value
