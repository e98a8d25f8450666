"""Tiny training runs log the diagnostics (diag/*, role/*) every step, and step 1's values are what float64
autograd on the step's own batch gives; switching them off changes nothing else."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM

import eopd.training.trainer
from eopd.sampling.forward import completion_logits
from eopd.tracking import read_metrics
from eopd.training.collect import Batch
from eopd.training.components import build_components
from eopd.training.trainer import run, train

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


def reference_step_metrics(batch: Batch, student: torch.nn.Module, vocab_size: int,
                           roles: Callable[[list[int]], list[str]]) -> dict[str, float]:
    """Step 1's diagnostics from its batch and the student it starts from, written out from their definitions
    (docs/metrics.md) in float64 with autograd on full logits, no eopd loss or metric code: one minibatch of
    every row (``N`` tokens), the learner's old log-probs (PPO ratio 1), EOPD's renormalised top-k FKL."""
    tokens, w, mask = batch.tokens, batch.weights, batch.rollout.completion_mask_BT.bool()
    logits = completion_logits(student, batch.rollout, vocab_size).detach().double().requires_grad_(True)
    logq = torch.log_softmax(logits, -1)
    logq_y = logq.gather(-1, tokens.tokens.unsqueeze(-1)).squeeze(-1)
    adv = tokens.teacher_logp.double() - logq_y.detach()  # logp_old = the learner's own log-prob: ratio 1
    rkl = -torch.exp(logq_y - logq_y.detach()) * adv
    p_K = torch.softmax(tokens.teacher_topk_logprobs.double(), -1)
    fkl = (p_K * (p_K.log() - logq.gather(-1, tokens.teacher_topk_ids))).sum(-1)
    term_r, term_f = (torch.where(mask, x, 0.0) for x in (w.w_rkl.double() * rkl, w.w_fkl.double() * fkl))
    g_r = torch.autograd.grad(term_r.sum(), logits, retain_graph=True)[0]
    g_f = torch.autograd.grad(term_f.sum(), logits)[0]
    n = float(mask.sum())
    sq_r, sq_f, dot = float((g_r * g_r).sum()), float((g_f * g_f).sum()), float((g_r * g_f).sum())
    out = {"diag/grad_rkl": sq_r**0.5 / n, "diag/grad_fkl": sq_f**0.5 / n, "diag/grad_cos": dot / (sq_r * sq_f) ** 0.5,
           "loss": float((term_r + term_f).detach().sum()) / n, "fkl": float(fkl.detach()[mask].sum()) / n}
    gnorm, high = g_r.norm(dim=-1)[mask], tokens.teacher_entropy[mask] >= w.tau
    for group, sel in (("high", high), ("low", ~high)):
        out[f"diag/rkl_gnorm_mean_{group}"] = float(gnorm[sel].mean())
        out[f"diag/rkl_gnorm_var_{group}"] = float(gnorm[sel].var(unbiased=False))
    gate = w.gate.double()[mask]
    out["gated_share"] = float(gate.sum()) / n
    out["fkl_high_entropy"] = float((fkl.detach()[mask] * gate).sum() / gate.sum())
    row_roles = [roles([t for t, m in zip(ids, row, strict=True) if m]) for ids, row in
                 zip(tokens.tokens.tolist(), mask.tolist(), strict=True)]
    flat_roles, fkl_valid = [r for rs in row_roles for r in rs], fkl.detach()[mask].tolist()  # row-major order
    for name in ROLES:
        mine = [f for f, r in zip(fkl_valid, flat_roles, strict=True) if r == name]
        out[f"role/{name}/share"] = len(mine) / n
        out[f"role/{name}/fkl"] = sum(mine) / len(mine)
    return out


def test_step_one_diagnostics_are_their_definitions_on_the_step_batch(tiny_models, tmp_path):
    """Every step-1 diagnostic recomputed from the batch the update saw, by another route than the trainer's
    (float64 autograd on full logits instead of the fused closed form; per-token sums instead of merged
    micro-batch sums; the task's own token roles)."""
    # tau near the median teacher entropy: both entropy groups large; micro-batches of 2 rows, gated unevenly
    c = build_components(tiny_cfg(tiny_models, tmp_path, *COMMON, "max_steps=1", "loss.tau=1.5",
                                  "optim.micro_batch_size=2"))
    seen: list[Batch] = []
    real = eopd.training.trainer.ppo_update

    def capture(model: torch.nn.Module, batch: Batch, **kwargs: Any) -> Any:
        seen.append(batch)
        return real(model, batch, **kwargs)

    with mock.patch.object(eopd.training.trainer, "ppo_update", capture):
        run(c)
    (logged,) = read_metrics(tmp_path / "metrics.jsonl")
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])  # the weights step 1 starts from
    expected = reference_step_metrics(seen[0], student, c.vocab_size, functools.partial(c.task.token_roles,
                                                                                       c.tokenizer))
    assert 0.2 < expected["gated_share"] < 0.8 and expected["role/choice/share"] > 0  # both groups, both roles
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


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
