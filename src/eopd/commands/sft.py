"""``eopd sft``: train a small causal LM from scratch on any task's (prompt, completion) traces.

The command reads a JSONL file, builds a character tokenizer over the traces' characters and a tiny Qwen3,
trains it with ``eopd.world.sft.train_sft`` and writes an ordinary Hugging Face folder (never over an existing
one)::

    eopd sft --data traces.jsonl --output-dir out/model --hidden-size 96 --layers 3 --steps 2000

Bad input (a missing file, a malformed line, an existing output folder, an impossible budget) ends with
one line on stderr and exit code 2, before any training.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from eopd.commands import run_command
from eopd.commands.arguments import CommandParser, UsageError, count, folder_to_write, real, seed
from eopd.config import ConfigError
from eopd.folders import atomic_folder, save_model_folder
from eopd.tasks import DataError
from eopd.tasks.sources import read_json_rows
from eopd.world import SFTConfig, train_sft


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """``(prompt, completion)`` pairs of a JSONL file, one ``{"prompt": ..., "completion": ...}`` per line,
    read through the shared reader of prompt files (``eopd.tasks.sources``).

    Raises:
        DataError: the file is missing or malformed (named with its line), a row lacks a text ``prompt`` or
            ``completion``, or the file holds no examples.
    """
    pairs = []
    for row_no, row in read_json_rows(path):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise DataError(f'{path}: line {row_no}: expected a JSON object {{"prompt": "...", "completion": "..."}} '
                            f"with text values, got fields {sorted(row)}")
        pairs.append((row["prompt"], row["completion"]))
    if not pairs:
        raise DataError(f"--data {str(path)!r} holds no examples; write one JSON object per line")
    return pairs


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="eopd sft",
        description="Supervised training of a small causal LM (a tiny Qwen3 with a character tokenizer) from "
        "scratch on (prompt, completion) traces. The loss covers the completion and its EOS only.",
    )
    p.add_argument("--data", type=Path, required=True, help='JSONL, one {"prompt": ..., "completion": ...} per line')
    p.add_argument("--output-dir", type=folder_to_write, required=True,
                   help="the model folder to write (save_pretrained); it must not exist yet")
    p.add_argument("--steps", type=count, help="optimizer steps (default 1000; warmup shrinks to fit)")
    p.add_argument("--batch-size", type=count, help="examples per step (default 64)")
    p.add_argument("--lr", type=real(0), help="peak learning rate, > 0 (default 3e-3)")
    p.add_argument("--seed", type=seed, help="batch-order and initialisation seed, >= 0 (default 0)")
    p.add_argument("--threads", type=count, default=None, help="torch threads (default: torch's own setting)")
    g = p.add_argument_group("model size (a tiny Qwen3; head size = hidden size / heads, even)")
    g.add_argument("--hidden-size", type=count, default=96)
    g.add_argument("--layers", type=count, default=3)
    g.add_argument("--heads", type=count, default=4)
    g.add_argument("--kv-heads", type=count, default=2, help="key/value heads, dividing --heads")
    g.add_argument("--intermediate-size", type=count, default=288)
    return p


def check_model_size(args: argparse.Namespace) -> None:
    """The shape rules of a Qwen3 (otherwise a traceback from inside the first forward).

    Raises:
        UsageError: heads that do not divide the width, an odd head size (rotary embeddings halve it), or
            key/value heads that do not divide the heads.
    """
    if args.hidden_size % args.heads or (args.hidden_size // args.heads) % 2:
        raise UsageError(f"--hidden-size {args.hidden_size} / --heads {args.heads} must be a whole, even head size "
                         "(rotary embeddings split each head in halves), e.g. --hidden-size 96 --heads 4")
    if args.heads % args.kv_heads:
        raise UsageError(f"--kv-heads {args.kv_heads} must divide --heads {args.heads} (each key/value head serves "
                         "a group of query heads)")


def with_overrides(cfg: SFTConfig, args: argparse.Namespace) -> SFTConfig:
    """``cfg`` with the command line's budget flags applied (warmup shrunk to 10% if it no longer fits)."""
    changes = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
               "num_threads": args.threads}
    merged = asdict(cfg) | {k: v for k, v in changes.items() if v is not None}
    if merged["warmup_steps"] >= merged["steps"]:
        merged["warmup_steps"] = merged["steps"] // 10
    return SFTConfig(**merged)


def print_step(step: int, loss: float, lr: float) -> None:
    """The progress line of a supervised run (an ``on_step`` callback)."""
    print(f"  step {step:>6}  loss {loss:.4f}  lr {lr:.2e}", flush=True)


def _run(args: argparse.Namespace) -> int:
    from eopd.models import build_tiny_qwen3
    from eopd.models.char_tokenizer import alphabet_of, build_char_tokenizer

    check_model_size(args)
    cfg = with_overrides(SFTConfig(), args)
    examples = read_pairs(args.data)
    try:
        tokenizer = build_char_tokenizer(alphabet_of(p + c for p, c in examples))
    except ValueError as err:
        raise DataError(f"--data {str(args.data)!r}: {err}") from None
    longest = max(len(p) + len(c) for p, c in examples) + 1
    try:
        model = build_tiny_qwen3(
            len(tokenizer), hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
            num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size,
            max_position_embeddings=max(64, 2 * longest), seed=cfg.seed,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        )
    except ValueError as err:
        raise ConfigError(f"model size: {err}") from None
    with atomic_folder(args.output_dir) as tmp:  # refuses an existing folder before any training
        start = time.perf_counter()
        train_sft(model, tokenizer, examples, cfg, on_step=print_step)
        save_model_folder(tmp, model, tokenizer)
    print(f"trained on {len(examples)} examples in {time.perf_counter() - start:.1f}s -> {args.output_dir}")
    return 0


def main(argv: list[str]) -> int:
    """Run ``eopd sft``; returns the exit code (2 on bad input, 130 when interrupted).

    Every value is checked before the data is read.
    """
    args = _parser().parse_args(argv)
    return run_command("eopd sft", lambda: _run(args))
