"""Prompts from a JSONL file or a Hugging Face dataset, with an optional gold answer per row."""

from __future__ import annotations

import json
from pathlib import Path

from eopd.tasks.base import Problem


class PromptFileTask:
    """``Task`` over a JSONL file (or HF dataset id) with a prompt field and optionally an answer field.

    Grading is exact string match of the stripped completion's last line against the answer; tasks with a
    real grader (math, arithmetic) should be used through their own classes.
    """

    name = "prompts"

    def __init__(self, source: str, prompt_field: str = "prompt", answer_field: str | None = None,
                 hf: bool = False, split: str = "train") -> None:
        self.source = source
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        rows = self._hf_rows(source, split) if hf else self._jsonl_rows(source)
        self._problems = [self._problem(i, row) for i, row in enumerate(rows)]
        if not self._problems:
            raise ValueError(f"{source!r} holds no prompts")

    @staticmethod
    def _jsonl_rows(path: str) -> list[dict]:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"prompt file {path!r} not found (data.path)")
        rows = []
        for i, line in enumerate(p.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {i} is not valid JSON ({err.msg})") from err
        return rows

    @staticmethod
    def _hf_rows(dataset_id: str, split: str) -> list[dict]:
        try:
            import datasets
        except ImportError as err:
            raise ValueError("data.task=hf needs the datasets package: pip install datasets") from err
        return list(datasets.load_dataset(dataset_id, split=split))

    def _problem(self, i: int, row: dict) -> Problem:
        if not isinstance(row, dict) or self.prompt_field not in row:
            raise ValueError(f"{self.source}: row {i + 1} has no field {self.prompt_field!r} (data.prompt_field)")
        answer = ""
        if self.answer_field is not None:
            if self.answer_field not in row:
                raise ValueError(f"{self.source}: row {i + 1} has no field {self.answer_field!r} (data.answer_field)")
            answer = str(row[self.answer_field])
        return Problem(id=str(row.get("id", i)), prompt=str(row[self.prompt_field]), answer=answer)

    def problems(self, split: str) -> list[Problem]:
        """All rows (a prompt file has one split)."""
        return list(self._problems)

    def grade(self, completion: str, answer: str) -> bool:
        """Exact match of the completion's last non-empty line."""
        lines = [ln.strip() for ln in completion.strip().splitlines() if ln.strip()]
        return bool(lines) and lines[-1] == answer.strip()

    def path_key(self, completion: str) -> str | None:
        """No notion of a path."""
        return None
