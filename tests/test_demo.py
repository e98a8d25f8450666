"""``eopd demo --quick``: CI's smoke test of the embedded default (structure of the report, not numbers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from eopd.demo import parse_variant, plan_for
from eopd.report import RunResult, markdown_table, mean_std


@pytest.mark.slow
def test_quick_demo_writes_report_and_plots(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "EOPD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "eopd", "demo", "--quick", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "| objective | seeds | pass@1 (Avg@8) | pass@8 | distinct correct paths /8 |" in report
    for row in ("| base student | - |", "| opd | 1 |", "| eopd | 1 |"):
        assert row in report
    assert "Command: `eopd demo --quick" in report
    for png in ("curves.png", "teacher_entropy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert {r["objective"] for r in results["runs"]} == {"opd", "eopd"}
    for run in results["runs"]:
        steps = [p["step"] for p in run["curve"]]
        assert steps == [0, 10, 20]
        assert 0.0 <= run["final"]["avg@n"] <= 1.0 and 0.0 <= run["final"]["pass@8"] <= 1.0
        assert run["final"]["pass@8"] >= run["final"]["avg@n"]
    # a second run reuses the cached world (no training message)
    proc2 = subprocess.run([sys.executable, "-m", "eopd", "demo", "--quick", "--output-dir", str(out / "again"),
                            "--steps", "2"], capture_output=True, text=True, timeout=600, env=env)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert "training the teacher" not in proc2.stdout and "cached at" in proc2.stdout


def test_modes_and_table():
    import yaml

    from eopd.demo import DEMO_CONFIG

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
    from eopd.demo import parse_variant, run_folder, split_objectives

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

    from eopd.demo import DemoPlan, RunSpec, _train_command

    plan = DemoPlan(["eopd[loss.alpha=0.5]"], [0], 10, 5, 8, train_overrides=["optim.lr=1e-4"])
    cmd = _train_command(RunSpec("eopd[loss.alpha=0.5]", 0, Path("o")), plan, Path("t"), Path("s"), Path("c.yaml"))
    assert "objective=eopd" in cmd and cmd[-2:] == ["optim.lr=1e-4", "loss.alpha=0.5"]


def test_base_row_is_the_mean_of_every_step0_evaluation():
    from eopd.demo import _base_metrics

    runs = [RunResult("opd", 0, {}, [{"step": 0, "avg@n": 0.8}, {"step": 10, "avg@n": 0.9}]),
            RunResult("eopd", 1, {}, [{"step": 0, "avg@n": 0.7}])]
    assert _base_metrics(runs) == {"avg@n": pytest.approx(0.75)}
    assert _base_metrics([RunResult("opd", 0, {}, [])]) is None
