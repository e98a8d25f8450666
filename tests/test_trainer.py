"""Real tiny distillation runs on CPU: learning, exact resume, masking, vocab alignment, config errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eopd.config import ConfigError, load_config
from eopd.losses import forward_kl, reverse_kl
from eopd.models.loading import ModelLoadError, aligned_vocab_size, build_tiny_checkpoint, load_causal_lm
from eopd.prompting import encode_prompts
from eopd.sampling.forward import completion_logits
from eopd.sampling.rollout import sample
from eopd.tracking import read_metrics
from eopd.training.checkpoint import latest_checkpoint, list_checkpoints
from eopd.training.components import build_components
from eopd.training.trainer import run, train

from .conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


def tiny_cfg(tiny_models, out: Path, *overrides: str):
    base = [f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
            f"output_dir={out}", "num_threads=1", "tensorboard=false"]
    return load_config(TINY, [*base, *overrides])


def exact_kls(student, teacher, tokenizer, prompts, vocab_size: int, seed: int = 123) -> tuple[float, float]:
    """Mean exact per-token (reverse KL on student samples, forward KL on teacher samples)."""
    out = []
    for sampler in (student, teacher):
        g = torch.Generator().manual_seed(seed)
        r = sample(sampler, prompts, n=4, max_new_tokens=16, eos_token_ids=[tokenizer.eos_token_id],
                   pad_token_id=tokenizer.pad_token_id, generator=g, vocab_size=vocab_size)
        with torch.no_grad():
            s = completion_logits(student, r, vocab_size)
            t = completion_logits(teacher, r, vocab_size)
        kl = reverse_kl(s, t) if sampler is student else forward_kl(s, t)
        m = r.completion_mask_BT
        out.append(float((kl * m).sum() / m.sum()))
    return out[0], out[1]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["opd", "eopd", "fkl", "rkl"])
def test_student_kl_to_teacher_falls(tiny_models, tmp_path, objective):
    cfg = tiny_cfg(tiny_models, tmp_path, f"objective={objective}", "max_steps=30", "rollout.prompts_per_step=4",
                   "rollout.max_new_tokens=16", "optim.minibatch_size=8", "optim.micro_batch_size=8",
                   "optim.lr=3e-3", "save_every=0")
    d = build_components(cfg)
    prompts = encode_prompts(d.tokenizer, [p.prompt for p in d.task.problems("test")[:16]], chat_template=False)
    before = exact_kls(d.student, d.teacher_model, d.tokenizer, prompts, d.vocab_size)
    history = run(d)
    after = exact_kls(d.student, d.teacher_model, d.tokenizer, prompts, d.vocab_size)
    assert len(history) == 30
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    # the divergence each objective minimises falls clearly (reverse KL for the OPD family, forward KL for
    # fkl); the other one does not blow up
    target = 1 if objective == "fkl" else 0
    assert after[target] < 0.9 * before[target], (objective, before, after)
    assert after[1 - target] < before[1 - target] * 1.05, (objective, before, after)


@pytest.mark.parametrize("objective", ["mixture", "fkl", "jsd"])
def test_exact_baselines_fused_from_teacher_hidden_match_plain(tiny_models, tmp_path, objective):
    """The fused path gives exact baselines the teacher's hidden states + lm_head, never [B, T, V] logits."""
    steps, calls = {}, []
    for impl in ("fused", "plain"):
        cfg = tiny_cfg(tiny_models, tmp_path / impl, f"objective={objective}", f"loss_impl={impl}", "max_steps=2",
                       "rollout.prompts_per_step=4", "rollout.max_new_tokens=12", "optim.minibatch_size=8",
                       "optim.micro_batch_size=4", "save_every=0")
        d = build_components(cfg)
        if impl == "fused":
            score = d.teacher.score
            d.teacher.score = lambda *a, score=score, **k: calls.append(k) or score(*a, **k)  # type: ignore[method-assign]
        steps[impl] = run(d)
        if impl == "fused":
            assert calls and all(c["want_hidden"] and not c["want_logits"] for c in calls)
    assert len(steps["fused"]) == len(steps["plain"]) == 2
    for f, p in zip(steps["fused"], steps["plain"], strict=True):
        for key in ("loss", "rkl", "fkl", "student_entropy", "teacher_entropy"):
            assert f[key] == pytest.approx(p[key], rel=1e-4, abs=1e-6), (key, f[key], p[key])


def _strip_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s/"))} for r in rows]


