"""Rows of task data read through Hugging Face ``datasets``: local JSON/JSONL files and Hub dataset ids.

The one home for turning a data source into ``(row number, row)`` pairs, shared by the math benchmarks
(``tasks.benchmarks``) and the prompt-file task (``tasks.prompts``), and for turning every way that can fail
into one ``DataError`` line that names the file and line, or the dataset id and what to check.

Source syntax:

- a local file: ``.jsonl`` (one JSON object per line; a row's number is its line number) or ``.json`` (a
  list of objects; a row's number is its position). Any other suffix is read as JSONL.
- a Hub dataset: ``hf:owner/name``, optionally with a config and a split: ``hf:openai/gsm8k:main[test]``.
- several sources (where a task accepts them): comma-separated, see ``split_sources``.

Missing fields are absent from a row (``datasets`` fills a column that only some rows have with None; those
Nones are dropped so "absent" and "null" read the same).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from eopd.tasks.base import DataError, MissingDataError

HUB_PREFIX = "hf:"
Row = dict[str, Any]
_HUB_RE = re.compile(r"(?P<id>[^:\[\]\s]+/[^:\[\]\s]+)(?::(?P<config>[^:\[\]\s]+))?(?:\[(?P<split>[^\[\]\s]+)\])?")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


@dataclass(frozen=True)
class HubSource:
    """A Hub dataset split: ``hf:<dataset_id>[:<config>][<split>]``."""

    dataset_id: str
    config: str | None
    split: str

    def __str__(self) -> str:
        config = f":{self.config}" if self.config else ""
        return f"{HUB_PREFIX}{self.dataset_id}{config}[{self.split}]"


def parse_hub_source(text: str, default_split: str) -> HubSource:
    """``hf:owner/name[:config][[split]]`` (the ``hf:`` prefix optional) -> ``HubSource``.

    Raises:
        DataError: ``text`` is not of that form.
    """
    match = _HUB_RE.fullmatch(text.strip().removeprefix(HUB_PREFIX))
    if match is None:
        raise DataError(f"{text!r} is not a Hub dataset id; write hf:owner/name, optionally with a config and a "
                        "split: hf:owner/name:config[split]")
    return HubSource(match["id"], match["config"], match["split"] or default_split)


def split_sources(text: str) -> list[str]:
    """A comma-separated source list -> its stripped entries (empty entries, e.g. a trailing comma, dropped)."""
    return [s.strip() for s in text.split(",") if s.strip()]


def _datasets() -> ModuleType:
    """The ``datasets`` package, imported on first use (it takes about a second)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("reading task data needs the 'datasets' package: pip install datasets") from err
    return datasets


