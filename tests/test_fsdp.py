"""Sharded training (``parallel.strategy=fsdp``, FSDP2) against one unsharded process, on CPU with gloo.

Each check runs real processes under ``torchrun``: the whole training step (every PPO epoch, minibatch and
micro-batch, clipping, diagnostics) equals the one-process step; the first update's full gradients equal the
one-process ones with an untied lm_head; sampling unshards once and never gathers per token while processes end
at different steps; a SIGKILLed run resumes bit for bit; a checkpoint resumes at another process count; HSDP on
a 2 x 2 mesh equals one process; bfloat16 mixed precision keeps the teacher's inputs float32. Bad settings and
cross-strategy resumes stop in one line.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from eopd.config import ConfigError, load_config
from eopd.models import build_tiny_checkpoint
from eopd.tracking import read_metrics
from eopd.training.checkpoint import list_checkpoints
from eopd.training.components import build_components

from .conftest import REPO
from .rehearsal_grads import first_update_grads, partition_of, step_on_rollout, uneven_rollout
from .test_process_count import ATOL, RTOL, STEP, WEIGHT_TOL, logged
from .test_trainer import tiny_cfg

TINY = str(REPO / "configs" / "tiny.yaml")
HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
FSDP = "parallel.strategy=fsdp"


def torchrun(nproc: int, *args: str, timeout: float = 300) -> tuple[str, str]:
    """Run under ``torchrun``; a hang (a collective one process never reaches) fails after ``timeout`` with every
    process killed (torchrun starts its workers in sessions of their own, so killing it alone would leave them)."""
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"torchrun {' '.join(args[:2])} hung for {timeout} s (every process killed)\n{err[-2000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out, err


def overrides(tiny_models: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
            f"output_dir={out}", "num_threads=1", "tensorboard=false", *extra]


def launch(nproc: int, script: str, mode: list[str], prefix: Path, args: list[str]) -> list[dict[str, Any]]:
    torchrun(nproc, str(HERE / script), *mode, str(prefix), TINY, *args)
    return [torch.load(f"{prefix}.rank{r}.pt", weights_only=False) for r in range(nproc)]


def moved_and_apart(start: dict[str, torch.Tensor], one: dict[str, torch.Tensor], other: dict[str, torch.Tensor]
                    ) -> tuple[float, float]:
    """How far the step moved the weights (Frobenius over all of them) and how far ``other`` ends from ``one``."""
    moved = sum(float(((one[k] - start[k]) ** 2).sum()) for k in one) ** 0.5
    apart = sum(float(((other[k] - one[k]) ** 2).sum()) for k in one) ** 0.5
    return moved, apart


def start_weights(tiny_models: dict[str, Path]) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: p.detach() for k, p in AutoModelForCausalLM.from_pretrained(tiny_models["student"]).named_parameters()}


def assert_same_step(one: dict[str, Any], sharded: list[dict[str, Any]], tiny_models: dict[str, Path]) -> None:
    """Every logged metric, the weights after the step and the evaluation's samples: the one-process values."""
    a, b = logged(one["metrics"]), logged(sharded[0]["metrics"])
    assert set(a) == set(b)
    differ = {k: (a[k], b[k]) for k in a if b[k] != pytest.approx(a[k], rel=RTOL, abs=ATOL)}
    assert not differ, differ
    assert all(logged(r["metrics"]) == b for r in sharded)  # every process logs the same
    moved, apart = moved_and_apart(start_weights(tiny_models), one["weights"], sharded[0]["weights"])
    assert moved > 0.5 and apart < WEIGHT_TOL * moved, (apart, moved)
    assert [r.completions for r in sharded[0]["records"]] == [r.completions for r in one["records"]]


@pytest.fixture(scope="module")
def one_process(tiny_models, tmp_path_factory) -> dict[str, Any]:
    """The step of tests/test_process_count.py in one unsharded process, on the minibatches two processes take."""
    c = build_components(tiny_cfg(tiny_models, tmp_path_factory.mktemp("one") / "run", *STEP))
    return step_on_rollout(c, uneven_rollout(c)[0], partition=partition_of(2, c))


