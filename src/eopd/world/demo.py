"""``eopd demo``: the embedded default, end to end on a laptop CPU.

1. Build (or load from the cache) a named arithmetic world (``--world``, default ``multi-path``): a
   teacher trained on several orders of adding the terms and a weaker base student (``eopd.world.build``).
2. Distil the base student with each objective and several seeds on one budget of steps, two runs at a time
   (two single-thread processes beat one two-thread process on 2 cores), each run an ordinary
   ``eopd train`` subprocess with periodic evaluation on the world's held-out prompts.
3. Write ``report.md`` (the world, mean ± std over seeds, pass@k for k = 1..8, the command and the config)
   and PNG plots: pass@1 / pass@8 / distinct correct paths over steps, final pass@k against k, and the
   histogram of teacher entropy on base-student samples with the gate. With several settings, also the
   accuracy-diversity frontier: pass@8 against pass@1 of every setting at every evaluation step
   (``frontier.png``), and whether any ``eopd`` setting reaches a point no ``opd`` setting reaches.

Why the recipe comes in layers: the shared recipe and budgets live in ``configs/demo.yaml``, while what
suits one world (its objectives' learning rates, its sampling budget) lives in that world's file
(``configs/worlds/NAME.yaml``, docs/worlds.md), so adding a world never changes another's results.

Budgets: ``--quick`` is CI's smoke test (checks structure, not numbers; the world's task with tiny models),
the default compares ``opd`` and ``eopd`` with 3 seeds, ``--full`` runs every objective of the comparison
with 5 seeds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import torch
import yaml

from eopd.config import ConfigError, deep_merge, from_dict, require
from eopd.tasks.arithmetic import ArithmeticConfig, ArithmeticTask
from eopd.tracking import format_duration, read_metrics
from eopd.world.build import (
    DEFAULT_WORLD,
    WorldConfig,
    longest_completion,
    world_config_from_dict,
    world_document,
    world_names,
)
from eopd.world.frontier import frontier, frontier_section, reach_answer
from eopd.world.report import (
    COLUMNS,
    DIAG_COLUMNS,
    PAIRED_COLUMNS,
    RunResult,
    markdown_table,
    paired_table,
    pass_at_k_columns,
    plot_curves,
    plot_entropy_histogram,
    plot_pass_at_k,
)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@dataclass
class DemoMode:
    """One mode of the demo config (``modes.quick``, ``modes.default``, ``modes.full``), checked by ``from_dict``.

    Attributes:
        objectives: Objectives, each a preset or a variant ``PRESET[key=value,...]`` (``parse_variant``).
        seeds: Seeds per objective (``0..seeds-1``).
        max_steps: Distillation steps per run.
        eval_every: Steps between evaluations (and at step 0 and the last step).
        eval_problems: Held-out prompts per evaluation.
        world: Changes to the world for this mode (``WorldConfig`` fields; ``--quick`` shrinks the models).
        train: Changes to the recipe for this mode (``eopd train`` keys, nested).
    """

    objectives: list[str]
    seeds: int
    max_steps: int
    eval_every: int
    eval_problems: int
    world: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(isinstance(self.objectives, list) and bool(self.objectives)
                and all(isinstance(o, str) for o in self.objectives), "objectives",
                f"must be a non-empty list of objective names, got {self.objectives!r}")
        for key in ("seeds", "max_steps", "eval_every", "eval_problems"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")


@dataclass
class DemoPlan:
    """What one ``eopd demo`` invocation runs.

    Attributes:
        objectives: Objective labels (presets or variants).
        seeds: Seeds of every objective.
        max_steps: Steps per run.
        eval_every: Steps between evaluations.
        eval_problems: Held-out prompts per evaluation.
        world: The world the runs distil (its base student, its teacher, its task).
        world_name: The registered name of the world (or the path of its file).
        description: What the world is for (its file's ``description``).
        train: The shared ``eopd train`` recipe (no models/output_dir/seed), the world's task in
            ``data.arithmetic``.
        train_overrides: ``key=value`` overrides of every run (``--set``).
    """

    objectives: list[str]
    seeds: list[int]
    max_steps: int
    eval_every: int
    eval_problems: int
    world: WorldConfig = field(default_factory=WorldConfig)
    world_name: str = DEFAULT_WORLD
    description: str = ""
    train: dict = field(default_factory=dict)
    train_overrides: list[str] = field(default_factory=list)


def task_section(world: WorldConfig) -> dict:
    """The ``data.arithmetic`` section that makes ``eopd train`` use the world's prompts and held-out split.

    Only the fields that define the prompts and the split; the order styles concern the world's SFT data.
    """
    t = world.task
    return {"num_terms": t.num_terms, "min_digit": t.min_digit, "max_digit": t.max_digit,
            "test_size": t.test_size, "split_seed": t.split_seed}


def plan_for(mode: str, config: dict, world: str | None = None) -> DemoPlan:
    """The plan of a mode (``quick``, ``default``, ``full``) on a world.

    The layers, later ones winning: the demo config (``train``, ``modes``), the world's file (its
    ``train`` and ``modes`` sections: the recipe that suits it), then the mode's own ``world``/``train``
    changes. The world's task always reaches ``eopd train`` through ``data.arithmetic``.

    Args:
        mode: A key of the merged ``modes`` section.
        config: The demo config (``DEMO_CONFIG`` or ``--config``): ``world`` (the default world's name),
            ``train``, ``modes``.
        world: A registered world's name or a world file's path (default: the config's ``world``).

    Raises:
        ConfigError: an unknown world or mode, or an invalid world or mode section (one line).
    """
    unknown = sorted(set(config) - {"world", "train", "modes"})
    if unknown:
        raise ConfigError(f"demo config: unknown key '{unknown[0]}'; it holds world (a world's name), train, modes")
    name = world or config.get("world") or DEFAULT_WORLD
    require(isinstance(name, str), "demo config: world", f"must name a world ({', '.join(world_names())}), "
            f"got {name!r}; a world's settings live in its own file (docs/worlds.md)")
    doc = world_document(name)
    merged = deep_merge({"train": config.get("train") or {}, "modes": config.get("modes") or {}},
                        {"train": doc["train"], "modes": doc["modes"]})
    modes = merged["modes"]
    if mode not in modes:
        raise ConfigError(f"demo config has no mode {mode!r}; it defines: {', '.join(modes)}")
    section = modes[mode]
    require(isinstance(section, dict), f"modes.{mode}", f"must be a mapping of DemoMode fields, got {section!r}")
    missing = [f.name for f in fields(DemoMode)
               if f.default is MISSING and f.default_factory is MISSING and f.name not in section]
    require(not missing, f"modes.{mode}", f"missing {', '.join(missing)}")
    m = from_dict(DemoMode, section, prefix=f"modes.{mode}.")
    world_cfg = world_config_from_dict(m.world, base=world_config_from_dict(doc["world"]))
    train = deep_merge(deep_merge(merged["train"], m.train), {"data": {"arithmetic": task_section(world_cfg)}})
    return DemoPlan(objectives=list(m.objectives), seeds=list(range(m.seeds)), max_steps=m.max_steps,
                    eval_every=m.eval_every, eval_problems=m.eval_problems, world=world_cfg, world_name=name,
                    description=doc["description"].strip(), train=train)


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``"eopd[loss.alpha=0.25,loss.tau=0.5]"`` -> ``("eopd", ["loss.alpha=0.25", "loss.tau=0.5"])``.

    A variant is an objective preset plus ``eopd train`` overrides, so a settings sweep runs as one demo with
    one report; the whole string is its label. A plain preset name has no overrides.
    """
    from eopd.losses import PRESETS

    m = re.fullmatch(r"\s*([A-Za-z_][\w-]*)\s*(?:\[(.*)\])?\s*", spec)
    if m is None:
        raise ValueError(f"objective {spec!r}: expected PRESET or PRESET[key=value,...], e.g. eopd[loss.alpha=0.25]")
    if m.group(1) not in PRESETS:
        raise ValueError(f"objective {spec!r}: unknown preset {m.group(1)!r}; choose one of: {', '.join(PRESETS)}")
    overrides = [o.strip() for o in (m.group(2) or "").split(",") if o.strip()]
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"objective {spec!r}: override {o!r} is not key=value")
    return m.group(1), overrides


def split_objectives(text: str) -> list[str]:
    """Split ``--objectives`` on commas outside brackets: ``"opd,eopd[loss.alpha=0.5,loss.top_k=4]"``."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


@dataclass
class RunSpec:
    """One distillation subprocess; ``objective`` is a preset name or a variant ``preset[key=value,...]``."""

    objective: str
    seed: int
    output_dir: Path
    process: subprocess.Popen | None = None
    started: float = 0.0
    finished: float = 0.0
    log: Path | None = None

    @property
    def name(self) -> str:
        """``objective/seedN``."""
        return f"{self.objective}/seed{self.seed}"


def run_folder(objective: str) -> str:
    """A folder name for a variant label: ``eopd[loss.alpha=0.25]`` -> ``eopd_loss.alpha=0.25``."""
    return re.sub(r"[^\w.=-]+", "_", objective).strip("_")


def _train_command(spec: RunSpec, plan: DemoPlan, teacher: Path, student: Path, train_yaml: Path) -> list[str]:
    preset, variant_overrides = parse_variant(spec.objective)
    return [sys.executable, "-m", "eopd", "train", str(train_yaml), f"models.teacher={teacher}",
            f"models.student={student}", f"output_dir={spec.output_dir}", f"objective={preset}",
            f"seed={spec.seed}", f"max_steps={plan.max_steps}", f"eval.every={plan.eval_every}",
            f"eval.problems={plan.eval_problems}", "num_threads=1", "tensorboard=false",
            *plan.train_overrides, *variant_overrides]


def run_all(specs: list[RunSpec], commands: dict[str, list[str]], workers: int, total_steps: int) -> None:
    """Run the subprocesses ``workers`` at a time with a progress display; raise if one fails."""
    pending = list(specs)
    running: list[RunSpec] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    last_print = 0.0
    tty = sys.stdout.isatty()
    while pending or running:
        while pending and len(running) < workers:
            spec = pending.pop(0)
            spec.output_dir.mkdir(parents=True, exist_ok=True)
            spec.log = spec.output_dir / "train.log"
            spec.started = time.perf_counter()
            with spec.log.open("w") as log:
                spec.process = subprocess.Popen(commands[spec.name], stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append(spec)
        time.sleep(0.5)
        for spec in list(running):
            assert spec.process is not None
            if spec.process.poll() is not None:
                spec.finished = time.perf_counter()
                running.remove(spec)
                if spec.process.returncode != 0:
                    for other in running:
                        other.process.kill()  # type: ignore[union-attr]
                    tail = spec.log.read_text()[-3000:] if spec.log else ""
                    raise RuntimeError(f"run {spec.name} failed (exit {spec.process.returncode}):\n{tail}")
        now = time.perf_counter()
        if now - last_print >= (1.0 if tty else 20.0) or not (pending or running):
            last_print = now
            _print_progress(specs, running, total_steps, now - t0, tty)


def _print_progress(specs: list[RunSpec], running: list[RunSpec], total_steps: int, elapsed: float,
                    tty: bool) -> None:
    done_steps = 0
    parts = []
    for spec in specs:
        rows = read_metrics(spec.output_dir / "metrics.jsonl") if spec.started else []
        step = max((int(r["step"]) for r in rows), default=0)
        done_steps += step if spec.process is None or spec.process.poll() is None else total_steps
        if spec in running:
            phase = "eval" if rows and any(k.startswith("eval/") for k in rows[-1]) and step else "train"
            parts.append(f"{spec.name} {phase} {step}/{total_steps}")
    frac = done_steps / max(total_steps * len(specs), 1)
    eta = elapsed / frac * (1 - frac) if frac > 0 else float("nan")
    finished = sum(1 for s in specs if s.finished)
    line = (f"[demo] runs {finished}/{len(specs)} done | {' | '.join(parts) or '-'} | "
            f"elapsed {format_duration(elapsed)} eta {format_duration(eta)}")
    if tty:
        sys.stdout.write("\r" + line[:200] + "\033[K")
        if finished == len(specs):
            sys.stdout.write("\n")
        sys.stdout.flush()
    else:
        print(line, flush=True)


def collect(spec: RunSpec, tail_frac: float = 0.2) -> RunResult:
    """Final evaluation, eval curve and late-training token statistics of a finished run."""
    rows = read_metrics(spec.output_dir / "metrics.jsonl")
    evals = [{"step": r["step"], **{k[5:]: v for k, v in r.items() if k.startswith("eval/")}}
             for r in rows if any(k.startswith("eval/") for k in r)]
    train_rows = [r for r in rows if "loss" in r]
    late = train_rows[int(len(train_rows) * (1 - tail_frac)) :] or train_rows
    final = dict(evals[-1]) if evals else {}
    for key in ("teacher_entropy", "gated_share", "student_entropy", "fkl", "rkl_estimate",
                *(k for k, _, _ in DIAG_COLUMNS)):
        vals = [r[key] for r in late if key in r and r[key] == r[key]]
        if vals:
            final[f"train/{key}"] = sum(vals) / len(vals)
    return RunResult(spec.objective, spec.seed, final, evals, spec.finished - spec.started)


@torch.no_grad()
def teacher_entropy_on_student_samples(teacher_path: Path, student_path: Path, task: ArithmeticConfig, prompts: int,
                                       seed: int) -> list[float]:
    """Teacher entropy at every valid position of the base student's samples on the task's held-out prompts."""
    from transformers.utils import logging as transformers_logging

    from eopd.models import aligned_vocab_size, load_causal_lm, load_tokenizer
    from eopd.prompting import encode_prompts
    from eopd.sampling import sample
    from eopd.teachers import HFTeacher

    transformers_logging.disable_progress_bar()  # two tiny models: no "Loading weights" bars in the output
    tok = load_tokenizer(student_path)
    student, teacher = load_causal_lm(student_path), load_causal_lm(teacher_path)
    vocab = aligned_vocab_size(teacher, student, tok)
    problems = ArithmeticTask(task).problems("test")[:prompts]
    r = sample(student, encode_prompts(tok, [p.prompt for p in problems], chat_template=False), n=4,
               max_new_tokens=max(40, longest_completion(task) + 8),  # 40: what the documented figures used
               eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
               generator=torch.Generator().manual_seed(seed), vocab_size=vocab)
    scores = HFTeacher(teacher, vocab, 1.0).score(r, top_k=1, want_logits=False)
    return scores.entropy_BT[r.completion_mask_BT.bool()].tolist()


def write_report(out: Path, results: list[RunResult], base: dict[str, float] | None, plan: DemoPlan,
                 command: str, seconds: float, entropies: list[float], tau: float) -> Path:
    """``report.md`` plus PNG plots: curves over steps, final pass@k against k, teacher entropy and, with several
    settings, the frontier (``frontier_section``)."""
    from eopd.world.build import config_dict

    curves = plot_curves(results, [("avg@n", "pass@1 (Avg@8)"), ("pass@8", "pass@8"),
                                   ("distinct_correct_paths", "distinct correct paths")],
                         out / "curves.png", title="held-out prompts, 8 samples at T=1; band = ±1 std over seeds")
    ks = pass_at_k_columns(results, base)
    pass_k = plot_pass_at_k(results, base, [int(h[2:]) for _, h, _ in ks], out / "pass_at_k.png",
                            title=f"world {plan.world_name}: final evaluation, mean over seeds")
    hist = plot_entropy_histogram(entropies, tau, out / "teacher_entropy.png",
                                  title="teacher entropy on base-student samples")
    lines = [
        "# eopd demo report",
        "",
        f"Command: `{command}`  ",
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}; wall time {format_duration(seconds)}.",
        "",
        f"World: `{plan.world_name}` (cache key {plan.world.key()}). {plan.description}",
        "",
        f"Each objective distils the same base student for {plan.max_steps} steps with seeds "
        f"{plan.seeds}; evaluation on {plan.eval_problems} held-out prompts (never trained on), 8 samples each at "
        "temperature 1. Mean ± std over seeds. `distinct correct paths` counts different orders of adding the "
        "terms among the correct samples of a prompt; `share of base path` is the share of correct samples that "
        "add the terms as written (`reference_path_share`). The base student's row is the mean of every run's "
        "step-0 evaluation (the same model, each run's sampling seed).",
        "",
        markdown_table(results, COLUMNS, baseline=base),
        "",
        "pass@k at the final evaluation (unbiased estimate from the 8 samples; mean ± std over seeds):",
        "",
        markdown_table(results, ks, baseline=base),
        "",
        *([f"Paired by seed against `{results[0].objective}` (same seed = same base sampling streams and data "
           "order): mean difference, its 95% t interval over seeds, and on how many seeds it was positive:",
           "", paired_table(results, results[0].objective, PAIRED_COLUMNS), ""]
          if len({r.objective for r in results}) > 1 and len({r.seed for r in results}) > 1 else []),
        "Training diagnostics, mean over the last 20% of steps (docs/metrics.md):",
        "",
        markdown_table(results, [(f"train/{k}", h, d) for k, h, d in DIAG_COLUMNS]),
        "",
        f"![curves]({curves.name})",
        "",
        f"![pass@k]({pass_k.name})",
        "",
        f"![teacher entropy]({hist.name})",
        "",
        *(frontier_section(out, results, plan.world_name) if len({r.objective for r in results}) > 1 else []),
        "## Run config",
        "",
        "```yaml",
        yaml.safe_dump({"objectives": plan.objectives, "seeds": plan.seeds, "max_steps": plan.max_steps,
                        "eval_every": plan.eval_every, "eval_problems": plan.eval_problems,
                        "train_overrides": plan.train_overrides,
                        "world": {"name": plan.world_name, "key": plan.world.key(),
                                  "config": config_dict(plan.world)}}, sort_keys=False).strip(),
        "```",
        "",
        "The recipe every run shares: `train.yaml`. Per-run metrics: `runs/<objective>/seed<k>/metrics.jsonl`; "
        "raw results: `results.json`.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(
        {"world": plan.world_name, "base": base, "runs": [r.__dict__ for r in results]}, indent=1, default=float))
    return path


def check_variants(plan: DemoPlan) -> None:
    """Validate every run's ``eopd train`` config now, with the trainer's own validator, before any world is
    built: a bad preset, key or value stops the demo with the trainer's one-line message. Also checks that
    every completion of the world fits the sampling budgets (``rollout``/``eval.max_new_tokens``).

    Raises:
        ValueError: a variant is malformed or its config is invalid (``ConfigError`` is one).
    """
    from eopd.config import TrainConfig, parse_overrides

    needed = longest_completion(plan.world.task)
    for spec in plan.objectives:
        preset, variant = parse_variant(spec)
        data = deep_merge(plan.train, parse_overrides([f"objective={preset}", *plan.train_overrides, *variant]))
        data["models"] = {"teacher": "demo/teacher", "student": "demo/student"}  # the world's, built later
        try:
            cfg = from_dict(TrainConfig, data)
            for key, budget in (("rollout", cfg.rollout.max_new_tokens), ("eval", cfg.eval.max_new_tokens)):
                require(budget >= needed, f"{key}.max_new_tokens", f"{budget} cuts off the world "
                        f"{plan.world_name!r}'s longest completion ({needed} tokens with EOS); raise it")
        except ConfigError as err:
            raise ConfigError(f"objective {spec!r}: {err}") from None


def plan_from_args(config: dict, mode: str, objectives: str | None, seeds: int | None, steps: int | None,
                   overrides: list[str], world: str | None = None) -> DemoPlan:
    """The mode's plan on ``world`` with the command line's changes, every run's config validated."""
    plan = plan_for(mode, config, world)
    if objectives:
        plan.objectives = split_objectives(objectives)
    if seeds:
        plan.seeds = list(range(seeds))
    if steps:
        plan.max_steps = steps
        plan.eval_every = max(1, steps // 5)
    plan.train_overrides += overrides
    check_variants(plan)
    return plan


def run_demo(plan: DemoPlan, out: Path, *, workers: int, cache_dir: str | None, command: str) -> Path:
    """The demo driver (see module docstring); returns the report's path."""
    from eopd.world.build import build_world

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    print(f"[demo] world {plan.world_name!r}: building or loading teacher and base student (cache key "
          f"{plan.world.key()})", flush=True)
    # One thread: two OpenMP threads slow down 40-60x as soon as anything else is busy on a 2-core machine
    # (measured), while one thread costs ~1.8x on an idle one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher, student, _ = build_world(plan.world, cache_dir, log=lambda m: print(f"[demo] {m}", flush=True))
    finally:
        torch.set_num_threads(threads)
    train_yaml = out / "train.yaml"
    train_yaml.write_text(yaml.safe_dump(plan.train, sort_keys=False))

    specs = [RunSpec(o, s, out / "runs" / run_folder(o) / f"seed{s}") for o in plan.objectives for s in plan.seeds]
    commands = {s.name: _train_command(s, plan, teacher, student, train_yaml) for s in specs}
    print(f"[demo] {len(specs)} runs x {plan.max_steps} steps, {workers} at a time", flush=True)
    run_all(specs, commands, workers, plan.max_steps)
    results = [collect(s) for s in specs]
    base = _base_metrics(results)
    tau = float(plan.train.get("loss", {}).get("tau", 0.8))
    entropies = teacher_entropy_on_student_samples(teacher, student, plan.world.task, prompts=64, seed=0)
    report = write_report(out, results, base, plan, command, time.perf_counter() - t0, entropies, tau)
    print(f"[demo] report: {report}  (plots: {out / 'curves.png'}, {out / 'pass_at_k.png'}, "
          f"{out / 'teacher_entropy.png'})")
    print(markdown_table(results, COLUMNS, baseline=base))
    verdicts = frontier(results)[2] if len({r.objective for r in results}) > 1 else []
    if verdicts:
        print(reach_answer(verdicts))
    return report


def _base_metrics(results: list[RunResult]) -> dict[str, float] | None:
    """The base student's evaluation: every run evaluates it at step 0 (its own sampling seed); the mean."""
    points = [p for r in results for p in r.curve if int(p["step"]) == 0]
    if not points:
        return None
    keys = [k for k in points[0] if k != "step"]
    return {k: sum(float(p.get(k, float("nan"))) for p in points) / len(points) for k in keys}
