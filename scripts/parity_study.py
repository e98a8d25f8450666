"""Issue 22's study: the public code's pipeline against the paper's equation, and the pass@1-pass@8 frontier.

Why this script: the study is several ``eopd demo`` invocations (each a group of settings, 5 seeds, two runs at a
time) and reports merged over them (``scripts/merge_demo_runs.py``: the demo's own tables, paired intervals
against the first setting and the frontier section), and a merge needs every label with its run folder. This
script holds the grid in one place, prints the exact commands (``--dry-run``, what docs/evidence.md quotes),
runs them in order, skips an invocation whose ``report.md`` already exists (so a stopped study continues where
it stopped), and writes the merged reports.

From the repository root (the commands are relative to it):

    .venv/bin/python scripts/parity_study.py --dry-run                          # the commands, nothing run
    .venv/bin/python scripts/parity_study.py                                    # the study (docs/evidence.md)
    .venv/bin/python scripts/parity_study.py --steps 20 --seeds 2 --out /tmp/s  # a smoke run of the same grid

The settings (``eopd demo`` variants; ``PARITY`` is the public code's pipeline, ``ALIGN`` its offset alone):

- ``multi-path``, the frontier: ``opd`` at learning rates 3e-5 / 1e-4 / 3e-4 / 1e-3 and under the public code's
  normaliser; ``eopd`` (tau 0.8, alpha 1) with tau 0.3 and alpha 5 apart and together (the strong gate), at
  1e-4 / 1e-3, with the exact reverse KL; the parity variant, the offset alone, and the parity variant with the
  strong gate. Every evaluation step of every run is a frontier point.
- ``capability-gap``, parity vs eopd vs opd at that world's learning rates (opd 3e-4, eopd 1e-4).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from eopd.world.demo import run_folder, split_objectives

#: The public code's pipeline: the forward KL one position late and each micro-batch (16 of a 64-row minibatch)
#: normalised on its own (docs/objectives.md).
PARITY = "loss.official_alignment=true,optim.normalize=micro_batch,optim.micro_batch_size=16"
#: The one-position offset alone (the paper's normaliser).
ALIGN = "loss.official_alignment=true"
STRONG = "loss.tau=0.3,loss.alpha=5"


@dataclass
class Invocation:
    """One ``eopd demo`` call: its output folder's name, its world and its settings."""

    name: str
    world: str
    objectives: list[str]


INVOCATIONS = [
    Invocation("mp_opd", "multi-path", ["opd", "opd[optim.lr=3e-5]", "opd[optim.lr=1e-4]", "opd[optim.lr=1e-3]",
                                        "opd[optim.normalize=micro_batch,optim.micro_batch_size=16]"]),
    Invocation("mp_eopd", "multi-path", ["eopd", f"eopd[{STRONG}]", "eopd[loss.tau=0.3]", "eopd[loss.alpha=5]",
                                         "eopd[optim.lr=1e-4]", "eopd[optim.lr=1e-3]", "eopd[loss.rkl=exact]"]),
    Invocation("mp_parity", "multi-path", [f"eopd[{PARITY}]", f"eopd[{ALIGN}]", f"eopd[{PARITY},{STRONG}]"]),
    Invocation("cg", "capability-gap", ["opd", "eopd[optim.lr=1e-4]", f"eopd[optim.lr=1e-4,{PARITY}]",
                                        f"eopd[optim.lr=1e-4,{ALIGN}]"]),
]
#: The merged reports: a name, its world and the settings it reads (the first is the paired reference): the whole
#: multi-path frontier against ``opd``, and the public code's pipeline against the paper's ``eopd`` on each world.
MERGES = [
    ("mp_merged", "multi-path", [label for inv in INVOCATIONS[:3] for label in inv.objectives]),
    ("mp_vs_eopd", "multi-path", ["eopd", f"eopd[{PARITY}]", f"eopd[{ALIGN}]", f"eopd[{STRONG}]",
                                  f"eopd[{PARITY},{STRONG}]"]),
    ("cg_vs_eopd", "capability-gap", ["eopd[optim.lr=1e-4]", f"eopd[optim.lr=1e-4,{PARITY}]",
                                      f"eopd[optim.lr=1e-4,{ALIGN}]"]),
]


def demo_command(inv: Invocation, out: Path, cache: str, steps: int, seeds: int) -> list[str]:
    """The ``eopd demo`` command line of one invocation."""
    return [".venv/bin/eopd", "demo", "--world", inv.world, "--cache-dir", cache,
            "--objectives", ",".join(inv.objectives), "--seeds", str(seeds), "--steps", str(steps),
            "--workers", "2", "--output-dir", str(out / inv.name)]


def merge_command(name: str, world: str, labels: list[str], out: Path, cache: str, steps: int) -> list[str]:
    """The ``scripts/merge_demo_runs.py`` command line of one merged report: each label's runs where its
    invocation (on ``world``) put them."""
    home = {label: inv.name for inv in INVOCATIONS if inv.world == world for label in inv.objectives}
    pairs = [f"{label}::{out / home[label] / 'runs' / run_folder(label)}" for label in labels]
    return [".venv/bin/python", "scripts/merge_demo_runs.py", str(out / name), world, cache, str(steps), *pairs]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/study22", help="where every invocation's folder goes")
    p.add_argument("--cache-dir", default="/tmp/eopd_study_cache", help="the worlds' cache (built on first use)")
    p.add_argument("--steps", type=int, default=300, help="steps per run (evaluation every steps / 5)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per setting")
    p.add_argument("--only", action="append", default=[], help="run only these invocations or merges (by name)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    if not Path(".venv/bin/eopd").exists():
        p.error("run it from the repository root, where .venv/bin/eopd is")
    out = Path(args.out)
    for inv in INVOCATIONS:
        assert split_objectives(",".join(inv.objectives)) == inv.objectives  # brackets keep their commas
    steps = [(inv.name, demo_command(inv, out, args.cache_dir, args.steps, args.seeds)) for inv in INVOCATIONS]
    steps += [(name, merge_command(name, world, labels, out, args.cache_dir, args.steps))
              for name, world, labels in MERGES]
    for name, cmd in steps:
        if args.only and name not in args.only:
            continue
        print(shlex.join(cmd), flush=True)
        if args.dry_run:
            continue
        if (out / name / "report.md").exists():
            print(f"[study] {name}: {out / name / 'report.md'} exists, skipped", flush=True)
            continue
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        with (out / f"{name}.log").open("w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        print(f"[study] {name}: exit {proc.returncode}, log {out / f'{name}.log'}", flush=True)
        if proc.returncode != 0:
            return proc.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
