"""Math benchmarks: one loader per benchmark, a boxed-answer extractor and a math-verify grader.

Every benchmark's rows are normalised to ``Problem(id, prompt, answer, meta)`` where ``prompt`` is the
problem text followed by the paper's zero-shot instruction (``PROMPT_SUFFIX``) and ``answer`` is the gold
final answer as a LaTeX-ish string. The schemas differ:

=============  =====================================================================================
benchmark      row fields used
=============  =====================================================================================
math500        ``problem``, ``answer`` (``unique_id``, ``subject``, ``level`` kept in ``meta``)
aime24         ``problem``, ``answer`` (``id``)
aime25         ``problem`` (instruction already appended), ``answer``
amc23          ``question`` (or ``problem``), ``answer`` as a float (``27.0`` -> ``"27"``)
minerva        ``problem``, ``solution`` whose last ``\\boxed{}`` is the answer (``idx``, ``type``)
olympiadbench  ``question`` (+ ``context``), ``final_answer`` (a list), ``is_multiple_answer``, ``unit``
gsm8k          ``question``, ``answer`` ending in ``#### N``
=============  =====================================================================================

Grading (``grade``) takes the last ``\\boxed{...}`` of a completion (nested braces, ``\\boxed 5``,
``\\fbox``) and compares it with the gold answer through math-verify's ``parse``/``verify`` under a
timeout: math-verify's own ``signal.alarm`` timeouts in the main thread, a wall-clock deadline on a helper
thread in any other thread (signals only reach the main thread).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eopd.tasks.base import Problem

PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
PAPER_BENCHMARKS: tuple[str, ...] = ("math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench")
DATA_ENV_VAR = "EOPD_MATH_DATA"
MAX_ANSWER_CHARS = 1000  # longer "answers" are graded wrong without parsing (regexes are not interruptible)
NUMERIC_REL_TOL = 1e-6  # plain-number answers: equal within this relative tolerance

Row = dict[str, Any]
logger = logging.getLogger(__name__)


class BenchmarkFormatError(ValueError):
    """A benchmark file or row does not have the fields its schema needs; the message names row and field."""


# --------------------------------------------------------------------------------------------------------
# answer extraction and grading
# --------------------------------------------------------------------------------------------------------


def _balanced_group(text: str, open_at: int) -> str | None:
    """The contents of the ``{...}`` group whose ``{`` is at ``open_at`` (None when it never closes)."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif text[i] == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\framebox{...}``) in ``text``.

    Handles nested braces (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``) and the brace-less form
    ``\\boxed 5`` (the token up to the next whitespace or ``$``). A last box that never closes (a
    truncated completion) gives None rather than an earlier box: the model did not finish its answer.

    Args:
        text: A completion (or a reference solution).

    Returns:
        The stripped box content, or None when there is no (complete) box.
    """
    matches = list(re.finditer(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])", text))
    if not matches:
        return None
    end = matches[-1].end()
    rest = text[end:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        content = _balanced_group(text, end + len(rest) - len(stripped))
        return None if content is None else content.strip()
    if rest[:1].isspace() and stripped:
        token = re.match(r"[^\s$]+", stripped)
        return token.group(0).rstrip(".") if token else None
    return None


def _normalise_answer(answer: str) -> str:
    """Light normalisation before math-verify: dollars, ``1,000``-style thousands, ``4.5e33`` notation."""
    answer = answer.strip().replace("\\$", "").replace("$", "").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", answer):
        answer = answer.replace(",", "")
    sci = re.fullmatch(r"(-?\d+(?:\.\d*)?)[eE]([+-]?\d+)", answer)
    if sci:
        answer = f"{sci.group(1)} \\times 10^{{{int(sci.group(2))}}}"
    return answer


def numeric_literal(answer: str) -> float | None:
    """The value of a plain number answer (``-1.5``, ``2.88e-19``, ``4.5 \\times 10^{33}``, ``10^{-3}``).

    Such answers are compared with a relative tolerance instead of math-verify, whose fixed 6-decimal
    rounding would equate any two numbers below 5e-7 (Minerva's physical constants).
    """
    text = _normalise_answer(answer).replace(" ", "")
    num = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
    times = r"(?:\\times|\\cdot|\*)"
    if re.fullmatch(num, text):
        return float(text)
    m = re.fullmatch(rf"({num}){times}10\^\{{?([-+]?\d+)\}}?", text)
    if m:
        return float(m.group(1)) * 10.0 ** int(m.group(2))
    m = re.fullmatch(r"10\^\{?([-+]?\d+)\}?", text)
    return 10.0 ** int(m.group(1)) if m else None


@functools.lru_cache(maxsize=1)
def _extraction_config() -> tuple:
    """math-verify extraction targets: a LaTeX box first, then a plain expression."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def _parse(answer: str, timeout_s: int | None) -> list:
    """math-verify ``parse`` of one bare answer (wrapped in a box so the LaTeX extractor takes all of it)."""
    from math_verify import parse

    return parse(
        "\\boxed{" + _normalise_answer(answer) + "}",
        extraction_config=list(_extraction_config()),
        parsing_timeout=timeout_s,
    )


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout_s: int | None) -> tuple:
    """Parsed gold answers are cached: each gold is compared with ``n`` samples."""
    return tuple(_parse(gold, timeout_s))


def answers_match_unguarded(pred: str, gold: str, timeout_s: int | None = 5) -> bool:
    """Whether two bare answers are equivalent per math-verify (``timeout_s=None`` disables its alarms).

    Must run in a process's main thread unless ``timeout_s`` is None (math-verify uses ``signal.alarm``).
    """
    from math_verify import verify

    if len(pred) > MAX_ANSWER_CHARS:
        return False
    timeout_s = None if timeout_s is None else max(1, int(timeout_s))  # signal.alarm takes whole seconds
    gold_value, pred_value = numeric_literal(gold), numeric_literal(pred)
    if gold_value is not None and pred_value is not None:
        return math.isclose(gold_value, pred_value, rel_tol=NUMERIC_REL_TOL)
    gold_parsed = list(_parse_gold(gold, timeout_s))
    pred_parsed = _parse(pred, timeout_s)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))


