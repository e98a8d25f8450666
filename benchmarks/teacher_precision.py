"""What a bfloat16 served teacher does to the EOPD gate: the share of tokens whose gate flips against float32.

Why this exists: vLLM computes the lm_head in the model's dtype (``ModelConfig.head_dtype``: bfloat16 for a
bfloat16 model, vLLM 0.34.0) unless started with ``--hf-overrides '{"head_dtype": "float32"}'``; SGLang likewise
unless ``--enable-fp32-lm-head``. The gate ``1[H_t >= tau]`` reads the teacher's entropy at every position, so a
rounding of the logits moves tokens across tau. This script scores the same student samples with one teacher four
ways and counts, over the valid tokens, how often the gate differs from the float32 teacher's:

- ``bf16 model, bf16 head``: weights and activations bfloat16, logits rounded to bfloat16 (vLLM's default for a
  bfloat16 model), then log-softmax in float32;
- ``bf16 model, fp32 head``: the same bfloat16 body, the lm_head in float32 (``head_dtype: float32``; also what
  ``eopd serve-teacher --dtype bfloat16`` does: ``score_chunked`` computes float32 logits);
- ``fp32 model, bf16 head``: only the logits rounded, to separate the head's share from the body's.

Both the exact entropy gate (``teacher.entropy=exact``) and the gate read from the top-20 estimate (what a vLLM
teacher gives) are counted; also the mean absolute change of the entropy and of the sampled token's log-prob.

Settings: tiny random Qwen3 pairs (``eopd.models.loading.build_tiny_qwen3``) at V = 4,096 and 32,768 with the
teacher's median entropy near tau = 0.8 (``initializer_range`` 1.2, as ``topk_gate_agreement.py``); ``--world``
adds the embedded ``multi-path`` world's trained teacher (cached under ``$EOPD_CACHE``). bfloat16 keeps 8 bits of
mantissa, so a logit's rounding error grows with its size: the table gives each setting's median largest
``|logit|`` (a random teacher's are larger than a trained LLM's, ~20-40, so its flips are an upper estimate).

Usage::

    python benchmarks/teacher_precision.py              # ~1 min on 2 CPU cores
    EOPD_CACHE=/tmp/mt_world python benchmarks/teacher_precision.py --world

Prints a markdown table and, last, ``summary: gate_flips bf16_head=<share> fp32_head=<share> ...`` (the mean over
the settings of the exact gate's flip share).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from eopd.losses.scoring import score_from_logits
from eopd.losses.topk_entropy import topk_entropy_estimate
from eopd.sampling import Rollout, completion_hidden_states, output_head, sample

Tensor = torch.Tensor
TAU = 0.8
TOPK = 20
#: How a variant turns the teacher's final hidden states into logits: (hidden, lm_head weight) -> float32 logits.
VARIANTS: dict[str, tuple[torch.dtype, Callable[[Tensor, Tensor], Tensor]]] = {
    "fp32 (reference)": (torch.float32, lambda h, w: h.float() @ w.float().T),
    "bf16 model, bf16 head": (torch.bfloat16, lambda h, w: (h.bfloat16() @ w.bfloat16().T).float()),
    "bf16 model, fp32 head": (torch.bfloat16, lambda h, w: h.float() @ w.float().T),
    "fp32 model, bf16 head": (torch.float32, lambda h, w: (h.bfloat16() @ w.bfloat16().T).float()),
}


@torch.no_grad()
def scores_of(teacher: torch.nn.Module, rollout: Rollout, vocab: int, dtype: torch.dtype,
              head: Callable[[Tensor, Tensor], Tensor]) -> dict[str, Tensor]:
    """``[N]`` exact entropy, top-20 estimate and sampled log-prob at the valid positions, one variant."""
    model = teacher.to(dtype)
    hidden_BTH = completion_hidden_states(model, rollout)
    logits_BTV = head(hidden_BTH, output_head(model).weight)[..., :vocab]
    teacher.to(torch.float32)
    s = score_from_logits(logits_BTV, rollout.completion_ids_BT, top_k=min(TOPK, vocab))
    valid_BT = rollout.completion_mask_BT.bool()
    return {"entropy": s.entropy[valid_BT], "estimate": topk_entropy_estimate(s.topk_logprobs[valid_BT], vocab),
            "logp": s.logp[valid_BT], "scale": logits_BTV[valid_BT].abs().amax(-1)}


def setting(name: str, student: torch.nn.Module, teacher: torch.nn.Module, prompts: list[list[int]], vocab: int,
            eos: list[int], pad: int) -> list[dict]:
    """The table's rows of one setting: every variant against the float32 reference."""
    rollout = sample(student, prompts, n=4, max_new_tokens=48, eos_token_ids=eos, pad_token_id=pad,
                     generator=torch.Generator().manual_seed(0), vocab_size=vocab)
    ref = scores_of(teacher, rollout, vocab, *VARIANTS["fp32 (reference)"])
    rows = []
    for variant, (dtype, head) in VARIANTS.items():
        if variant.startswith("fp32 (reference)"):
            continue
        got = scores_of(teacher, rollout, vocab, dtype, head)
        rows.append({
            "setting": name, "variant": variant, "tokens": int(ref["entropy"].numel()),
            "gated": float((ref["entropy"] >= TAU).float().mean()), "scale": float(ref["scale"].median()),
            "flips": float(((got["entropy"] >= TAU) != (ref["entropy"] >= TAU)).float().mean()),
            "flips_topk": float(((got["estimate"] >= TAU) != (ref["estimate"] >= TAU)).float().mean()),
            "dH": float((got["entropy"] - ref["entropy"]).abs().mean()),
            "dlogp": float((got["logp"] - ref["logp"]).abs().mean()),
        })
    return rows


