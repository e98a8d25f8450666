"""Teachers: what scores the student's rollouts, in-process or behind a server, one teacher or several.

- ``scores``          what every teacher returns: ``TeacherScores``, the ``Teacher`` protocol, its two errors
- ``in_process``      ``HFTeacher``: a Hugging Face model scoring in the trainer's process
- ``served``          ``ServedTeacher``: the client of vLLM, SGLang and ``eopd serve-teacher`` servers
- ``transport``       one HTTP exchange under one deadline, the API key
- ``wire/``           the JSON a server speaks: ``vllm`` (completions + ``prompt_logprobs``), ``sglang``
                      (``/generate`` + ``logprob_start_len``), ``common`` (checks both share)
- ``server``          ``eopd serve-teacher``'s service and HTTP server (either wire format)
- ``routing``         which teacher scores a prompt (``routing.*``)
- ``routed``          ``TeacherSet``: several teachers, each row scored and gated by its own
- ``same_tokenizer``  the start-up check that a teacher tokenizes like the run
- ``build``           the run's teacher(s) from its config

The rest of the code imports from here only.
"""

from eopd.teachers.build import build_teachers
from eopd.teachers.in_process import HFTeacher
from eopd.teachers.routed import TeacherSet, finish_teacher_metrics
from eopd.teachers.routing import Router, RoutingError
from eopd.teachers.scores import (
    ENTROPY_MODES,
    Teacher,
    TeacherMismatchError,
    TeacherScores,
    TeacherUnavailableError,
    teacher_token_sums,
    topk_only_scores,
)
from eopd.teachers.served import ServedTeacher
from eopd.teachers.server import TeacherHTTPServer, TeacherService
from eopd.teachers.transport import API_KEY_ENV, api_key

__all__ = [
    "API_KEY_ENV", "ENTROPY_MODES", "HFTeacher", "Router", "RoutingError", "ServedTeacher", "Teacher",
    "TeacherHTTPServer", "TeacherMismatchError", "TeacherScores", "TeacherService", "TeacherSet",
    "TeacherUnavailableError", "api_key", "build_teachers", "finish_teacher_metrics", "teacher_token_sums",
    "topk_only_scores",
]
