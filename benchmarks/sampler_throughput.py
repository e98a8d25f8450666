"""Sampler throughput on a long-tailed length mix (issue 19): useful completion tokens per second, in one run.

Why: completion lengths in on-policy distillation are long-tailed (most end far before the budget), so a
sampler whose batch runs until its longest row ends spends most of its compute on rows that have ended. This
measures, on the same model, rows and budget, side by side in one process:

- ``legacy``: the sampler before issue 19 (groups of ``--max-batch-size`` rows, each run until its longest
  row ends, finished rows fed pad tokens, the attention mask re-concatenated every token; a verbatim copy of
  its loop is kept below, ``legacy_sample``);
- ``generate``: transformers' ``model.generate(do_sample=True, top_k=0)``, all rows in one call (its best case:
  4x the KV cache of the others), and ``generate_grouped``, in groups of ``--max-batch-size`` rows;
- ``eager``: ``eopd.sampling.sample`` (continuous batching: finished rows leave, waiting rows take their slot);
- ``compiled``: the same with ``compile=True`` (its compilation time is reported apart, ``compile_s``);
- ``cb``: transformers' continuous batching (``model.generate_batch``), where it runs (``--cb``).

The model is a random Qwen3 (``--shape``) whose lm_head output gives EOS a constant share of the probability,
``P(EOS) = 1 / --mean-length`` at every step, so completion lengths are geometric with that mean (default: an
eighth of the budget) whatever the weights; lm_head rows past the tokenizer's vocabulary get -inf, so every
sampler sees the same distribution. Prompts are random ids, lengths uniform in ``--prompt-len``. Useful tokens:
completion tokens up to and including the first EOS. Variants alternate, ``--repeats`` times (one seed per
repeat, the same for every variant); each rate is the median. ``--profile`` adds one instrumented run of
``legacy`` and ``eager`` split by phase (prefill, decode forward, sampling math, cache handling, the rest).

Usage::

    python benchmarks/sampler_throughput.py                          # CPU: tiny shape, 64 rows, budget 256
    python benchmarks/sampler_throughput.py --device cuda --dtype bfloat16 --shape qwen3-0.6b --budget 1024

The last line is machine-readable (``eopd_tps`` is the eager engine's; ``ratio`` = eopd_tps / generate_tps,
``generate_tps`` the better of the two generate modes)::

    summary: rows=64 budget=256 legacy_tps=... generate_tps=... eopd_tps=... compiled_tps=... ratio=... legacy_ratio=...
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from qwen3_shapes import QWEN3_0_6B, Shape

from eopd.sampling import Rollout, sample
from eopd.sampling.rollout import (
    completion_mask_from_ids,
    inverse_cdf_sample,
    left_pad,
    position_ids_from_mask,
    top_p_filter,
)

EOS, PAD = 2, 0


SHAPES = {
    "tiny": Shape(256, 4, 4, 2, 64, 768, 512, 500),
    "qwen3-0.6b": QWEN3_0_6B,
}


class FixedEosHead(torch.nn.Module):
    """The lm_head, then: rows past ``vocab`` at -inf and EOS at ``logsumexp(other tokens) + log(p / (1 - p))``,
    so that ``P(EOS) = p`` at temperature 1 whatever the hidden state (geometric completion lengths)."""

    def __init__(self, head: torch.nn.Module, vocab: int, p_eos: float) -> None:
        super().__init__()
        self.head, self.vocab, self.offset = head, vocab, math.log(p_eos / (1 - p_eos))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        logits[..., self.vocab :] = torch.finfo(logits.dtype).min
        others = logits[..., : self.vocab].float().clone()
        others[..., EOS] = float("-inf")
        logits[..., EOS] = (torch.logsumexp(others, -1) + self.offset).to(logits.dtype)
        return logits


def build_model(shape: Shape, p_eos: float, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A random Qwen3 of ``shape`` with ``FixedEosHead`` (seeded; nothing downloaded)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=shape.rows, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, tie_word_embeddings=False,
                         max_position_embeddings=8192, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen3ForCausalLM(config).to(dtype).eval()
    model.lm_head = FixedEosHead(model.lm_head, shape.vocab, p_eos)
    return model


# ---------------------------------------------------------------------------------------------------------
# (a) the sampler before issue 19, verbatim (src/eopd/sampling/rollout.py at 1cc7155), for the comparison


def _forward_params(model: torch.nn.Module) -> set[str]:
    """Named parameters of the forward that does the work (a ``PeftModel`` forwards ``**kwargs`` to its base)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return set(inspect.signature(getattr(base, "forward", base)).parameters)