def call_with_deadline(fn: Callable[..., Any], args: tuple, deadline_s: float, default: Any) -> Any:
    """Run ``fn(*args)`` in a daemon thread; ``default`` if it has not returned after ``deadline_s`` seconds.

    Used where signal-based timeouts cannot work (any thread but the main one). A call that overruns is
    abandoned, not killed: it finishes in the background (daemon threads never block interpreter exit),
    so one pathological answer costs CPU but cannot stall the run. Exceptions from ``fn`` propagate.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as err:  # handed to the caller below
            box["error"] = err

    worker = threading.Thread(target=target, name="eopd-grade", daemon=True)
    worker.start()
    worker.join(timeout=deadline_s)
    if worker.is_alive():
        logger.warning("grading took longer than %.1f s; counted as wrong: %.200r", deadline_s, args)
        return default
    if "error" in box:
        raise box["error"]
    return box["value"]


def answers_match(pred: str, gold: str, *, timeout_s: int = 5) -> bool:
    """Whether a predicted final answer equals the gold one, never taking much longer than the timeout.

    In the main thread math-verify's own per-parse / per-comparison alarms apply. In any other thread (where
    signals cannot be used) the check runs with math-verify's alarms off under a wall-clock deadline of
    ``4 * timeout_s`` seconds (two parses and a comparison), see ``call_with_deadline``.

    Args:
        pred: The model's bare final answer (e.g. a box's content).
        gold: The gold answer.
        timeout_s: Seconds allowed per math-verify step (>= 1).
    """
    if threading.current_thread() is threading.main_thread():
        return answers_match_unguarded(pred, gold, timeout_s)
    return bool(call_with_deadline(answers_match_unguarded, (pred, gold, None), 4.0 * timeout_s, False))


def grade(completion: str, gold: str, *, timeout_s: int = 5) -> bool:
    """Whether a completion's last ``\\boxed{}`` answer is mathematically equal to ``gold``.

    Args:
        completion: The model's full response text.
        gold: The gold answer (a bare LaTeX / number / text answer, e.g. ``"\\frac{1}{2}"``).
        timeout_s: Per-step math-verify timeout in seconds; a pathological answer is graded wrong.

    Returns:
        True when a box exists and math-verify finds it equivalent to the gold answer.
    """
    pred = extract_boxed(completion)
    if pred is None or not pred.strip():
        return False
    return answers_match(pred, gold, timeout_s=timeout_s)


def build_prompt(problem_text: str) -> str:
    """The paper's zero-shot prompt: the problem then the boxed-answer instruction (added once)."""
    text = problem_text.strip()
    if PROMPT_SUFFIX in text:
        return text
    return f"{text}\n{PROMPT_SUFFIX}"


# --------------------------------------------------------------------------------------------------------
# row normalisers: one per benchmark
# --------------------------------------------------------------------------------------------------------


