"""``build_task`` from a config's data section: the training prompts, a held-out eval split that never overlaps
them, the MATH training-set schema, Hub ids with config and split, and each task's one-line ``describe()``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest

from eopd.config import DataConfig, from_dict
from eopd.tasks import DataError, Task, build_task
from eopd.tasks.benchmarks import PAPER_BENCHMARKS, PROMPT_SUFFIX, find_data_dir
from eopd.tasks.sources import HubSource, parse_hub_source, split_sources

needs_data = pytest.mark.skipif(find_data_dir() is None, reason="shared/data/math not found (set EOPD_MATH_DATA)")

# rows shaped like hf:DigitalLearningGmbH/MATH-lighteval: no 'answer', the gold is the solution's last box
MATH_TRAIN_ROWS = [
    {"problem": "What is $1+1$?", "solution": "First \\boxed{3} was a typo; so $\\boxed{2}$.", "level": "Level 1",
     "type": "Prealgebra"},
    {"problem": "Simplify $\\frac{2}{4}$.", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 2",
     "type": "Algebra"},
    {"problem": "Solve $x^2=4$, $x>0$.", "solution": "So $x=\\boxed{2}$.", "level": "Level 1", "type": "Algebra"},
]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prompt_rows(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    return [{"prompt": f"{prefix}{i}", "answer": str(i)} for i in range(n)]


def _data(**fields: Any) -> DataConfig:
    """A DataConfig as a YAML config would give it (type checks included)."""
    return from_dict(DataConfig, fields, prefix="data.")


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``datasets.load_dataset`` answering Hub ids from ``hub["rows"]`` (local JSON files still read for real)."""
    real = datasets.load_dataset
    hub: dict[str, Any] = {"rows": {}, "calls": []}

    def load_dataset(path: str, *args: Any, **kwargs: Any) -> datasets.Dataset:
        if path == "json":
            return real(path, *args, **kwargs)
        hub["calls"].append((path, kwargs.get("name"), kwargs.get("split")))
        return datasets.Dataset.from_list(hub["rows"][path, kwargs.get("split")])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return hub


# ---------------------------------------------------------------------------------------------- task: math


def test_math_config_trains_on_path_and_evaluates_on_eval_path(tmp_path: Path) -> None:
    """Old bug: data.path (a string) went to MathTask(test=...) and was iterated character by character."""
    train = _write_jsonl(tmp_path / "math_train.jsonl", MATH_TRAIN_ROWS)
    held = _write_jsonl(tmp_path / "held.jsonl", [{"problem": "2+3?", "answer": "5"}])
    extra = _write_jsonl(tmp_path / "extra.jsonl", [{"question": "4+4?", "answer": 8}])
    task = build_task(_data(task="math", path=str(train), eval_path=f"{held}, {extra}"))
    assert isinstance(task, Task)
    assert task.describe() == f"train: 3 problems from {train}; eval: {held}, {extra} (loaded at the first evaluation)"
    problems = task.problems("train")
    assert [p.answer for p in problems] == ["2", "\\frac{1}{2}", "2"]  # each solution's LAST box
    assert [p.meta["level"] for p in problems] == [r["level"] for r in MATH_TRAIN_ROWS]
    assert all(p.prompt.endswith(PROMPT_SUFFIX) for p in problems)
    assert [(p.prompt.split("\n")[0], p.answer) for p in task.problems("test")] == [("2+3?", "5"), ("4+4?", "8")]
    assert task.describe().endswith(f"eval: 2 problems from {held}, {extra}")
    assert task.grade("so \\boxed{0.5}", problems[1].answer)


@needs_data
def test_math_eval_defaults_to_the_paper_benchmarks(tmp_path: Path) -> None:
    task = build_task(_data(task="math", path=str(_write_jsonl(tmp_path / "t.jsonl", MATH_TRAIN_ROWS))))
    assert [p.meta["benchmark"] for p in task.problems("train")] == ["t"] * 3
    assert list(dict.fromkeys(p.meta["benchmark"] for p in task.problems("test"))) == list(PAPER_BENCHMARKS)


def test_math_training_set_from_the_hub(fake_hub: dict[str, Any]) -> None:
    fake_hub["rows"]["DigitalLearningGmbH/MATH-lighteval", "train"] = MATH_TRAIN_ROWS
    fake_hub["rows"]["DigitalLearningGmbH/MATH-lighteval", "test"] = MATH_TRAIN_ROWS[:1]
    task = build_task(_data(task="math", path="hf:DigitalLearningGmbH/MATH-lighteval",
                            eval_path="hf:DigitalLearningGmbH/MATH-lighteval[test]"))
    assert [p.answer for p in task.problems("train")] == ["2", "\\frac{1}{2}", "2"]
    assert [p.answer for p in task.problems("test")] == ["2"]
    assert fake_hub["calls"] == [("DigitalLearningGmbH/MATH-lighteval", None, "train"),
                                 ("DigitalLearningGmbH/MATH-lighteval", None, "test")]