def _cache_keyword(model: torch.nn.Module) -> str:
    """``cache`` in transformers >= 5.2x, ``past_key_values`` before (the same object either way)."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _sample_rows(
    model: torch.nn.Module,
    ids_BP: torch.Tensor,
    mask_BP: torch.Tensor,
    uniform_BT: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    eos: torch.Tensor,
    pad_token_id: int,
    vocab_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample completions of one group of rows; returns ``(tokens_BT, logp_BT)`` with ``T`` <= the budget (the
    loop stops when every row has ended)."""
    B = ids_BP.shape[0]
    cache_kw = _cache_keyword(model)
    # the prompt's prefill only needs the last position's logits (not [B, P, V])
    keep = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}
    tokens: list[torch.Tensor] = []
    logps: list[torch.Tensor] = []
    finished_B = torch.zeros(B, dtype=torch.bool, device=ids_BP.device)
    attn_BL, input_ids, position_ids, past = mask_BP, ids_BP, position_ids_from_mask(mask_BP), None
    for t in range(uniform_BT.shape[1]):
        out = model(input_ids=input_ids, attention_mask=attn_BL, position_ids=position_ids, use_cache=True,
                    **keep, **{cache_kw: past})
        past = getattr(out, cache_kw)
        logits_BV = out.logits[:, -1, :].float() / temperature
        if vocab_size is not None and logits_BV.shape[-1] > vocab_size:
            logits_BV[:, vocab_size:] = float("-inf")
        logp_BV = torch.log_softmax(logits_BV, dim=-1)
        probs_BV = logp_BV.exp() if top_p >= 1.0 else torch.softmax(top_p_filter(logits_BV, top_p), dim=-1)
        next_B = inverse_cdf_sample(probs_BV, uniform_BT[:, t])
        next_B = torch.where(finished_B, torch.full_like(next_B, pad_token_id), next_B)
        tokens.append(next_B)
        logps.append(logp_BV.gather(-1, next_B[:, None]).squeeze(1))
        finished_B = finished_B | torch.isin(next_B, eos)
        if bool(finished_B.all()):
            break
        input_ids = next_B[:, None]
        position_ids = position_ids[:, -1:] + 1
        attn_BL = torch.cat([attn_BL, torch.ones((B, 1), dtype=attn_BL.dtype, device=attn_BL.device)], dim=1)
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


def _pad_columns(x_BT: torch.Tensor, width: int, value: float) -> torch.Tensor:
    """``x_BT`` right-padded with ``value`` to ``width`` columns."""
    return torch.nn.functional.pad(x_BT, (0, width - x_BT.shape[1]), value=value)