def _where(source: str, row_no: int) -> str:
    return f"{source}: row {row_no}"


def _field(row: Row, names: Sequence[str], source: str, row_no: int) -> Any:
    """The first present, non-empty field of ``names``; a ``BenchmarkFormatError`` naming them otherwise."""
    for name in names:
        value = row.get(name)
        if value is not None and value != "" and value != []:
            return value
    wanted = " or ".join(repr(n) for n in names)
    raise BenchmarkFormatError(
        f"{_where(source, row_no)}: missing field {wanted} (row has fields {sorted(row)}); "
        "fix the file or pass the benchmark's schema explicitly"
    )


def _number_text(value: Any) -> str:
    """``27.0`` -> ``"27"``, ``0.5`` -> ``"0.5"``, strings unchanged."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _problem(bench: str, row_id: Any, text: str, gold: str, source: str, row_no: int, **meta: Any) -> Problem:
    if not str(gold).strip():
        raise BenchmarkFormatError(f"{_where(source, row_no)}: the gold answer is empty")
    return Problem(
        id=f"{bench}/{row_id}",
        prompt=build_prompt(str(text)),
        answer=str(gold).strip(),
        meta={"benchmark": bench, "row": row_no, **{k: v for k, v in meta.items() if v is not None}},
    )


def _row_problem_answer(bench: str, row: Row, source: str, row_no: int) -> Problem:
    """MATH500, AIME24/25 and any generic ``problem``/``question`` + ``answer`` file."""
    text = _field(row, ("problem", "question"), source, row_no)
    gold = _number_text(_field(row, ("answer",), source, row_no))
    row_id = row.get("unique_id", row.get("id", row.get("idx", row_no - 1)))
    return _problem(bench, row_id, text, gold, source, row_no, subject=row.get("subject"), level=row.get("level"))


def _row_amc(bench: str, row: Row, source: str, row_no: int) -> Problem:
    """AMC23: ``question`` with a float ``answer``."""
    text = _field(row, ("question", "problem"), source, row_no)
    gold = _number_text(_field(row, ("answer",), source, row_no))
    return _problem(bench, row.get("id", row_no - 1), text, gold, source, row_no)


def _row_minerva(bench: str, row: Row, source: str, row_no: int) -> Problem:
    """Minerva Math: the answer is the last ``\\boxed{}`` of ``solution``."""
    text = _field(row, ("problem", "question"), source, row_no)
    solution = str(_field(row, ("solution",), source, row_no))
    gold = extract_boxed(solution)
    if not gold:
        raise BenchmarkFormatError(f"{_where(source, row_no)}: field 'solution' holds no \\boxed{{}} answer")
    return _problem(bench, row.get("idx", row_no - 1), text, gold, source, row_no, type=row.get("type"))


def _row_olympiad(bench: str, row: Row, source: str, row_no: int) -> Problem:
    """OlympiadBench: ``final_answer`` is a list of ``$...$`` strings; ``context`` precedes the question."""
    question = str(_field(row, ("question",), source, row_no))
    finals = _field(row, ("final_answer",), source, row_no)
    finals = finals if isinstance(finals, list) else [finals]
    gold = ", ".join(str(f).replace("$", "").strip().rstrip(".") for f in finals)
    context = row.get("context")
    text = f"{context}\n\n{question}" if context else question
    return _problem(
        bench,
        row.get("id", row_no - 1),
        text,
        gold,
        source,
        row_no,
        unit=row.get("unit"),
        is_multiple_answer=row.get("is_multiple_answer"),
        answer_type=row.get("answer_type"),
        subfield=row.get("subfield"),
    )


def _row_gsm8k(bench: str, row: Row, source: str, row_no: int) -> Problem:
    """GSM8K: ``answer`` is a worked solution ending in ``#### N``."""
    text = _field(row, ("question", "problem"), source, row_no)
    answer = str(_field(row, ("answer",), source, row_no))
    if "####" not in answer:
        raise BenchmarkFormatError(f"{_where(source, row_no)}: field 'answer' has no '#### N' final answer")
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return _problem(bench, row.get("idx", row_no - 1), text, gold, source, row_no)


RowLoader = Callable[[str, Row, str, int], Problem]


@dataclass(frozen=True)
class BenchmarkSpec:
    """A registered benchmark: its file name in the data folder and its row normaliser."""

    file: str
    load_row: RowLoader


