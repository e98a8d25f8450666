"""Several processes fail together: a teacher that fails on one process only stops every process at the same
point of the step; all of them checkpoint the last complete step and stop with the same one line, and
``resume=true`` continues exactly (2 gloo processes on CPU, tiny models)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from eopd.tracking import read_metrics
from eopd.training.checkpoint import checkpoint_dir, list_checkpoints

from .conftest import REPO
from .failing_teacher import MESSAGE

TINY = str(REPO / "configs" / "tiny.yaml")
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
WALL_CLOCK = ("time/", "tokens_per_s/")


def _args(tiny_models, out: Path, *extra: str) -> list[str]:
    # adaptive tau: token_weights' mean over processes is a collective right after the teacher's scoring
    return [TINY, f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
            f"output_dir={out}", "max_steps=3", "save_every=0", "num_threads=1", "tensorboard=false",
            "rollout.max_new_tokens=12", "optim.minibatch_size=8", "optim.micro_batch_size=4",
            "loss.adaptive_share=0.5", *extra]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``cmd`` in a process group of its own, all of it killed after ``timeout`` s (processes whose collectives
    no longer line up wait for each other until gloo's 30-minute timeout)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\n[killed after {timeout} s: the processes hung]"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_a_teacher_failure_on_one_process_stops_every_process_with_one_checkpoint(tiny_models, tmp_path):
    out = tmp_path / "failed"
    launcher = str(Path(__file__).with_name("failing_teacher.py"))
    proc = _run([*TORCHRUN, launcher, "1", "2", *_args(tiny_models, out)])  # rank 1, step 2
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log
    line = f"eopd train: {MESSAGE}"
    # both processes stop with the failing process's one line (no traceback of ours: no TypeError, no hang)
    assert proc.stderr.count(line) == 2, log
    assert proc.stderr.count("Traceback (most recent call last)") == 1, log  # torchrun's ChildFailedError only
    assert proc.stdout.count("teacher unavailable: checkpoint saved at step 1") == 1, log
    assert [p.name for p in list_checkpoints(out)] == [checkpoint_dir(out, 1).name]  # the last complete step
    assert not (out / "final").exists()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]

    resumed = _run([*TORCHRUN, "-m", "eopd", "train", *_args(tiny_models, out, "resume=true")])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 1" in resumed.stdout
    ref_out = tmp_path / "uninterrupted"
    ref = _run([*TORCHRUN, "-m", "eopd", "train", *_args(tiny_models, ref_out)])
    assert ref.returncode == 0, ref.stdout + ref.stderr

    expected, got = read_metrics(ref_out / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2, 3]
    for e, g in zip(expected, got, strict=True):
        assert set(e) == set(g)
        differ = {k: (e[k], g[k]) for k in e if not k.startswith(WALL_CLOCK) and e[k] != g[k]}
        assert not differ, (e["step"], differ)
    a = AutoModelForCausalLM.from_pretrained(ref_out / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_first_failure_costs_one_flag_when_all_is_well_and_names_the_first_failing_process() -> None:
    from eopd.training.agree import first_failure

    calls: list[str] = []

    def agree(message: str | None, failed_elsewhere: int, messages: list[str | None]) -> str | None:
        def reduce_sum(x: torch.Tensor) -> torch.Tensor:
            calls.append("reduce")
            return x + failed_elsewhere

        def gather(mine: list[str | None]) -> list[str | None]:
            calls.append("gather")
            return messages

        return first_failure(message, world=2, reduce_sum=reduce_sum, gather=gather)

    assert agree(None, 0, [None, None]) is None and calls == ["reduce"]  # a good step: one tiny all-reduce
    calls.clear()
    assert agree(None, 1, [None, "rank 1: 400"]) == "rank 1: 400" and calls == ["reduce", "gather"]
    assert agree("rank 0: 400", 1, ["rank 0: 400", "rank 1: 400"]) == "rank 0: 400"  # the lowest rank's line
    assert first_failure("alone", world=1, reduce_sum=None, gather=None) == "alone"  # type: ignore[arg-type]
