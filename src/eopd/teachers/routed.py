"""Several teachers, routed per prompt: each row of a rollout scored by its own teacher, weighed by its own gate.

Why this file exists: multi-teacher on-policy distillation (a math teacher, a code teacher... one student) needs a
batch in which every row carries its teacher's scores and that teacher's entropy gate, whatever the mix.
``TeacherSet`` holds the named teachers (in-process or served, each a ``Teacher``), each one's gate settings (an
``ObjectiveConfig`` with its own ``tau`` and ``top_k``) and the ``routing.Router``. It scores a rollout by
teacher (each teacher sees only its rows, asking for its own top-k, joined back in row order, every top-k padded
to the widest with zero-probability entries: ``scores.widened_topk``), decides every row's token weights with its
own teacher's gate (``prepare_weights`` per teacher), and sums per-teacher diagnostics as token sums that the
trainer turns into ``teacher/NAME/*`` metrics whatever the micro-batches and the process count.

Full-distribution objectives (exact terms, single divergences) and the adaptive tau are refused with several
teachers at config load: the one needs a single teacher head, the other one entropy scale.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from eopd.losses import ObjectiveConfig, TokenBatch, TokenWeights, prepare_weights
from eopd.losses.topk_entropy import gate_undecided
from eopd.sampling import Rollout
from eopd.tasks.base import Problem
from eopd.teachers.routing import Router
from eopd.teachers.scores import ROW_FIELDS, Teacher, TeacherScores, TeacherUnavailableError, widened_topk

Tensor = torch.Tensor

#: The per-teacher token sums ``TeacherSet.token_sums`` reports (``teacher/NAME/<part>``), finished by dividing
#: by the teacher's token count (``teacher/NAME/share`` before the division: the token count itself).
SCORE_PARTS = ("gated_share", "teacher_entropy", "tokens_per_s", "undecided_share")


class TeacherSet:
    """Named teachers, each with its gate settings, and the rule that routes prompts to them.

    Args:
        names: The teachers' names (``teachers.NAME``), in config order.
        teachers: One ``Teacher`` per name.
        objectives: Each teacher's objective: the run's, with that teacher's ``tau`` and ``top_k``.
        router: Which teacher scores a prompt.
        descriptions: One line per teacher for the log.
    """

    def __init__(self, names: Sequence[str], teachers: Sequence[Teacher], objectives: Sequence[ObjectiveConfig],
                 router: Router, descriptions: Sequence[str] = ()) -> None:
        if not (len(names) == len(teachers) == len(objectives)) or not names:
            raise ValueError("one teacher and one objective per name, at least one")
        self.names = tuple(names)
        self.teachers = list(teachers)
        self.objectives = list(objectives)
        self.router = router
        self.descriptions = list(descriptions)
        self.top_k = max(o.top_k for o in self.objectives)
        self._table: tuple[int, list[int]] | None = None  # (id of the problems list, every problem's teacher)

    def describe(self) -> str:
        """The log's lines: each teacher and how prompts are routed."""
        rule = (f"by a hash of the prompt id over {', '.join(self.names)}" if self.router.by == "hash" else
                f"by the field {self.router.field!r}")
        return "\n".join([*self.descriptions, f"routing: {rule}"])

    def routes(self, problems: Sequence[Problem], indices: Sequence[int]) -> list[int]:
        """The teacher index of ``problems[i]`` for each ``i`` in ``indices``. The first call routes every problem
        (``Router.routes``), so a prompt no teacher takes stops the run at its first step, not deep into it.

        Raises:
            RoutingError: a problem the rule cannot place.
        """
        if self._table is None or self._table[0] != id(problems):
            self._table = (id(problems), self.router.routes(problems))
        return [self._table[1][i] for i in indices]

    def score(self, rollout: Rollout, teacher_ids_B: Tensor) -> tuple[TeacherScores, dict[int, float]]:
        """Each row's scores from its own teacher (top-k padded to the widest teacher's), and each teacher's
        scoring seconds on this call.

        Args:
            rollout: The student's samples, ``B`` rows.
            teacher_ids_B: ``[B]`` index into ``names`` of each row's teacher (on the rollout's device).

        Raises:
            TeacherUnavailableError: any teacher failed; its name leads the message.
        """
        parts, order, seconds = [], [], {}
        for t, teacher in enumerate(self.teachers):
            rows = (teacher_ids_B == t).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            t0 = time.perf_counter()
            try:
                scores = teacher.score(rollout.select(rows), top_k=self.objectives[t].top_k, want_logits=False)
            except TeacherUnavailableError as err:
                raise TeacherUnavailableError(f"teachers.{self.names[t]}: {err}") from None
            seconds[t] = time.perf_counter() - t0
            parts.append(widened_topk(scores, self.top_k))
            order.append(rows)
        joined = _joined(parts)
        back = torch.argsort(torch.cat(order))
        return joined.select(back), seconds

    def weights(self, tokens: TokenBatch, teacher_ids_B: Tensor, *, generator: torch.Generator) -> TokenWeights:
        """Every row's token weights from its own teacher's objective (gate, ``tau``), ``[B, T]``.

        ``tau`` of the result is the teachers' common tau, or NaN when they use different ones (each teacher's is
        logged as ``teacher/NAME/tau``): a function of the teachers, not of the rows a process happens to hold, so
        every process and every process count logs the same.
        """
        shape = tokens.mask.shape
        w_rkl, w_fkl, gate = (torch.zeros(shape, dtype=torch.float32, device=tokens.mask.device) for _ in range(3))
        for t, obj in enumerate(self.objectives):
            rows = (teacher_ids_B == t).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            part = prepare_weights(obj, tokens.map(lambda x, r=rows: x[r]), generator=generator)
            w_rkl[rows], w_fkl[rows], gate[rows] = part.w_rkl.float(), part.w_fkl.float(), part.gate.float()
        taus = {obj.tau for obj in self.objectives}
        return TokenWeights(w_rkl, w_fkl, gate, taus.pop() if len(taus) == 1 else math.nan)

    def token_sums(self, scores: TeacherScores, weights: TokenWeights, mask_BT: Tensor, teacher_ids_B: Tensor,
                   seconds: dict[int, float]) -> dict[str, float]:
        """Per-teacher token sums of this process (``teacher/NAME/<part>``; ``SCORE_PARTS``) and the total
        ``teacher/undecided_share`` (each row's undecided tokens at its own teacher's tau).

        ``teacher/NAME/share`` is the teacher's valid-token count (after the trainer's division by the step's
        tokens: its share of them); ``tokens_per_s`` is its completion tokens scored per second of its scoring
        call here, weighted by those tokens (the trainer divides every part by the teacher's tokens).
        """
        valid_BT = mask_BT.bool()
        sums: dict[str, float] = {}
        undecided_total = 0.0
        for t, name in enumerate(self.names):
            rows_BT = valid_BT & (teacher_ids_B == t).unsqueeze(1)
            n = float(rows_BT.sum())
            key = f"teacher/{name}"
            sums[f"{key}/share"] = n
            sums[f"{key}/gated_share"] = float(weights.gate[rows_BT].sum())
            sums[f"{key}/teacher_entropy"] = float(scores.entropy_BT[rows_BT].sum())
            sums[f"{key}/tokens_per_s"] = n * n / seconds[t] if t in seconds and seconds[t] > 0 else 0.0
            if scores.entropy_lower_BT is not None and scores.entropy_upper_BT is not None:
                undecided_BT = gate_undecided(scores.entropy_lower_BT, scores.entropy_upper_BT,
                                              self.objectives[t].tau) & rows_BT
                sums[f"{key}/undecided_share"] = float(undecided_BT.sum())
                undecided_total += sums[f"{key}/undecided_share"]
        if scores.entropy_lower_BT is not None:
            sums["teacher/undecided_share"] = undecided_total
        return sums


