"""A small supervised trainer for causal LMs on (prompt, completion) pairs; builds the embedded models.

Why our own loop rather than ``transformers.Trainer``: the embedded world trains ~100K-340K-parameter
models for a few hundred steps on a laptop CPU, where a trainer's overhead (accelerate, logging,
checkpoints) costs more than the model, and the run must be reproducible from explicit seeds without the
global RNG. The loop is: tokenize once -> per step draw a batch from a seeded permutation -> cross-entropy
on completion tokens (+ the EOS that ends them) only -> AdamW with warmup + cosine decay.

CLI (``eopd sft``)::

    # the embedded world's models, exactly as ``eopd.world.build_world`` caches them
    eopd sft --role teacher --output-dir out/teacher
    eopd sft --role student --output-dir out/student
    eopd sft --role world                       # both, into the cache (~/.cache/eopd/world or $EOPD_CACHE)
    eopd sft --role world --world-config demo.yaml   # a variant world (its ``world:`` section)
    # any task's traces: a JSONL of {"prompt": ..., "completion": ...}
    eopd sft --data traces.jsonl --output-dir out/model --hidden-size 96 --layers 3 --steps 2000

Each ``--role`` run prints ``eopd.world.measure`` on held-out prompts afterwards (``--eval-problems 0``
skips it). ``--threads 2`` reproduces the documented timings on an idle 2-core machine; on a busy one use
``--threads 1``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

IGNORE_INDEX = -100


@dataclass
class SFTConfig:
    """Optimisation budget and seeds of one supervised run.

    Attributes:
        steps: Optimizer steps.
        batch_size: Examples per step.
        lr: Peak AdamW learning rate (tiny models from scratch like a high one: 1e-3 to 5e-3).
        weight_decay: AdamW decoupled weight decay.
        warmup_steps: Linear warmup from 0 to ``lr`` (must be < ``steps``).
        min_lr_ratio: The cosine decays to ``lr * min_lr_ratio`` at the last step.
        grad_clip: Global grad-norm clip (0 disables).
        seed: Seed of the batch order (a local ``torch.Generator``).
        num_threads: ``torch.set_num_threads`` during training (restored after); None leaves the
            current setting alone.
        log_every: Call ``on_step`` / print every this many steps (0: only the last step).
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    num_threads: int | None = None
    log_every: int = 100

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps) = [0, {self.steps}), got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None (leave torch's setting), got {self.num_threads}")
        if self.log_every < 0:
            raise ValueError(f"log_every must be >= 0, got {self.log_every}")


def encode_example(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + completion + EOS`` and labels that are ``IGNORE_INDEX`` on the prompt.

    Prompt and completion are tokenized separately (no special tokens added) so the boundary is exact.

    Returns:
        ``(input_ids, labels)``, equal length; ``labels[i] = input_ids[i]`` on completion and EOS tokens.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; SFT teaches the model to stop with one")
    p_ids = tokenizer.encode(prompt, add_special_tokens=False)
    c_ids = [*tokenizer.encode(completion, add_special_tokens=False), tokenizer.eos_token_id]
    if not p_ids:
        raise ValueError(f"prompt {prompt!r} tokenizes to nothing; every example needs a prompt")
    return p_ids + c_ids, [IGNORE_INDEX] * len(p_ids) + c_ids


def collate(
    encoded: Sequence[tuple[list[int], list[int]]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad encoded examples into ``(input_ids_BL, attention_mask_BL, labels_BL)``.

    Padding gets attention 0 and label ``IGNORE_INDEX``, so pad may equal EOS: a real EOS keeps its label.
    """
    width = max(len(ids) for ids, _ in encoded)
    B = len(encoded)
    input_ids_BL = torch.full((B, width), pad_token_id, dtype=torch.long)
    attention_mask_BL = torch.zeros((B, width), dtype=torch.long)
    labels_BL = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labels) in enumerate(encoded):
        input_ids_BL[i, : len(ids)] = torch.tensor(ids)
        attention_mask_BL[i, : len(ids)] = 1
        labels_BL[i, : len(labels)] = torch.tensor(labels)
    return input_ids_BL, attention_mask_BL, labels_BL


def completion_loss(
    model: torch.nn.Module, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, labels_BL: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled (completion + EOS) positions, a scalar.

    Position ``t``'s logits predict token ``t + 1``; positions whose target is ``IGNORE_INDEX`` (prompt,
    padding) contribute nothing.
    """
    logits_BLV = model(input_ids=input_ids_BL, attention_mask=attention_mask_BL).logits
    logits_BTV = logits_BLV[:, :-1].float()
    targets_BT = labels_BL[:, 1:]
    if not bool((targets_BT != IGNORE_INDEX).any()):
        raise ValueError("the batch has no completion tokens to learn from")
    return F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def lr_factor(step: int, cfg: SFTConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step`` (0-based): linear warmup, then cosine to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _batch_indices(n: int, cfg: SFTConfig, generator: torch.Generator):
    """Yield ``cfg.steps`` index batches: successive seeded permutations of ``range(n)``, cut in batches."""
    perm = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(cfg.steps):
        if pos + cfg.batch_size > n:
            perm = torch.cat([perm[pos:], torch.randperm(n, generator=generator)])
            pos = 0
        yield perm[pos : pos + cfg.batch_size].tolist()
        pos += cfg.batch_size


def train_sft(
    model: PreTrainedModel,
    tokenizer,
    examples: Sequence[tuple[str, str]],
    cfg: SFTConfig,
    on_step: Callable[[int, float, float], None] | None = None,
) -> PreTrainedModel:
    """Train ``model`` in place on ``(prompt, completion)`` pairs; the loss covers completion + EOS only.

    Args:
        model: A Hugging Face causal LM (its device is used; float32 recommended on CPU).
        tokenizer: Encodes the text; needs an eos token (pad falls back to eos when absent).
        examples: Training pairs; reused in fresh seeded permutations if ``steps * batch_size`` exceeds
            their number.
        cfg: Budget and seeds.
        on_step: Called as ``on_step(step, loss, lr)`` every ``cfg.log_every`` steps and at the last step
            (``step`` is 1-based).

    Returns:
        The same model, trained and left in eval mode.
    """
    if not examples:
        raise ValueError("no training examples; pass a non-empty list of (prompt, completion) pairs")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode_example(tokenizer, p, c) for p, c in examples]
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    old_threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    model.train()
    try:
        for step, idx in enumerate(_batch_indices(len(encoded), cfg, generator), start=1):
            input_ids_BL, attention_mask_BL, labels_BL = (
                t.to(device) for t in collate([encoded[i] for i in idx], pad_id)
            )
            loss = completion_loss(model, input_ids_BL, attention_mask_BL, labels_BL)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            is_log = (cfg.log_every and step % cfg.log_every == 0) or step == cfg.steps
            if on_step is not None and is_log:
                on_step(step, float(loss.item()), lr)
    finally:
        torch.set_num_threads(old_threads)
        model.eval()
    return model


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    pairs = []
    with path.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((str(row["prompt"]), str(row["completion"])))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{line_no}: expected a JSON object with 'prompt' and 'completion' "
                                 f"({err})") from err
    if not pairs:
        raise ValueError(f"{path} holds no examples; write one JSON object per line")
    return pairs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eopd sft",
        description="Supervised training of a small causal LM from scratch on (prompt, completion) traces. "
        "--role builds the embedded arithmetic world's models (eopd.world.WorldConfig, optionally changed "
        "by --world-config); --data trains on any task's JSONL traces.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--role", choices=["teacher", "student", "world"],
                     help="the embedded world's teacher or base student (into --output-dir), or both into the "
                     "cache (world)")
    src.add_argument("--data", type=Path, help='JSONL, one {"prompt": ..., "completion": ...} per line')
    p.add_argument("--output-dir", type=Path, help="save_pretrained folder (required unless --role world)")
    p.add_argument("--world-config", type=Path,
                   help="--role: YAML/JSON world config (a mapping, or one with a 'world' key like the demo "
                   "config); keys it omits keep their defaults")
    p.add_argument("--cache-dir", type=Path, help="--role world: cache root (default $EOPD_CACHE or "
                   "~/.cache/eopd/world)")
    p.add_argument("--steps", type=int, help="override the optimizer steps (warmup shrinks to fit)")
    p.add_argument("--batch-size", type=int, help="override the batch size")
    p.add_argument("--lr", type=float, help="override the peak learning rate")
    p.add_argument("--seed", type=int, help="override the batch-order seed (--data: also the init seed)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own setting)")
    p.add_argument("--eval-problems", type=int, default=200,
                   help="--role: held-out test prompts to measure after training, 8 samples each (0 skips)")
    g = p.add_argument_group("--data model size (a tiny Qwen3)")
    g.add_argument("--hidden-size", type=int, default=96)
    g.add_argument("--layers", type=int, default=3)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--intermediate-size", type=int, default=288)
    return p


def _overridden(cfg: SFTConfig, args: argparse.Namespace) -> SFTConfig:
    """``cfg`` with the command line's budget overrides applied (warmup shrunk to 10% if it no longer fits)."""
    changes = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
               "num_threads": args.threads}
    merged = asdict(cfg) | {k: v for k, v in changes.items() if v is not None}
    if merged["warmup_steps"] >= merged["steps"]:
        merged["warmup_steps"] = merged["steps"] // 10
    return SFTConfig(**merged)


def _print_step(step: int, loss: float, lr: float) -> None:
    print(f"  step {step:>6}  loss {loss:.4f}  lr {lr:.2e}", flush=True)


def _load_world_config(path: Path | None):
    from eopd import world  # local: world imports this module

    if path is None:
        return world.WorldConfig()
    import yaml

    doc = yaml.safe_load(path.read_text()) or {}
    if isinstance(doc, dict) and "world" in doc:
        doc = doc["world"]
    return world.world_config_from_dict(doc)


def _print_measurements(model: PreTrainedModel, tokenizer, cfg, role: str, n_problems: int) -> None:
    from eopd import world

    start = time.perf_counter()
    stats = world.measure(model, tokenizer, world.ArithmeticTask(cfg.task), n_problems=n_problems, n_samples=8,
                          generator=torch.Generator().manual_seed(0))
    stats["measure_seconds"] = round(time.perf_counter() - start, 1)
    print(f"{role}: " + json.dumps(stats), flush=True)


def _cli_role(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from eopd import world
    from eopd.models import load_causal_lm, load_tokenizer

    cfg = _load_world_config(args.world_config)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.role == "world":
        if any(v is not None for v in (args.steps, args.batch_size, args.lr, args.seed)):
            parser.error("--role world takes its per-role budgets from --world-config, not --steps/--batch-size/"
                         "--lr/--seed (which would set teacher and student alike)")
        paths = world.build_world(cfg, args.cache_dir, log=lambda msg: print(msg, flush=True))
        print(json.dumps({"teacher": str(paths[0]), "student": str(paths[1]), "tokenizer": str(paths[2])}))
        if args.eval_problems > 0:
            tokenizer = load_tokenizer(paths[2])
            for role, path in zip(world.ROLES, paths, strict=False):
                _print_measurements(load_causal_lm(path), tokenizer, cfg, role, args.eval_problems)
        return 0
    if args.output_dir is None:
        parser.error("--output-dir is required with --role teacher/student")
    spec = getattr(cfg, args.role)
    spec.sft = _overridden(spec.sft, args)
    start = time.perf_counter()
    model, tokenizer = world.train_role(cfg, args.role, on_step=_print_step)
    elapsed = time.perf_counter() - start
    world.save_model(model, tokenizer, args.output_dir, {"role": args.role, "world": world.config_dict(cfg),
                                                          "hash": cfg.key(), "train_seconds": elapsed})
    print(f"{args.role}: trained in {elapsed:.1f}s on {torch.get_num_threads()} threads -> {args.output_dir}")
    if args.eval_problems > 0:
        _print_measurements(model, tokenizer, cfg, args.role, args.eval_problems)
    return 0


def _cli_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from eopd.models import build_tiny_qwen3
    from eopd.tokenizer import alphabet_of, build_char_tokenizer

    if args.output_dir is None:
        parser.error("--output-dir is required with --data")
    examples = _read_jsonl(args.data)
    tokenizer = build_char_tokenizer(alphabet_of(p + c for p, c in examples))
    cfg = _overridden(SFTConfig(), args)
    longest = max(len(p) + len(c) for p, c in examples) + 1
    model = build_tiny_qwen3(
        len(tokenizer), hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size,
        max_position_embeddings=max(64, 2 * longest), seed=cfg.seed,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    start = time.perf_counter()
    train_sft(model, tokenizer, examples, cfg, on_step=_print_step)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"trained on {len(examples)} examples in {time.perf_counter() - start:.1f}s -> {args.output_dir}")
    return 0


def cli(argv: list[str]) -> int:
    """``eopd sft``: see the module docstring for examples."""
    parser = _parser()
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return _cli_role(args, parser) if args.role else _cli_data(args, parser)
    finally:
        torch.set_num_threads(threads)  # callers in-process (tests, the demo) keep their setting
