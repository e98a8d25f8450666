"""Several processes resume together: process 0 alone chooses the checkpoint (and sets proven damage aside,
once), every process loads that one, and a failure on any process stops them all with the same line and
changes nothing (2 gloo processes on CPU, tiny models)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eopd.tracking import read_metrics

from .conftest import REPO
from .resume_launcher import MESSAGE

TINY = str(REPO / "configs" / "tiny.yaml")
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
LAUNCHER = str(Path(__file__).with_name("resume_launcher.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
WALL_CLOCK = ("time/", "tokens_per_s/")


def _args(tiny_models, out: Path, *extra: str) -> list[str]:
    return [TINY, f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
            f"output_dir={out}", "max_steps=4", "save_every=2", "keep_checkpoints=5", "num_threads=1",
            "tensorboard=false", "rollout.max_new_tokens=12", "optim.minibatch_size=8", "optim.micro_batch_size=4",
            *extra]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(WALL_CLOCK)} for r in rows]


@pytest.mark.slow
def test_two_processes_resume_from_one_choice_and_fail_together(tiny_models, tmp_path):
    out = tmp_path / "run"
    first = _run([*TORCHRUN, "-m", "eopd", "train", *_args(tiny_models, out)])
    assert first.returncode == 0, first.stdout + first.stderr
    uninterrupted = _without_times(read_metrics(out / "metrics.jsonl"))
    shutil.rmtree(out / "final")  # as after a crash before the final save

    # out of memory on process 1 alone: both processes stop with the same line; nothing is set aside
    before = _snapshot(out)
    failed = _run([*TORCHRUN, LAUNCHER, "1", *_args(tiny_models, out, "resume=true", "max_steps=6")])
    log = failed.stdout + failed.stderr
    line = next((ln for ln in failed.stderr.splitlines() if ln.startswith("eopd train: ")), "")
    line = line[: line.index(MESSAGE) + len(MESSAGE)]  # the two processes' lines may share one terminal line
    assert failed.returncode != 0 and failed.stderr.count(line) == 2, log  # the same line from both
    assert line.startswith("eopd train: process 1 could not load checkpoint step_000004"), log
    assert "]: Traceback" not in failed.stderr, log  # no process's own traceback (torchrun's summary aside)
    assert _snapshot(out) == before

    # the newest checkpoint damaged: process 0 sets it aside once, both processes resume from the one before
    weights = out / "checkpoints" / "step_000004" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    resumed = _run([*TORCHRUN, LAUNCHER, "-1", *_args(tiny_models, out, "resume=true")])
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log
    assert "process 0 resumed from step_000002 at step 2" in resumed.stdout, log
    assert "process 1 resumed from step_000002 at step 2" in resumed.stdout, log
    assert resumed.stdout.count("checkpoint step_000004 is damaged") == 1, log  # said and moved once
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_000002", "step_000004", "step_000004.damaged"]
    assert _without_times(read_metrics(out / "metrics.jsonl")) == uninterrupted  # steps 3-4 replayed exactly