def benchmark_registry() -> dict[str, BenchmarkSpec]:
    """Registered benchmarks (name -> file + row loader); ``generic`` is any problem/answer file."""
    return {
        "math500": BenchmarkSpec("math500.jsonl", _row_problem_answer),
        "aime24": BenchmarkSpec("aime24.jsonl", _row_problem_answer),
        "aime25": BenchmarkSpec("aime25.jsonl", _row_problem_answer),
        "amc23": BenchmarkSpec("amc23.jsonl", _row_amc),
        "minerva": BenchmarkSpec("minerva_math.jsonl", _row_minerva),
        "olympiadbench": BenchmarkSpec("olympiadbench.jsonl", _row_olympiad),
        "gsm8k": BenchmarkSpec("gsm8k.jsonl", _row_gsm8k),
        "generic": BenchmarkSpec("", _row_problem_answer),
    }


ALIASES: dict[str, str] = {"minerva_math": "minerva", "math": "math500", "olympiad": "olympiadbench"}


def detect_schema(row: Row) -> str:
    """Guess a file's schema from its first row's fields (used when the name is not a registered one)."""
    if "final_answer" in row:
        return "olympiadbench"
    if "answer" in row:
        return "gsm8k" if "####" in str(row["answer"]) else "generic"
    if "solution" in row:
        return "minerva"
    return "generic"  # its loader then reports the missing 'answer'


# --------------------------------------------------------------------------------------------------------
# sources: registry name, file, folder, HF dataset id
# --------------------------------------------------------------------------------------------------------


def find_data_dir(start: Iterable[Path] | None = None) -> Path | None:
    """Where the benchmark files live: ``$EOPD_MATH_DATA``, else the first ``shared/data/math`` found
    walking up from the working directory and from this file.
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    starts = list(start) if start is not None else [Path.cwd(), Path(__file__).resolve().parent]
    for base in starts:
        for folder in (base, *base.parents):
            candidate = folder / "shared" / "data" / "math"
            if candidate.is_dir():
                return candidate
    return None


def read_rows(path: Path) -> list[tuple[int, Row]]:
    """``(row number, row)`` pairs of a ``.jsonl`` (blank lines skipped) or a ``.json`` list file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise BenchmarkFormatError(f"{path}: a .json benchmark must hold a list of rows")
        items = list(enumerate(data, start=1))
    else:
        items = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((line_no, json.loads(line)))
            except json.JSONDecodeError as err:
                raise BenchmarkFormatError(f"{path}: row {line_no} is not valid JSON ({err.msg})") from err
    for row_no, row in items:
        if not isinstance(row, dict):
            raise BenchmarkFormatError(f"{path}: row {row_no} is a {type(row).__name__}, not a JSON object")
    return items


def problems_from_rows(rows: Sequence[tuple[int, Row]], bench: str, schema: str | None, source: str) -> list[Problem]:
    """Normalise rows with a schema (a registry name; detected from the first row when None)."""
    if not rows:
        raise BenchmarkFormatError(f"{source}: no rows")
    registry = benchmark_registry()
    schema = ALIASES.get(schema, schema) if schema else detect_schema(rows[0][1])
    if schema not in registry:
        raise BenchmarkFormatError(f"unknown schema {schema!r}; choose one of {', '.join(registry)}")
    load_row = registry[schema].load_row
    return [load_row(bench, row, source, row_no) for row_no, row in rows]


def _load_hf(dataset_id: str, split: str, schema: str | None) -> list[Problem]:
    """A Hugging Face dataset (``datasets`` imported lazily)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"loading the Hub dataset {dataset_id!r} needs the 'datasets' package: pip install datasets "
            "(or download its test file and pass the local .jsonl path)"
        ) from err
    ds = datasets.load_dataset(dataset_id, split=split)
    rows = [(i, dict(r)) for i, r in enumerate(ds, start=1)]
    return problems_from_rows(rows, dataset_id.rsplit("/", 1)[-1].lower(), schema, f"{dataset_id}[{split}]")


def _folder_files(folder: Path) -> list[Path]:
    """A folder's benchmark file(s): ``test.jsonl`` if present (Qwen2.5-Math layout), else every .jsonl."""
    if (folder / "test.jsonl").is_file():
        return [folder / "test.jsonl"]
    files = sorted(folder.glob("*.jsonl")) or sorted(folder.glob("*.json"))
    if not files:
        raise BenchmarkFormatError(f"folder {str(folder)!r} holds no .jsonl/.json benchmark file")
    return files


def _looks_like_hub_id(text: str) -> bool:
    """``owner/name`` that is not a (missing) local path such as ``data/x.jsonl`` or ``./x``."""
    return (
        text.count("/") == 1 and not text.startswith((".", "/", "~")) and Path(text).suffix not in (".jsonl", ".json")
    )


