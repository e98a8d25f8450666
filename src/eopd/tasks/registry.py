"""``build_task``: the task a config's ``data`` section names, with its training prompts and eval split.

The one place that maps ``DataConfig`` (``data.task``, ``data.path``, ``data.eval_path``,
``data.eval_fraction``...) onto task constructors, so the trainer, the demo and the tests build tasks the
same way. Task modules are imported on use: ``import eopd.tasks`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from eopd.tasks.base import Task
from eopd.tasks.sources import split_sources

if TYPE_CHECKING:
    from eopd.config import DataConfig


def build_task(data: DataConfig) -> Task:
    """The task named by ``data.task`` (semantics of each key: ``DataConfig``'s help text).

    - ``arithmetic``: ``ArithmeticTask(data.arithmetic)``, which holds out its own test split.
    - ``math``: training problems from ``data.path`` (comma-separated sources), eval problems from
      ``data.eval_path`` (default: the paper's six benchmarks) or a held-out ``data.eval_fraction``.
    - ``jsonl`` / ``hf``: ``PromptFileTask`` over ``data.path``, eval from ``data.eval_path`` or
      ``data.eval_fraction`` (neither: asking for the test split raises ``DataError``).

    Raises:
        ConfigError: ``data.arithmetic`` holds a bad field.
        DataError: a data source is missing or malformed (``MissingDataError`` for a missing file).
    """
    from eopd.config import ConfigError

    if data.task == "arithmetic":
        from eopd.tasks.arithmetic import ArithmeticConfig, ArithmeticTask

        try:
            return ArithmeticTask(ArithmeticConfig(**data.arithmetic))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"data.arithmetic: {err}") from err
    if data.task == "math":
        from eopd.tasks.math import MathTask

        return MathTask(
            test=split_sources(data.eval_path) if data.eval_path else None,
            train=split_sources(data.path or ""),
            eval_fraction=data.eval_fraction,
            split_seed=data.split_seed,
        )
    if data.task in ("jsonl", "hf"):
        from eopd.tasks.prompts import PromptFileTask

        return PromptFileTask(
            data.path or "",
            data.prompt_field,
            data.answer_field,
            hub=data.task == "hf",
            eval_source=data.eval_path,
            eval_fraction=data.eval_fraction,
            split_seed=data.split_seed,
        )
    raise ConfigError(f"data.task: must be arithmetic, math, jsonl or hf, got {data.task!r}")
