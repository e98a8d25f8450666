"""One process or two (gloo) on the same global batch: the same step, to float tolerance.

``tests/rehearsal_grads.py --step`` runs ``eopd.training.trainer.step`` under ``torchrun --nproc_per_node 2`` on each
process's rows of one fixed rollout (two PPO epochs of two minibatches, clipping that binds, an adaptive tau,
the learner's own old log-probs, every diagnostic), after the trainer's periodic evaluation of the student it
starts from. The same runs here in one process on all the rows, given the very minibatches the two processes
took (``rehearsal_grads.partition_of``: each process shuffles its own rows). Every logged metric (wall-clock
timings aside), the weights after the whole step and the evaluation's graded samples must agree.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from eopd.training.components import build_components

from .conftest import REPO
from .rehearsal_grads import partition_of, step_on_rollout, uneven_rollout
from .test_trainer import tiny_cfg

TINY = str(REPO / "configs" / "tiny.yaml")
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
WALL_CLOCK = ("time/", "tokens_per_s/")
# 32 rows (8 prompts x 4), minibatches of 16 (8 per process, 2 micro-batches of 4 each; one process: 4 of 4),
# 2 PPO epochs: 4 updates, clipped at 0.3, a learning rate that moves the PPO ratios past the clip range within
# the first epoch; evaluation: 20 problems x 8 samples, sampling blocks of 8 problems
STEP = ("rollout.max_new_tokens=12", "optim.minibatch_size=16", "optim.micro_batch_size=4", "optim.ppo_epochs=2",
        "optim.lr=0.02", "optim.warmup_steps=0", "optim.grad_clip=0.3", "optim.recompute_logp_old=true",
        "loss.adaptive_share=0.3", "loss.top_k=4", "eval.every=1", "eval.problems=20", "eval.n=8",
        "eval.max_new_tokens=12")
# float32 sums in another order, through AdamW steps at a high learning rate: ~2e-5 apart (the PPO ratio after
# an update, an exponential, the most); a mean of per-process means or a per-process normaliser: >1e-2
RTOL = 1e-4
ATOL = 1e-6  # float32 log-probs: the sampler-learner gap itself is ~2e-7, and its max moves by that much
# of the step's move (Frobenius, all weights): ~7e-5 here; a per-process normaliser gives ~0.4
WEIGHT_TOL = 1e-3


@pytest.fixture(scope="module")
def two_processes(tiny_models, tmp_path_factory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("two") / "step"
    overrides = [f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
                 f"output_dir={out.parent / 'run'}", "num_threads=1", "tensorboard=false", *STEP]
    script = str(Path(__file__).with_name("rehearsal_grads.py"))
    proc = subprocess.run([*TORCHRUN, script, "--step", str(out), TINY, *overrides], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def one_process(tiny_models, tmp_path_factory) -> dict[str, Any]:
    c = build_components(tiny_cfg(tiny_models, tmp_path_factory.mktemp("one") / "run", *STEP))
    return step_on_rollout(c, uneven_rollout(c)[0], partition=partition_of(2, c))


def logged(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith(WALL_CLOCK)}


@pytest.mark.slow
def test_every_step_metric_is_the_one_process_value(two_processes, one_process) -> None:
    two, one = (logged(r["metrics"]) for r in (two_processes[0], one_process))
    assert two_processes[0]["world"] == 2 and one_process["world"] == 1
    assert logged(two_processes[1]["metrics"]) == two  # every process logs the same
    assert set(two) == set(one)
    # the step exercises what it compares: every diagnostic family, a clip that binds, a tau from the data
    for key in ("fkl_high_entropy", "diag/grad_cos", "diag/rkl_gnorm_var_high", "role/choice/fkl", "ppo/clip_frac",
                "ppo/ratio_max", "ppo/sampler_gap_mean", "grad_norm", "response_length", "teacher_entropy"):
        assert key in one and math.isfinite(one[key]) and one[key] != 0, key
    assert one["diag/clip_coef"] < 1 and one["tau"] != 0.8 and 0 < one["gated_share"] < 1  # adaptive tau
    differ = {k: (one[k], two[k]) for k in one if two[k] != pytest.approx(one[k], rel=RTOL, abs=ATOL)}
    assert not differ, differ


@pytest.mark.slow
def test_weights_after_a_whole_step_are_the_one_process_weights(two_processes, one_process, tiny_models) -> None:
    """Four clipped AdamW updates on globally normalised minibatches: the same weights to float tolerance, far
    below what a per-process normaliser or a minibatch split otherwise would change."""
    from transformers import AutoModelForCausalLM

    start = {k: p.detach() for k, p in AutoModelForCausalLM.from_pretrained(tiny_models["student"]).named_parameters()}
    one, (two, two_b) = one_process["weights"], (r["weights"] for r in two_processes)
    assert one.keys() == two.keys() and one
    assert all(torch.equal(two[k], two_b[k]) for k in one)  # DDP kept the processes identical
    moved = sum(float(((one[k] - start[k]) ** 2).sum()) for k in one) ** 0.5
    apart = sum(float(((two[k] - one[k]) ** 2).sum()) for k in one) ** 0.5
    assert moved > 0.5  # the step moved the weights (4 updates at lr 0.02 over ~10^4 weights)
    assert apart < WEIGHT_TOL * moved, (apart, moved)


@pytest.mark.slow
def test_evaluation_samples_do_not_depend_on_the_process_count(two_processes, one_process) -> None:
    """The trainer's evaluation on two processes grades exactly the completions one process samples."""
    one, two = one_process["records"], two_processes[0]["records"]
    assert len(one) == 20 and [r.id for r in two] == [r.id for r in one]
    assert two_processes[1]["records"] == two  # gathered: every process holds them all
    assert [dataclasses.asdict(r) for r in two] == [dataclasses.asdict(r) for r in one]
    assert len({c.text for r in one for c in r.completions}) > 20  # sampled, not one repeated completion
    assert two_processes[0]["eval"] == one_process["eval"]
