"""Tasks: prompts with gold answers and a grader (``base.Task``), built from a config by ``build_task``."""

from eopd.tasks.base import DataError, MissingDataError, Problem, Task
from eopd.tasks.registry import build_task

__all__ = ["DataError", "MissingDataError", "Problem", "Task", "build_task"]
