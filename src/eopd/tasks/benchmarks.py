"""Math benchmarks and training sets: one row normaliser per schema, and ``load_benchmark`` over any source.

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

A file or dataset whose name is not registered gets its schema from its first row (``detect_schema``): the
MATH training set (e.g. ``hf:DigitalLearningGmbH/MATH-lighteval``: ``problem``, ``solution``, ``level``,
``type``) reads like minerva, its gold answer being the solution's last box. Rows are read through
``tasks.sources`` (Hugging Face ``datasets``); answers are graded by ``tasks.grading``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eopd.tasks.base import DataError, MissingDataError, Problem
from eopd.tasks.grading import extract_boxed
from eopd.tasks.sources import HUB_PREFIX, Row, parse_hub_source, read_hub_rows, read_json_rows

PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
PAPER_BENCHMARKS: tuple[str, ...] = ("math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench")
DATA_ENV_VAR = "EOPD_MATH_DATA"


class BenchmarkFormatError(DataError):
    """A benchmark file or row does not have the fields its schema needs; the message names row and field."""


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
    """Minerva Math and the MATH training set: the answer is the last ``\\boxed{}`` of ``solution``."""
    text = _field(row, ("problem", "question"), source, row_no)
    solution = str(_field(row, ("solution",), source, row_no))
    gold = extract_boxed(solution)
    if not gold:
        raise BenchmarkFormatError(f"{_where(source, row_no)}: field 'solution' holds no \\boxed{{}} answer")
    return _problem(
        bench, row.get("idx", row_no - 1), text, gold, source, row_no, type=row.get("type"), level=row.get("level")
    )


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


def _load_hub(text: str, split: str, schema: str | None) -> list[Problem]:
    """A Hub dataset split (``hf:owner/name[:config][[split]]``; ``split`` when the text names none)."""
    source = parse_hub_source(text, split)
    bench = source.dataset_id.rsplit("/", 1)[-1].lower()
    return problems_from_rows(read_hub_rows(source), bench, schema, str(source))


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
            all its ``.jsonl`` files), or a Hugging Face dataset id (``hf:owner/name`` or ``owner/name``,
            optionally ``hf:owner/name:config[split]``).
        data_dir: Folder holding ``<name>.jsonl`` for registry names (default: ``find_data_dir()``).
        schema: Row schema (a registry name); default the source's own name when registered, else
            detected from the first row.
        split: Dataset split for Hub ids that name none.
        limit: Keep only the first ``limit`` problems.

    Raises:
        BenchmarkFormatError: a row lacks a field its schema needs (the message names row and field).
        MissingDataError: the source names no existing file, folder or registered benchmark file (also a
            ``FileNotFoundError``).
        DataError: a file is not valid JSON/JSONL (the message names the line), or a Hub dataset cannot be
            loaded.
    """
    text = str(source)
    registry = benchmark_registry()
    name = ALIASES.get(text.lower(), text.lower())
    path = Path(text).expanduser()
    if name in registry and name != "generic" and not path.exists():
        folder = Path(data_dir).expanduser() if data_dir else find_data_dir()
        file = folder / registry[name].file if folder else None
        if file is None or not file.is_file():
            raise MissingDataError(
                f"benchmark {name!r} needs {registry[name].file} in the data folder ({folder or 'not found'}); "
                f"set ${DATA_ENV_VAR} or --data-dir to the folder holding it, or pass the file's path"
            )
        problems = problems_from_rows(read_json_rows(file), name, schema or name, str(file))
    elif path.is_file():
        bench = ALIASES.get(path.stem, path.stem)
        schema = schema or (bench if bench in registry else None)
        problems = problems_from_rows(read_json_rows(path), bench, schema, text)
    elif path.is_dir():
        bench = ALIASES.get(path.name, path.name)
        schema = schema or (bench if bench in registry else None)
        problems = [
            p for f in _folder_files(path) for p in problems_from_rows(read_json_rows(f), bench, schema, str(f))
        ]
    elif text.startswith(HUB_PREFIX) or _looks_like_hub_id(text):
        problems = _load_hub(text, split, schema)
    else:
        raise MissingDataError(
            f"benchmark {text!r} is neither a registered name ({', '.join(n for n in registry if n != 'generic')}), "
            "an existing file or folder, nor a Hub dataset id (hf:owner/name)"
        )
    return problems[:limit] if limit is not None else problems