@torch.no_grad()
def legacy_sample(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    n: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    generator: torch.Generator,
    vocab_size: int | None = None,
    max_batch_size: int | None = None,
) -> Rollout:
    """Today's ``sample`` before issue 19 (its body verbatim)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not eos_token_ids:
        raise ValueError("eos_token_ids must name at least one token")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    device = next(model.parameters()).device
    ids_BP, mask_BP = left_pad([p for p in prompt_ids for _ in range(n)], pad_token_id)
    ids_BP, mask_BP = ids_BP.to(device), mask_BP.to(device)
    B, P = ids_BP.shape
    prompt_index_B = torch.arange(len(prompt_ids), device=device).repeat_interleave(n)
    eos = torch.tensor(list(eos_token_ids), device=device)
    uniform_BT = torch.rand((B, max_new_tokens), generator=generator, device=generator.device).to(device)
    size = max_batch_size or B
    parts = [_sample_rows(model, ids_BP[s : s + size], mask_BP[s : s + size], uniform_BT[s : s + size],
                          temperature=temperature, top_p=top_p, eos=eos, pad_token_id=pad_token_id,
                          vocab_size=vocab_size) for s in range(0, B, size)]
    T = max(tokens.shape[1] for tokens, _ in parts)
    completion_BT = torch.cat([_pad_columns(tokens, T, pad_token_id) for tokens, _ in parts])
    cmask_BT = completion_mask_from_ids(completion_BT, list(eos_token_ids))
    logp_old_BT = torch.cat([_pad_columns(logp, T, 0.0) for _, logp in parts]) * cmask_BT
    return Rollout(
        sequences_BL=torch.cat([ids_BP, completion_BT], dim=1),
        attention_mask_BL=torch.cat([mask_BP, cmask_BT.long()], dim=1),
        prompt_len=P,
        completion_ids_BT=completion_BT,
        completion_mask_BT=cmask_BT,
        logp_old_BT=logp_old_BT,
        prompt_index_B=prompt_index_B,
    )

# ---------------------------------------------------------------------------------------------------------
# the variants: each returns its useful completion tokens


@dataclass
class Setup:
    """What every variant samples: the model, the prompts, the budget and the rows at once."""

    model: torch.nn.Module
    prompts: list[list[int]]
    budget: int
    max_batch_size: int
    vocab: int


def run_legacy(s: Setup, seed: int) -> int:
    r = legacy_sample(s.model, s.prompts, max_new_tokens=s.budget, eos_token_ids=[EOS], pad_token_id=PAD,
                      generator=torch.Generator().manual_seed(seed), vocab_size=s.vocab,
                      max_batch_size=s.max_batch_size)
    return r.num_tokens


def run_engine(s: Setup, seed: int, compile: bool = False) -> int:
    r = sample(s.model, s.prompts, max_new_tokens=s.budget, eos_token_ids=[EOS], pad_token_id=PAD,
               generator=torch.Generator().manual_seed(seed), vocab_size=s.vocab, max_batch_size=s.max_batch_size,
               compile=compile)
    return r.num_tokens


def run_generate(s: Setup, seed: int, group: int | None = None) -> int:
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, max_new_tokens=s.budget, top_k=0, top_p=1.0, temperature=1.0,
                              eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(seed)  # generate draws from the global RNG
    device = next(s.model.parameters()).device
    total, size = 0, group or len(s.prompts)
    for a in range(0, len(s.prompts), size):
        ids, mask = left_pad(s.prompts[a : a + size], PAD)
        with torch.no_grad():
            out = s.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        total += int(completion_mask_from_ids(out[:, ids.shape[1] :], [EOS]).sum())
    return total


def run_cb(s: Setup, seed: int) -> int:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(do_sample=True, max_new_tokens=s.budget, top_k=0, top_p=1.0, temperature=1.0,
                              eos_token_id=EOS, pad_token_id=PAD)
    out = s.model.generate_batch(inputs=s.prompts, generation_config=config,
                                 continuous_batching_config=ContinuousBatchingConfig(
                                     max_requests_per_batch=s.max_batch_size, seed=seed))
    return sum(len(o.generated_tokens) for o in out.values())


def timed(fn: Callable[[], int], device: str) -> tuple[int, float]:
    """``(useful tokens, wall seconds)`` of one call."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# --profile: where the time goes, per phase (CPU timing is synchronous; on CUDA every timer synchronises)


