"""Tiny training runs log the diagnostics (diag/*, role/*) every step; switching them off changes nothing else."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from eopd.tracking import read_metrics
from eopd.trainer import train

from .test_trainer import tiny_cfg

GRAD_KEYS = ("diag/grad_rkl", "diag/grad_fkl", "diag/grad_cos", "diag/rkl_gnorm_mean_high", "diag/rkl_gnorm_var_high",
             "diag/rkl_gnorm_mean_low", "diag/rkl_gnorm_var_low")
ROLE_KEYS = ("share", "loss", "rkl", "fkl", "student_entropy", "teacher_entropy", "gated_share")
ROLES = ("arithmetic", "choice")
CLIP = 0.5
# one optimizer update per step (32 rows = 8 prompts x 4), two micro-batches, a clip that bites
COMMON = ("max_steps=3", "save_every=0", "rollout.max_new_tokens=16", "optim.minibatch_size=32",
          "optim.micro_batch_size=16", f"optim.grad_clip={CLIP}")


def run_rows(tiny_models, out: Path, *overrides: str) -> list[dict[str, float]]:
    train(tiny_cfg(tiny_models, out, *COMMON, *overrides))
    return read_metrics(out / "metrics.jsonl")


def test_diagnostics_logged_every_step_and_off_switch_changes_nothing_else(tiny_models, tmp_path):
    rows = run_rows(tiny_models, tmp_path / "on")
    assert [r["step"] for r in rows] == [1, 2, 3]
    role_keys = [f"role/{name}/{k}" for name in ROLES for k in ROLE_KEYS]
    for r in rows:
        for key in (*GRAD_KEYS, "diag/clip_coef", *role_keys):
            assert key in r and math.isfinite(r[key]), (key, r.get(key))
        assert not any(k.startswith("raw/") for k in r)  # raw sums are finished, never logged
        assert r["diag/grad_rkl"] > 0 and r["diag/grad_fkl"] > 0 and -1 <= r["diag/grad_cos"] <= 1
        assert r["diag/rkl_gnorm_mean_high"] > 0 and r["diag/rkl_gnorm_mean_low"] > 0
        # one update per step: the coefficient clip_grad_norm_ applied to the logged pre-clip norm
        assert r["diag/clip_coef"] == pytest.approx(min(1.0, CLIP / r["grad_norm"]), rel=1e-5)
        assert sum(r[f"role/{name}/share"] for name in ROLES) == pytest.approx(1.0, abs=1e-12)
        # token-weighted role means recombine into the step's means
        for key in ("loss", "rkl", "fkl", "student_entropy", "teacher_entropy", "gated_share"):
            mixed = sum(r[f"role/{name}/share"] * r[f"role/{name}/{key}"] for name in ROLES)
            assert mixed == pytest.approx(r[key], rel=1e-5, abs=1e-9), key
    assert any(r["diag/clip_coef"] < 1.0 for r in rows)

    off = run_rows(tiny_models, tmp_path / "off", "optim.diagnostics=false")
    assert not any(k.startswith(("diag/", "role/")) for r in off for k in r)
    for a, b in zip(rows, off, strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]  # bit-identical training


def test_plain_path_logs_the_same_diagnostics(tiny_models, tmp_path):
    fused = run_rows(tiny_models, tmp_path / "fused", "max_steps=1")
    plain = run_rows(tiny_models, tmp_path / "plain", "max_steps=1", "loss_impl=plain")
    for key in (*GRAD_KEYS, "diag/clip_coef", "role/choice/loss", "role/arithmetic/fkl"):
        assert plain[0][key] == pytest.approx(fused[0][key], rel=1e-4, abs=1e-7), key


def test_task_without_roles_logs_no_role_metrics(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{a + 1}+3="}) + "\n" for a in range(1, 9)))
    rows = run_rows(tiny_models, tmp_path / "run", "max_steps=1", "data.task=jsonl", f"data.path={prompts}")
    assert all(k in rows[0] for k in GRAD_KEYS)
    assert not any(k.startswith("role/") for k in rows[0])


def test_grad_norm_is_measured_with_clipping_off(tiny_models, tmp_path):
    """grad_clip=0 still logs the pre-clip norm (it was 0 before): the first step's equals a clipped run's."""
    clipped = run_rows(tiny_models, tmp_path / "clip", "max_steps=1")
    free = run_rows(tiny_models, tmp_path / "free", "max_steps=1", "optim.grad_clip=0")
    assert free[0]["grad_norm"] > 0 and free[0]["diag/clip_coef"] == 1.0
    assert free[0]["grad_norm"] == pytest.approx(clipped[0]["grad_norm"], rel=1e-6)  # the same first gradient