def check_kill_and_resume(make_cfg, tiny_models, tmp_path, *extra: str) -> tuple[Path, Path]:
    """Six steps run whole, and run again with a kill during step 4 (the step-6 checkpoint and the final folder
    never written) then ``resume=true``: the metrics must agree bit for bit on CPU. Returns both output folders."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = (*extra, "max_steps=6", "save_every=3", "rollout.prompts_per_step=4", "optim.minibatch_size=8",
              "optim.micro_batch_size=4", "objective=eopd", "loss.adaptive_share=0.3")
    train(make_cfg(tiny_models, full, *common))
    train(make_cfg(tiny_models, cut, *common))
    shutil.rmtree(cut / "checkpoints" / "step_000006")
    shutil.rmtree(cut / "final")
    assert latest_checkpoint(cut).name == "step_000003"
    train(make_cfg(tiny_models, cut, *common, "resume=true"))
    a, b = _strip_times(read_metrics(full / "metrics.jsonl")), _strip_times(read_metrics(cut / "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert a == b
    return full, cut


@pytest.mark.slow
@pytest.mark.parametrize("settings", [(), ("models.device=auto",)], ids=["tiny-config", "defaults"])
def test_kill_and_resume_reproduces_uninterrupted_run(tiny_models, tmp_path, settings):
    # "defaults": every key a checkpoint records in its config at its default spelling (tiny.yaml names the
    # device; dtype auto, chunk_size None, data.chat_template_kwargs {}, no teacher.url are defaults already)
    full, cut = check_kill_and_resume(tiny_cfg, tiny_models, tmp_path, *settings)
    sa = AutoModelForCausalLM.from_pretrained(full / "final").state_dict()
    sb = AutoModelForCausalLM.from_pretrained(cut / "final").state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_tmp_leftover_is_ignored(tiny_models, tmp_path):
    cfg = tiny_cfg(tiny_models, tmp_path, "max_steps=2", "save_every=1", "rollout.prompts_per_step=2",
                   "optim.minibatch_size=8", "optim.micro_batch_size=8", "keep_checkpoints=1")
    train(cfg)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002"]
    (tmp_path / "checkpoints" / "step_000009.tmp").mkdir()  # a save interrupted mid-way
    assert latest_checkpoint(tmp_path).name == "step_000002"


def test_saved_student_loads_with_plain_transformers_and_generates(tiny_models, tmp_path):
    c = build_components(tiny_cfg(tiny_models, tmp_path, "max_steps=1", "rollout.prompts_per_step=2",
                                  "optim.minibatch_size=8", "optim.micro_batch_size=8"))
    run(c)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    trained = c.student.state_dict()
    assert set(model.state_dict()) == set(trained)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())  # the trained weights
    ids = tok("1+2+3+4=", return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=None)
    greedy = ids["input_ids"]
    with torch.no_grad():
        for _ in range(5):  # the same continuation by hand from the trained in-memory student
            greedy = torch.cat([greedy, c.student(greedy).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, greedy)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    expected = {"step", "loss", "rkl_estimate", "fkl", "gated_share", "tau", "teacher_entropy", "student_entropy",
                "response_length", "lr", "grad_norm", "time/sample", "time/teacher", "time/update",
                "tokens_per_s/sample", "tokens_per_s/teacher", "tokens_per_s/update", "loss_rkl", "loss_fkl",
                "ppo/ratio_mean", "ppo/ratio_min", "ppo/ratio_max", "ppo/clip_frac", "ppo/sampler_gap_max",
                "ppo/sampler_gap_mean"}
    assert expected <= set(rows[0])


def test_pad_equal_to_eos_masks_after_first_eos(tiny_models, tmp_path):
    # a student folder whose tokenizer pads with its EOS id (as many chat models do)
    folder = tmp_path / "student-pad-eos"
    shutil.copytree(tiny_models["student"], folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(folder)
    assert tok.pad_token_id == tok.eos_token_id
    model = load_causal_lm(folder)
    with torch.no_grad():  # make EOS likely so completions end early
        model.lm_head.weight[tok.eos_token_id] += 0.5 * model.model.embed_tokens.weight.norm(dim=1).mean()
    r = sample(model, [[5, 6, 7], [8, 9]], n=8, max_new_tokens=12, eos_token_ids=[tok.eos_token_id],
               pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    ids, m = r.completion_ids_BT, r.completion_mask_BT
    ended = 0
    for row_ids, row_m in zip(ids.tolist(), m.tolist(), strict=True):
        if tok.eos_token_id in row_ids:
            first = row_ids.index(tok.eos_token_id)
            ended += 1
            assert row_m[: first + 1] == [1.0] * (first + 1)  # the EOS itself is trained on
            assert row_m[first + 1 :] == [0.0] * (len(row_ids) - first - 1)  # pad (== eos) is not
        else:
            assert row_m == [1.0] * len(row_ids)
    assert ended > 0
    assert torch.all(r.logp_old_BT[m == 0] == 0)
    cfg = tiny_cfg(tiny_models, tmp_path / "run", f"models.student={folder}", "max_steps=2",
                   "rollout.prompts_per_step=2", "optim.minibatch_size=8", "optim.micro_batch_size=8")
    history = train(cfg)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def test_vocab_alignment(tiny_models, tmp_path):
    teacher = load_causal_lm(tiny_models["teacher"])
    student = load_causal_lm(tiny_models["student"])
    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    assert teacher.lm_head.weight.shape[0] == len(tok) + 3
    assert aligned_vocab_size(teacher, student, tok) == len(tok)
    short = build_tiny_checkpoint(tmp_path / "short", alphabet="0123456789+=,", hidden_size=32, num_layers=1)
    with pytest.raises(ModelLoadError, match="lm_head has 16 rows but the tokenizer has 17"):
        aligned_vocab_size(teacher, load_causal_lm(short), tok)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.nn=3"], "unknown key 'rollout.nn'"),
        (["rollout.n=three"], "rollout.n: must be an integer"),
        (["loss.tau=-1"], "tau must be >= 0"),
        (["optim.minibatch_size=7", "optim.micro_batch_size=7"], "optim.minibatch_size: must divide the rollout batch"),
        (["optim.micro_batch_size=3"], "optim.micro_batch_size: must divide optim.minibatch_size"),
        (["objective=nope"], "unknown objective 'nope'"),
        (["loss.bogus=1"], "unknown objective field"),
        (["loss.temperature=0.5"], "must equal rollout.temperature"),
        (["models.build_teacher=null", "models.teacher=./missing-folder"],
         "models.teacher: folder './missing-folder' does not exist"),
        (["models.build_teacher=null", "models.teacher=/nonexistent/teacher"], "does not exist"),
        (["max_steps=0"], "max_steps: must be > 0"),
        (["rollout.top_p=0.9"], "rollout.top_p: must be 1 for training"),
        (["eval.top_p=0"], "eval.top_p: must be in (0, 1]"),
        (["eval.temperature=0"], "eval.temperature: must be > 0"),
        (["loss_impl=magic"], "loss_impl: must be fused or plain"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_top_k_larger_than_vocab_is_a_config_error(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match=r"loss.top_k: 64 exceeds the vocabulary \(17 tokens\)"):
        build_components(tiny_cfg(tiny_models, tmp_path, "loss.top_k=64"))


def test_cli_reports_config_error_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "eopd", "train", TINY, "rollout.n=0"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "eopd train: rollout.n: must be > 0, got 0"


@pytest.mark.slow
def test_torchrun_two_processes_follow_the_one_process_schedule(tiny_models, tmp_path):
    """2 processes: files written once, tokens summed over both, and the learning rate of every step equal to
    the 1-process run's (a scheduler stepped once per process per call would run it 2x too fast)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [TINY, f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
            "max_steps=4", "num_threads=1", "tensorboard=false", "optim.minibatch_size=8", "optim.micro_batch_size=4",
            "optim.warmup_steps=3"]
    out = tmp_path / "ddp"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "eopd", "train", *args, f"output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # written once, by the main process
    assert proc.stdout.count("done: 4 steps") == 1
    # tokens are reduced over both processes: 8 prompts x 4 samples, each of 1..24 tokens
    assert all(32 <= r["tokens"] <= 32 * 24 for r in rows)
    single = train(load_config(TINY, [*args[1:], f"output_dir={tmp_path / 'one'}"]))
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in single], rel=1e-12)
    assert len({r["lr"] for r in rows}) == 4  # warmup then cosine: the column can tell the schedules apart
    AutoModelForCausalLM.from_pretrained(out / "final")