def qwen(vocab: int) -> list[dict]:
    from eopd.models.loading import build_tiny_qwen3

    student = build_tiny_qwen3(vocab, seed=3).eval()
    teacher = build_tiny_qwen3(vocab, seed=4, initializer_range=1.2).eval()
    prompts = torch.randint(1, vocab, (48, 8), generator=torch.Generator().manual_seed(3)).tolist()
    return setting(f"qwen{vocab}", student, teacher, prompts, vocab, eos=[0], pad=0)


def world() -> list[dict]:
    from eopd.models.loading import aligned_vocab_size, load_causal_lm, load_tokenizer
    from eopd.prompting import encode_prompts
    from eopd.tasks.arithmetic import ArithmeticTask
    from eopd.world.build import build_world, named_world_config

    cfg = named_world_config("multi-path")  # the demo's default world
    teacher_path, student_path, tok_path = build_world(cfg)
    tok = load_tokenizer(tok_path)
    student, teacher = load_causal_lm(student_path).eval(), load_causal_lm(teacher_path).eval()
    vocab = aligned_vocab_size(teacher, student, tok)
    problems = ArithmeticTask(cfg.task).problems("test")[:64]
    prompts = encode_prompts(tok, [p.prompt for p in problems], chat_template=False)
    return setting("world", student, teacher, prompts, vocab, eos=[tok.eos_token_id], pad=tok.pad_token_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", action="store_true", help="add the embedded world's trained teacher")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [*qwen(4096), *qwen(32768), *(world() if args.world else [])]
    print("| setting | max abs logit (median) | variant | tokens | gated (fp32) | exact gate flips | top-20 gate flips "
          "| mean abs dH (nats) | mean abs d log p |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['scale']:.1f} | {r['variant']} | {r['tokens']} | {100 * r['gated']:.1f}% | "
              f"{100 * r['flips']:.2f}% | {100 * r['flips_topk']:.2f}% | {r['dH']:.2e} | {r['dlogp']:.2e} |")
    mean = {v: sum(r["flips"] for r in rows if r["variant"] == v) / max(1, sum(r["variant"] == v for r in rows))
            for v in VARIANTS if not v.startswith("fp32 (")}
    print(f"summary: gate_flips bf16_head={100 * mean['bf16 model, bf16 head']:.2f}% "
          f"fp32_head={100 * mean['bf16 model, fp32 head']:.2f}% "
          f"head_only={100 * mean['fp32 model, bf16 head']:.2f}% (exact gate, tau {TAU}, mean over "
          f"{len(rows) // len(mean)} settings)")


if __name__ == "__main__":
    main()
