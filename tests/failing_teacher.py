"""``eopd train`` whose teacher fails for good on one process only, at one step (a test launcher).

``tests/test_process_failures.py`` runs it under ``torchrun --nproc_per_node 2``:

    torchrun --standalone --nproc_per_node 2 tests/failing_teacher.py FAIL_RANK FAIL_STEP CONFIG [key=value ...]

Every process builds the run as ``eopd train`` does; on process ``FAIL_RANK`` the teacher's ``score`` raises
``TeacherUnavailableError`` at its ``FAIL_STEP``-th call (one call per step), as a served teacher does when
it answers one process's request with a non-retryable 400. The run then ends as ``eopd train`` ends it
(``run_command``: one line on stderr, exit 2).
"""

from __future__ import annotations

import sys
from typing import Any

from eopd.commands import run_command
from eopd.config import load_config
from eopd.sampling.rollout import Rollout
from eopd.teachers import Teacher, TeacherScores, TeacherUnavailableError
from eopd.training.components import build_components
from eopd.training.trainer import run

MESSAGE = "teacher http://teacher-b:8000/v1: 400 Bad Request (not retried): prompt too long"


class FailingTeacher:
    """``teacher`` whose ``fail_at``-th ``score`` call (1-based) raises ``TeacherUnavailableError``."""

    def __init__(self, teacher: Teacher, fail_at: int) -> None:
        self.teacher, self.fail_at, self.calls = teacher, fail_at, 0

    def score(self, rollout: Rollout, **kwargs: Any) -> TeacherScores:
        self.calls += 1
        if self.calls == self.fail_at:
            raise TeacherUnavailableError(MESSAGE)
        return self.teacher.score(rollout, **kwargs)


def main(argv: list[str]) -> int:
    fail_rank, fail_step, config, *overrides = argv

    def body() -> None:
        c = build_components(load_config(config, overrides))
        if c.rank == int(fail_rank):
            c.teacher = FailingTeacher(c.teacher, int(fail_step))
        run(c)

    return run_command("eopd train", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
