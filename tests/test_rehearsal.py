"""The paper's recipe rehearsed on CPU (``configs/paper/rehearsal.yaml``): the real path end to end with tiny
models built here, a SIGKILL and an exact resume, two processes on the same learning-rate schedule and the
same first gradient as one process, and the Qwen3-style tokenizer the tiny models carry."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from eopd.config import ConfigError, TrainConfig, load_config
from eopd.models.math_tokenizer import (
    END_OF_TEXT,
    IM_END,
    IM_START,
    NON_THINKING_OPENER,
    SPECIAL_TOKENS,
    THINK_TOKENS,
    USER_HEADER,
    train_math_bpe,
)
from eopd.tasks.benchmarks import PROMPT_SUFFIX, load_benchmark
from eopd.tracking import read_metrics
from eopd.training.checkpoint import checkpoint_dir, latest_checkpoint
from eopd.training.collect import step_prompt_indices
from eopd.training.components import Components, build_components

from .conftest import REPO
from .rehearsal_grads import first_update_grads

REHEARSAL = REPO / "configs" / "paper" / "rehearsal.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1"}
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
WALL_CLOCK = ("time/", "tokens_per_s/")  # the only metrics that are not a function of the seed
TIMEOUT = 300


@dataclass
class Rehearsal:
    """The uninterrupted one-process run every other run is compared with."""

    root: Path
    models: Path
    out: Path
    output: str

    def overrides(self, out: Path) -> list[str]:
        return [f"output_dir={out}", f"models.teacher={self.models / 'teacher'}",
                f"models.student={self.models / 'student'}"]

    def cfg(self, out: Path, *extra: str) -> TrainConfig:
        return load_config(REHEARSAL, [*self.overrides(out), *extra])


def train_cmd(r: Rehearsal, out: Path, *extra: str) -> list[str]:
    return ["-m", "eopd", "train", str(REHEARSAL), *r.overrides(out), *extra]


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> Rehearsal:
    """``eopd train configs/paper/rehearsal.yaml`` as from a fresh clone: the model folders do not exist yet."""
    root = tmp_path_factory.mktemp("rehearsal")
    r = Rehearsal(root, root / "models", root / "full", "")
    r.output = run([sys.executable, *train_cmd(r, r.out)])
    return r


@pytest.fixture(scope="module")
def one_process(rehearsal: Rehearsal) -> Components:
    """The rehearsal's run built in this process, before any step (read by the prompt check, then updated once
    by the gradient check)."""
    return build_components(rehearsal.cfg(rehearsal.root / "in-process"))


def same_value(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def assert_same_metrics(expected: list[dict[str, Any]], got: list[dict[str, Any]]) -> None:
    """Every step, every key, every value equal (wall-clock timings aside, whose keys must still be there)."""
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    for e, g in zip(expected, got, strict=True):
        assert set(g) == set(e), f"step {e['step']}: missing {sorted(set(e) - set(g))}, extra {sorted(set(g) - set(e))}"
        differ = [k for k in e if not k.startswith(WALL_CLOCK) and not same_value(e[k], g[k])]
        assert not differ, f"step {e['step']}: " + ", ".join(f"{k} {e[k]!r} != {g[k]!r}" for k in differ)


def test_assert_same_metrics_catches_a_missing_key_and_a_changed_value() -> None:
    rows = [{"step": 1, "loss": 1.0, "tau": float("nan"), "time/update": 0.1}]
    assert_same_metrics(rows, [{"step": 1, "loss": 1.0, "tau": float("nan"), "time/update": 0.7}])
    with pytest.raises(AssertionError, match="missing"):
        assert_same_metrics(rows, [{"step": 1, "loss": 1.0, "time/update": 0.1}])
    with pytest.raises(AssertionError, match="loss"):
        assert_same_metrics(rows, [{"step": 1, "loss": 1.0 + 1e-12, "tau": float("nan"), "time/update": 0.1}])


# ----------------------------------------------------------------------------------------------------------
# (a) the real path, end to end


def test_rehearsal_runs_end_to_end_with_periodic_evaluation(rehearsal: Rehearsal) -> None:
    cfg = rehearsal.cfg(rehearsal.out)
    rows = read_metrics(rehearsal.out / "metrics.jsonl")
    assert [m["step"] for m in rows] == list(range(cfg.max_steps + 1))  # step 0: the evaluation before training
    eval_steps = [0, *range(cfg.eval.every, cfg.max_steps + 1, cfg.eval.every)]
    assert [m["step"] for m in rows if any(k.startswith("eval/") for k in m)] == eval_steps
    for m in rows:
        if m["step"] in eval_steps:
            assert 0 <= m["eval/avg@n"] <= m[f"eval/pass@{cfg.eval.n}"] <= 1
            assert 0 < m["eval/mean_length"] <= cfg.eval.max_new_tokens
    trained = [m for m in rows if m["step"] > 0]
    assert all(0 < m["gated_share"] < 1 for m in trained)  # the entropy gate splits the tokens
    assert all(math.isfinite(m["loss"]) and m["tokens"] > 0 for m in trained)
    assert f"done: {cfg.max_steps} steps" in rehearsal.output
    assert (rehearsal.out / "final" / "model.safetensors").is_file()
    assert (rehearsal.models / "teacher" / "tokenizer.json").is_file()


def test_the_trainer_samples_from_non_thinking_chat_prompts(one_process: Components) -> None:
    c = one_process
    cfg = c.cfg
    im_start = c.tokenizer.convert_tokens_to_ids(IM_START)
    r = cfg.rollout
    for i in step_prompt_indices(len(c.problems), 0, r.prompts_per_step, cfg.seed, rank=0, world=1):
        problem, ids = c.problems[i], c.prompt_ids[i]
        text = c.tokenizer.decode(ids)
        assert ids[0] == im_start  # no BOS before the template
        assert text.startswith(USER_HEADER) and text.endswith(NON_THINKING_OPENER), text
        assert text == f"{USER_HEADER}{problem.prompt}{IM_END}\n{NON_THINKING_OPENER}"
        assert problem.meta["benchmark"] == "gsm8k" and problem.prompt.endswith(PROMPT_SUFFIX)
    assert set(c.eos_ids) == {c.tokenizer.convert_tokens_to_ids(t) for t in (IM_END, END_OF_TEXT)}


# ----------------------------------------------------------------------------------------------------------
# (b) SIGKILL, then resume: the same run


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(rehearsal: Rehearsal) -> None:
    cfg = rehearsal.cfg(rehearsal.root / "killed")
    out = Path(cfg.output_dir)
    with open(rehearsal.root / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, *train_cmd(rehearsal, out)], stdout=log, stderr=subprocess.STDOUT,
                                env=ENV)
        first = checkpoint_dir(out, cfg.save_every)
        deadline = time.monotonic() + TIMEOUT
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the kill: " + (rehearsal.root / "killed.log").read_text()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "final").exists()
    killed_at = latest_checkpoint(out)
    assert killed_at is not None
    step = int(killed_at.name.split("_")[1])
    assert cfg.save_every <= step < cfg.max_steps

    output = run([sys.executable, *train_cmd(rehearsal, out, "resume=true")])
    assert f"at step {step}" in output and f"done: {cfg.max_steps - step} steps" in output
    assert_same_metrics(read_metrics(rehearsal.out / "metrics.jsonl"), read_metrics(out / "metrics.jsonl"))
    full = AutoModelForCausalLM.from_pretrained(rehearsal.out / "final").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


# ----------------------------------------------------------------------------------------------------------
# (c), (d) two processes


@pytest.fixture(scope="module")
def ddp_two(rehearsal: Rehearsal) -> tuple[Path, str]:
    """The rehearsal on two DDP processes: its output folder and what it printed."""
    out = rehearsal.root / "ddp"
    return out, run([*TORCHRUN, *train_cmd(rehearsal, out)])


def test_two_processes_follow_the_one_process_lr_schedule(rehearsal: Rehearsal, ddp_two: tuple[Path, str]) -> None:
    out, output = ddp_two
    assert output.count("done: ") == 1  # printed by the main process only
    one = {m["step"]: m["lr"] for m in read_metrics(rehearsal.out / "metrics.jsonl") if "lr" in m}
    two = {m["step"]: m["lr"] for m in read_metrics(out / "metrics.jsonl") if "lr" in m}
    assert sorted(two) == sorted(one) == list(range(1, rehearsal.cfg(out).max_steps + 1))
    assert len(set(one.values())) == len(one)  # the cosine moves every step: a faster schedule would show
    assert two == one


def test_the_rehearsal_sharded_over_two_processes_is_the_ddp_run(rehearsal: Rehearsal,
                                                                 ddp_two: tuple[Path, str]) -> None:
    """The paper's path under ``parallel.strategy=fsdp`` on two processes: every step's metrics and the periodic
    evaluations are those of the two-process DDP run (float sums in another order: to 1e-4), and its final folder
    is an ordinary HF folder of the same weights."""
    from transformers import AutoModelForCausalLM

    out = rehearsal.root / "fsdp"
    run([*TORCHRUN, *train_cmd(rehearsal, out, "parallel.strategy=fsdp")])
    ddp, fsdp = read_metrics(ddp_two[0] / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in fsdp] == [m["step"] for m in ddp] and any("eval/avg@n" in m for m in fsdp)
    for a, b in zip(ddp, fsdp, strict=True):
        assert set(a) == set(b)
        differ = {k: (a[k], b[k]) for k in a if not k.startswith(WALL_CLOCK)
                  and b[k] != pytest.approx(a[k], rel=1e-4, abs=1e-6, nan_ok=True)}
        assert not differ, (a["step"], differ)
    wa = AutoModelForCausalLM.from_pretrained(ddp_two[0] / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4, msg=k)


def test_two_processes_give_the_one_process_gradient(rehearsal: Rehearsal, one_process: Components) -> None:
    """One update on one batch split over two processes: global-token normalisation makes it the same update."""
    out = rehearsal.root / "grads"
    script = Path(__file__).with_name("rehearsal_grads.py")
    run([*TORCHRUN, str(script), str(out), str(REHEARSAL), *rehearsal.overrides(out)])
    ranks = [torch.load(f"{out}.rank{r}.pt") for r in (0, 1)]
    one = first_update_grads(one_process)

    assert [r["world"] for r in ranks] == [2, 2] and one["world"] == 1
    for r in ranks:  # both processes started from the very batch the single process used
        assert r["seed"] == one["seed"] and torch.equal(r["completion_ids"], one["completion_ids"])
    tokens = one["row_tokens"]
    assert len(set(tokens.tolist())) > 1 and tokens[0::2].sum() != tokens[1::2].sum()
    cfg = rehearsal.cfg(out)
    assert cfg.optim.micro_batch_size < cfg.rollout.batch_size // 2  # several micro-batches per process
    assert sorted(ranks[0]["grads"]) == sorted(one["grads"]) and one["grads"]
    for name, g in one["grads"].items():
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name  # DDP synchronised them
        # float32 sums in another order: ~1e-7 apart; a per-process normaliser would be ~10% off here
        torch.testing.assert_close(ranks[0]["grads"][name], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------------------------------------------------
# the tiny models' Qwen3-style tokenizer


def test_built_models_follow_qwen3_conventions(rehearsal: Rehearsal) -> None:
    """Loaded with plain transformers, no eopd code: Qwen3's specials, EOS/pad/BOS rules and padded lm_head."""
    cfg = rehearsal.cfg(rehearsal.out)
    tok = AutoTokenizer.from_pretrained(rehearsal.models / "teacher")
    assert len(tok) == cfg.models.build_vocab_size
    ids = {t: tok.convert_tokens_to_ids(t) for t in (*SPECIAL_TOKENS, *THINK_TOKENS)}
    assert sorted(ids.values()) == list(range(len(tok) - len(ids), len(tok)))  # at the end, as in Qwen3
    assert tok.bos_token is None and tok.eos_token == IM_END and tok.pad_token == END_OF_TEXT
    assert tok("<think>x</think>", add_special_tokens=False)["input_ids"][0] == ids["<think>"]
    assert tok.decode([ids["<think>"], ids[IM_END]], skip_special_tokens=True) == "<think>"  # not special
    assert len(tok("2024", add_special_tokens=False)["input_ids"]) == 4  # digits one by one
    problems = [p.prompt for p in load_benchmark("aime24")]
    assert all(tok.decode(tok(p, add_special_tokens=False)["input_ids"]) == p for p in problems)  # byte level
    for role, spec in (("teacher", cfg.models.build_teacher), ("student", cfg.models.build_student)):
        assert spec is not None
        config = AutoConfig.from_pretrained(rehearsal.models / role)
        gen = GenerationConfig.from_pretrained(rehearsal.models / role)
        assert config.vocab_size == len(tok) + spec.vocab_padding > len(tok)
        assert config.eos_token_id == ids[IM_END] and config.bos_token_id is None
        assert gen.eos_token_id == [ids[IM_END], ids[END_OF_TEXT]] and gen.pad_token_id == ids[END_OF_TEXT]


