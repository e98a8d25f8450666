"""``MathTask``: math problems as a ``Task``, binding the benchmark loaders to the math-verify grader.

The data side (schemas, files, Hub datasets) lives in ``tasks.benchmarks`` and the grading in
``tasks.grading``; this file decides which sources feed which split:

- ``problems("train")``: the training sources (e.g. ``hf:DigitalLearningGmbH/MATH-lighteval``, a local
  ``.jsonl``), the prompts the student is distilled on;
- ``problems("test")``: the eval sources (default: the paper's six benchmarks), or, with ``eval_fraction``,
  a seeded share of the training problems held out and never trained on (``tasks.splits.hold_out``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from eopd.tasks.base import DataError, Problem
from eopd.tasks.benchmarks import PAPER_BENCHMARKS, load_benchmark
from eopd.tasks.grading import grade
from eopd.tasks.splits import hold_out

SPLITS = ("train", "test")


class MathTask:
    """Math benchmarks as a ``Task``: training prompts, an eval split, math-verify grading.

    Args:
        test: Sources of ``problems("test")`` (see ``load_benchmark``); default the paper's six benchmarks,
            or none when ``eval_fraction`` is given.
        train: Sources of ``problems("train")`` (benchmark names, ``.jsonl``/``.json`` files, folders,
            ``hf:owner/name`` datasets).
        data_dir: Folder holding registered benchmark files.
        limit: Keep the first ``limit`` problems of each source.
        timeout_s: math-verify timeout per grading step.
        eval_fraction: Hold out this share (0 < f < 1) of the training problems as the test split instead.
        split_seed: Seed of that hold-out.
    """

    name = "math"

    def __init__(
        self,
        test: Sequence[str] | None = None,
        train: Sequence[str] = (),
        *,
        data_dir: str | Path | None = None,
        limit: int | None = None,
        timeout_s: int = 5,
        eval_fraction: float | None = None,
        split_seed: int = 0,
    ) -> None:
        for arg, value in (("test", test), ("train", train)):
            if isinstance(value, str):
                raise TypeError(f"MathTask({arg}=...) takes a list of sources, not the string {value!r}")
        if eval_fraction is not None and (test is not None or not train):
            raise ValueError("eval_fraction holds out training problems: give train sources and no test sources")
        test = () if eval_fraction is not None else PAPER_BENCHMARKS if test is None else test
        self.sources = {"test": list(test), "train": list(train)}
        self.data_dir = data_dir
        self.limit = limit
        self.timeout_s = timeout_s
        self.eval_fraction = eval_fraction
        self.split_seed = split_seed
        self._cache: dict[str, list[Problem]] = {}

    def _read(self, split: str) -> list[Problem]:
        if not self.sources[split]:
            raise DataError(f"MathTask has no {split!r} sources; pass {split}=[...] (files or benchmark names)")
        # a Hub source naming no [split] gives its split of this name: the Hub's train split trains
        load = [load_benchmark(s, data_dir=self.data_dir, split=split, limit=self.limit) for s in self.sources[split]]
        return [p for problems in load for p in problems]

    def problems(self, split: str) -> list[Problem]:
        """All problems of a split, source after source (``meta["benchmark"]`` names each one's)."""
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if split not in self._cache:
            if self.eval_fraction is not None:
                where = ", ".join(self.sources["train"])
                self._cache["train"], self._cache["test"] = hold_out(
                    self._read("train"), self.eval_fraction, self.split_seed, where
                )
            else:
                self._cache[split] = self._read(split)
        return self._cache[split]

    def describe(self) -> str:
        """Where each split comes from, e.g. ``"train: 7,500 problems from hf:...; eval: 500 held out (...)"``.

        Loads the training split; the eval split's size is given once it is loaded (else its sources).
        """
        train = f"train: {len(self.problems('train')):,} problems from {', '.join(self.sources['train'])}"
        if self.eval_fraction is not None:
            held = len(self.problems("test"))
            return f"{train}; eval: {held:,} held out (fraction {self.eval_fraction}, seed {self.split_seed})"
        sources = ", ".join(self.sources["test"])
        if "test" in self._cache:
            return f"{train}; eval: {len(self._cache['test']):,} problems from {sources}"
        return f"{train}; eval: {sources} (loaded at the first evaluation)"

    def grade(self, completion: str, answer: str) -> bool:
        """Math-verify equivalence of the completion's last boxed answer and the gold answer."""
        return grade(completion, answer, timeout_s=self.timeout_s)
