"""Tasks: prompts with gold answers and a grader (``base.Task``)."""

from eopd.tasks.base import Problem, Task

__all__ = ["Problem", "Task"]
