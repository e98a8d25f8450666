"""Prompts from a JSONL/JSON file or a Hugging Face dataset, with an optional gold answer per row.

Rows are read through Hugging Face ``datasets`` (``tasks.sources``). The file or dataset split holds the
training prompts; the eval split is a second file or dataset (``eval_source``) or a seeded share of the
prompts held out and never trained on (``eval_fraction``), never the training prompts themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eopd.tasks.base import DataError, Problem
from eopd.tasks.sources import HUB_PREFIX, json_type_name, parse_hub_source, read_hub_rows, read_json_rows
from eopd.tasks.splits import hold_out

NO_EVAL = "none (set data.eval_path or data.eval_fraction)"
#: The longest text field a row keeps beside its prompt and answer (``PromptFileTask._meta``).
META_TEXT_MAX = 64


class PromptFileTask:
    """``Task`` over a prompt file or Hub dataset: a prompt field and optionally an answer field per row.

    Grading is exact string match of the stripped completion's last line against the answer; tasks with a
    real grader (math, arithmetic) should be used through their own classes.

    Args:
        source: The training prompts: a ``.jsonl``/``.json`` file, or a Hub dataset
            ``hf:owner/name[:config][[split]]`` (split default ``train``).
        prompt_field: The row field holding the prompt text.
        answer_field: The row field holding the gold answer (None: rows have no answer).
        hub: Read sources as Hub dataset ids even without the ``hf:`` prefix, except ``.jsonl``/``.json``
            files (``data.task: hf``).
        eval_source: A second file or dataset for ``problems("test")`` (Hub split default ``test``).
        eval_fraction: Or hold out this share (0 < f < 1) of the distinct training prompts as the test split.
        split_seed: Seed of the hold-out.

    Raises:
        MissingDataError: a file does not exist.
        DataError: a file or row is malformed, a field is missing or not text, a dataset cannot be loaded.
    """

    name = "prompts"

    def __init__(
        self,
        source: str,
        prompt_field: str = "prompt",
        answer_field: str | None = None,
        *,
        hub: bool = False,
        eval_source: str | None = None,
        eval_fraction: float | None = None,
        split_seed: int = 0,
    ) -> None:
        if eval_source is not None and eval_fraction is not None:
            raise ValueError("give eval_source or eval_fraction, not both")
        self.source = source
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.hub = hub
        train = self._load(source, "train")
        test: list[Problem] | None = None
        eval_text = NO_EVAL
        if eval_fraction is not None:
            train, test = hold_out(train, eval_fraction, split_seed, source)
            eval_text = f"{len(test):,} held out (fraction {eval_fraction}, seed {split_seed})"
        elif eval_source is not None:
            test = self._load(eval_source, "test")
            eval_text = f"{len(test):,} prompts from {eval_source}"
        self._splits: dict[str, list[Problem] | None] = {"train": train, "test": test}
        self._description = f"train: {len(train):,} prompts from {source}; eval: {eval_text}"

    def _is_hub(self, source: str) -> bool:
        return source.startswith(HUB_PREFIX) or (self.hub and Path(source).suffix not in (".jsonl", ".json"))

    def _load(self, source: str, default_split: str) -> list[Problem]:
        """The problems of one file or dataset split (Hub split ``default_split`` unless the id names one)."""
        if self._is_hub(source):
            hub = parse_hub_source(source, default_split)
            rows, label = read_hub_rows(hub), str(hub)
        else:
            rows, label = read_json_rows(source), source
        return [self._problem(index, f"{label}: row {row_no}", row) for index, (row_no, row) in enumerate(rows)]

    def _problem(self, index: int, where: str, row: dict[str, Any]) -> Problem:
        """One row as a ``Problem``; ``where`` (source and row number) starts every error message."""
        prompt = row.get(self.prompt_field)
        if prompt is None:
            raise DataError(f"{where} has no field {self.prompt_field!r} (its fields: {', '.join(sorted(row))}); "
                            "set data.prompt_field to the field that holds the prompt text")
        if not isinstance(prompt, str):
            raise DataError(f"{where}: field {self.prompt_field!r} is a JSON {json_type_name(prompt)} "
                            f"({str(prompt)[:60]}), not text; prompts must be strings")
        if not prompt.strip():
            raise DataError(f"{where}: field {self.prompt_field!r} is empty; give every row a prompt")
        answer = ""
        if self.answer_field is not None:
            value = row.get(self.answer_field)
            if value is None:
                raise DataError(f"{where} has no field {self.answer_field!r} (its fields: {', '.join(sorted(row))});"
                                " set data.answer_field to the field that holds the gold answer, or leave it unset")
            if isinstance(value, dict | list):
                raise DataError(f"{where}: field {self.answer_field!r} is a JSON {json_type_name(value)}, not a "
                                "text or number answer")
            answer = str(value)
        return Problem(id=str(row.get("id", index)), prompt=prompt, answer=answer, meta=self._meta(row))

    def _meta(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row's other short scalar fields (text up to ``META_TEXT_MAX`` characters, numbers, booleans): labels
        such as a domain, a source or a task name, which ``routing.field`` reads to pick a row's teacher. Long
        text (a worked solution) is not kept: every row stays in memory for the whole run."""
        skip = (self.prompt_field, self.answer_field)
        return {k: v for k, v in row.items() if k not in skip and (
            isinstance(v, bool | int | float) or (isinstance(v, str) and len(v) <= META_TEXT_MAX))}

    def problems(self, split: str) -> list[Problem]:
        """The training prompts (``"train"``) or the held-out / second-source eval prompts (``"test"``).

        Raises:
            DataError: ``"test"`` was asked for but the task has no eval split.
        """
        if split not in self._splits:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        problems = self._splits[split]
        if problems is None:
            raise DataError(f"{self.source} has no eval split; set data.eval_path (a second file or dataset) or "
                            "data.eval_fraction (a share of the prompts held out, e.g. 0.1)")
        return list(problems)

    def describe(self) -> str:
        """Where each split comes from, e.g. ``"train: 6,061 prompts from p.jsonl; eval: 500 held out (...)"``."""
        return self._description

    def grade(self, completion: str, answer: str) -> bool:
        """Exact match of the completion's last non-empty line."""
        lines = [ln.strip() for ln in completion.strip().splitlines() if ln.strip()]
        return bool(lines) and lines[-1] == answer.strip()
