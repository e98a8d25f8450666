"""Teachers: what scores the student's rollouts, in-process or behind a server.

- ``teacher``   the ``Teacher`` protocol, ``TeacherScores``, and ``HFTeacher`` (a Hugging Face model in-process)
- ``served``    ``ServedTeacher``: the client of OpenAI-compatible servers (vLLM, ``eopd serve-teacher``)
- ``server``    ``eopd serve-teacher``'s service and HTTP server
- ``protocol``  the wire format both sides speak (vLLM's completions API with ``prompt_logprobs``)
"""

from eopd.teachers.served import API_KEY_ENV, ServedTeacher, TeacherMismatchError
from eopd.teachers.server import TeacherHTTPServer, TeacherService
from eopd.teachers.teacher import (
    ENTROPY_MODES,
    HFTeacher,
    Teacher,
    TeacherScores,
    TeacherUnavailableError,
    teacher_token_sums,
    topk_only_scores,
)

__all__ = [
    "API_KEY_ENV", "ENTROPY_MODES", "HFTeacher", "ServedTeacher", "Teacher", "TeacherHTTPServer",
    "TeacherMismatchError", "TeacherScores", "TeacherService", "TeacherUnavailableError", "teacher_token_sums",
    "topk_only_scores",
]