def finish_teacher_metrics(metrics: dict[str, float], names: Sequence[str], objectives: Sequence[ObjectiveConfig],
                           ) -> None:
    """Turn the reduced ``teacher/NAME/*`` token sums (each already divided by the step's token count) into
    per-teacher means, in place: every part divided by the teacher's share of the tokens, 0 for a teacher with
    no token in the step; ``teacher/NAME/tau`` added."""
    for name, obj in zip(names, objectives, strict=True):
        key = f"teacher/{name}"
        share = metrics.get(f"{key}/share", 0.0)
        for k in [k for k in metrics if k.startswith(f"{key}/") and k != f"{key}/share"]:
            metrics[k] = metrics[k] / share if share > 0 else 0.0
        metrics[f"{key}/tau"] = obj.tau


def _joined(parts: list[TeacherScores]) -> TeacherScores:
    """Row blocks of different teachers joined along the rows. An exact teacher's entropy interval is its entropy
    (lower = upper) where another teacher's is a top-k estimate; full logits and hidden states never mix."""
    fields: dict[str, Tensor | None] = {}
    for f in ROW_FIELDS:
        values = [getattr(p, f) for p in parts]
        if all(v is None for v in values):
            fields[f] = None
        elif f in ("entropy_lower_BT", "entropy_upper_BT"):
            fields[f] = torch.cat([p.entropy_BT if v is None else v for p, v in zip(parts, values, strict=True)])
        elif any(v is None for v in values):
            raise ValueError(f"teachers disagree on {f}: several teachers give top-k scores only")
        else:
            fields[f] = torch.cat(values)  # type: ignore[arg-type]
    return TeacherScores(**fields)  # type: ignore[arg-type]
