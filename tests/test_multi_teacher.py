"""Several teachers routed per prompt (issue 20): each row scored and gated by its own teacher, per-teacher metrics
that do not depend on micro-batches or processes, exact resume, the start-up checks.

The two teachers are tiny random Qwen3 models of different initialisations (so they score the same row
differently), sharing the run's character tokenizer; a third has another tokenizer. ``routing.by=hash`` sends
each prompt to one of them, so a step's batch mixes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from eopd.config import ConfigError, load_config
from eopd.models.loading import build_tiny_checkpoint
from eopd.tasks.base import Problem
from eopd.teachers import RoutingError, TeacherMismatchError, TeacherSet
from eopd.teachers.routing import Router
from eopd.tracking import read_metrics
from eopd.training.collect import collect_batch, step_prompt_indices
from eopd.training.components import build_components
from eopd.training.trainer import train

from .conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
WALL_CLOCK = ("time/", "tokens_per_s/", "teacher/a/tokens_per_s", "teacher/b/tokens_per_s")
# 8 prompts x 4 samples, 24 new tokens: both teachers get rows in every step (hash routing)
SMALL = ("max_steps=2", "save_every=0", "rollout.max_new_tokens=12", "optim.minibatch_size=16",
         "optim.micro_batch_size=16")
PER_TEACHER = ("loss", "rkl", "fkl", "student_entropy", "gated_share", "teacher_entropy")


@pytest.fixture(scope="module")
def other_teacher(tiny_models) -> Path:
    """A teacher of another initialisation (another "style"), the same tokenizer and padded head as the first."""
    return build_tiny_checkpoint(tiny_models["root"] / "teacher_b", alphabet="0123456789+=,;", hidden_size=64,
                                 num_layers=2, vocab_padding=3, initializer_range=0.6, seed=11)


def multi_cfg(tiny_models, out: Path, a: Path | str, b: Path | str, *overrides: str):
    base = [f"models.student={tiny_models['student']}", "models.teacher=", "models.build_teacher=null",
            f"output_dir={out}", "num_threads=1", "tensorboard=false", f"teachers.a.model={a}",
            f"teachers.b.model={b}", "routing.by=hash", *SMALL]
    return load_config(TINY, [*base, *overrides])


def collected(c) -> tuple[Any, list[int]]:
    """The first step's batch of run ``c`` (all its prompts, one process) and each prompt's teacher."""
    r = c.cfg.rollout
    prompts = step_prompt_indices(len(c.problems), 0, r.prompts_per_step, c.cfg.seed, rank=0, world=1)
    ids = c.teacher.routes(c.problems, prompts)
    batch = collect_batch(c.student, c.teacher, [c.prompt_ids[i] for i in prompts], obj=c.obj, n=r.n,
                          max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                          eos_ids=c.eos_ids, pad_id=c.tokenizer.pad_token_id, vocab_size=c.vocab_size,
                          sample_generator=torch.Generator().manual_seed(0),
                          loss_generator=torch.Generator().manual_seed(1), teacher_ids=ids)
    return batch, ids


def test_each_row_is_scored_and_gated_by_its_own_teacher(tiny_models, other_teacher, tmp_path):
    c = build_components(multi_cfg(tiny_models, tmp_path / "run", tiny_models["teacher"], other_teacher,
                                   "teachers.b.tau=1.5", "teachers.b.top_k=4"))
    assert isinstance(c.teacher, TeacherSet) and c.teacher_model is None
    batch, ids = collected(c)
    assert sorted(set(ids)) == [0, 1]  # the batch mixes both teachers
    row_teacher = torch.tensor(ids)[batch.rollout.prompt_index_B]
    mask = batch.rollout.completion_mask_BT.bool()
    assert torch.equal(batch.teacher_ids_BT, torch.where(mask, row_teacher.unsqueeze(1), -1))
    for t, (tau, k) in enumerate(((0.8, 8), (1.5, 4))):
        rows = (row_teacher == t).nonzero().squeeze(1)
        sub, m = batch.rollout.select(rows), mask[rows]
        own = c.teacher.teachers[t].score(sub, top_k=k, want_logits=False)
        other = c.teacher.teachers[1 - t].score(sub, top_k=k, want_logits=False)
        got = batch.scores.select(rows)
        assert torch.equal(got.logp_BT[m], own.logp_BT[m]) and torch.equal(got.entropy_BT[m], own.entropy_BT[m])
        assert (got.logp_BT[m] - other.logp_BT[m]).abs().max() > 0.1  # the other teacher would score it otherwise
        assert torch.equal(got.topk_ids_BTK[..., :k][m], own.topk_ids_BTK[m])
        assert torch.equal(batch.weights.gate[rows].bool()[m], (own.entropy_BT >= tau)[m])  # its own tau
        # its own top-k: teacher b's 4 entries, then zero-probability padding up to teacher a's 8
        assert bool(torch.isneginf(got.topk_logprobs_BTK[..., k:][m]).all())
        assert bool(torch.isfinite(got.topk_logprobs_BTK[..., :k][m]).all())
    assert batch.weights.tau != batch.weights.tau  # NaN: the rows use two taus (each is logged per teacher)


def test_swapping_the_teachers_changes_the_loss_and_per_teacher_metrics_make_the_totals(tiny_models, other_teacher,
                                                                                        tmp_path):
    a, b = tiny_models["teacher"], other_teacher
    ab = train(multi_cfg(tiny_models, tmp_path / "ab", a, b, "max_steps=1"))[0]
    ba = train(multi_cfg(tiny_models, tmp_path / "ba", b, a, "max_steps=1"))[0]
    assert abs(ab["loss"] - ba["loss"]) > 1e-2  # the same prompts to "a", other scores: another loss
    for m in (ab, ba):
        shares = [m["teacher/a/share"], m["teacher/b/share"]]
        assert min(shares) > 0.1 and sum(shares) == pytest.approx(1.0)
        for part in PER_TEACHER:  # each teacher's mean over its own tokens; their token-weighted sum is the total
            mixed = sum(m[f"teacher/{t}/share"] * m[f"teacher/{t}/{part}"] for t in "ab")
            assert mixed == pytest.approx(m[part], rel=1e-6), part  # float32 means vs float64 sums
        assert m["teacher/a/tokens_per_s"] > 0 and m["teacher/a/tau"] == 0.8
    # the same teacher under both names, with the run's gate: the one-teacher run, to float rounding (each
    # teacher scores its rows in a micro-batch of its own)
    same = train(multi_cfg(tiny_models, tmp_path / "aa", a, a, "max_steps=1"))[0]
    single = train(load_config(TINY, [f"models.teacher={a}", f"models.student={tiny_models['student']}",
                                      f"output_dir={tmp_path / 'single'}", "num_threads=1", "tensorboard=false",
                                      *SMALL, "max_steps=1"]))[0]
    for key in ("loss", "rkl", "fkl", "gated_share", "teacher_entropy", "grad_norm"):
        assert same[key] == pytest.approx(single[key], rel=1e-5), key


def test_per_teacher_metrics_do_not_depend_on_micro_batches(tiny_models, other_teacher, tmp_path):
    """Nor on the diagnostics: the per-teacher loss parts are summed by the update itself."""
    whole = train(multi_cfg(tiny_models, tmp_path / "16", tiny_models["teacher"], other_teacher, "max_steps=1"))[0]
    split = train(multi_cfg(tiny_models, tmp_path / "4", tiny_models["teacher"], other_teacher, "max_steps=1",
                            "optim.micro_batch_size=4", "optim.diagnostics=false"))[0]
    assert not any(k.startswith(("diag/", "role/")) for k in split)
    keys = [f"teacher/{t}/{p}" for t in "ab" for p in (*PER_TEACHER, "share")]
    assert all(k in whole for k in keys)
    assert {k: split[k] for k in keys} == pytest.approx({k: whole[k] for k in keys}, rel=1e-5)


def test_a_multi_teacher_run_resumes_exactly(tiny_models, other_teacher, tmp_path):
    """4 steps with a checkpoint at 2; the step-4 checkpoint and the final student set aside, ``resume=true``
    continues from step 2 and logs steps 3 and 4 exactly as the uninterrupted run did."""
    out = tmp_path / "run"
    cfg = (tiny_models, out, tiny_models["teacher"], other_teacher, "teachers.b.tau=1.2", "max_steps=4",
           "save_every=2")
    uninterrupted = train(multi_cfg(*cfg))
    (out / "final").rename(tmp_path / "final")
    (out / "checkpoints" / "step_000004").rename(tmp_path / "step_000004")
    resumed = train(multi_cfg(*cfg, "resume=true"))
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    for g, e in zip(resumed, uninterrupted[2:], strict=True):
        assert set(g) == set(e) and "teacher/b/loss" in g
        differ = {k: (g[k], e[k]) for k in e if not k.startswith(WALL_CLOCK) and g[k] != e[k] and e[k] == e[k]}
        assert not differ, differ


def test_a_teacher_with_another_tokenizer_stops_at_start_naming_it(tiny_models, tmp_path):
    other = build_tiny_checkpoint(tmp_path / "reversed", alphabet="9876543210+=,;", hidden_size=32, num_layers=1)
    with pytest.raises(TeacherMismatchError) as err:
        build_components(multi_cfg(tiny_models, tmp_path / "run", tiny_models["teacher"], other))
    message = str(err.value)
    assert message.startswith("teachers.b: ") and "tokenizer differs from the run's" in message and "\n" not in message


@pytest.mark.parametrize(("overrides", "message"), [
    (["routing.map.x=c"], "routing.map: 'x' -> 'c' names no teacher (teachers: a, b)"),
    (["routing.default=c"], "routing.default: 'c' names no teacher"),
    (["teacher.url=http://127.0.0.1:9/v1"], "teacher.url: give each teacher's url under teachers.NAME.url"),
    (["loss.adaptive_share=0.2"], "loss.adaptive_share: an adaptive tau is not supported with several teachers"),
    (["objective=fkl"], "with several teachers only top-k objectives"),
    (["teachers.b.tau=-1"], "teachers.b.tau: must be >= 0"),
    (["teachers.c.tau=1"], "teachers.c.model: or url is required"),
    (["teachers.b.url=localhost:8000"], "teachers.b.url: must be http(s)://host:port/v1 URLs"),
    (["routing.by=length"], "routing.by: must be field or hash"),
])
def test_multi_teacher_config_errors(tiny_models, other_teacher, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        multi_cfg(tiny_models, tmp_path, tiny_models["teacher"], other_teacher, *overrides)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_routing_by_a_row_field(tmp_path, tiny_models, other_teacher):
    """JSONL rows keep their short fields: ``routing.field`` maps them to teachers; a row without a teacher stops
    the run at its first step with one line naming it (no teacher is asked to score anything first)."""
    rows = [{"prompt": "1+2=", "domain": "algebra"}, {"prompt": "3+4=", "domain": "geometry"},
            {"prompt": "5+6=", "domain": "algebra", "solution": "x" * 500}]
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    router = Router(("a", "b"), by="field", field="domain", map={"algebra": "a", "geometry": "b"})
    from eopd.tasks.prompts import PromptFileTask

    problems = PromptFileTask(str(data)).problems("train")
    assert router.routes(problems) == [0, 1, 0] and "solution" not in problems[2].meta  # long text is not kept
    assert Router(("algebra", "geometry")).routes([Problem("1", "p", "", {"teacher": "geometry"})]) == [1]
    with pytest.raises(RoutingError, match="has domain='topology', which names no teacher"):
        router.routes([Problem("q7", "p", "", {"domain": "topology"})])
    with_default = Router(("a", "b"), by="field", field="domain", map={"algebra": "a"}, default="b")
    assert with_default.routes([Problem("q7", "p", "", {"domain": "topology"}), Problem("q8", "p", "", {})]) == [1, 1]

    cfg = multi_cfg(tiny_models, tmp_path / "run", tiny_models["teacher"], other_teacher, "data.task=jsonl",
                    f"data.path={data}", "data.limit=null", "rollout.prompts_per_step=4", "rollout.n=4",
                    "routing.by=field", "routing.field=domain", "routing.map.algebra=a")
    with pytest.raises(RoutingError) as err:
        train(cfg)
    assert "'geometry', which names no teacher" in str(err.value) and "routing.map" in str(err.value)
    assert not read_metrics(tmp_path / "run" / "metrics.jsonl")  # stopped before any step was logged


@pytest.mark.slow
def test_a_mixed_batch_over_two_processes_gives_the_one_process_step(tiny_models, other_teacher, tmp_path):
    """One whole step on one fixed rollout mixing both teachers (two taus, two top-k): each process holds the rows
    of its own prompts, of both teachers, with other valid-token counts. The gradient, the weights after the step
    and every step metric, the per-teacher ones included, equal one process's on all the rows."""
    launcher = str(Path(__file__).with_name("multi_teacher_grads.py"))
    overrides = [f"models.student={tiny_models['student']}", "models.teacher=", "models.build_teacher=null",
                 f"output_dir={tmp_path / 'run'}", "num_threads=1", "tensorboard=false",
                 f"teachers.a.model={tiny_models['teacher']}", f"teachers.b.model={other_teacher}",
                 "teachers.b.tau=1.5", "teachers.b.top_k=4", "routing.by=hash", *SMALL, "rollout.prompts_per_step=16",
                 "rollout.n=2", "optim.minibatch_size=32",
                 "optim.micro_batch_size=4", "optim.lr=0.01"]
    prefix = tmp_path / "step"
    two = subprocess.run([*TORCHRUN, launcher, str(prefix), TINY, *overrides], capture_output=True, text=True,
                         timeout=300, env=ENV)
    assert two.returncode == 0, two.stdout + two.stderr
    one = subprocess.run([sys.executable, launcher, f"{prefix}-one", TINY, *overrides], capture_output=True,
                         text=True, timeout=300, env=ENV)
    assert one.returncode == 0, one.stdout + one.stderr
    ref = torch.load(f"{prefix}-one.rank0.pt", weights_only=False)
    assert ref["world"] == 1 and ref["teachers"] == [0, 1]
    keys = [k for k in ref["metrics"] if not k.startswith(WALL_CLOCK)]
    assert {f"teacher/{t}/{p}" for t in "ab" for p in (*PER_TEACHER, "share")} <= set(keys)
    for rank in (0, 1):
        got = torch.load(f"{prefix}.rank{rank}.pt", weights_only=False)
        assert got["world"] == 2 and torch.equal(got["completion_ids"], ref["completion_ids"])
        assert got["teachers"] == [0, 1]  # every process holds rows of both teachers
        assert ref["grads"].keys() == got["grads"].keys() and ref["grads"]
        for name, g in ref["grads"].items():
            assert torch.allclose(got["grads"][name], g, rtol=1e-4, atol=1e-7), name
        for name, w in ref["weights"].items():
            assert torch.allclose(got["weights"][name], w, rtol=1e-5, atol=1e-6), name
        differ = {k: (got["metrics"][k], ref["metrics"][k]) for k in keys
                  if got["metrics"][k] != pytest.approx(ref["metrics"][k], rel=1e-4, abs=1e-6)
                  and ref["metrics"][k] == ref["metrics"][k]}
        assert not differ, differ
