"""Step metrics: how per-micro-batch numbers become one step's metrics, summed over processes.

Three kinds of key, merged over micro-batches and processes by one rule each:

- plain keys are means over valid tokens: summed as ``value * tokens``, divided by the step's token count;
- ``*_min`` / ``*_max`` keys are extremes: merged by min / max;
- ``raw/*`` keys are sums (of squares, dot products, counts) turned into metrics only after the sum over
  processes, by ``finish_raw_sums`` (the logit-gradient diagnostics, the per-role means and every mean whose
  denominator is not the valid tokens, e.g. ``fkl_high_entropy`` over the gated tokens). A plain key ``k``
  that comes with raw sums ``raw/k/*`` beside it is that call's own value (what a single ``objective`` call
  reports): the step drops it and finishes ``k`` from the sums, never a mean of per-call means.

So every step metric is a function of the step's tokens alone, whatever the micro-batches and processes.

Processes may hold different keys (a role one process never saw, ratio metrics of an empty micro-batch):
``reduce_step`` agrees on the union of keys first, so the positional all-reduce never misaligns.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from eopd.losses.objectives import RAW  # summed over micro-batches and processes as they are, then finished

Tensor = torch.Tensor


def merge_metrics(sums: dict[str, float], metrics: dict[str, float], num_valid: int) -> None:
    """Add one micro-batch's metrics: means weighted by its valid tokens, ``_min``/``_max`` keys as extremes,
    ``RAW`` keys as they are; a key with raw sums of its own (``raw/<key>/...``) is left to them."""
    finished = {k.removeprefix(RAW).rsplit("/", 1)[0] for k in metrics if k.startswith(RAW)}
    for k, v in metrics.items():
        if k in finished:
            continue
        if k.startswith(RAW):
            sums[k] = sums.get(k, 0.0) + v
        elif k.endswith("_min"):
            sums[k] = min(sums.get(k, v), v)
        elif k.endswith("_max"):
            sums[k] = max(sums.get(k, v), v)
        else:
            sums[k] = sums.get(k, 0.0) + v * num_valid


#: The per-token parts each role reports (token-weighted over the role's tokens), beside the teacher's.
ROLE_PARTS = ("loss", "rkl", "fkl", "student_entropy")


def pop_raw_sums(sums: dict[str, float]) -> dict[str, float]:
    """Remove the ``RAW`` sums from ``sums`` and return them, sorted by key (the same order on every process)."""
    return {k: sums.pop(k) for k in sorted(sums) if k.startswith(RAW)}


def finish_raw_sums(raw: dict[str, float]) -> dict[str, float]:
    """``fkl_high_entropy`` and the ``diag/*`` and ``role/*`` metrics from raw sums already summed over
    micro-batches and processes.

    The one place where "sum, then transform" metrics are defined (docs/metrics.md, "Diagnostics").
    """
    v = {k.removeprefix(RAW): x for k, x in raw.items()}
    out: dict[str, float] = {}
    if "fkl_high_entropy/gated" in v:
        gated = v["fkl_high_entropy/gated"]
        out["fkl_high_entropy"] = v["fkl_high_entropy/sum"] / gated if gated > 0 else 0.0
    if "diag/updates" in v:
        out["diag/clip_coef"] = v["diag/clip_coef"] / max(v["diag/updates"], 1.0)
    if "diag/grad_rkl_sq" in v:
        rkl, fkl = math.sqrt(max(v["diag/grad_rkl_sq"], 0.0)), math.sqrt(max(v["diag/grad_fkl_sq"], 0.0))
        cos = v["diag/grad_dot"] / (rkl * fkl) if rkl > 0 and fkl > 0 else 0.0
        out.update({"diag/grad_rkl": rkl, "diag/grad_fkl": fkl, "diag/grad_cos": min(1.0, max(-1.0, cos))})
        for group in ("high", "low"):
            n, total, total_sq = (v[f"diag/rkl_gnorm_{group}/{s}"] for s in ("tokens", "sum", "sum_sq"))
            mean = total / n if n > 0 else 0.0
            out[f"diag/rkl_gnorm_mean_{group}"] = mean
            out[f"diag/rkl_gnorm_var_{group}"] = max(total_sq / n - mean * mean, 0.0) if n > 0 else 0.0
    roles = sorted(k.split("/")[1] for k in v if k.startswith("role/") and k.endswith("/tokens"))
    all_tokens = sum(v[f"role/{name}/tokens"] for name in roles)
    for name in roles:
        n = v[f"role/{name}/tokens"]
        out[f"role/{name}/share"] = n / all_tokens if all_tokens > 0 else 0.0
        for part in (*ROLE_PARTS, "teacher_entropy", "gated_share"):
            if f"role/{name}/{part}" in v:
                out[f"role/{name}/{part}"] = v[f"role/{name}/{part}"] / n if n > 0 else 0.0
    return out


def reduce_step(
    sums: dict[str, float],
    *,
    tokens: float,
    rows: float,
    grad_norm: float,
    reduce_sum: Callable[[Tensor], Tensor],
    reduce_max: Callable[[Tensor], Tensor],
    all_keys: Callable[[list[str]], list[str]] = lambda keys: keys,
) -> tuple[dict[str, float], float, float, float]:
    """One step's metrics from this process's ``sums`` (see the module docstring for the three kinds).

    Args:
        sums: Merged micro-batch metrics of this process (``merge_metrics``) and token sums of the batch.
        tokens: This process's valid tokens; rows: its sequences; grad_norm: its mean pre-clip norm.
        reduce_sum: Sum over processes; reduce_max: element-wise max over processes.
        all_keys: The sorted union of every process's keys (identity on one process).

    Returns:
        ``(metrics, tokens, rows, grad_norm)`` with the last three summed (grad_norm: averaged) over processes.
    """
    keys = all_keys(sorted(sums))
    extreme = [k for k in keys if k.endswith(("_min", "_max"))]
    additive = [k for k in keys if k not in extreme]
    local = [sums.get(k, 0.0) for k in additive] + [tokens, rows, grad_norm]
    total = reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()
    n_tok, n_rows, norm = total[-3:]
    added = dict(zip(additive, total[:-3], strict=True))
    metrics = {k: v / max(n_tok, 1.0) for k, v in added.items() if not k.startswith(RAW) and k != "num_valid"}
    metrics.update(finish_raw_sums({k: v for k, v in added.items() if k.startswith(RAW)}))
    signs = torch.tensor([-1.0 if k.endswith("_min") else 1.0 for k in extreme], dtype=torch.float64)
    signed = torch.tensor([sums.get(k, -math.inf if k.endswith("_max") else math.inf) for k in extreme],
                          dtype=torch.float64) * signs
    metrics.update(zip(extreme, (reduce_max(signed) * signs).tolist(), strict=True))
    return metrics, n_tok, n_rows, norm
