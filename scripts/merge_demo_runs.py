"""Merge finished runs of several ``eopd demo`` invocations into one report, through the demo's own code.

Why: a study runs its objectives in several invocations (a main comparison, then ablations) but wants one
table, one pass@k table and one seed-paired table against a single reference. This reads each run's
``metrics.jsonl`` with ``eopd.world.demo.collect`` and writes ``report.md`` with ``eopd.world.demo.write_report``, so
the numbers are exactly what one invocation over all the runs would have reported (docs/evidence.md).

    python scripts/merge_demo_runs.py OUT WORLD CACHE STEPS "LABEL::PATH" ...

``PATH`` holds ``seed<k>/`` run folders (e.g. ``runs/study/mp_main/runs/opd``); objectives keep the order
given, and the first is the paired reference.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from eopd.config import read_yaml_mapping
from eopd.world.build import build_world
from eopd.world.demo import (
    DEMO_CONFIG,
    RunSpec,
    _base_metrics,
    collect,
    plan_from_args,
    teacher_entropy_on_student_samples,
    write_report,
)


def main(argv: list[str]) -> None:
    out, world, cache, steps = Path(argv[0]), argv[1], argv[2], int(argv[3])
    results, labels = [], []
    for source in argv[4:]:
        label, path = source.split("::", 1)
        for seed, run in sorted((int(d.name[4:]), d) for d in Path(path).iterdir() if re.fullmatch(r"seed\d+", d.name)):
            result = collect(RunSpec(label, seed, run))
            last = max(int(point["step"]) for point in result.curve)
            if last != steps:
                raise SystemExit(f"{run}: its last evaluation is at step {last}, not {steps}; merge finished runs only")
            results.append(result)
        labels.append(label)
    results.sort(key=lambda r: (labels.index(r.objective), r.seed))
    plan = plan_from_args(read_yaml_mapping(str(DEMO_CONFIG), "demo config"), "default", ",".join(labels), None,
                          steps, [], world)
    plan.seeds = sorted({r.seed for r in results})
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.yaml").write_text(yaml.safe_dump(plan.train, sort_keys=False))
    teacher, student, _ = build_world(plan.world, cache, log=print)
    tau = float(plan.train.get("loss", {}).get("tau", 0.8))
    entropies = teacher_entropy_on_student_samples(teacher, student, plan.world.task, prompts=64, seed=0)
    command = "merged by scripts/merge_demo_runs.py from: " + " ".join(argv[4:])
    print(write_report(out, results, _base_metrics(results), plan, command, 0.0, entropies, tau))


if __name__ == "__main__":
    main(sys.argv[1:])
