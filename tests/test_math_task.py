"""Math benchmark loaders on the real shared test files, boxed-answer extraction, math-verify grading, MathTask."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from eopd.tasks.base import DataError, Task
from eopd.tasks.benchmarks import PROMPT_SUFFIX, BenchmarkFormatError, build_prompt, find_data_dir, load_benchmark
from eopd.tasks.grading import call_with_deadline, extract_boxed, grade, numeric_literal
from eopd.tasks.math import MathTask

DATA_DIR = find_data_dir()
needs_data = pytest.mark.skipif(DATA_DIR is None, reason="shared/data/math not found (set EOPD_MATH_DATA)")

# published test-set sizes (SOURCES.md)
ROW_COUNTS = {
    "math500": 500,
    "aime24": 30,
    "aime25": 30,
    "amc23": 40,
    "minerva": 272,
    "olympiadbench": 675,
    "gsm8k": 1319,
}


@pytest.fixture(scope="module")
def benchmarks() -> dict:
    return {name: load_benchmark(name) for name in ROW_COUNTS}


# ---------------------------------------------------------------------------------------------- loaders


@needs_data
@pytest.mark.parametrize("name", list(ROW_COUNTS))
def test_loader_reads_every_row_with_a_gold_answer(benchmarks: dict, name: str) -> None:
    problems = benchmarks[name]
    assert len(problems) == ROW_COUNTS[name]
    assert all(p.answer.strip() for p in problems), "empty gold answer"
    assert len({p.id for p in problems}) == len(problems), "ids must be unique"
    assert all(p.meta["benchmark"] == name for p in problems)
    # the instruction is present exactly once (AIME25 rows already carry it)
    assert all(p.prompt.count(PROMPT_SUFFIX) == 1 and p.prompt.endswith(PROMPT_SUFFIX) for p in problems)


@needs_data
def test_loaders_normalise_each_schema(benchmarks: dict) -> None:
    rows = {
        name: [json.loads(line) for line in (DATA_DIR / file).read_text().splitlines() if line.strip()]
        for name, file in [("amc23", "amc23.jsonl"), ("gsm8k", "gsm8k.jsonl"), ("olympiadbench", "olympiadbench.jsonl")]
    }
    # AMC23: float answers become integers' text
    assert isinstance(rows["amc23"][0]["answer"], float)
    assert benchmarks["amc23"][0].answer == str(int(rows["amc23"][0]["answer"]))
    # GSM8K: the number after '####', thousands separators removed
    assert all("####" not in p.answer and "," not in p.answer for p in benchmarks["gsm8k"])
    assert benchmarks["gsm8k"][0].answer == rows["gsm8k"][0]["answer"].rsplit("####", 1)[1].strip()
    # Minerva: the answer is the solution's last box
    assert benchmarks["minerva"][0].answer == "1.6"
    # OlympiadBench: the list's '$...$' answer unwrapped; unit and multiplicity kept in meta
    oly = benchmarks["olympiadbench"]
    assert all("$" not in p.answer for p in oly)
    multi = [p for p, r in zip(oly, rows["olympiadbench"], strict=True) if r["is_multiple_answer"]]
    assert multi and all(p.meta["is_multiple_answer"] for p in multi)
    assert any("unit" in p.meta for p in oly)
    # MATH500 keeps its unique ids and subjects
    assert benchmarks["math500"][0].id == "math500/test/precalculus/807.json"
    assert benchmarks["math500"][0].meta["subject"] == "Precalculus"


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_file_error_names_row_and_field(tmp_path: Path) -> None:
    rows = [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "4"}, {"problem": "3+3?"}]
    path = _write_jsonl(tmp_path / "mine.jsonl", rows)
    with pytest.raises(BenchmarkFormatError, match=r"row 3: missing field 'answer'"):
        load_benchmark(path)


@pytest.mark.parametrize(
    ("name", "row", "message"),
    [
        ("minerva_math.jsonl", {"problem": "x?", "solution": "it is 3"}, r"row 1: field 'solution' holds no \\boxed"),
        ("gsm8k.jsonl", {"question": "x?", "answer": "it is 3"}, r"row 1: field 'answer' has no '#### N'"),
        ("olympiadbench.jsonl", {"final_answer": ["$3$"]}, r"row 1: missing field 'question'"),
        ("amc23.jsonl", {"question": "x?", "answer": ""}, r"row 1: missing field 'answer'"),
    ],
)
def test_schema_errors(tmp_path: Path, name: str, row: dict, message: str) -> None:
    path = _write_jsonl(tmp_path / name, [row])
    with pytest.raises(BenchmarkFormatError, match=message):
        load_benchmark(path)


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n\n{not json\n')
    with pytest.raises(DataError, match="line 3 is not valid JSON"):
        load_benchmark(path)


def test_folder_and_schema_detection(tmp_path: Path) -> None:
    folder = tmp_path / "mybench"
    folder.mkdir()
    _write_jsonl(folder / "test.jsonl", [{"question": "q", "answer": "work\n#### 1,234"}])
    (problem,) = load_benchmark(folder)
    assert problem.answer == "1234"  # detected as GSM8K-style
    assert problem.meta["benchmark"] == "mybench"
    generic = _write_jsonl(tmp_path / "other.jsonl", [{"question": "q", "answer": 0.5}, {"problem": "p", "answer": 3}])
    assert [p.answer for p in load_benchmark(generic)] == ["0.5", "3"]
    assert len(load_benchmark(generic, limit=1)) == 1


def test_unknown_source_and_missing_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="neither a registered name"):
        load_benchmark("no_such_bench")
    with pytest.raises(FileNotFoundError, match="neither a registered name"):
        load_benchmark("data/missing.jsonl")  # a missing file is not mistaken for a Hub id
    monkeypatch.setenv("EOPD_MATH_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"math500\.jsonl.*EOPD_MATH_DATA"):
        load_benchmark("math500")


def test_hub_dataset_without_datasets_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_datasets(name: str, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_benchmark("hf:HuggingFaceH4/MATH-500")


def test_build_prompt_adds_the_instruction_once() -> None:
    prompt = build_prompt("What is $1+1$?")
    assert prompt == f"What is $1+1$?\n{PROMPT_SUFFIX}"
    assert build_prompt(prompt) == prompt


@needs_data
def test_math_task_is_a_task() -> None:
    task = MathTask(test=["aime24", "amc23"], limit=3)
    assert isinstance(task, Task)
    problems = task.problems("test")
    assert [p.meta["benchmark"] for p in problems] == ["aime24"] * 3 + ["amc23"] * 3
    assert task.grade(f"so \\boxed{{{problems[0].answer}}}", problems[0].answer)
    assert not task.grade("no box here", problems[0].answer)
    assert not hasattr(task, "path_key")  # no enumerable paths: no path metrics are reported
    with pytest.raises(ValueError, match="no 'train' sources"):
        task.problems("train")


# ---------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{1} first, then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("nested \\boxed{\\left(3, \\frac{\\pi}{2}\\right)}", "\\left(3, \\frac{\\pi}{2}\\right)"),
        ("the answer is $\\boxed 5$", "5"),
        ("\\fbox{42} done", "42"),
        ("$\\framebox{204}$ minutes", "204"),
        ("\\boxed {7}", "7"),
        ("no box at all", None),
        ("truncated \\boxed{\\frac{1}{2}", None),
        ("\\boxedsomething{3}", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


def test_numeric_literal() -> None:
    assert numeric_literal("2.88e-19") == pytest.approx(2.88e-19)
    assert numeric_literal("4.5 \\times 10^{33}") == pytest.approx(4.5e33)
    assert numeric_literal("1,000") == 1000.0
    assert numeric_literal("10^{-3}") == pytest.approx(1e-3)
    assert numeric_literal("\\frac{1}{2}") is None
    assert numeric_literal("x=5") is None


# ---------------------------------------------------------------------------------------------- grading


def _boxed(answer: str) -> str:
    return f"Reasoning... so the final answer is $\\boxed{{{answer}}}$."


@needs_data
@pytest.mark.parametrize("name", list(ROW_COUNTS))
def test_every_gold_answer_verifies_against_itself(benchmarks: dict, name: str) -> None:
    """Each gold answer, boxed in a completion, grades correct. Measured: no exceptions on any benchmark."""
    failures = [p.answer for p in benchmarks[name] if not grade(_boxed(p.answer), p.answer)]
    assert failures == []


@needs_data
@pytest.mark.parametrize("name", list(ROW_COUNTS))
def test_different_gold_answers_do_not_verify(benchmarks: dict, name: str) -> None:
    """A gold answer graded against the next problem's (different) gold is wrong.

    The only pair that legitimately verifies is MATH500's ``5`` vs ``x=5`` (an assignment is compared by
    its value). The first 100 problems per benchmark keep the test fast (Minerva's symbolic answers take
    ~0.1-1 s per comparison).
    """
    golds = [p.answer for p in benchmarks[name][:100]]
    pairs = [(golds[i], golds[i + 1]) for i in range(len(golds) - 1) if golds[i] != golds[i + 1]]
    false_positives = [(a, b) for a, b in pairs if grade(_boxed(a), b)]
    assert false_positives == ([("5", "x=5")] if name == "math500" else [])


EQUIVALENT = [
    ("0.5", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac12"),
    ("\\tfrac{3}{4}", "0.75"),
    ("1/3", "\\frac{1}{3}"),
    ("0.3333333", "\\frac13"),
    ("5\\text{ cm}", "5"),
    ("5 \\mathrm{~cm}", "5"),
    ("12 \\text{ km/h}", "12"),
    ("10\\%", "10"),
    ("90^\\circ", "90"),
    ("(1, 3]", "(1,3]"),
    ("[2,\\infty)", "[2, \\infty)"),
    ("x \\in (1,3]", "(1,3]"),
    ("2, 1", "1, 2"),
    ("\\{1,2\\}", "1,2"),
    ("(4,5,7), (1,8,19), (2,7,13)", "(1,8,19), (2,7,13), (4,5,7)"),
    ("Evelyn", "\\text{Evelyn}"),
    ("\\text{(C)}", "\\text{(C)}"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("x=5", "5"),
    ("27", "27.0"),
    ("1,000", "1000"),
    ("\\$18", "18"),
    ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\frac{1}{2(n+1)}", "\\frac{1}{2 n+2}"),
    ("-1", "-1.0"),
    ("1.60", "1.6"),
    ("4.5 \\times 10^{33}", "4.5e33"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
]

NOT_EQUIVALENT = [
    ("0.333", "\\frac{1}{3}"),
    ("(1,3)", "(1,3]"),
    ("3, 5", "3, 4"),
    ("(1,8,19), (2,7,13)", "(1,8,19), (2,7,13), (4,5,7)"),
    ("Bob", "\\text{Evelyn}"),
    ("(D)", "\\text{(C)}"),
    ("\\sqrt{3}", "\\sqrt{2}"),
    ("\\frac{1}{2n}", "\\frac{1}{2 n+2}"),
    ("2^{1008}", "2^{1009}"),
    ("1", "-1"),
    ("1.7", "1.6"),
    ("2.88e-19", "1.325e-27"),  # math-verify alone rounds both to 0
    ("4.4 \\times 10^{33}", "4.5e33"),
]


@pytest.mark.parametrize(("pred", "gold"), EQUIVALENT)
def test_equivalent_answers_grade_correct(pred: str, gold: str) -> None:
    assert grade(_boxed(pred), gold)


@pytest.mark.parametrize(("pred", "gold"), NOT_EQUIVALENT)
def test_different_answers_grade_wrong(pred: str, gold: str) -> None:
    assert not grade(_boxed(pred), gold)


def test_no_box_is_wrong() -> None:
    assert not grade("the answer is 2", "2")
    assert not grade("\\boxed{}", "2")


def test_grading_off_the_main_thread_gives_the_same_verdicts() -> None:
    cases = [(_boxed("0.5"), "\\frac12"), (_boxed("0.6"), "\\frac12"), (_boxed("(1,3]"), "(1,3]")]
    verdicts: list[bool] = []
    worker = threading.Thread(target=lambda: verdicts.extend(grade(c, g) for c, g in cases))
    worker.start()
    worker.join(timeout=60)
    assert verdicts == [grade(c, g) for c, g in cases] == [True, False, True]


def test_deadline_abandons_a_call_that_hangs() -> None:
    start = time.monotonic()
    assert call_with_deadline(time.sleep, (30,), 0.3, "timed out") == "timed out"
    assert time.monotonic() - start < 5
    assert call_with_deadline(sum, ([1, 2],), 5.0, None) == 3
    with pytest.raises(ZeroDivisionError):
        call_with_deadline(divmod, (1, 0), 5.0, None)
