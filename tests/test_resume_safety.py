"""Resume never loses work: only proven damage sets a checkpoint aside; a transient failure, a ``trainer.pt``
that would run code, or a run folder with history but no checkpoint stops with one line and changes nothing.
Also the writers under resume: ``truncate_metrics`` and ``atomic_folder`` are crash-safe, TensorBoard shows
every step once, and the step-0 line prints only what exists."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from eopd.config import load_config, to_dict
from eopd.errors import UserError
from eopd.folders import atomic_folder
from eopd.losses import AdaptiveTau
from eopd.models.loading import DamagedFileError, ModelLoadError, load_causal_lm
from eopd.tracking import MetricsLogger, read_metrics, truncate_metrics
from eopd.training.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    capture_state,
    checkpoint_dir,
    list_checkpoints,
)
from eopd.training.components import build_components
from eopd.training.optim import build_optimizer, build_scheduler
from eopd.training.resume import steps_disagree
from eopd.training.trainer import train
from eopd.training.trainer_state import load_trainer_state

from .conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")
FAST = ("rollout.prompts_per_step=2", "optim.minibatch_size=8", "optim.micro_batch_size=8", "num_threads=1",
        "tensorboard=false", "rollout.max_new_tokens=12", "loss.adaptive_share=0.3")


def _cfg(tiny_models, out: Path, *extra: str):
    return load_config(TINY, [f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
                              f"output_dir={out}", *FAST, *extra])


@pytest.fixture(scope="module")
def finished_run(tiny_models, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints after steps 2 and 4 (copy it before changing anything)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(_cfg(tiny_models, out, "max_steps=4", "save_every=2", "keep_checkpoints=5"))
    return out


def _crashed_copy(finished_run: Path, tmp_path: Path) -> Path:
    """The run as after a crash before its final save."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "final")
    return out


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path -> content hash: equal snapshots = nothing touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------
# only proven damage sets a checkpoint aside


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA error: out of memory"),
                                   PermissionError(13, "Permission denied")],
                         ids=["OutOfMemoryError", "RuntimeError", "PermissionError"])
def test_a_transient_load_failure_stops_and_sets_nothing_aside(finished_run, tiny_models, tmp_path, monkeypatch,
                                                               error):
    out = _crashed_copy(finished_run, tmp_path)
    before = _snapshot(out)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(UserError) as err:
        build_components(_cfg(tiny_models, out, "max_steps=6", "resume=true"))
    message = str(err.value)
    assert "\n" not in message and "step_000004" in message, message
    assert str(error).split(".")[0] in message, message
    assert _snapshot(out) == before  # both checkpoints and the metrics, byte for byte; no .damaged folder