def load_benchmark(
    source: str | Path,
    *,
    data_dir: str | Path | None = None,
    schema: str | None = None,
    split: str = "test",
    limit: int | None = None,
) -> list[Problem]:
    """Load a benchmark as normalised problems.

    Args:
        source: A registry name (``math500``, ``aime24``, ``aime25``, ``amc23``, ``minerva``,
            ``olympiadbench``, ``gsm8k``), a ``.jsonl``/``.json`` file, a folder (its ``test.jsonl`` or
            all its ``.jsonl`` files), or a Hugging Face dataset id (``hf:owner/name`` or ``owner/name``).
        data_dir: Folder holding ``<name>.jsonl`` for registry names (default: ``find_data_dir()``).
        schema: Row schema (a registry name); default the source's own name when registered, else
            detected from the first row.
        split: Dataset split for Hub ids.
        limit: Keep only the first ``limit`` problems.

    Raises:
        BenchmarkFormatError: a row lacks a field its schema needs (the message names row and field).
        FileNotFoundError: a registry name's file is missing from the data folder.
    """
    text = str(source)
    registry = benchmark_registry()
    name = ALIASES.get(text.lower(), text.lower())
    path = Path(text).expanduser()
    if name in registry and name != "generic" and not path.exists():
        folder = Path(data_dir).expanduser() if data_dir else find_data_dir()
        file = folder / registry[name].file if folder else None
        if file is None or not file.is_file():
            raise FileNotFoundError(
                f"benchmark {name!r} needs {registry[name].file} in the data folder ({folder or 'not found'}); "
                f"set ${DATA_ENV_VAR} or --data-dir to the folder holding it, or pass the file's path"
            )
        problems = problems_from_rows(read_rows(file), name, schema or name, str(file))
    elif path.is_file():
        bench = ALIASES.get(path.stem, path.stem)
        problems = problems_from_rows(read_rows(path), bench, schema or (bench if bench in registry else None), text)
    elif path.is_dir():
        bench = ALIASES.get(path.name, path.name)
        schema = schema or (bench if bench in registry else None)
        problems = [p for f in _folder_files(path) for p in problems_from_rows(read_rows(f), bench, schema, str(f))]
    elif text.startswith("hf:") or _looks_like_hub_id(text):
        problems = _load_hf(text.removeprefix("hf:"), split, schema)
    else:
        raise FileNotFoundError(
            f"benchmark {text!r} is neither a registered name ({', '.join(n for n in registry if n != 'generic')}), "
            "an existing file or folder, nor a Hub dataset id (owner/name)"
        )
    return problems[:limit] if limit is not None else problems


class MathTask:
    """Math benchmarks as a ``Task``: test problems from benchmarks, optional training prompts, math grading.

    Args:
        test: Benchmark sources for ``problems("test")`` (see ``load_benchmark``).
        train: Sources for ``problems("train")`` (e.g. a local ``.jsonl`` of training problems).
        data_dir: Folder holding registered benchmark files.
        limit: Keep the first ``limit`` problems of each source.
        timeout_s: math-verify timeout per grading step.
    """

    name = "math"

    def __init__(
        self,
        test: Sequence[str] = PAPER_BENCHMARKS,
        train: Sequence[str] = (),
        *,
        data_dir: str | Path | None = None,
        limit: int | None = None,
        timeout_s: int = 5,
    ) -> None:
        self.sources = {"test": list(test), "train": list(train)}
        self.data_dir = data_dir
        self.limit = limit
        self.timeout_s = timeout_s
        self._cache: dict[str, list[Problem]] = {}

    def problems(self, split: str) -> list[Problem]:
        """All problems of a split, benchmark after benchmark (``meta["benchmark"]`` names each one's)."""
        if split not in self.sources:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not self.sources[split]:
            raise ValueError(f"MathTask has no {split!r} sources; pass {split}=[...] (files or benchmark names)")
        if split not in self._cache:
            self._cache[split] = [
                p for s in self.sources[split] for p in load_benchmark(s, data_dir=self.data_dir, limit=self.limit)
            ]
        return self._cache[split]

    def grade(self, completion: str, answer: str) -> bool:
        """Math-verify equivalence of the completion's last boxed answer and the gold answer."""
        return grade(completion, answer, timeout_s=self.timeout_s)

    def path_key(self, completion: str) -> str | None:
        """Math solutions have no enumerable reasoning paths."""
        return None
