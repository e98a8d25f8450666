"""``eopd world``: build one of the embedded arithmetic worlds' models and measure them.

A world (``eopd.world.build``) is what ``eopd demo`` distils: a multi-path teacher and a base student trained from
scratch. The registered ones are named (``configs/worlds/*.yaml``, docs/worlds.md); this command builds one
on demand, so its figures can be checked before (or without) a demo::

    eopd world                                   # the default world (multi-path), into the cache
    eopd world --world multi-path --threads 1    # a registered world (~/.cache/eopd/world or $EOPD_CACHE)
    eopd world --config my_world.yaml            # a variant world (a mapping, or its ``world:`` section)
    eopd world --role teacher --output-dir out/teacher      # one role into a new folder
    eopd world --role student --output-dir out/student --steps 500

Each model is then measured by ``eopd.world.build.measure`` on held-out prompts (``--eval-problems 0`` skips
it). ``--threads 2`` reproduces the documented timings on an idle 2-core machine; on a busy one use
``--threads 1``. Bad input (a missing or invalid config, an existing --output-dir) ends with one line on
stderr and exit code 2, before any training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from eopd.commands import run_command
from eopd.commands.arguments import CommandParser, count, folder_to_write, integer, real, seed
from eopd.commands.sft import print_step, with_overrides
from eopd.config import read_yaml_mapping
from eopd.folders import atomic_folder


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="eopd world",
        description="Build an embedded arithmetic world (a registered --world, or eopd.world.build.WorldConfig "
        "changed by --config): both models into the cache, or one --role into --output-dir; then measure them.",
    )
    p.add_argument("--world", help="a registered world's name (configs/worlds/NAME.yaml; default "
                   "capability-gap) or the path of a world file; not with --config")
    p.add_argument("--role", choices=["teacher", "student"],
                   help="build only this role, into --output-dir (default: both, into the cache)")
    p.add_argument("--output-dir", type=folder_to_write,
                   help="--role: the model folder to write; it must not exist yet")
    p.add_argument("--config", type=Path,
                   help="YAML/JSON world config: a mapping, or one with a 'world' key (the demo config, a model's "
                   "eopd_world.json); keys it omits keep their defaults")
    p.add_argument("--cache-dir", type=folder_to_write, help="without --role: cache root (default $EOPD_CACHE or "
                   "~/.cache/eopd/world)")
    p.add_argument("--steps", type=count, help="--role: override the optimizer steps, >= 1 (warmup shrinks to fit)")
    p.add_argument("--batch-size", type=count, help="--role: override the batch size, >= 1")
    p.add_argument("--lr", type=real(0), help="--role: override the peak learning rate, > 0")
    p.add_argument("--seed", type=seed, help="--role: override the batch-order seed, >= 0")
    p.add_argument("--threads", type=count, default=None, help="torch threads, >= 1 (default: torch's own setting)")
    p.add_argument("--eval-problems", type=integer(low=0), default=200,
                   help="held-out test prompts to measure after building, 8 samples each (0 skips)")
    return p


def load_world_config(path: Path | None, name: str | None = None) -> Any:
    """The ``WorldConfig`` of a registered world ``name``, of a YAML/JSON file (its ``world`` key when it has
    one: a section, or the name of a registered world as in the demo config), or the default world.

    Raises:
        ConfigError: an unknown world; the file is missing, is not YAML, or holds an invalid world.
    """
    from eopd.world import build as world

    if name is not None:
        return world.named_world_config(name)
    if path is None:
        return world.named_world_config(world.DEFAULT_WORLD)
    doc = read_yaml_mapping(path, "--config (a YAML/JSON world config)")
    section = doc.get("world", doc)
    if isinstance(section, str):  # the demo config names its default world
        return world.named_world_config(section)
    return world.world_config_from_dict(section)


def _check_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.world is not None and args.config is not None:
        parser.error("give --world (a registered world) or --config (a world config file), not both")
    budget = any(v is not None for v in (args.steps, args.batch_size, args.lr, args.seed))
    if args.role is None and budget:
        parser.error("without --role the per-role budgets come from --config, not --steps/--batch-size/--lr/"
                     "--seed (which would set teacher and student alike)")
    if args.role is None and args.output_dir is not None:
        parser.error("--output-dir needs --role teacher or --role student (without --role both go into the cache)")
    if args.role is not None and args.output_dir is None:
        parser.error(f"--role {args.role} needs --output-dir")
    if args.role is not None and args.cache_dir is not None:
        parser.error("--cache-dir is for building both roles (without --role); --role writes to --output-dir")


def _print_measurements(model: Any, tokenizer: Any, cfg: Any, role: str, n_problems: int) -> None:
    from eopd.world import build as world

    start = time.perf_counter()
    stats = world.measure(model, tokenizer, world.ArithmeticTask(cfg.task), n_problems=n_problems, n_samples=8,
                          generator=torch.Generator().manual_seed(0))
    stats["measure_seconds"] = round(time.perf_counter() - start, 1)
    print(f"{role}: " + json.dumps(stats), flush=True)


def _build_both(args: argparse.Namespace, cfg: Any) -> int:
    from eopd.models import load_causal_lm, load_tokenizer
    from eopd.world import build as world

    paths = world.build_world(cfg, args.cache_dir, log=lambda msg: print(msg, flush=True))
    print(json.dumps({"teacher": str(paths[0]), "student": str(paths[1]), "tokenizer": str(paths[2])}), flush=True)
    if args.eval_problems > 0:
        tokenizer = load_tokenizer(paths[2])
        for role, path in zip(world.ROLES, paths, strict=False):
            _print_measurements(load_causal_lm(path), tokenizer, cfg, role, args.eval_problems)
    return 0


def _build_role(args: argparse.Namespace, cfg: Any) -> int:
    from eopd.world import build as world

    spec = getattr(cfg, args.role)
    spec.sft = with_overrides(spec.sft, args)
    with atomic_folder(args.output_dir) as tmp:  # refuses an existing folder before any training
        start = time.perf_counter()
        model, tokenizer = world.train_role(cfg, args.role, on_step=print_step)
        elapsed = time.perf_counter() - start
        world.write_role(tmp, model, tokenizer, world.role_info(cfg, args.role, elapsed))
    print(f"{args.role}: trained in {elapsed:.1f}s on {torch.get_num_threads()} threads -> {args.output_dir}",
          flush=True)
    if args.eval_problems > 0:
        _print_measurements(model, tokenizer, cfg, args.role, args.eval_problems)
    return 0


def main(argv: list[str]) -> int:
    """Run ``eopd world``; returns the exit code (2 on bad input, 130 when interrupted)."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_flags(args, parser)

    def body() -> int:
        cfg = load_world_config(args.config, args.world)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        return _build_role(args, cfg) if args.role else _build_both(args, cfg)

    return run_command("eopd world", body)
