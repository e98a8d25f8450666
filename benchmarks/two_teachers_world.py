"""Two teachers of different styles on the embedded world, each routed to half of the prompts (issue 20).

Why this exists: it shows a multi-teacher run end to end on the demo's own world and recipe, with numbers. The
``multi-path`` world's teacher writes its additions in four orders (as written, largest first, right to left,
random: entropy at every order choice); a second teacher is trained here on the same world with one order only,
as written (confident at those choices). Three runs distil the world's base student with EOPD on the demo's
recipe, same seed, same steps:

- ``multi-path only``: ``models.teacher`` = the four-order teacher (the demo's run);
- ``as-written only``: ``models.teacher`` = the one-order teacher;
- ``both, half each``: ``teachers: {multi: ..., written: ...}``, ``routing.by: hash`` (half of the prompts each).

It reports the final evaluation (pass@1, pass@8, distinct correct paths, share of the as-written path) and the
late-training per-teacher metrics of the routed run (``teacher/NAME/*``: share, gated share, entropy, loss).

Usage::

    EOPD_CACHE=/tmp/mt_world python benchmarks/two_teachers_world.py            # ~15 min on 2 CPU cores
    EOPD_CACHE=/tmp/mt_world python benchmarks/two_teachers_world.py --steps 40 # a smoke run

The routed run's command is printed; the last line is ``summary: ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import yaml

from eopd.folders import atomic_folder
from eopd.tracking import read_metrics
from eopd.world.build import build_world, config_hash, role_info, train_role, world_paths, write_role
from eopd.world.demo import DEMO_CONFIG, plan_for

STYLE = {"as_written": 1.0}
EVAL = ("avg@n", "pass@8", "distinct_correct_paths", "reference_path_share")
PER_TEACHER = ("share", "gated_share", "teacher_entropy", "loss", "fkl", "rkl")


def one_style_teacher(world, cache: str | None) -> Path:
    """The world's teacher trained on as-written traces only (cached like a world's teacher)."""
    cfg = dataclasses.replace(world, task=dataclasses.replace(world.task, teacher_styles=dict(STYLE)))
    folder = world_paths(cfg, cache)[0].parent.with_name(f"{config_hash(cfg)}-teacher-only")
    if not (folder / "model.safetensors").exists():
        start = time.perf_counter()
        model, tokenizer = train_role(cfg, "teacher")
        with atomic_folder(folder, keep_existing=True) as tmp:
            write_role(tmp, model, tokenizer, role_info(cfg, "teacher", time.perf_counter() - start))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/two_teachers"))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    plan = plan_for("default", yaml.safe_load(DEMO_CONFIG.read_text()), "multi-path")
    multi, student, _ = build_world(plan.world, args.cache_dir, log=lambda m: print(f"[world] {m}", flush=True))
    written = one_style_teacher(plan.world, args.cache_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    train_yaml = args.out / "train.yaml"
    train_yaml.write_text(yaml.safe_dump(plan.train, sort_keys=False))
    common = [sys.executable, "-m", "eopd", "train", str(train_yaml), f"models.student={student}",
              f"max_steps={args.steps}", f"eval.every={args.steps}", f"eval.problems={args.eval_problems}",
              "seed=0", "num_threads=1", "tensorboard=false", "start_over=true", *plan.train_overrides]
    runs = {
        "multi-path only": [f"models.teacher={multi}"],
        "as-written only": [f"models.teacher={written}"],
        "both, half each": ["models.teacher=", f"teachers.multi.model={multi}", f"teachers.written.model={written}",
                            "routing.by=hash"],
    }
    commands = {name: [*common, f"output_dir={args.out / name.split()[0].replace(',', '')}", *extra]
                for name, extra in runs.items()}
    print("routed run: " + " ".join(commands["both, half each"][1:]), flush=True)
    start, pending, running = time.perf_counter(), list(commands), {}
    while pending or running:
        while pending and len(running) < args.workers:
            name = pending.pop(0)
            running[name] = subprocess.Popen(commands[name], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                             text=True)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                if proc.returncode:
                    raise SystemExit(f"{name} failed: {proc.stderr.read() if proc.stderr else ''}")
                del running[name]
        time.sleep(1)
    print(f"3 runs x {args.steps} steps in {time.perf_counter() - start:.0f} s", flush=True)

    print("| run | pass@1 (Avg@8) | pass@8 | distinct correct paths | share of as-written path | gated share (train) |")
    print("|---|---|---|---|---|---|")
    finals = {}
    for name in runs:
        rows = read_metrics(args.out / name.split()[0].replace(",", "") / "metrics.jsonl")
        late = [r for r in rows if "loss" in r][int(0.8 * args.steps):]
        final = {k[5:]: v for k, v in rows[-1].items() if k.startswith("eval/")}
        final["gated"] = sum(r["gated_share"] for r in late) / len(late)
        finals[name] = final
        print(f"| {name} | " + " | ".join(f"{final[k]:.3f}" for k in EVAL) + f" | {final['gated']:.3f} |")
        if name == "both, half each":
            per = {f"{t}/{p}": sum(r[f"teacher/{t}/{p}"] for r in late) / len(late)
                   for t in ("multi", "written") for p in PER_TEACHER}
    print("\n| teacher (routed run, last 20% of steps) | " + " | ".join(PER_TEACHER) + " |")
    print("|---|" + "---|" * len(PER_TEACHER))
    for t in ("multi", "written"):
        print(f"| {t} | " + " | ".join(f"{per[f'{t}/{p}']:.3f}" for p in PER_TEACHER) + " |")
    both, m, w = finals["both, half each"], finals["multi-path only"], finals["as-written only"]
    print(f"summary: as_written_share multi={m['reference_path_share']:.3f} both={both['reference_path_share']:.3f} "
          f"written={w['reference_path_share']:.3f} pass@1 multi={m['avg@n']:.3f} both={both['avg@n']:.3f} "
          f"written={w['avg@n']:.3f} gated multi_teacher={per['multi/gated_share']:.3f} "
          f"written_teacher={per['written/gated_share']:.3f} (steps {args.steps}, seed 0)")


if __name__ == "__main__":
    main()