@contextlib.contextmanager
def patched(owner: object, name: str, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """``owner.name`` replaced by ``wrap(original)`` for the duration."""
    own = name in vars(owner)  # an instance attribute (or the class's own), not one found on the class
    original = getattr(owner, name)
    setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def phase_timer(
    seconds: dict[str, float], calls: dict[str, int], device: str
) -> Callable[[str | Callable[..., str]], Callable]:
    """A decorator factory adding each call's wall time to ``seconds[phase]`` and counting it in ``calls[phase]``
    (phase: a name, or a function of the call's arguments); nested timed calls are subtracted from their
    caller's phase."""
    stack: list[float] = []

    def timer(phase: str | Callable[..., str]) -> Callable[[Callable], Callable]:
        def wrap(fn: Callable) -> Callable:
            @functools.wraps(fn)
            def inner(*args: object, **kwargs: object) -> object:
                if device == "cuda":
                    torch.cuda.synchronize()
                stack.append(0.0)
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                if device == "cuda":
                    torch.cuda.synchronize()
                spent = time.perf_counter() - t0
                nested = stack.pop()
                name = phase if isinstance(phase, str) else phase(*args, **kwargs)
                seconds[name] += spent - nested
                calls[name] += 1
                if stack:
                    stack[-1] += spent
                return out

            return inner

        return wrap

    return timer


def forward_phase(*args: object, **kwargs: object) -> str:
    ids = kwargs.get("input_ids")
    return "prefill" if ids is not None and ids.shape[1] > 1 else "decode forward"


def counted(shapes: list[tuple[int, int]]) -> Callable[[Callable], Callable]:
    """A forward wrapper appending each decode forward's ``(rows, attended columns)`` to ``shapes``."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args: object, **kwargs: object) -> object:
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            if ids.shape[1] == 1:
                shapes.append((ids.shape[0], mask.shape[-1]))
            return fn(*args, **kwargs)

        return inner

    return wrap


def profile(s: Setup, seed: int, device: str) -> dict[str, tuple[dict[str, float], dict[str, int], list]]:
    """Seconds and calls per phase of one ``legacy`` and one ``eager`` run, and each decode forward's (rows,
    columns). The verbatim legacy loop computes its sampling math inline, so for ``legacy`` it is in "rest"."""
    from transformers.cache_utils import DynamicLayer

    import eopd.sampling.engine as engine
    from eopd.sampling.slots import SlotCache

    out: dict[str, tuple[dict[str, float], dict[str, int], list]] = {}
    for name, run in (("legacy", run_legacy), ("eager", run_engine)):
        seconds: dict[str, float] = defaultdict(float)
        calls: dict[str, int] = defaultdict(int)
        shapes: list[tuple[int, int]] = []
        timer = phase_timer(seconds, calls, device)
        with contextlib.ExitStack() as stack:
            time_forward, count_forward = timer(forward_phase), counted(shapes)
            stack.enter_context(patched(s.model, "forward", lambda f, t=time_forward, c=count_forward: t(c(f))))
            stack.enter_context(patched(DynamicLayer, "update", timer("cache handling")))
            for method in ("update", "move", "shift_left", "grow"):
                stack.enter_context(patched(SlotCache, method, timer("cache handling")))
            stack.enter_context(patched(engine, "attention_mask_4d", timer("cache handling")))
            stack.enter_context(patched(engine, "draw_tokens", timer("sampling math")))
            timer("rest (loop, bookkeeping)")(run)(s, seed)
        out[name] = dict(seconds), dict(calls), shapes
    return out


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--budget", type=int, default=256, help="max new tokens")
    p.add_argument("--mean-length", type=float, default=None, help="mean completion length (default budget / 8)")
    p.add_argument("--max-batch-size", type=int, default=None, help="rows at once (default rows / 4)")
    p.add_argument("--prompt-len", default="8,32", help="min,max prompt tokens (uniform)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU torch threads")
    p.add_argument("--variants", default="legacy,generate,generate_grouped,eager,compiled",
                   help="comma-separated, from legacy, generate, generate_grouped, eager, compiled, cb")
    p.add_argument("--cb", action="store_true", help="also transformers' continuous batching (one run)")
    p.add_argument("--profile", action="store_true", help="one instrumented legacy and eager run, per phase")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sampler_throughput: no CUDA device here; use --device cpu")
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    mean = args.mean_length or args.budget / 8
    model = build_model(shape, 1 / mean, args.device, getattr(torch, args.dtype))
    g = torch.Generator().manual_seed(0)
    lo, hi = (int(x) for x in args.prompt_len.split(","))
    prompts = [torch.randint(3, shape.vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.rows)]
    s = Setup(model, prompts, args.budget, args.max_batch_size or max(1, args.rows // 4), shape.vocab)
    variants: dict[str, Callable[[int], int]] = {
        "legacy": lambda seed: run_legacy(s, seed),
        "generate": lambda seed: run_generate(s, seed),
        "generate_grouped": lambda seed: run_generate(s, seed, group=s.max_batch_size),
        "eager": lambda seed: run_engine(s, seed),
        "compiled": lambda seed: run_engine(s, seed, compile=True),
        "cb": lambda seed: run_cb(s, seed),
    }
    chosen = [v for v in args.variants.split(",") if v] + (["cb"] if args.cb else [])
    print(f"sampler_throughput: {args.shape} {args.dtype} on {args.device} ({args.threads} threads), {args.rows} rows, "
          f"budget {args.budget}, P(EOS) 1/{mean:g} per step, max_batch_size {s.max_batch_size}, prompts "
          f"{lo}-{hi} tokens, torch {torch.__version__}", flush=True)
    extra: dict[str, float] = {}
    if "compiled" in chosen:  # the first call compiles; its time is reported apart
        tokens, seconds = timed(lambda: variants["compiled"](10_000), args.device)
        extra["compile_s"] = seconds
        print(f"  compiled: first call (compilation included) {seconds:.1f} s, {tokens} tokens", flush=True)
    rates: dict[str, list[float]] = defaultdict(list)
    for r in range(args.repeats):
        for name in chosen:
            if name == "cb" and r > 0:
                continue
            try:
                tokens, seconds = timed(functools.partial(variants[name], r), args.device)
            except Exception as err:  # a variant that cannot run here is reported, not fatal
                print(f"  {name}: did not run ({type(err).__name__}: {str(err).splitlines()[0][:160]})", flush=True)
                chosen = [c for c in chosen if c != name]
                continue
            rates[name].append(tokens / seconds)
            print(f"  repeat {r} {name}: {tokens} useful tokens in {seconds:.2f} s = {tokens / seconds:.0f} tokens/s",
                  flush=True)
    tps = {name: statistics.median(v) for name, v in rates.items()}
    for name, v in tps.items():
        print(f"  median {name}: {v:.0f} tokens/s", flush=True)
    if args.profile:
        for name, (seconds, calls, shapes) in profile(s, 0, args.device).items():
            total = sum(seconds.values())
            print(f"  profile {name}: total {total:.2f} s: " + ", ".join(
                f"{k} {v:.2f} s ({100 * v / total:.0f}%, {calls[k]} calls)"
                for k, v in sorted(seconds.items(), key=lambda x: -x[1])), flush=True)
            rows = sum(r for r, _ in shapes)
            print(f"  profile {name}: {len(shapes)} decode forwards, {rows} row-steps ({rows / len(shapes):.1f} rows "
                  f"a step), {statistics.fmean(c for _, c in shapes):.0f} attended columns a step on average, "
                  f"{1000 * seconds['decode forward'] / len(shapes):.2f} ms a decode forward", flush=True)
    generate = max((tps[k] for k in ("generate", "generate_grouped") if k in tps), default=float("nan"))
    eopd = tps.get("eager", float("nan"))
    fields = {"rows": args.rows, "budget": args.budget, "legacy_tps": tps.get("legacy", float("nan")),
              "generate_tps": generate, "eopd_tps": eopd, "compiled_tps": tps.get("compiled", float("nan")),
              "cb_tps": tps.get("cb", float("nan")), **extra, "ratio": eopd / generate,
              "legacy_ratio": eopd / tps.get("legacy", float("nan")),
              "compiled_ratio": tps.get("compiled", float("nan")) / eopd}
    print("summary: " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()),
          flush=True)


if __name__ == "__main__":
    main()