def test_chat_template_renders_like_qwen3() -> None:
    tok = train_math_bpe(["Let $x^2 = 4$. Find $x$."] * 4, 300)
    user = [{"role": "user", "content": "Hi"}]

    def render(messages: list[dict[str, str]], **kwargs: Any) -> str:
        return tok.apply_chat_template(messages, tokenize=False, **kwargs)

    assert render(user, add_generation_prompt=True) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render(user, add_generation_prompt=True, enable_thinking=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # the last assistant turn keeps a (here empty) think block; turns before the last query lose theirs
    assert render([*user, {"role": "assistant", "content": "Hello"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n")
    history = [{"role": "system", "content": "S"}, *user,
               {"role": "assistant", "content": "<think>\nr\n</think>\n\nHello"}, {"role": "user", "content": "Q"}]
    assert render(history, add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")


def test_the_configs_vocabulary_floor_is_the_math_tokenizers_own() -> None:
    """config.py holds the floor (the config checks it at load); it must be exactly what the tokenizer builds."""
    from eopd.config import MIN_VOCAB_SIZE
    from eopd.models.math_tokenizer import BYTE_ALPHABET_SIZE, SPECIAL_TOKENS, THINK_TOKENS

    assert BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS) + len(THINK_TOKENS) + 1 == MIN_VOCAB_SIZE  # one merge
    texts = [p.prompt for p in load_benchmark("aime24")]
    assert len(train_math_bpe(texts, MIN_VOCAB_SIZE)) == MIN_VOCAB_SIZE
    with pytest.raises(ValueError, match="at least"):
        train_math_bpe(texts, MIN_VOCAB_SIZE - 1)


def test_bpe_training_is_deterministic() -> None:
    """``ensure_models`` builds a missing model's tokenizer again; it must be the one the other model has."""
    texts = [p.prompt for p in load_benchmark("aime24")]
    a, b = train_math_bpe(texts, 400), train_math_bpe(list(reversed(texts)), 400)
    assert len(a) == 400
    assert a.backend_tokenizer.to_str() == train_math_bpe(texts, 400).backend_tokenizer.to_str()
    assert a.get_vocab() == b.get_vocab()  # counts decide the merges, not the order of the text


@pytest.mark.parametrize(("override", "message"), [
    ("models.build_tokenizer=bpe", "models.build_tokenizer: must be char or math_bpe, got 'bpe'"),
    ("models.build_vocab_size=100", "models.build_vocab_size: must be at least 262"),
    ("models.build_corpus=", "models.build_corpus: is empty"),
])
def test_bad_build_settings_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(REHEARSAL, [override])
