"""The task interface shared by the trainer, the demo and the evaluation.

A task is a list of problems (prompt text + gold answer) and a grader. Tasks whose reasoning can take
several valid paths also expose ``path_key`` so diversity (distinct correct paths) can be measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Problem:
    """One prompt with its gold answer.

    Attributes:
        id: Stable identifier (unique within a task split).
        prompt: The text given to the model (before any chat template).
        answer: The gold final answer as a string.
        meta: Free-form extra fields (benchmark, level, ...).
    """

    id: str
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """What the trainer and the evaluation need from a task."""

    name: str

    def problems(self, split: str) -> list[Problem]:
        """Problems of a split (``"train"`` or ``"test"``)."""
        ...

    def grade(self, completion: str, answer: str) -> bool:
        """Whether a completion's final answer equals the gold answer."""
        ...

    def path_key(self, completion: str) -> str | None:
        """A key naming the reasoning path a completion took (None when not applicable)."""
        ...
