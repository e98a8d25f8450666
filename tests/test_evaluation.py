"""pass@k, metrics (paths, per-role entropy), backends, output files, run comparison, ``eopd eval`` and its
bad-input lines."""

from __future__ import annotations

import itertools
import json
import math
import string
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from eopd.cli import main as eopd_main
from eopd.evaluation import backends as eval_backends
from eopd.evaluation.backends import (
    BackendUnavailableError,
    Generation,
    TokenRoles,
    import_vllm,
    role_entropy,
    topk_entropy,
)
from eopd.evaluation.comparison import compare_results, paired_bootstrap
from eopd.evaluation.loop import evaluate_problems
from eopd.evaluation.results import (
    CompletionRecord,
    ProblemRecord,
    benchmark_metrics,
    pass_at_k,
    write_results,
)
from eopd.models.char_tokenizer import build_char_tokenizer
from eopd.models.loading import build_tiny_qwen3
from eopd.prompting import encode_prompts
from eopd.sampling.forward import completion_entropy_BT
from eopd.sampling.rollout import sample
from eopd.tasks.arithmetic import ArithmeticConfig, ArithmeticTask, format_prompt
from eopd.tasks.base import Problem
from eopd.tasks.benchmarks import find_data_dir

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(with_chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII (whitespace included) with pad/eos/unk."""
    specials = ["<pad>", "<eos>", "<unk>"]
    alphabet = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    if with_chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3 + character tokenizer saved with save_pretrained (loaded back via from_pretrained)."""
    folder = tmp_path_factory.mktemp("tiny_model")
    tok = char_tokenizer()
    model = build_tiny_qwen3(vocab_size=len(tok) + 3, max_position_embeddings=4096, seed=0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- pass@k


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c correct) containing at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_pass_at_k_matches_subset_enumeration(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_1_is_the_sample_accuracy_and_large_n_is_stable() -> None:
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    exact = 1 - math.comb(900, 64) / math.comb(1024, 64)
    assert pass_at_k(1024, 124, 64) == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------------------------------------- metrics


def _record(
    pid: str,
    verdicts: Sequence[bool],
    answers: Sequence[str | None],
    lengths: Sequence[int],
    entropies: Sequence[float],
) -> ProblemRecord:
    completions = [
        CompletionRecord(text="t", answer=a, correct=v, num_tokens=n, finished=n < 10, mean_entropy=h)
        for v, a, n, h in zip(verdicts, answers, lengths, entropies, strict=True)
    ]
    return ProblemRecord(pid, "b", "prompt", "1", completions)


def test_benchmark_metrics_by_hand() -> None:
    problems = [
        _record("p0", [True, False, False], ["1", " 2", "2"], [2, 4, 10], [1.0, 0.5, 0.0]),
        _record("p1", [True, True, True], ["1", "1", None], [4, 4, 4], [0.0, 0.0, 3.0]),
    ]
    m = benchmark_metrics(problems)
    assert m["num_problems"] == 2
    assert m["avg@3"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["pass@1"] == pytest.approx(m["avg@3"])
    assert m["pass@2"] == pytest.approx((2 / 3 + 1) / 2)  # c=1 of 3: 1 - C(2,2)/C(3,2) = 2/3
    assert m["pass@3"] == pytest.approx(1.0)
    assert m["distinct_answers"] == pytest.approx((2 + 1) / 2)  # " 2" == "2"; a missing box is not an answer
    assert m["mean_length"] == pytest.approx(28 / 6)
    assert m["mean_entropy"] == pytest.approx((2 * 1.0 + 4 * 0.5 + 4 * 3.0) / 28)  # token-weighted
    assert m["answer_rate"] == pytest.approx(5 / 6)
    assert m["truncation_rate"] == pytest.approx(1 / 6)


def _pathed(pid: str, ref: str | None, paths: Sequence[str | None], roles: Sequence[dict | None]) -> ProblemRecord:
    completions = [
        CompletionRecord(text="t", answer="1", correct=q is not None, num_tokens=4, finished=True, mean_entropy=0.0,
                         path=q, role_entropy=r)
        for q, r in zip(paths, roles, strict=True)
    ]
    return ProblemRecord(pid, "b", "prompt", "1", completions, reference_path=ref)


def test_path_and_role_metrics_by_hand() -> None:
    c = {"choice": {"sum": 1.5, "tokens": 2}, "arithmetic": {"sum": 0.25, "tokens": 5}}
    a = {"arithmetic": {"sum": 0.5, "tokens": 3}}
    problems = [
        _pathed("p0", "1,2", ["1,2", "2,1", "1,2", None], [c, a, c, None]),  # 3 pathed, 2 distinct, 2 on ref
        _pathed("p1", "3,4", ["4,3", None, None, None], [a, a, a, a]),  # 1 pathed, 1 distinct, 0 on ref
    ]
    m = benchmark_metrics(problems, with_paths=True)
    assert m["faithful@1"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert m["distinct_correct_paths"] == pytest.approx((2 + 1) / 2)
    assert m["reference_path_share"] == pytest.approx(2 / 4)  # pooled: 2 of the 4 pathed samples
    # token-weighted over the 7 samples with role data: choice 2 * 1.5 / 4 tokens; arithmetic (2*0.25 + 5*0.5) / 25
    assert m["entropy/choice"] == pytest.approx(3.0 / 4)
    assert m["entropy/arithmetic"] == pytest.approx((2 * 0.25 + 5 * 0.5) / (2 * 5 + 5 * 3))
    assert m["tokens/choice"] == pytest.approx(4 / 7)
    assert m["tokens/arithmetic"] == pytest.approx(25 / 7)
    # re-weighting per-benchmark values by num_problems * faithful@1 recovers the pooled share
    halves = [benchmark_metrics([p], with_paths=True) for p in problems]
    weights = [h["num_problems"] * h["faithful@1"] for h in halves]
    merged = sum(w * h["reference_path_share"] for w, h in zip(weights, halves, strict=True)) / sum(weights)
    assert merged == pytest.approx(m["reference_path_share"])
    # a task that names no paths reports none; no reference path, no share
    assert "distinct_correct_paths" not in benchmark_metrics(problems)
    assert "reference_path_share" not in benchmark_metrics([_pathed("p", None, ["1"], [None])], with_paths=True)


def test_role_entropy_sums_per_role() -> None:
    got = role_entropy(["choice", "arithmetic", "choice", "arithmetic", "arithmetic"], [1.0, 0.1, 0.5, 0.2, 0.3])
    assert got == {"choice": {"sum": pytest.approx(1.5), "tokens": 2},
                   "arithmetic": {"sum": pytest.approx(0.6), "tokens": 3}}
    with pytest.raises(ValueError, match="one role per token"):
        role_entropy(["choice"], [1.0, 2.0])


def test_metrics_need_equal_sample_counts() -> None:
    with pytest.raises(ValueError, match="same number"):
        benchmark_metrics(
            [_record("a", [True], ["1"], [1], [0.0]), _record("b", [True, False], ["1", "2"], [1, 1], [0, 0])]
        )


class ScriptedBackend:
    """Returns fixed completions: problem i gets ``correct[i]`` boxed gold answers, then wrong ones."""

    name = "scripted"
    entropy_kind = "exact"

    def __init__(self, problems: Sequence[Problem], correct: Sequence[int]) -> None:
        self.by_prompt = dict(zip((p.prompt for p in problems), zip(problems, correct, strict=True), strict=True))

    def generate(self, prompts: Sequence[str], n: int, token_roles: TokenRoles | None = None) -> list[list[Generation]]:
        out = []
        for prompt in prompts:
            problem, c = self.by_prompt[prompt]
            texts = [f"so \\boxed{{{problem.answer}}}" if j < c else "so \\boxed{-12345}" for j in range(n)]
            out.append([Generation(text=t, num_tokens=5, finished=True, mean_entropy=0.5) for t in texts])
        return out


def _problems(bench: str, answers: Sequence[str]) -> list[Problem]:
    return [Problem(f"{bench}/{i}", f"{bench} q{i}", a, {"benchmark": bench}) for i, a in enumerate(answers)]


def test_evaluate_problems_grades_groups_and_summarises() -> None:
    problems = _problems("x", ["\\frac12", "3"]) + _problems("y", ["(1,2]"])
    result = evaluate_problems(None, char_tokenizer(), problems, n=4, backend=ScriptedBackend(problems, [1, 4, 2]))
    assert set(result.benchmarks) == {"x", "y"}
    assert result.benchmarks["x"].metrics["avg@4"] == pytest.approx((1 / 4 + 1) / 2)
    assert result.benchmarks["y"].metrics["avg@4"] == pytest.approx(2 / 4)
    assert result.summary["mean"]["avg@4"] == pytest.approx(((1 / 4 + 1) / 2 + 2 / 4) / 2)
    assert result.summary["mean"]["num_problems"] == 3
    record = result.benchmarks["x"].problems[0]
    assert [c.correct for c in record.completions] == [True, False, False, False]
    assert record.completions[0].answer == "\\frac12"
    assert result.flat_metrics()["y/pass@4"] == 1.0
    assert result.metrics["avg@4"] == result.summary["mean"]["avg@4"]
    assert result.metrics["x/avg@4"] == result.benchmarks["x"].metrics["avg@4"]


class ArithmeticScript:
    """Returns fixed arithmetic completions per prompt (entropy 1 nat at every token)."""

    name = "scripted"
    entropy_kind = "exact"

    def __init__(self, completions: dict[str, list[str]], tokenizer) -> None:
        self.completions, self.tokenizer = completions, tokenizer

    def generate(self, prompts: Sequence[str], n: int, token_roles: TokenRoles | None = None) -> list[list[Generation]]:
        out = []
        for prompt in prompts:
            gens = []
            for text in self.completions[prompt][:n]:
                ids = [*self.tokenizer.encode(text, add_special_tokens=False), self.tokenizer.eos_token_id]
                roles = role_entropy(token_roles(ids), [1.0] * len(ids)) if token_roles else None
                gens.append(Generation(text, len(ids), True, 1.0, roles))
            out.append(gens)
        return out


def test_evaluate_problems_names_paths_of_correct_faithful_samples_only() -> None:
    task, tok = ArithmeticTask(ArithmeticConfig(num_terms=3, test_size=10)), build_char_tokenizer()
    problems = [Problem(format_prompt(t), format_prompt(t), str(sum(t)), {}) for t in ([7, 3, 5], [2, 2, 4])]
    script = {
        "7+3+5=": ["7+3=10,10+5=15;15",  # as written: the reference path
                   "5+3=8,8+7=15;15",  # another path
                   "7+4=11,11+4=15;15",  # right answer, miscopied terms: correct, no path
                   "7+3=10,10+5=15;16"],  # wrong answer
        "2+2+4=": ["4+2=6,6+2=8;8", "4+2=6,6+2=8;8", "2+2=4,4+4=8;8", "8;8"],
    }
    result = evaluate_problems(None, tok, problems, task, n=4, backend=ArithmeticScript(script, tok))
    first = result.benchmarks["all"].problems[0]
    assert [c.correct for c in first.completions] == [True, True, True, False]
    assert [c.path for c in first.completions] == ["7,3,5", "5,3,7", None, None]
    assert first.reference_path == "7,3,5"
    m = result.benchmarks["all"].metrics
    assert m["distinct_correct_paths"] == pytest.approx((2 + 2) / 2)
    assert m["faithful@1"] == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert m["reference_path_share"] == pytest.approx(2 / 5)  # "7,3,5" and "2,2,4" among 5 pathed samples
    # roles: "7+3=10,10+5=15;15" + EOS names 2 terms by choice ('7', '3'); "8;8" names none
    roles = first.completions[0].role_entropy
    assert roles == {"choice": {"sum": 2.0, "tokens": 2}, "arithmetic": {"sum": 16.0, "tokens": 16}}
    n_choice = 2 * 4 + 2 * 3  # the 3-step chains of problem 1 and the 3 chains of problem 2; "8;8" has none
    n_tokens = sum(c.num_tokens for p in result.benchmarks["all"].problems for c in p.completions)
    assert m["entropy/choice"] == pytest.approx(1.0) and m["tokens/choice"] == pytest.approx(n_choice / 8)
    assert m["tokens/arithmetic"] == pytest.approx((n_tokens - n_choice) / 8)
    # math grading (task=None) names no paths
    assert "distinct_correct_paths" not in evaluate_problems(
        None, tok, problems, n=4, backend=ArithmeticScript(script, tok)).benchmarks["all"].metrics


def test_hf_backend_role_entropy_agrees_with_its_token_entropy() -> None:
    tok = build_char_tokenizer()
    task = ArithmeticTask(ArithmeticConfig(num_terms=3, test_size=10))
    model = build_tiny_qwen3(vocab_size=len(tok), seed=3, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, bos_token_id=None)
    result = evaluate_problems(model, tok, task.problems("test")[:3], task, n=2, max_new_tokens=12, top_p=1.0,
                               use_chat_template=False, generator=torch.Generator().manual_seed(0))
    for c in (c for p in result.benchmarks["all"].problems for c in p.completions):
        assert c.role_entropy is not None
        assert sum(r["tokens"] for r in c.role_entropy.values()) == c.num_tokens
        assert sum(r["sum"] for r in c.role_entropy.values()) == pytest.approx(c.mean_entropy * c.num_tokens, rel=1e-5)
        assert set(c.role_entropy) <= {"choice", "arithmetic"}


def test_chat_template_kwargs_reach_the_prompt_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict | None] = []
    real = eval_backends.encode_prompts

    def spy(tokenizer, texts, *, chat_template, template_kwargs=None):
        seen.append(template_kwargs)
        return real(tokenizer, texts, chat_template=chat_template, template_kwargs=template_kwargs)

    monkeypatch.setattr(eval_backends, "encode_prompts", spy)
    tok = char_tokenizer()
    model = build_tiny_qwen3(vocab_size=len(tok) + 3, seed=0)
    evaluate_problems(model, tok, _problems("x", ["1"]), n=1, max_new_tokens=2, use_chat_template=True,
                      chat_template_kwargs={"enable_thinking": False})
    assert seen == [{"enable_thinking": False}]


# ---------------------------------------------------------------------------------------------- entropy


def test_completion_entropy_matches_a_full_forward() -> None:
    tok = char_tokenizer(with_chat_template=False)
    model = build_tiny_qwen3(vocab_size=len(tok) + 5, seed=1).eval()
    prompts = encode_prompts(tok, ["1+1=", "a much longer prompt here"], chat_template=False)
    gen = torch.Generator().manual_seed(0)
    rollout = sample(
        model,
        prompts,
        n=2,
        max_new_tokens=6,
        temperature=0.7,
        top_p=0.9,
        eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        generator=gen,
        vocab_size=len(tok),
    )
    entropy_BT = completion_entropy_BT(
        model, rollout, temperature=0.7, vocab_size=len(tok), rows_per_forward=3, max_chunk_elements=100
    )
    # reference: one full forward, the logits at column P-1+t predict completion token t
    mask = rollout.attention_mask_BL
    logits = model(
        input_ids=rollout.sequences_BL, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
    ).logits
    P, T = rollout.prompt_len, rollout.completion_ids_BT.shape[1]
    logp = torch.log_softmax(logits[:, P - 1 : P - 1 + T, : len(tok)].float() / 0.7, dim=-1)
    expected = -(logp.exp() * logp).sum(-1) * rollout.completion_mask_BT
    torch.testing.assert_close(entropy_BT, expected, atol=1e-5, rtol=1e-5)
    # the alignment is the sampler's own: its log-probs of the sampled tokens agree with this forward
    sampled = logp.gather(-1, rollout.completion_ids_BT[..., None]).squeeze(-1) * rollout.completion_mask_BT
    torch.testing.assert_close(sampled, rollout.logp_old_BT, atol=1e-4, rtol=1e-4)
    assert bool((entropy_BT[rollout.completion_mask_BT > 0] > 0).all())


def test_topk_entropy_is_exact_for_a_full_distribution_and_a_lower_bound_otherwise() -> None:
    probs = np.array([0.5, 0.25, 0.125, 0.125])
    exact = float(-(probs * np.log(probs)).sum())
    assert topk_entropy(list(np.log(probs))) == pytest.approx(exact)
    assert topk_entropy(list(np.log(probs[:2]))) <= exact + 1e-12
    assert topk_entropy([0.0]) == pytest.approx(0.0)


def test_vllm_backend_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each case is simulated, so every branch is checked on every machine, vLLM installed or not."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # an import of vllm now raises ImportError
    with pytest.raises(BackendUnavailableError, match=r"pip install 'eopd\[vllm\]'"):
        import_vllm()
    fake = types.ModuleType("vllm")
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        import_vllm()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert import_vllm() is fake


# ---------------------------------------------------------------------------------------------- comparison


def test_paired_bootstrap_intervals() -> None:
    rng = np.random.default_rng(0)
    zero = paired_bootstrap({"a": np.zeros(30), "b": np.zeros(10)}, num_resamples=200, rng=rng)
    assert zero["mean"] == (0.0, 0.0, 0.0)
    shift = paired_bootstrap({"a": np.full(30, 0.1)}, num_resamples=200, rng=rng)
    assert shift["a"] == pytest.approx((0.1, 0.1, 0.1))
    noisy_d = rng.choice([-1.0, 0.0, 1.0], size=30)
    d, lo, hi = paired_bootstrap({"a": noisy_d}, num_resamples=2000, rng=rng)["a"]
    assert lo < d < hi and hi - lo > 0.1


def _doc(n: int, correct: dict[str, list[int]], model: str) -> dict:
    return {
        "format": "eopd-eval/1",
        "config": {"n": n, "model": model},
        "benchmarks": {
            bench: {
                "problems": [
                    {"id": f"{bench}/{i}", "completions": [{"correct": j < c} for j in range(n)]}
                    for i, c in enumerate(counts)
                ]
            }
            for bench, counts in correct.items()
        },
    }


def test_compare_results_reports_paired_differences() -> None:
    a = _doc(4, {"x": [0, 2, 4], "y": [1, 1]}, "A")
    b = _doc(4, {"x": [4, 2, 4], "y": [1, 1]}, "B")
    text = compare_results(a, b, num_resamples=500)
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in text.splitlines() if line.startswith("| ")}
    assert "+33.3" in rows[("avg", "x")]  # problem 0 went 0/4 -> 4/4
    assert "+0.0 | [+0.0, +0.0]" in rows[("avg", "y")]
    assert "+16.7" in rows[("avg", "mean")]
    with pytest.raises(ValueError, match="share no problems"):
        compare_results(a, _doc(4, {"z": [1]}, "C"))


# ---------------------------------------------------------------------------------------------- end to end


needs_data = pytest.mark.skipif(find_data_dir() is None, reason="shared/data/math not found (set EOPD_MATH_DATA)")


@needs_data
def test_eopd_eval_end_to_end(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    argv = [
        "eval",
        "--model",
        str(tiny_checkpoint),
        "--benchmarks",
        "math500,aime24",
        "--limit",
        "5",
        "--n",
        "2",
        "--max-new-tokens",
        "8",
        "--output-dir",
        str(out),
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    assert eopd_main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["format"] == "eopd-eval/1"
    assert doc["config"]["n"] == 2 and doc["config"]["chat_template"] is True
    assert set(doc["benchmarks"]) == {"math500", "aime24"}
    for bench in ("math500", "aime24"):
        body = doc["benchmarks"][bench]
        assert set(body["metrics"]) >= {"avg@2", "pass@1", "pass@2", "distinct_answers", "mean_length", "mean_entropy"}
        assert len(body["problems"]) == 5
        for p in body["problems"]:
            assert p["gold"] and p["prompt"].endswith("within \\boxed{}.")
            assert len(p["completions"]) == 2
            assert p["reference_path"] is None
            for c in p["completions"]:
                assert set(c) == {"text", "answer", "correct", "num_tokens", "finished", "mean_entropy", "path",
                                  "role_entropy"}
                assert 1 <= c["num_tokens"] <= 8 and c["mean_entropy"] > 0
                assert c["path"] is None and c["role_entropy"] is None  # math names no paths and no roles
            assert p["num_correct"] == sum(c["correct"] for c in p["completions"])
    assert set(doc["summary"]["mean"]) >= {"avg@2", "pass@2"}
    table = (out / "results.md").read_text()
    assert "| math500 | 5 |" in table and "**mean**" in table

    # same seed -> same samples; --compare of a run with itself shows no difference
    out2 = tmp_path / "run2"
    assert eopd_main([*argv[:-6], "--output-dir", str(out2), "--device", "cpu", "--dtype", "float32"]) == 0
    doc2 = json.loads((out2 / "results.json").read_text())
    texts = [[c["text"] for c in p["completions"]] for p in doc["benchmarks"]["aime24"]["problems"]]
    assert texts == [[c["text"] for c in p["completions"]] for p in doc2["benchmarks"]["aime24"]["problems"]]
    capsys.readouterr()
    assert eopd_main(["eval", "--compare", str(out / "results.json"), str(out2 / "results.json")]) == 0
    assert "| avg | mean | 10 |" in capsys.readouterr().out


def test_eopd_eval_bad_benchmark_file_exits_with_the_row(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"}\n')
    assert eopd_main(["eval", "--model", str(tiny_checkpoint), "--benchmarks", str(bad), "--device", "cpu"]) == 2
    assert "row 2: missing field 'answer'" in capsys.readouterr().err


def test_write_results_round_trips(tmp_path: Path) -> None:
    problems = _problems("x", ["1", "2"])
    result = evaluate_problems(None, char_tokenizer(), problems, n=2, backend=ScriptedBackend(problems, [2, 0]))
    json_path, md_path = write_results(result, tmp_path)
    doc = json.loads(json_path.read_text())
    assert doc["benchmarks"]["x"]["metrics"]["avg@2"] == pytest.approx(0.5)
    assert [p["num_correct"] for p in doc["benchmarks"]["x"]["problems"]] == [2, 0]
    assert "| x | 2 | 50.0 |" in md_path.read_text()
