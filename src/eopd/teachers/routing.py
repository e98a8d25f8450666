"""Which teacher scores a prompt: the routing rule of a run with several teachers (``routing.*``).

Why this file exists: multi-teacher distillation scores each prompt with the teacher of its domain (a math
teacher, a code teacher...). The rule is a function of the prompt alone, decided once per prompt, so a step's
batch may mix teachers and every process, every resume and every process count routes a prompt alike:

- ``by: field``: a field of the prompt's row (JSONL/HF rows keep their short scalar fields in ``Problem.meta``;
  math problems keep ``benchmark``, the data source, and ``subject``, ``level``), mapped to a teacher by ``map``
  (``{value: teacher}``; without a map the value is the teacher's name), ``default`` for values not mapped;
- ``by: hash``: a stable hash of the prompt's id, equal shares over the teachers in the order listed (an A/B split,
  or the demo's half-and-half).

A prompt the rule cannot place (the field missing, a value no teacher takes and no default) stops the run at start
with one line that names the prompt and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from eopd.errors import UserError
from eopd.tasks.base import Problem

#: ``routing.by`` values.
ROUTING_RULES = ("field", "hash")


class RoutingError(UserError):
    """A prompt the routing rule cannot give to any teacher; the message names the prompt and the fix."""


def field_value(value: Any) -> str:
    """A row field as a routing key: text as it is, numbers and booleans as YAML writes them (``3``, ``true``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class Router:
    """The rule that gives each prompt one of ``names`` (see the module docstring).

    Attributes:
        names: The teachers, in the order the config lists them.
        by: ``field`` or ``hash``.
        field: ``by: field``: the ``Problem.meta`` key read.
        map: ``by: field``: routing key -> teacher name (empty: the key is the name).
        default: The teacher of keys not in ``map`` (None: such a prompt is an error).
    """

    names: tuple[str, ...]
    by: str = "field"
    field: str = "teacher"
    map: dict[str, str] = dataclasses.field(default_factory=dict)
    default: str | None = None

    def __post_init__(self) -> None:
        if self.by not in ROUTING_RULES:
            raise ValueError(f"by must be one of {ROUTING_RULES}, got {self.by!r}")

    def teacher_of(self, problem: Problem) -> int:
        """The index in ``names`` of ``problem``'s teacher.

        Raises:
            RoutingError: ``by: field`` and the row lacks the field, or its value names no teacher and there is
                no ``default``.
        """
        if self.by == "hash":
            digest = hashlib.sha256(problem.id.encode("utf-8", "surrogatepass")).digest()
            return int.from_bytes(digest[:8], "big") % len(self.names)
        if self.field not in problem.meta:
            if self.default is not None:
                return self.names.index(self.default)
            fields = ", ".join(sorted(map(str, problem.meta))) or "none"
            raise RoutingError(f"routing.field: prompt {problem.id!r} has no field {self.field!r} (its fields: "
                               f"{fields}); name a field every row has, or set routing.default")
        key = field_value(problem.meta[self.field])
        name = self.map.get(key, key if not self.map else None)
        if name in self.names:
            return self.names.index(name)  # type: ignore[arg-type]
        if self.default is not None:
            return self.names.index(self.default)
        raise RoutingError(f"routing: prompt {problem.id!r} has {self.field}={key!r}, which names no teacher "
                           f"(teachers: {', '.join(self.names)}); add it to routing.map or set routing.default")

    def routes(self, problems: Sequence[Problem]) -> list[int]:
        """Every problem's teacher index (the first prompt that cannot be placed raises ``RoutingError``)."""
        return [self.teacher_of(p) for p in problems]