@pytest.mark.slow
def test_a_sharded_step_is_the_one_process_step(tiny_models, tmp_path, one_process) -> None:
    """Two FSDP processes, each holding half the student: the same metrics, weights after four clipped AdamW
    updates (two micro-batches each, one reduce-scatter per minibatch) and evaluation samples."""
    sharded = launch(2, "rehearsal_grads.py", ["--step"], tmp_path / "step",
                     overrides(tiny_models, tmp_path / "run", *STEP, FSDP))
    assert [r["world"] for r in sharded] == [2, 2]
    assert_same_step(one_process, sharded, tiny_models)


@pytest.mark.slow
def test_hsdp_on_a_two_by_two_mesh_is_the_one_process_step(tiny_models, tmp_path) -> None:
    """Four processes: sharded within pairs, replicated across them (``parallel.shard_size=2``)."""
    c = build_components(tiny_cfg(tiny_models, tmp_path / "one", *STEP))
    one = step_on_rollout(c, uneven_rollout(c)[0], partition=partition_of(4, c))
    sharded = launch(4, "rehearsal_grads.py", ["--step"], tmp_path / "step",
                     overrides(tiny_models, tmp_path / "run", *STEP, FSDP, "parallel.shard_size=2"))
    assert_same_step(one, sharded, tiny_models)


