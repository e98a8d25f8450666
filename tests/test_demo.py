"""``eopd demo --quick``: CI's smoke test of the embedded default (the report's structure, and its numbers
recomputed from each run's own metrics by another route)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from eopd.tracking import read_metrics
from eopd.world.build import WorldConfig, named_world_config, world_names
from eopd.world.demo import DEMO_CONFIG, parse_variant, plan_for, plan_from_args, task_section
from eopd.world.report import RunResult, markdown_table, mean_std, paired_difference, paired_table


@pytest.mark.slow
def test_quick_demo_writes_report_and_plots(tmp_path):
    # On a world file of its own (the --world path wiring end to end): a three-term task, so this also checks
    # that the world's task, not the trainer's default, reaches every `eopd train` run; --quick shrinks the
    # world's models, not its task. Three terms keep it faster than the registered worlds.
    world_file = tmp_path / "three-terms.yaml"
    world_file.write_text("description: three terms\nworld: {task: {num_terms: 3, test_size: 100}}\n")
    out = tmp_path / "demo"
    env = {**os.environ, "EOPD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "eopd", "demo", "--world", str(world_file), "--quick", "--output-dir",
                           str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "| objective | seeds | pass@1 (Avg@8) | pass@8 | distinct correct paths /8 |" in report
    assert "| objective | seeds | " + " | ".join(f"k={k}" for k in range(1, 9)) + " |" in report
    for row in ("| base student | - |", "| opd | 1 |", "| eopd | 1 |"):
        assert row in report
    assert f"World: `{world_file}`" in report and "three terms" in report
    for png in ("curves.png", "pass_at_k.png", "teacher_entropy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((out / "train.yaml").read_text())["data"]["arithmetic"]["num_terms"] == 3
    assert "| objective | seeds | RKL logit-grad norm | FKL logit-grad norm | cos(RKL, FKL) |" in report
    configs = {run: json.loads((out / "runs" / run / "seed0" / "config.json").read_text()) for run in ("opd", "eopd")}
    for run in json.loads((out / "results.json").read_text())["runs"]:  # from each run's own metrics.jsonl
        clip = configs[run["objective"]]["optim"]["grad_clip"]
        rows = [r for r in read_metrics(out / "runs" / run["objective"] / "seed0" / "metrics.jsonl") if "loss" in r]
        late = rows[int(len(rows) * 0.8):]  # the report's "last 20% of steps"
        # one optimizer update per step: the applied clip coefficient follows from the logged pre-clip norm
        coef = sum(min(1.0, clip / (r["grad_norm"] + 1e-6)) for r in late) / len(late)
        assert run["final"]["train/diag/clip_coef"] == pytest.approx(coef, rel=1e-6)
        assert run["final"]["train/diag/grad_cos"] == pytest.approx(sum(r["diag/grad_cos"] for r in late) / len(late))
    for run in ("opd", "eopd"):  # the trainer itself says which prompts it sampled
        assert "arithmetic prompts (3 terms," in (out / "runs" / run / "seed0" / "train.log").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["world"] == str(world_file)
    assert {r["objective"] for r in results["runs"]} == {"opd", "eopd"}
    for run in results["runs"]:
        steps = [p["step"] for p in run["curve"]]
        assert steps == [0, 10, 20]
        for point in run["curve"]:
            # the unbiased pass@1..8 of the problems fix how many problems have c = 0..8 correct samples: whole
            # numbers, and pass@1 is the mean accuracy (a pass@k computed any other way gives fractions)
            problems = configs[run["objective"]]["eval"]["problems"]
            counts = correct_count_histogram([point[f"pass@{k}"] for k in range(1, 9)], problems)
            assert counts == pytest.approx(counts.round(), abs=1e-6) and counts.min() > -1e-6, counts
            assert point["avg@n"] == pytest.approx(sum(c * h for c, h in enumerate(counts.round())) / (8 * problems))
        assert run["final"] == {**run["final"], **run["curve"][-1]}  # the final evaluation is the last one
    # a second run reuses the cached world (no training message)
    proc2 = subprocess.run([sys.executable, "-m", "eopd", "demo", "--world", str(world_file), "--quick", "--output-dir",
                            str(out / "again"), "--steps", "2"], capture_output=True, text=True, timeout=600, env=env)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert "training the teacher" not in proc2.stdout and "cached at" in proc2.stdout


def correct_count_histogram(pass_at: list[float], problems: int) -> np.ndarray:
    """How many problems have c = 0..n correct samples, from the mean unbiased pass@1..n of ``problems``
    problems (``n + 1`` linear equations: the count total and ``problems * pass@k = sum_c h_c (1 - C(n - c, k)
    / C(n, k))``)."""
    n = len(pass_at)
    rows = [[1.0] * (n + 1)] + [[1 - math.comb(n - c, k) / math.comb(n, k) for c in range(n + 1)]
                                for k in range(1, n + 1)]
    return np.linalg.solve(np.array(rows), np.array([problems] + [problems * p for p in pass_at]))


def test_correct_count_histogram_tells_the_unbiased_pass_at_k_from_another() -> None:
    from eopd.evaluation.results import pass_at_k

    correct = [0, 0, 1, 3, 8, 8, 5, 2]  # 8 problems, 8 samples each
    unbiased = [sum(pass_at_k(8, c, k) for c in correct) / 8 for k in range(1, 9)]
    assert correct_count_histogram(unbiased, 8).round(9).tolist() == [2, 1, 1, 1, 0, 1, 0, 0, 2]
    naive = [sum(1 - (1 - c / 8) ** k for c in correct) / 8 for k in range(1, 9)]  # with replacement: biased
    counts = correct_count_histogram(naive, 8)
    assert abs(counts - counts.round()).max() > 1e-3


def test_modes_and_table():
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    default = plan_for("default", config)
    assert {"opd", "eopd"} <= {parse_variant(o)[0] for o in default.objectives} and len(default.seeds) >= 3
    full = plan_for("full", config)
    assert len(full.seeds) >= 5
    assert {"opd", "eopd", "mixture", "fkl"} <= {parse_variant(o)[0] for o in full.objectives}
    with pytest.raises(ValueError, match="no mode 'nope'"):
        plan_for("nope", config)
    results = [RunResult("opd", 0, {"a": 0.5}), RunResult("opd", 1, {"a": 0.7}), RunResult("eopd", 0, {"a": 0.9})]
    table = markdown_table(results, [("a", "A", 2), ("b", "B", 1)], baseline={"a": 0.1})
    assert "| opd | 2 | 0.60 ± 0.14 | - |" in table and "| eopd | 1 | 0.90 | - |" in table
    assert "| base student | - | 0.10 | - |" in table
    assert mean_std([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(1.4142135))


def test_variants_parse_and_fail_clearly(capsys):
    from eopd.commands.demo import main as cli
    from eopd.world.demo import parse_variant, run_folder, split_objectives

    assert split_objectives("opd, eopd[loss.alpha=0.5,loss.top_k=4],fkl") == [
        "opd", "eopd[loss.alpha=0.5,loss.top_k=4]", "fkl"]
    assert parse_variant("eopd[loss.alpha=0.5, loss.top_k=4]") == ("eopd", ["loss.alpha=0.5", "loss.top_k=4"])
    assert parse_variant("opd") == ("opd", [])
    assert run_folder("eopd[loss.alpha=0.5,loss.top_k=4]") == "eopd_loss.alpha=0.5_loss.top_k=4"
    with pytest.raises(ValueError, match="not key=value"):
        parse_variant("eopd[loss.alpha]")
    with pytest.raises(ValueError, match="unknown preset 'eodp'"):
        parse_variant("eodp")
    with pytest.raises(SystemExit):  # before any world is built
        cli(["--objectives", "opd,eopd[alpha", "--output-dir", "/nonexistent/x"])
    assert "expected PRESET or PRESET[key=value" in capsys.readouterr().err
    # values are checked by the trainer's own config validator, also before any world is built
    with pytest.raises(SystemExit):
        cli(["--objectives", "opd,eopd[optim.lr=-1]", "--output-dir", "/nonexistent/x"])
    assert "objective 'eopd[optim.lr=-1]': optim.lr: must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["--objectives", "opd", "--set", "rollout.nn=2", "--output-dir", "/nonexistent/x"])
    assert "unknown key 'rollout.nn'" in capsys.readouterr().err
    from pathlib import Path

    from eopd.world.demo import DemoPlan, RunSpec, _train_command

    plan = DemoPlan(["eopd[loss.alpha=0.5]"], [0], 10, 5, 8, train_overrides=["optim.lr=1e-4"])
    cmd = _train_command(RunSpec("eopd[loss.alpha=0.5]", 0, Path("o")), plan, Path("t"), Path("s"), Path("c.yaml"))
    assert "objective=eopd" in cmd and cmd[-2:] == ["optim.lr=1e-4", "loss.alpha=0.5"]


def test_base_row_is_the_mean_of_every_step0_evaluation():
    from eopd.world.demo import _base_metrics

    runs = [RunResult("opd", 0, {}, [{"step": 0, "avg@n": 0.8}, {"step": 10, "avg@n": 0.9}]),
            RunResult("eopd", 1, {}, [{"step": 0, "avg@n": 0.7}])]
    assert _base_metrics(runs) == {"avg@n": pytest.approx(0.75)}
    assert _base_metrics([RunResult("opd", 0, {}, [])]) is None


@pytest.mark.parametrize("world", world_names())
@pytest.mark.parametrize("mode", ["quick", "default", "full"])
def test_every_world_runs_every_mode_with_a_valid_recipe(world: str, mode: str) -> None:
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    plan = plan_from_args(config, mode, None, None, None, [], world)  # every run's config validated
    cfg = named_world_config(world)
    assert plan.world_name == world and plan.world.task == cfg.task and plan.description
    assert plan.train["data"]["arithmetic"] == task_section(cfg)  # eopd train samples this world's prompts
    quick_teacher = config["modes"]["quick"]["world"]["teacher"]["hidden_size"]
    assert (plan.world.teacher.hidden_size == quick_teacher) == (mode == "quick")  # --quick: tiny models only
    if mode != "quick":
        assert plan.world == cfg


def test_default_world_is_the_configs_and_the_world_flag_wins() -> None:
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    assert config["world"] == "multi-path"  # the paper's setting (docs/evidence.md)
    assert plan_for("default", config).world == named_world_config(config["world"]) != WorldConfig()
    assert plan_for("default", {**config, "world": "capability-gap"}).world_name == "capability-gap"
    assert plan_for("default", config, "capability-gap").world == named_world_config("capability-gap") == WorldConfig()


def test_world_flag_wiring_and_one_line_errors(tmp_path, capsys, monkeypatch) -> None:
    import eopd.world.demo
    from eopd.commands.demo import main as cli
    from eopd.world.demo import RunSpec, _train_command

    plans = []
    monkeypatch.setattr(eopd.world.demo, "run_demo", lambda plan, out, **kw: plans.append((plan, kw)))
    assert cli(["--world", "multi-path", "--quick", "--output-dir", str(tmp_path / "o"), "--cache-dir", "C"]) == 0
    (plan, kw), = plans
    assert plan.world_name == "multi-path" and kw["cache_dir"] == "C"
    assert kw["command"] == f"eopd demo --world multi-path --quick --output-dir {tmp_path / 'o'} --cache-dir C"
    assert plan.world.task == named_world_config("multi-path").task and len(plan.seeds) == 1
    cmd = _train_command(RunSpec("opd", 0, tmp_path / "r"), plan, tmp_path / "t", tmp_path / "s", tmp_path / "c.yaml")
    assert f"models.teacher={tmp_path / 't'}" in cmd and "objective=opd" in cmd
    for argv, needles in [
        (["--world", "multipath"], ["unknown world 'multipath'", *world_names()]),
        (["--quick", "--set", "rollout.max_new_tokens=8"], ["rollout.max_new_tokens: 8 cuts off", "raise it"]),
        (["--config", str(tmp_path / "missing.yaml")], ["not found"]),
    ]:
        with pytest.raises(SystemExit):
            cli([*argv, "--output-dir", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("eopd demo: error: ") and all(n in err[-1] for n in needles), err
    bad = tmp_path / "demo.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(DEMO_CONFIG.read_text()), "modes": {"quick": {"seeds": 1}}}))
    with pytest.raises(SystemExit):
        cli(["--config", str(bad), "--quick"])
    assert "modes.quick" in capsys.readouterr().err  # a mode missing its fields is named, not a KeyError
    assert not plans[1:] and not (tmp_path / "x").exists()


def test_pass_at_k_table_columns_and_plot(tmp_path) -> None:
    from eopd.world.report import pass_at_k_columns, plot_pass_at_k

    runs = [RunResult("opd", s, {"avg@n": 0.5, **{f"pass@{k}": 0.5 + 0.04 * k + 0.01 * s for k in range(1, 11)}})
            for s in range(2)]
    cols = pass_at_k_columns(runs, {"pass@1": 0.4, "pass@2": 0.5})
    assert [c[0] for c in cols] == [f"pass@{k}" for k in range(1, 11)]  # numeric order: 10 after 9
    table = markdown_table(runs, cols, baseline={"pass@1": 0.4})
    assert "| base student | - | 0.400 | - |" in table and "| opd | 2 | 0.545 ± 0.007 |" in table
    png = plot_pass_at_k(runs, {"pass@1": 0.4}, list(range(1, 11)), tmp_path / "k.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_difference_by_seed_with_a_t_interval() -> None:
    runs = [RunResult("opd", s, {"x": v}) for s, v in enumerate([0.5, 0.6, 0.55, 0.9])]
    runs += [RunResult("eopd", s, {"x": v}) for s, v in enumerate([0.6, 0.65, 0.7])]  # seed 3 has no pair
    p = paired_difference(runs, "opd", "eopd", "x")
    # differences 0.10, 0.05, 0.15: mean 0.10, sd 0.05, t(0.975, 2) = 4.303 -> half-width 0.1242
    assert p is not None and (p.seeds, p.wins) == (3, 3)
    assert p.mean == pytest.approx(0.10) and p.high - p.mean == pytest.approx(4.303 * 0.05 / 3**0.5, rel=1e-6)
    assert paired_table(runs, "opd", [("x", "X", 3)]).splitlines()[-1] == "| eopd | +0.100 [-0.024, +0.224] (3/3) |"
    assert paired_difference(runs[:1] + runs[4:5], "opd", "eopd", "x") is None  # one shared seed: no interval
