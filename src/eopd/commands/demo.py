"""``eopd demo``: the embedded default, end to end on a laptop CPU (see ``eopd.world.demo``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from eopd.commands.arguments import CommandParser, count, folder_to_write
from eopd.config import read_yaml_mapping
from eopd.world import DEFAULT_WORLD, world_names
from eopd.world.demo import DEMO_CONFIG, plan_from_args, split_objectives


def parser() -> argparse.ArgumentParser:
    """The ``eopd demo`` argument parser (every value checked as it is parsed: one line, exit 2)."""
    p = CommandParser(prog="eopd demo", description="The embedded default: build an arithmetic world "
                                "here (a multi-path teacher and a base student), distil the base student with "
                                "several objectives, report.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke test (~20 s): structure, not numbers")
    mode.add_argument("--full", action="store_true", help="every objective, 5 seeds")
    p.add_argument("--world", help=f"the world: {', '.join(world_names())} (default: the demo config's, "
                   f"{DEFAULT_WORLD}), or the path of a world file (docs/worlds.md)")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="demo config (default world, training recipe, modes)")
    p.add_argument("--output-dir", type=folder_to_write, default="runs/demo", help="where runs, report.md and plots go")
    p.add_argument("--workers", type=count, default=2, help="runs in parallel (one thread each), >= 1")
    p.add_argument("--objectives", help="comma-separated objectives instead of the mode's; a variant "
                   "PRESET[key=value,...] adds eopd train overrides, e.g. opd,eopd,eopd[loss.alpha=0.25]")
    p.add_argument("--seeds", type=count, help="number of seeds instead of the mode's, >= 1")
    p.add_argument("--steps", type=count, help="steps per run instead of the mode's, >= 1")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the training recipe of every run (eopd train keys, e.g. optim.lr=3e-4)")
    p.add_argument("--cache-dir", type=folder_to_write, help="world cache (default: $EOPD_CACHE or "
                   "~/.cache/eopd/world)")
    return p


def main(argv: list[str]) -> int:
    """Run ``eopd demo``; returns the exit code. Every run's config is validated before any world is built."""
    from eopd.world.demo import run_demo

    p = parser()
    args = p.parse_args(argv)
    if args.objectives is not None and not split_objectives(args.objectives):
        p.error(f"--objectives {args.objectives!r} names no objective; give e.g. opd,eopd (or leave it out for the "
                "mode's)")
    try:
        config = read_yaml_mapping(args.config, "--config (the demo config)")
        mode = "quick" if args.quick else "full" if args.full else "default"
        plan = plan_from_args(config, mode, args.objectives, args.seeds, args.steps, args.set, args.world)
    except (OSError, ValueError) as e:
        p.error(str(e))
    cache_dir = None if args.cache_dir is None else str(args.cache_dir)
    run_demo(plan, Path(args.output_dir), workers=args.workers, cache_dir=cache_dir,
             command=shlex.join(["eopd", "demo", *argv]))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