@contextlib.contextmanager
def _quiet_json_builder(datasets: ModuleType) -> Iterator[None]:
    """No progress bar for a local file, and no log line from ``datasets``' JSON builder before it raises
    (that line counts rows within a block, contradicting the line number our error names)."""
    builder_log = logging.getLogger("datasets.packaged_modules.json.json")
    level, bars = builder_log.level, datasets.is_progress_bar_enabled()
    builder_log.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        builder_log.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _first_line(err: BaseException) -> str:
    text = str(err.__cause__ or err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def json_type_name(value: Any) -> str:
    """The JSON name of a parsed value's type (``object``, ``array``, ``string``, ``number``...)."""
    return _JSON_TYPES.get(type(value), "null" if value is None else type(value).__name__)


def _without_nulls(row: Row) -> Row:
    return {k: v for k, v in row.items() if v is not None}


def _jsonl_line_numbers(text: str) -> list[int]:
    """Line numbers (1-based) of the non-blank lines: the row numbers of a JSONL file."""
    return [no for no, line in enumerate(text.split("\n"), start=1) if line.strip()]


def _json_problem(path: Path, text: str) -> str | None:
    """The first structural problem of a JSON/JSONL file's text as a one-line message (None when sound).

    ``datasets``' own parse errors do not name the file's line (pyarrow counts rows within a block), so
    after a failed load the text is checked here line by line, in Python, to name it. Only on failure, or
    when the row count does not match the lines: a sound file is parsed once, by ``datasets``.
    """
    if path.suffix == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            return f"{path}: line {err.lineno} is not valid JSON ({err.msg})"
        if not isinstance(value, list):
            return (f"{path}: a .json file must hold a list of row objects, got a JSON {json_type_name(value)}; "
                    "or write a .jsonl file, one object per line")
        if not value:
            return f"{path}: holds no rows; write one JSON object per row"
        for row_no, item in enumerate(value, start=1):
            if not isinstance(item, dict):
                return f"{path}: row {row_no} is a JSON {json_type_name(item)}, not an object"
        return None
    first_type: dict[str, tuple[str, int]] = {}  # a column must keep one JSON type (pyarrow's rule)
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return f"{path}: line {line_no} is not valid JSON ({err.msg}); write one JSON object per line"
        if not isinstance(value, dict):
            return (f"{path}: line {line_no} is a JSON {json_type_name(value)}, not an object; "
                    "write one JSON object per line")
        for key, item in value.items():
            if item is None:
                continue
            kind = json_type_name(item)
            seen, seen_at = first_type.setdefault(key, (kind, line_no))
            if kind != seen:
                return (f"{path}: line {line_no}: field {key!r} is a JSON {kind} but a {seen} on line {seen_at}; "
                        "give each field one type on every line")
    return None


def _read_text(path: Path) -> str:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise MissingDataError(f"data file {str(path)!r} {what}; check the path (relative paths start at the "
                               "current directory)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from err
    if not text.strip():
        raise DataError(f"{path}: the file is empty; write one JSON object per line")
    return text


def read_json_rows(path: str | Path) -> list[tuple[int, Row]]:
    """``(row number, row)`` pairs of a local ``.jsonl`` file (row number = line number) or ``.json`` list.

    Raises:
        MissingDataError: the file does not exist.
        DataError: the file is empty, not UTF-8, or a line/row is not a JSON object (the message names it).
        ImportError: ``datasets`` is not installed.
    """
    path = Path(path).expanduser()
    text = _read_text(path)
    datasets = _datasets()
    if path.suffix == ".json" and not text.lstrip().startswith("["):
        raise DataError(_json_problem(path, text) or f"{path}: a .json file must hold a list of row objects")
    try:
        with _quiet_json_builder(datasets):
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except (datasets.exceptions.DatasetsError, ValueError, OSError) as err:
        raise DataError(_json_problem(path, text) or f"{path}: datasets cannot read it ({_first_line(err)})") from err
    numbers = _jsonl_line_numbers(text) if path.suffix != ".json" else list(range(1, len(ds) + 1))
    if len(numbers) != len(ds):  # e.g. a line holding an array of objects becomes several rows
        raise DataError(_json_problem(path, text)
                        or f"{path}: {len(ds)} rows read from {len(numbers)} lines; write one JSON object per line")
    if not numbers:
        raise DataError(f"{path}: holds no rows; write one JSON object per row")
    return [(no, _without_nulls(row)) for no, row in zip(numbers, ds, strict=True)]


def read_hub_rows(source: HubSource) -> list[tuple[int, Row]]:
    """``(row number, row)`` pairs of a Hub dataset split (row numbers from 1).

    Raises:
        DataError: the dataset, config or split cannot be loaded (unknown id, no network, offline mode...),
            or the split is empty; the message names the id and what to check.
    """
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(source.dataset_id, name=source.config, split=source.split)
    except (datasets.exceptions.DatasetsError, ValueError, OSError) as err:
        raise DataError(
            f"dataset {source} could not be loaded ({_first_line(err)}); check the dataset id, config and split "
            "and your network (HF_HUB_OFFLINE must be unset), or download it and pass a local .jsonl file"
        ) from err
    if len(ds) == 0:
        raise DataError(f"dataset {source} has no rows; check the split name")
    return [(no, _without_nulls(dict(row))) for no, row in enumerate(ds, start=1)]
