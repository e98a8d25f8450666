"""The task interface shared by the trainer, the demo and the evaluation.

A task is a list of problems (prompt text + gold answer) and a grader. Tasks whose reasoning can take
several valid paths also expose ``path_key`` so diversity (distinct correct paths) can be measured.
Bad task data (a missing file, a malformed row, an unreachable dataset) raises ``DataError``: one line that
names the source, the row and field, and the fix, which the command line prints without a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from eopd.errors import UserError


class DataError(UserError, ValueError):
    """Task data is unusable; the one-line message names the source, the row/field and how to fix it."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file, folder or benchmark named by the user does not exist (also a ``FileNotFoundError``)."""


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

    def describe(self) -> str:
        """One line for the run log: where the train and eval prompts come from and how many there are."""
        ...


# Optional methods a task may add (looked up with getattr by the evaluation):
#   answer_of(completion) -> str | None           the stated final answer (distinct answers)
#   path_key(completion, problem) -> str | None   the reasoning path of a completion that faithfully solves
#       problem, else None; one definition for teacher and student rows (docs/metrics.md, "Paths"); tasks
#       without enumerable paths (math) leave it out and no path metric is reported
#   reference_path(problem) -> str                the base student's path (reference_path_share)
#   token_roles(tokenizer, token_ids) -> list[str]  a role per completion token (entropy by role)