@pytest.mark.slow
def test_first_gradient_of_an_untied_student_is_the_one_process_gradient(tiny_models, tmp_path) -> None:
    """The full gradient (``full_tensor`` of each shard) of the first update, lm_head untied from the embedding:
    the fused loss reads the lm_head weight inside the sharded root's forward, so its gradient is averaged too.
    Process 0 holds the shortest rows and process 1 the longest, and micro-batches are cut by a token budget, so
    they cut other numbers of micro-batches: every forward of FSDP is a collective, so ``same_count`` pads the
    shorter list with zero-weight forwards."""
    from eopd.models.char_tokenizer import build_char_tokenizer

    student = build_tiny_checkpoint(tmp_path / "untied", tokenizer=build_char_tokenizer("0123456789+=,;"),
                                    hidden_size=32, num_layers=2, seed=5, tie_word_embeddings=False)
    models = {**tiny_models, "student": student}
    settings = ("optim.micro_batch_size=4", "rollout.max_new_tokens=12", "optim.max_tokens_per_micro_batch=30")
    sharded = launch(2, "fsdp_checks.py", ["uneven"], tmp_path / "grads",
                     overrides(models, tmp_path / "run", *settings, FSDP))
    assert sharded[0]["micro_batches"] != sharded[1]["micro_batches"], [r["micro_batches"] for r in sharded]
    c = build_components(load_config(TINY, overrides(models, tmp_path / "one", *settings)))
    one = first_update_grads(c)  # the whole batch in one process: the same gradient, whatever the split
    assert "lm_head.weight" in one["grads"]
    assert c.student.lm_head.weight is not c.student.model.embed_tokens.weight
    for r in sharded:
        assert torch.equal(r["completion_ids"], one["completion_ids"])
        assert r["grads"].keys() == one["grads"].keys()
        for name, g in one["grads"].items():
            torch.testing.assert_close(r["grads"][name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_sampling_unshards_once_and_ranks_may_end_apart(tiny_models, tmp_path) -> None:
    """Process 1 samples three times the tokens process 0 does: no all-gather while sampling (so none a finished
    process could leave the other waiting in), and the tokens and log-probs of the unsharded weights."""
    results = launch(2, "fsdp_checks.py", ["sample"], tmp_path / "sample", overrides(tiny_models, tmp_path / "run",
                                                                                      FSDP))
    assert results[0]["steps"] < results[1]["steps"]  # they end at different steps
    for r in results:
        assert r["gathers_entering"] > 0  # the unshard itself
        assert r["gathers_while_sampling"] == 0
        assert torch.equal(r["tokens"], r["tokens_unsharded"])
        torch.testing.assert_close(r["logp"], r["logp_unsharded"], atol=1e-6, rtol=1e-6)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (torchrun starts its workers in sessions of their own)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier and p not in tree]
        tree.update(children)
        frontier = children
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def checkpoint_state(ckpt: Path) -> dict[str, Any]:
    """A sharded checkpoint read back whole, in this process, with no process group: the optimizer state from its
    DCP shards and the student from its HF folder."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    dest = ckpt.parent.parent / f"{ckpt.name}.optimizer.pt"
    dcp_to_torch_save(ckpt / "optimizer", dest)
    optimizer = torch.load(dest, weights_only=False)["optimizer"]
    model = AutoModelForCausalLM.from_pretrained(ckpt / "model").state_dict()
    return {"optimizer": optimizer, "model": model}


def assert_same_state(resumed: dict[str, Any], saved: dict[str, Any]) -> None:
    for k, v in saved["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, atol=3e-7, rtol=0, msg=k)
    assert resumed["optimizer"]["state"].keys() == saved["optimizer"]["state"].keys()
    assert resumed["optimizer"]["state"]
    for name, moments in saved["optimizer"]["state"].items():
        for key, v in moments.items():
            torch.testing.assert_close(resumed["optimizer"]["state"][name][key], v, atol=3e-7, rtol=0,
                                       msg=f"{name}.{key}")


@pytest.mark.slow
def test_killed_sharded_run_resumes_bit_for_bit_and_at_another_process_count(tiny_models, tmp_path) -> None:
    """SIGKILL during step 4 of a 2-process FSDP run, ``resume=true``: the uninterrupted run's metrics exactly.
    Its step-4 checkpoint then resumes in one process with the same weights and AdamW moments, and a one-process
    checkpoint in two."""
    steps = ("max_steps=6", "save_every=2", "keep_checkpoints=5", FSDP)
    full, cut = tmp_path / "full", tmp_path / "cut"
    torchrun(2, "-m", "eopd", "train", TINY, *overrides(tiny_models, full, *steps))
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m", "eopd",
           "train", TINY, *overrides(tiny_models, cut, *steps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 240
    while len(read_metrics(cut / "metrics.jsonl")) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    kill_tree(proc.pid)  # during step 4 (on a loaded machine perhaps later: cut back below)
    proc.wait()
    for late in list_checkpoints(cut)[1:]:
        shutil.rmtree(late)
    shutil.rmtree(cut / "final", ignore_errors=True)
    assert [p.name for p in list_checkpoints(cut)] == ["step_000002"]
    torchrun(2, "-m", "eopd", "train", TINY, *overrides(tiny_models, cut, *steps, "resume=true"))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s/"))}  # noqa: E731
                          for r in rows]
    assert strip(read_metrics(cut / "metrics.jsonl")) == strip(read_metrics(full / "metrics.jsonl"))

    # 2 -> 1: the step-4 checkpoint alone, resumed by one process
    two_to_one = tmp_path / "two-to-one"
    (two_to_one / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_000004", two_to_one / "checkpoints" / "step_000004")
    resumed = launch(1, "fsdp_checks.py", ["state"], tmp_path / "state1",
                     overrides(tiny_models, two_to_one, *steps, "resume=true"))[0]
    assert resumed["step"] == 4 and resumed["world"] == 1
    assert_same_state(resumed, checkpoint_state(full / "checkpoints" / "step_000004"))

    # 1 -> 2: a one-process run's checkpoint, resumed by two
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "eopd", "train", TINY, *overrides(tiny_models, single, *steps,
                                                                              "max_steps=2")],
                   check=True, capture_output=True, env=ENV, timeout=240)
    resumed2 = launch(2, "fsdp_checks.py", ["state"], tmp_path / "state2",
                      overrides(tiny_models, single, *steps, "resume=true", "max_steps=2"))
    assert [r["world"] for r in resumed2] == [2, 2] and resumed2[0]["step"] == 2
    assert_same_state(resumed2[0], checkpoint_state(single / "checkpoints" / "step_000002"))


@pytest.mark.slow
def test_bfloat16_mixed_precision_keeps_teacher_inputs_float32(tiny_models, tmp_path, one_process) -> None:
    """``models.dtype=bfloat16`` under FSDP: the student computes in bfloat16 (its lm_head gathered whole, in
    bfloat16, inside the root's forward), the teacher's log-probs and entropies reach the loss in float32 (the
    root casts no input), and the step stays within bfloat16's rounding of the float32 one."""
    mixed = launch(1, "fsdp_checks.py", ["mixed"], tmp_path / "mixed",
                   overrides(tiny_models, tmp_path / "run", *STEP, FSDP, "models.dtype=bfloat16"))[0]
    seen = mixed["seen"]
    assert seen["lm_head"] == torch.bfloat16 and seen["lm_head_is_whole"]
    assert seen["teacher_logp"] == seen["teacher_topk_logprobs"] == seen["teacher_entropy"] == torch.float32
    full = launch(1, "fsdp_checks.py", ["mixed"], tmp_path / "full", overrides(tiny_models, tmp_path / "run32",
                                                                              *STEP, FSDP))[0]
    assert full["seen"]["lm_head"] == torch.float32
    # bfloat16 keeps 8 bits of mantissa: per-token terms within ~1%, their means over the step closer still
    for key in ("loss", "rkl", "fkl", "student_entropy", "teacher_entropy"):
        a, b = full["metrics"][key], mixed["metrics"][key]
        assert math.isclose(a, b, rel_tol=0.02, abs_tol=0.02), (key, a, b)
    assert full["metrics"]["loss"] != mixed["metrics"]["loss"]  # the policy did change the arithmetic


def test_bad_fsdp_settings_stop_in_one_line(tiny_models, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"parallel\.strategy: must be ddp or fsdp, got .zero3."):
        tiny_cfg(tiny_models, tmp_path, "parallel.strategy=zero3")
    with pytest.raises(ConfigError, match=r"parallel\.shard_size: must be > 0"):
        tiny_cfg(tiny_models, tmp_path, "parallel.shard_size=0")
    from eopd.training.sharding import check_strategy

    with pytest.raises(ConfigError, match=r"parallel.shard_size: 3 does not divide the number of processes \(4\)"):
        check_strategy(tiny_cfg(tiny_models, tmp_path, FSDP, "parallel.shard_size=3"), 4)
    with pytest.raises(ConfigError, match=r"LoRA students .* are not sharded"):
        check_strategy(tiny_cfg(tiny_models, tmp_path, FSDP, "models.lora.r=4"), 2)
    check_strategy(tiny_cfg(tiny_models, tmp_path, FSDP, "parallel.shard_size=2"), 4)  # HSDP 2 x 2: fine


def eopd_train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eopd", "train", TINY, *args], capture_output=True, text=True,
                          env=ENV, timeout=240)


def test_a_checkpoint_of_the_other_strategy_stops_in_one_line_and_stays(tiny_models, tmp_path) -> None:
    for written, resumed in (("ddp", "fsdp"), ("fsdp", "ddp")):
        out = tmp_path / written
        assert eopd_train(*overrides(tiny_models, out, "max_steps=2", "save_every=2",
                                     f"parallel.strategy={written}")).returncode == 0
        before = sorted(p.name for p in (out / "checkpoints").iterdir())
        proc = eopd_train(*overrides(tiny_models, out, "max_steps=3", "resume=true", f"parallel.strategy={resumed}"))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
        line = proc.stderr.strip().splitlines()[-1]
        assert f"written with parallel.strategy={written}" in line and f"parallel.strategy={written}" in line
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing set aside


def test_a_damaged_or_missing_shard_is_named_and_set_aside(tiny_models, tmp_path) -> None:
    out = tmp_path / "run"
    assert eopd_train(*overrides(tiny_models, out, "max_steps=4", "save_every=2", FSDP)).returncode == 0
    shutil.rmtree(out / "final")
    newest = out / "checkpoints" / "step_000004" / "optimizer"
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    proc = eopd_train(*overrides(tiny_models, out, "max_steps=4", "resume=true", FSDP))
    assert proc.returncode == 0, proc.stderr
    assert f"{shard.name}' is truncated" in proc.stdout and "step_000004.damaged" in proc.stdout
    assert (out / "checkpoints" / "step_000004.damaged").is_dir()
    assert "resumed from" in proc.stdout and "step_000002" in proc.stdout

    # a missing shard, and metadata that would run code: named, nothing runs
    again = tmp_path / "again"
    assert eopd_train(*overrides(tiny_models, again, "max_steps=2", "save_every=2", FSDP)).returncode == 0
    folder = again / "checkpoints" / "step_000002" / "optimizer"
    marker = tmp_path / "ran"
    payload = _pickle_that_writes(marker)
    (folder / ".metadata").write_bytes(payload)
    proc = eopd_train(*overrides(tiny_models, again, "max_steps=3", "resume=true", FSDP))
    assert proc.returncode == 2 and not marker.exists()
    assert ".metadata' was not read" in proc.stderr and (again / "checkpoints" / "step_000002").is_dir()


def _pickle_that_writes(marker: Path) -> bytes:
    import pickle

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.write_text, (marker, "ran"))

    return pickle.dumps(Payload())