def test_math_eval_fraction_holds_out_training_problems(tmp_path: Path) -> None:
    rows = [{"problem": f"p{i}?", "answer": str(i)} for i in range(40)]
    task = build_task(_data(task="math", path=str(_write_jsonl(tmp_path / "t.jsonl", rows)), eval_fraction=0.25))
    train, test = task.problems("train"), task.problems("test")
    assert len(test) == 10 and len(train) == 30
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert task.describe().endswith("eval: 10 held out (fraction 0.25, seed 0)")


# ---------------------------------------------------------------------------------------------- task: jsonl / hf


def test_prompt_file_is_read_through_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    path = _write_jsonl(tmp_path / "p.jsonl", _prompt_rows(3))
    task = build_task(_data(task="jsonl", path=str(path), answer_field="answer", eval_fraction=0.34))
    assert calls == [(("json",), {"data_files": str(path), "split": "train"})]
    assert sorted(p.prompt for p in task.problems("train") + task.problems("test")) == ["q0", "q1", "q2"]


def test_eval_fraction_gives_disjoint_reproducible_splits(tmp_path: Path) -> None:
    """Old bug: every split returned the same rows, so periodic evaluation ran on training prompts."""
    rows = _prompt_rows(50)
    rows += [dict(rows[3]), dict(rows[7])]  # repeated prompts must not straddle the split
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    task = build_task(_data(task="jsonl", path=str(path), eval_fraction=0.2, split_seed=3))
    train, test = task.problems("train"), task.problems("test")
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert len(train) + len(test) == len(rows)
    assert len({p.prompt for p in test}) == 10  # 20% of the 50 distinct prompts
    again = build_task(_data(task="jsonl", path=str(path), eval_fraction=0.2, split_seed=3))
    assert [p.prompt for p in again.problems("test")] == [p.prompt for p in test]
    other = build_task(_data(task="jsonl", path=str(path), eval_fraction=0.2, split_seed=4))
    assert {p.prompt for p in other.problems("test")} != {p.prompt for p in test}
    held = f"{len(test)} held out (fraction 0.2, seed 3)"
    assert task.describe() == f"train: {len(train)} prompts from {path}; eval: {held}"


def test_eval_path_is_a_second_file(tmp_path: Path) -> None:
    train = _write_jsonl(tmp_path / "train.jsonl", _prompt_rows(1200))
    held = _write_jsonl(tmp_path / "held.jsonl", _prompt_rows(4, prefix="e"))
    task = build_task(_data(task="jsonl", path=str(train), eval_path=str(held)))
    assert [p.prompt for p in task.problems("test")] == ["e0", "e1", "e2", "e3"]
    assert len(task.problems("train")) == 1200
    assert task.describe() == f"train: 1,200 prompts from {train}; eval: 4 prompts from {held}"


def test_no_eval_split_is_an_error_naming_both_keys(tmp_path: Path) -> None:
    task = build_task(_data(task="jsonl", path=str(_write_jsonl(tmp_path / "p.jsonl", _prompt_rows(3)))))
    assert len(task.problems("train")) == 3
    with pytest.raises(DataError, match=r"no eval split; set data\.eval_path .* or data\.eval_fraction"):
        task.problems("test")
    assert "eval: none" in task.describe()


def test_hf_task_reads_train_and_test_splits(fake_hub: dict[str, Any]) -> None:
    fake_hub["rows"]["me/prompts", "train"] = _prompt_rows(5)
    fake_hub["rows"]["me/prompts", "test"] = _prompt_rows(2, prefix="e")
    fake_hub["rows"]["me/prompts", "dev"] = _prompt_rows(1, prefix="d")
    task = build_task(_data(task="hf", path="me/prompts", eval_path="me/prompts", answer_field="answer"))
    assert [p.prompt for p in task.problems("test")] == ["e0", "e1"]
    assert [p.answer for p in task.problems("train")] == ["0", "1", "2", "3", "4"]
    other = build_task(_data(task="hf", path="hf:me/prompts[test]", eval_path="hf:me/prompts:cfg[dev]"))
    assert [p.prompt for p in other.problems("train")] == ["e0", "e1"]
    assert fake_hub["calls"][-1] == ("me/prompts", "cfg", "dev")


# ---------------------------------------------------------------------------------------------- source syntax


def test_hub_source_syntax() -> None:
    assert parse_hub_source("hf:a/b", "train") == HubSource("a/b", None, "train")
    assert parse_hub_source("a/b:main[test]", "train") == HubSource("a/b", "main", "test")
    assert str(parse_hub_source("hf:openai/gsm8k:main", "test")) == "hf:openai/gsm8k:main[test]"
    with pytest.raises(DataError, match="not a Hub dataset id"):
        parse_hub_source("hf:no-slash", "train")
    assert split_sources(" math500, a.jsonl ,") == ["math500", "a.jsonl"]