def test_proven_damage_of_a_model_folder_is_told_apart_from_other_failures(finished_run, tmp_path, monkeypatch):
    """A file that does not parse, a missing file, a tensor missing or of another shape: damage. The same
    folder failing for another reason (out of memory): not damage."""
    source = checkpoint_dir(finished_run, 4) / "model"

    def damaged(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(source, folder)
        change(folder)
        return folder

    def drop_tensor(folder: Path) -> None:
        weights = load_file(folder / "model.safetensors")
        weights.pop("model.layers.0.mlp.up_proj.weight")
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    def shrink_tensor(folder: Path) -> None:
        weights = load_file(folder / "model.safetensors")
        weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"][:-1].clone()
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    cases = {
        "truncated": (lambda f: _halve(f / "model.safetensors"), "model.safetensors"),
        "config": (lambda f: (f / "config.json").write_text('{"model_type": "qw'), "config.json"),
        "no-config": (lambda f: (f / "config.json").unlink(), "config.json"),
        "missing-tensor": (drop_tensor, "model.layers.0.mlp.up_proj.weight"),
        "shape": (shrink_tensor, "model.layers.0.mlp.up_proj.weight"),
    }
    for name, (change, named) in cases.items():
        folder = damaged(name, change)
        with pytest.raises(DamagedFileError) as err:
            load_causal_lm(folder, strict=True)
        assert named in str(err.value) and "\n" not in str(err.value), (name, str(err.value))
        assert Path(err.value.path).is_relative_to(folder), (name, err.value.path)

    def oom(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", oom)
    with pytest.raises(ModelLoadError) as err:
        load_causal_lm(source, strict=True)
    assert not isinstance(err.value, DamagedFileError) and "out of memory" in str(err.value)


def _halve(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("change", ["halved", "zeroed", "missing"])
def test_a_damaged_trainer_pt_is_proven_damage(finished_run, tmp_path, change):
    ckpt = tmp_path / "step_000004"
    shutil.copytree(checkpoint_dir(finished_run, 4), ckpt)
    path = ckpt / "trainer.pt"
    if change == "halved":
        _halve(path)
    elif change == "zeroed":  # what a crash can leave on some filesystems
        path.write_bytes(bytes(path.stat().st_size))
    else:
        path.unlink()
    with pytest.raises(DamagedFileError) as err:
        load_trainer_state(ckpt)
    assert str(path) in str(err.value) and Path(err.value.path) == path


# ---------------------------------------------------------------------------------------------------------
# a trainer.pt that would run code is refused (issue 24.1)


class _WritesMarker:
    """Unpickling this calls ``Path.write_text(marker, ...)``: any code at all would run the same way."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "code ran while reading trainer.pt"))


def _write_payload(path: Path, marker: Path, writer: str) -> None:
    state = {"loop": {"step": 4}, "optimizer": _WritesMarker(marker)}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_trainer_pt_that_would_run_code_is_refused_and_kept(finished_run, tiny_models, tmp_path, writer):
    out = _crashed_copy(finished_run, tmp_path)
    marker = tmp_path / "marker"
    # the payload is live: read without weights_only it writes the marker
    probe = tmp_path / "probe.pt"
    _write_payload(probe, marker, writer)
    with contextlib.suppress(RuntimeError):  # a plain pickle is no torch file ("Invalid magic number"), found
        torch.load(probe, weights_only=False)  # only after the payload ran
    assert marker.exists()
    marker.unlink()

    newest = checkpoint_dir(out, 4) / "trainer.pt"
    _write_payload(newest, marker, writer)
    before = _snapshot(out)
    with pytest.raises(UnsafeCheckpointError) as err:
        build_components(_cfg(tiny_models, out, "max_steps=6", "resume=true"))
    message = str(err.value)
    assert str(newest) in message and "\n" not in message, message
    assert not marker.exists()  # nothing ran
    assert _snapshot(out) == before  # nothing renamed, nothing lost
    assert not isinstance(err.value, DamagedFileError)


def test_trainer_state_as_this_project_writes_it_still_loads(finished_run, tiny_models, tmp_path):
    """``weights_only=True`` reads what ``capture_state`` stores: the run's own checkpoint, and one built here
    with every optional part filled (adaptive tau, LoRA settings in the config, a CUDA-like RNG state)."""
    state = load_trainer_state(checkpoint_dir(finished_run, 4))
    assert state["loop"]["step"] == 4 and state["adaptive_tau"] is not None
    assert state["config"] == to_dict(_cfg(tiny_models, finished_run, "max_steps=4", "save_every=2",
                                           "keep_checkpoints=5"))

    cfg = _cfg(tiny_models, tmp_path, "models.lora.r=4", "models.lora.target_modules=q_proj,v_proj",
               "data.chat_template=true", "data.chat_template_kwargs.enable_thinking=false")
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    optimizer = build_optimizer(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = build_scheduler(optimizer, total_updates=10, warmup_updates=2, min_lr_ratio=0.1)
    params[0].grad, params[1].grad = torch.ones(3, 2), torch.ones(2)
    optimizer.step()
    scheduler.step()
    adaptive = AdaptiveTau(0.3, 0.9)
    adaptive.tau = 0.7
    written = capture_state(loop={"step": 3, "data_position": 6, "updates": 3}, optimizer_state=optimizer.state_dict(),
                            scheduler=scheduler, generators={"sample": torch.Generator().manual_seed(1)},
                            adaptive=adaptive, rank=0, world=1, config=to_dict(cfg))
    written["cuda_rng"] = {0: torch.zeros(16, dtype=torch.uint8)}  # what a GPU run stores
    (tmp_path / "ckpt").mkdir()
    torch.save(written, tmp_path / "ckpt" / "trainer.pt")
    read = load_trainer_state(tmp_path / "ckpt")
    assert _same(read, written)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------------------------------------------------
# "starting fresh" never deletes an earlier run's history


@pytest.mark.parametrize("resume", ["resume=true", "resume=false"])
def test_history_without_a_checkpoint_stops_until_start_over(finished_run, tiny_models, tmp_path, resume):
    out = _crashed_copy(finished_run, tmp_path)
    shutil.move(out / "checkpoints", tmp_path / "moved-away")  # no usable checkpoint left, the history remains
    history = (out / "metrics.jsonl").read_bytes()
    before = _snapshot(out)
    with pytest.raises(CheckpointError, match="start_over=true") as err:
        train(_cfg(tiny_models, out, "max_steps=2", resume))
    assert "\n" not in str(err.value) and "metrics.jsonl" in str(err.value)
    assert _snapshot(out) == before
    rows = train(_cfg(tiny_models, out, "max_steps=2", resume, "start_over=true"))
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert (out / "earlier_run" / "metrics.jsonl").read_bytes() == history  # set aside, never deleted


def test_start_over_sets_an_earlier_runs_checkpoints_aside(finished_run, tiny_models, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = _snapshot(out)
    with pytest.raises(CheckpointError, match="holds checkpoints of an earlier run"):
        train(_cfg(tiny_models, out, "max_steps=2"))
    assert _snapshot(out) == before
    train(_cfg(tiny_models, out, "max_steps=2", "save_every=1", "start_over=true"))
    assert _snapshot(out / "earlier_run") == before  # metrics, checkpoints, final, config: moved whole
    assert [p.name for p in list_checkpoints(out)] == ["step_000001", "step_000002"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_processes_that_resumed_at_different_steps_are_named():
    assert steps_disagree([4, 4]) is None
    message = steps_disagree([4, 2])
    assert message is not None and "process 0: step 4" in message and "process 1: step 2" in message


# ---------------------------------------------------------------------------------------------------------
# crash-safe writers


def test_truncate_metrics_is_all_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": float(s)} for s in range(1, 6)]
    path.write_text("".join(f'{{"step": {r["step"]}, "loss": {r["loss"]}}}\n' for r in rows))
    original = path.read_bytes()

    def killed(src: Any, dst: Any) -> None:
        raise KeyboardInterrupt  # the process dies before the new file takes the old one's place

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        truncate_metrics(path, 3)
    assert path.read_bytes() == original  # the history is whole
    monkeypatch.undo()

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    truncate_metrics(path, 3)
    assert read_metrics(path) == rows[:3]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left
    assert synced and all(Path(s).parent == tmp_path for s in synced)


def test_atomic_folder_syncs_every_file_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "rename", lambda a, b: events.append(("rename", str(a))) or real_rename(a, b))
    with atomic_folder(tmp_path / "final") as tmp:
        (tmp / "model.safetensors").write_bytes(b"weights")
        (tmp / "tokenizer").mkdir()
        (tmp / "tokenizer" / "vocab.json").write_text("{}")
        (tmp / "tokenizer" / "deeper").mkdir()
        (tmp / "tokenizer" / "deeper" / "merges.txt").write_text("a b")
    written = {str(tmp / "model.safetensors"), str(tmp / "tokenizer" / "vocab.json"),
               str(tmp / "tokenizer" / "deeper" / "merges.txt")}
    rename_at = events.index(("rename", str(tmp)))
    assert written <= {path for kind, path in events[:rename_at] if kind == "fsync"}, events
    assert (tmp_path / "final" / "tokenizer" / "deeper" / "merges.txt").read_text() == "a b"


# ---------------------------------------------------------------------------------------------------------
# TensorBoard and the progress line


def test_a_resumed_logger_purges_tensorboard_events_past_the_checkpoint(tmp_path, monkeypatch):
    """On resume the writer is opened with ``purge_step`` = the first replayed step, which TensorBoard uses to
    hide the earlier run's events from that step on (a fresh run purges nothing)."""
    opened: list[dict[str, Any]] = []

    class Writer:
        def __init__(self, log_dir: str, **kwargs: Any) -> None:
            opened.append(kwargs)

        def add_scalar(self, *args: Any) -> None: ...

        def close(self) -> None: ...

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    MetricsLogger(tmp_path, 10, tensorboard=True).close()
    MetricsLogger(tmp_path, 10, tensorboard=True, start_step=6).close()
    assert opened[0].get("purge_step") is None
    assert opened[1]["purge_step"] == 7


def test_resumed_tensorboard_shows_every_step_once(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (an optional tracker)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    first = MetricsLogger(tmp_path, 6, tensorboard=True)
    for step in range(1, 6):  # the crashed run got to step 5; its checkpoint is step 3
        first.log(step, {"loss": float(step)})
    first.close()
    truncate_metrics(tmp_path / "metrics.jsonl", 3)
    resumed = MetricsLogger(tmp_path, 6, tensorboard=True, start_step=3)
    for step in range(4, 7):
        resumed.log(step, {"loss": 10.0 + step})
    resumed.close()
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]
    files = sorted((tmp_path / "tb").glob("events.out.tfevents.*"))
    starts = [e.step for e in EventFileLoader(str(files[-1])).Load() if e.HasField("session_log")]
    assert starts == [4]  # the purge marker TensorBoard reads, not just its out-of-order heuristic


def test_the_step_0_line_prints_only_what_exists(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, 10, tensorboard=False)
    logger.log(0, {"eval/avg@n": 0.25})
    line = capsys.readouterr().out
    assert "nan" not in line and "loss" not in line and "eval avg@n 0.250" in line, line
    logger.log(1, {"loss": 1.5, "rkl_estimate": 0.5, "fkl": 0.25, "gated_share": 0.5, "teacher_entropy": 1.0,
                   "student_entropy": 2.0, "response_length": 7.0})
    line = capsys.readouterr().out
    assert "loss 1.5000 rkl 0.500 fkl 0.250 gated 0.50 H_T 1.00 H_S 2.00 len 7.0" in line, line