def test_step_prompt_indices_follow_one_seeded_permutation_per_pass():
    """The data order's properties, not its formula: every pass over the data is a permutation of all
    prompts, reshuffled each pass and by the seed; resuming at any data position continues the same
    stream; the ranks split each step's prompts into equal disjoint shares whose union is the 1-process step."""
    from eopd.training.collect import step_prompt_indices

    n, count = 10, 8
    stream = step_prompt_indices(n, 0, 4 * n, 3, rank=0, world=1)  # one process, four passes in one call
    passes = [stream[e * n : (e + 1) * n] for e in range(4)]
    assert all(sorted(p) == list(range(n)) for p in passes)
    assert len({tuple(p) for p in passes}) == 4  # each pass its own order
    firsts = {tuple(step_prompt_indices(n, 0, n, seed, rank=0, world=1)) for seed in range(5)}
    assert len(firsts) == 5  # each seed its own order
    for position in range(0, 3 * n + 1):  # steps starting anywhere, within a pass and across its end
        step = step_prompt_indices(n, position, count, 3, rank=0, world=1)
        assert step == stream[position : position + count]  # resuming here reads the same continuation
        for world in (2, 4):
            shares = [step_prompt_indices(n, position, count, 3, rank=r, world=world) for r in range(world)]
            assert all(len(s) == count // world for s in shares)
            assert sorted(i for s in shares for i in s) == sorted(step)  # the union is the 1-process step
            if position % n + count <= n:  # within one pass the prompts are distinct: the shares are disjoint
                assert len({i for s in shares for i in s}) == count
