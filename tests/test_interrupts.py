"""Interrupts, damaged checkpoints and the PPO ratio: what a long real run meets, on tiny models.

Signals are sent from Python to a real ``eopd train`` subprocess (a shell's background job ignores SIGINT).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eopd.config import ConfigError, load_config
from eopd.tracking import read_metrics
from eopd.training.checkpoint import CheckpointError, list_checkpoints
from eopd.training.collect import collect_batch
from eopd.training.components import build_components, pin_requested_gpu
from eopd.training.trainer import train
from eopd.training.update import ppo_update

from .conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")
FAST = ("rollout.prompts_per_step=2", "optim.minibatch_size=8", "optim.micro_batch_size=8", "num_threads=1",
        "tensorboard=false")


def _args(tiny_models, out: Path, *extra: str) -> list[str]:
    return [f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
            f"output_dir={out}", *FAST, *extra]


def _strip_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s/"))} for r in rows]


def _start(tiny_models, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "eopd", "train", TINY, *_args(tiny_models, out, *extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and len(read_metrics(out / "metrics.jsonl")) < n:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)


@pytest.mark.slow
def test_ctrl_c_stops_at_a_step_boundary_and_resume_is_exact(tiny_models, tmp_path):
    """SIGINT lands anywhere in a step; the run finishes that step, checkpoints it (never over another) and
    exits 130; resuming reproduces the uninterrupted run bit for bit, so the checkpoint held a complete step."""
    steps = ("max_steps=60", "save_every=4", "keep_checkpoints=50")
    cut = tmp_path / "cut"
    proc = _start(tiny_models, cut, *steps)
    _wait_for_steps(cut, 6, proc)
    before = {p.name: (p / "trainer.pt").stat().st_mtime_ns for p in list_checkpoints(cut)}
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    rows = read_metrics(cut / "metrics.jsonl")
    last = rows[-1]["step"]
    assert 6 <= last < 60, output  # it stopped early, after the step it was in
    assert [p.name for p in list_checkpoints(cut)][-1] == f"step_{last:06d}"  # a checkpoint of that very step
    assert all((cut / "checkpoints" / n / "trainer.pt").stat().st_mtime_ns == t for n, t in before.items())
    assert "stopping after this step" in output and "continue with resume=true" in output
    assert "Traceback" not in output
    train(load_config(TINY, _args(tiny_models, cut, *steps, "resume=true")))
    train(load_config(TINY, _args(tiny_models, tmp_path / "full", *steps)))
    full, resumed = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    assert len(full) == len(resumed) == 60
    assert _strip_times(full) == _strip_times(resumed)


def test_second_ctrl_c_exits_at_once_without_saving(tiny_models, tmp_path, capsys):
    """Two SIGINTs while the teacher scores step 4: the run leaves at once, saving nothing (the periodic
    checkpoints stay as they were, no half-written folder is left)."""
    import os
    import threading

    out = tmp_path / "run"
    c = build_components(load_config(TINY, _args(tiny_models, out, "max_steps=50", "save_every=3")))
    score, calls = c.teacher.score, []

    def slow_score(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # step 4: two Ctrl-C's, 0.2 s apart, while this step is still running
            def press() -> None:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                os.kill(os.getpid(), signal.SIGINT)
            threading.Thread(target=press).start()
            time.sleep(2.0)
        return score(*a, **k)

    c.teacher.score = slow_score  # type: ignore[method-assign]
    from eopd.training.trainer import run

    with pytest.raises(KeyboardInterrupt):
        run(c)
    said = capsys.readouterr().out
    assert "stopping after this step" in said and "checkpoint saved" not in said
    assert [p.name for p in list_checkpoints(out)] == ["step_000003"]  # only the periodic one
    assert not [p for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name]


def _damage(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damaged", ["model/model.safetensors", "trainer.pt"])
def test_resume_skips_a_damaged_checkpoint_naming_the_file(tiny_models, tmp_path, capsys, damaged):
    steps = ("max_steps=4", "save_every=2", "keep_checkpoints=5")
    train(load_config(TINY, _args(tiny_models, tmp_path / "full", *steps)))
    out = tmp_path / "run"
    train(load_config(TINY, _args(tiny_models, out, *steps)))
    _damage(out / "checkpoints" / "step_000004" / damaged)
    (out / "final").rename(out / "final-old")  # as after a crash before the final save
    capsys.readouterr()
    train(load_config(TINY, _args(tiny_models, out, *steps, "resume=true")))
    said = capsys.readouterr().out
    line = next(ln for ln in said.splitlines() if "damaged" in ln)
    assert "step_000004" in line and Path(damaged).name in line and "step_000004.damaged" in line, said
    assert "resumed from" in said and "step_000002" in said
    assert (out / "checkpoints" / "step_000004.damaged" / damaged).exists()  # kept, never deleted
    full = _strip_times(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    assert _strip_times(read_metrics(out / "metrics.jsonl")) == full


def test_resume_with_no_loadable_checkpoint_is_one_clear_error(tiny_models, tmp_path):
    out = tmp_path / "run"
    train(load_config(TINY, _args(tiny_models, out, "max_steps=2", "save_every=2")))
    _damage(out / "checkpoints" / "step_000002" / "trainer.pt")
    proc = subprocess.run([sys.executable, "-m", "eopd", "train", TINY, *_args(tiny_models, out, "max_steps=3",
                                                                             "resume=true")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("eopd train: none of the 1 checkpoints"), proc.stderr
    assert "trainer.pt" in proc.stdout  # the damaged file is named


def test_a_fresh_run_never_overwrites_another_runs_checkpoints(tiny_models, tmp_path):
    out = tmp_path / "run"
    train(load_config(TINY, _args(tiny_models, out, "max_steps=2", "save_every=1")))
    stamp = (out / "checkpoints" / "step_000002" / "trainer.pt").stat().st_mtime_ns
    with pytest.raises(CheckpointError, match="holds checkpoints of an earlier run"):
        train(load_config(TINY, _args(tiny_models, out, "max_steps=2", "save_every=1")))
    assert (out / "checkpoints" / "step_000002" / "trainer.pt").stat().st_mtime_ns == stamp


def test_first_update_ratio_is_one_even_when_the_sampler_disagrees(tiny_models, tmp_path):
    """A sampler in another precision (bf16 autocast on a GPU) gives other log-probs than the learner; with
    the learner's own recomputed logp_old the PPO ratio of the first update is exactly 1."""
    stats = {}
    for recompute in (True, False):
        c = build_components(load_config(TINY, _args(tiny_models, tmp_path / str(recompute), "rollout.n=4",
                                                     f"optim.recompute_logp_old={recompute}")))
        batch = collect_batch(c.student, c.teacher, c.prompt_ids[:2], obj=c.obj, n=4, max_new_tokens=12,
                              temperature=1.0, top_p=1.0, eos_ids=c.eos_ids, pad_id=c.tokenizer.pad_token_id,
                              vocab_size=c.vocab_size, sample_generator=c.generators["sample"],
                              loss_generator=c.generators["loss"])
        noise = 0.05 * torch.randn(batch.rollout.logp_old_BT.shape, generator=torch.Generator().manual_seed(0))
        batch.rollout.logp_old_BT += noise * batch.rollout.completion_mask_BT  # the sampler's own numbers
        injected = float((noise * batch.rollout.completion_mask_BT).abs().max())
        sums, _ = ppo_update(c.model, batch, obj=c.obj, optim=c.cfg.optim, optimizer=c.optimizer,
                             scheduler=c.scheduler, strategy=c.strategy, generator=c.generators["shuffle"],
                             loss_impl="fused", vocab_size=c.vocab_size, chunk_size=None)
        stats[recompute] = sums
    exact = stats[True]
    assert exact["ppo/ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert exact["ppo/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert exact["ppo/sampler_gap_max"] == pytest.approx(injected, abs=1e-5)  # the disagreement is measured
    assert stats[False]["ppo/ratio_max"] - stats[False]["ppo/ratio_min"] > 0.05  # what it was before


@pytest.mark.slow
def test_sampler_and_learner_agree_on_cpu_fp32(tiny_models, tmp_path):
    rows = train(load_config(TINY, _args(tiny_models, tmp_path, "max_steps=3", "optim.minibatch_size=8",
                                         "rollout.prompts_per_step=4")))
    assert all(r["ppo/sampler_gap_max"] < 1e-5 for r in rows), [r["ppo/sampler_gap_max"] for r in rows]


def test_cuda_index_is_honoured_for_one_process_and_refused_for_several(monkeypatch):
    with pytest.raises(ConfigError, match="0 GPU"):  # this machine has none
        pin_requested_gpu("cuda", 1)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(d))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="2 GPU"):
        pin_requested_gpu("cuda:2", 1)
    assert pin_requested_gpu("cuda:1", 1) == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda", 1)]
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        pin_requested_gpu("cuda:1", 2)
    assert pin_requested_gpu("cpu", 2) == torch.device("cpu")
