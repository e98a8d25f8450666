"""How often the EOPD gate computed from a top-k-only teacher differs from the exact full-vocabulary gate.

Why this exists: a teacher behind an inference server (vLLM ``prompt_logprobs``) returns per position only
its top-k log-probs (k <= 20), so the gate ``1[H_t >= tau]`` must be decided from
``eopd.losses.topk_entropy``: the bounds decide most tokens, and a rule (``RULES``) decides the undecided
rest. This script measures, for k in {5, 10, 20}, on the valid completion tokens of each setting:

- ``undecided``: the share of tokens whose entropy interval ``[lower, upper]`` contains tau;
- one column per rule: the share whose gate on ``topk_entropy_estimate(rule)`` differs from the exact gate
  (always inside the undecided share: every rule agrees on decided tokens, which the script checks).

Settings (the teacher scores the student's own samples; exact entropy and top-k from one
``eopd.losses.scoring.score_chunked`` pass through ``eopd.teachers.HFTeacher``):

- ``qwen<V>``: tiny random Qwen3 models (``eopd.models.loading.build_tiny_qwen3``); the teacher's
  ``initializer_range`` (default 1.2) puts its median entropy near tau = 0.8 at both vocabularies;
- two peaked synthetic families at Qwen3's vocabulary (151,936 ids), whose long tails are closer to a
  trained LLM's than random weights: ``zipf`` (a power-law tail in rank, ``zipf_logits``) and ``bulk``
  (a few head ids standing out of a Gaussian bulk of logits, ``bulk_logits``);
- ``world``: the embedded arithmetic world (``eopd.world.build.build_world(WorldConfig())``; cache under
  ``$EOPD_CACHE``), the trained teacher scoring its base student's samples on held-out prompts. Its
  vocabulary has 17 ids, so k >= 17 sees every id and is exact (marked ``exact``).

Usage::

    EOPD_CACHE=/tmp/h4cache python benchmarks/topk_gate_agreement.py            # ~1-2 min on 2 CPU cores
    python benchmarks/topk_gate_agreement.py --skip-world                         # no world (no training)

Prints a markdown table and, last, ``summary: rule=<DEFAULT_RULE> k=20 disagreement <setting>=<share> ...
best=<rule with the lowest mean disagreement over the inexact rows>``.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch

from eopd.losses.topk_entropy import DEFAULT_RULE, RULES, gate_undecided, topk_entropy_bounds, topk_entropy_estimate

Tensor = torch.Tensor
KS = (5, 10, 20)
QWEN3_VOCAB = 151_936


@dataclass
class Setting:
    """Exact entropies and served top-k of one setting's valid tokens.

    Attributes:
        name: Row label.
        vocab: ``V``, the teacher's vocabulary.
        entropy_N: ``[N]`` exact full-vocabulary entropy (nats).
        topk_logprobs_NK: ``[N, K]`` the teacher's top-K log-probs, most likely first, float32 as served.
    """

    name: str
    vocab: int
    entropy_N: Tensor
    topk_logprobs_NK: Tensor


def teacher_setting(name: str, student: torch.nn.Module, teacher: torch.nn.Module, prompts: list[list[int]],
                    vocab: int, *, n: int, max_new_tokens: int, eos: list[int], pad: int, seed: int) -> Setting:
    """The student samples ``n`` completions per prompt at T = 1; the teacher scores every valid position."""
    from eopd.sampling.rollout import sample
    from eopd.teachers import HFTeacher

    with torch.no_grad():
        rollout = sample(student, prompts, n=n, max_new_tokens=max_new_tokens, eos_token_ids=eos,
                         pad_token_id=pad, generator=torch.Generator().manual_seed(seed), vocab_size=vocab)
    scores = HFTeacher(teacher, vocab, 1.0).score(rollout, top_k=min(max(KS), vocab), want_logits=False)
    valid_BT = rollout.completion_mask_BT.bool()
    return Setting(name, vocab, scores.entropy_BT[valid_BT], scores.topk_logprobs_BTK[valid_BT].float())


def qwen_setting(vocab: int, init_range: float, prompts: int, seed: int) -> Setting:
    """Random tiny Qwen3 student (default init) and teacher (``initializer_range=init_range``) at ``vocab``."""
    from eopd.models.loading import build_tiny_qwen3

    student = build_tiny_qwen3(vocab, seed=seed).eval()
    teacher = build_tiny_qwen3(vocab, seed=seed + 1, initializer_range=init_range).eval()
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(1, vocab, (prompts, 8), generator=g).tolist()
    return teacher_setting(f"qwen{vocab}", student, teacher, prompt_ids, vocab, n=4, max_new_tokens=48,
                           eos=[0], pad=0, seed=seed)


def zipf_logits(c: int, vocab: int, g: torch.Generator) -> Tensor:
    """``[c, V]`` Zipf-tail logits ``b 1[i < h] - s log(i + 1) + 0.5 eps``.

    ``s ~ U[1, 2]`` (the tail's exponent in rank), ``h ~ {1..4}`` head ids raised by ``b ~ U[0, 6]``.
    """
    s_C1 = 1.0 + torch.rand(c, 1, generator=g, dtype=torch.float64)
    heads_C1 = torch.randint(1, 5, (c, 1), generator=g)
    boost_C1 = 6.0 * torch.rand(c, 1, generator=g, dtype=torch.float64)
    head_CV = (torch.arange(vocab)[None, :] < heads_C1).to(torch.float64)
    log_rank_V = torch.arange(1, vocab + 1, dtype=torch.float64).log()
    return boost_C1 * head_CV - s_C1 * log_rank_V + 0.5 * torch.randn(c, vocab, generator=g, dtype=torch.float64)


def bulk_logits(c: int, vocab: int, g: torch.Generator) -> Tensor:
    """``[c, V]`` head + Gaussian bulk logits.

    The bulk is ``sigma eps`` (``sigma ~ U[1.5, 3]``); ``h ~ {1..8}`` head ids sit at the bulk's expected max
    ``sigma sqrt(2 log V)`` plus ``U[2, 12] + 2 eps``.
    """
    sigma_C1 = 1.5 + 1.5 * torch.rand(c, 1, generator=g, dtype=torch.float64)
    heads_C1 = torch.randint(1, 9, (c, 1), generator=g)
    bulk_CV = sigma_C1 * torch.randn(c, vocab, generator=g, dtype=torch.float64)
    lift_C1 = sigma_C1 * math.sqrt(2 * math.log(vocab)) + 2.0
    lift_C1 = lift_C1 + 10.0 * torch.rand(c, 1, generator=g, dtype=torch.float64)
    head_CV = lift_C1 + 2.0 * torch.randn(c, vocab, generator=g, dtype=torch.float64)
    return torch.where(torch.arange(vocab)[None, :] < heads_C1, head_CV, bulk_CV)


SYNTHETIC = {"zipf": zipf_logits, "bulk": bulk_logits}


@torch.no_grad()
def synthetic_setting(kind: str, rows: int, vocab: int, seed: int, chunk: int = 50) -> Setting:
    """A synthetic family (``SYNTHETIC``), exact entropy in float64, ``chunk`` rows at a time."""
    g = torch.Generator().manual_seed(seed)
    entropies, tops = [], []
    for start in range(0, rows, chunk):
        logp_CV = torch.log_softmax(SYNTHETIC[kind](min(chunk, rows - start), vocab, g), dim=-1)
        entropies.append(-(logp_CV.exp() * logp_CV).sum(-1))
        tops.append(logp_CV.topk(max(KS), dim=-1).values)
    return Setting(f"{kind}{vocab}", vocab, torch.cat(entropies).float(), torch.cat(tops).float())


def world_setting(prompts: int, seed: int, attempts: int, wait_s: float) -> Setting:
    """The embedded world's teacher scoring its base student's samples on held-out prompts.

    ``build_world`` is retried (``attempts`` times, ``wait_s`` apart) because its training code may be
    mid-edit in a shared checkout; the last error is raised.
    """
    from transformers.utils import logging as transformers_logging

    from eopd.models.loading import aligned_vocab_size, load_causal_lm, load_tokenizer
    from eopd.prompting import encode_prompts
    from eopd.tasks.arithmetic import ArithmeticTask
    from eopd.world.build import WorldConfig, build_world

    for attempt in range(attempts):
        try:
            teacher_path, student_path, tok_path = build_world(WorldConfig())
            break
        except Exception as err:  # any failure of a module under edit: wait and retry
            if attempt == attempts - 1:
                raise
            print(f"build_world failed ({type(err).__name__}: {err}); retrying in {wait_s:.0f}s", flush=True)
            time.sleep(wait_s)
    transformers_logging.disable_progress_bar()  # no "Loading weights" bars between the table's lines
    tok = load_tokenizer(tok_path)
    student, teacher = load_causal_lm(student_path).eval(), load_causal_lm(teacher_path).eval()
    vocab = aligned_vocab_size(teacher, student, tok)
    problems = ArithmeticTask().problems("test")[:prompts]
    prompt_ids = encode_prompts(tok, [p.prompt for p in problems], chat_template=False)
    return teacher_setting("world", student, teacher, prompt_ids, vocab, n=4, max_new_tokens=40,
                           eos=[tok.eos_token_id], pad=tok.pad_token_id, seed=seed)


def agreement(setting: Setting, k: int, tau: float) -> dict:
    """One table row: shares of gated, undecided and per-rule disagreeing tokens at top-``k``."""
    kk = min(k, setting.topk_logprobs_NK.shape[1])
    lp_NK = setting.topk_logprobs_NK[:, :kk]
    exact_N = setting.entropy_N >= tau
    lower_N, upper_N = topk_entropy_bounds(lp_NK, setting.vocab)
    undecided_N = gate_undecided(lower_N, upper_N, tau)
    row = {"setting": setting.name, "V": setting.vocab, "k": k, "tokens": int(exact_N.numel()),
           "exact": kk >= setting.vocab, "gated": float(exact_N.float().mean()),
           "undecided": float(undecided_N.float().mean()),
           "width": float((upper_N - lower_N).median())}
    for rule in RULES:
        differs_N = (topk_entropy_estimate(lp_NK, setting.vocab, rule) >= tau) != exact_N
        # on decided tokens every rule must agree (float32 exact entropy within 1e-5 of tau excepted)
        clear_N = (setting.entropy_N - tau).abs() > 1e-5
        if bool((differs_N & ~undecided_N & clear_N).any()):
            raise AssertionError(f"{setting.name} k={k} rule={rule}: disagreement on a decided token")
        row[rule] = float(differs_N.float().mean())
    return row


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table (shares in %)."""
    head = ["setting", "V", "k", "tokens", "gated (exact)", "undecided", "median width (nats)",
            *[f"differs: {r}" for r in RULES]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        k = f"{r['k']} (exact)" if r["exact"] else str(r["k"])
        cells = [r["setting"], str(r["V"]), k, str(r["tokens"]), f"{100 * r['gated']:.1f}%",
                 f"{100 * r['undecided']:.2f}%", f"{r['width']:.3g}", *[f"{100 * r[x]:.2f}%" for x in RULES]]
        lines.append("| " + " | ".join(cells) + " |")
    for label, picked in (("mean, inexact rows at k = 20", inexact_rows(rows, 20)),
                          ("mean, all inexact rows", inexact_rows(rows))):
        if picked:
            cells = [f"**{100 * mean_share(picked, x):.2f}%**" for x in RULES]
            lines.append("| " + " | ".join([label, "", "", "", "", "", "", *cells]) + " |")
    return "\n".join(lines)


def inexact_rows(rows: list[dict], k: int | None = None) -> list[dict]:
    """The rows where top-k does not see the whole vocabulary (at one ``k``, or every ``k``)."""
    return [r for r in rows if not r["exact"] and (k is None or r["k"] == k)]


def mean_share(rows: list[dict], rule: str) -> float:
    """Mean over rows (each setting counts once, whatever its token count) of a rule's disagreement share."""
    return sum(r[rule] for r in rows) / len(rows)


def summary(rows: list[dict]) -> str:
    """``rule=<default> k=20 disagreement <setting>=<share> ... best=<rule>``.

    ``best`` is the selection criterion of ``DEFAULT_RULE``: the lowest mean disagreement over the settings
    at k = 20 (what one requests from vLLM, its maximum) where top-k does not see the whole vocabulary.
    """
    at20 = " ".join(f"{r['setting']}={r[DEFAULT_RULE]:.4f}" + ("(exact)" if r["exact"] else "")
                    for r in rows if r["k"] == 20)
    picked = inexact_rows(rows, 20) or rows
    best = min(RULES, key=lambda x: mean_share(picked, x))
    return f"summary: rule={DEFAULT_RULE} k=20 disagreement {at20} best={best}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--qwen-vocabs", type=int, nargs="*", default=[4096, 32768])
    parser.add_argument("--init-range", type=float, default=1.2, help="random teacher's initializer_range")
    parser.add_argument("--qwen-prompts", type=int, default=32, help="x 4 samples x <= 48 tokens")
    parser.add_argument("--synthetic-rows", type=int, default=2000, help="rows of each synthetic family")
    parser.add_argument("--synthetic-vocab", type=int, default=QWEN3_VOCAB)
    parser.add_argument("--world-prompts", type=int, default=100, help="x 4 samples")
    parser.add_argument("--skip-world", action="store_true")
    parser.add_argument("--world-attempts", type=int, default=4)
    parser.add_argument("--world-wait", type=float, default=120.0, help="seconds between build_world attempts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    settings = [qwen_setting(v, args.init_range, args.qwen_prompts, args.seed + 1) for v in args.qwen_vocabs]
    if args.synthetic_rows:
        settings += [synthetic_setting(kind, args.synthetic_rows, args.synthetic_vocab, args.seed)
                     for kind in SYNTHETIC]
    if not args.skip_world:  # last: the world's training code may be under edit (retried)
        settings.append(world_setting(args.world_prompts, args.seed, args.world_attempts, args.world_wait))
    rows = [agreement(s, k, args.tau) for s in settings for k in KS]
    print(f"tau = {args.tau} nats; shares of valid completion tokens; top-k log-probs in float32 (as served); "
          f"{time.perf_counter() - start:.0f} s\n")
    print(markdown(rows))
    print()
    print(summary(rows))


if __name__ == "__main__":
    main()
