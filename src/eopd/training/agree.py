"""Several processes fail together: a failure any process sees stops every process, with the same line.

Why one home: a failure that one process meets (a served teacher's 400 answer, a checkpoint it cannot load, an
output folder it cannot claim) must reach every process at one point where all of them run the same
collective; otherwise the others wait in a collective that never comes, or pair it with a different one, and
the run dies with a traceback and no checkpoint. Every caller runs these at a fixed point of its step or set-up.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from eopd.errors import UserError

Tensor = torch.Tensor


class AnotherProcessFailedError(UserError):
    """Another process failed; this one stops too, printing that process's line."""


def first_failure(
    message: str | None, *, world: int, reduce_sum: Callable[[Tensor], Tensor] | None = None,
    gather: Callable[[list[str | None]], list[str | None]],
) -> str | None:
    """The failure of the lowest process that failed (``None`` when none did), agreed by all processes.

    Every process calls it at the same point of the step, failed or not: one all-reduce of a flag (the cost
    of a step that went well), then, only when some process failed, one gather of the messages. So a
    failure one process sees (a served teacher's non-retryable 400 answer) stops all of them there, before
    any other collective of the step could pair up with a different one on another process.

    Args:
        message: This process's failure, or ``None``.
        world: Number of processes (1: no collective).
        reduce_sum: Sum over processes of a ``[1]`` float tensor; None: gather the messages at once (one collective
            instead of one, then one more on failure: for start-up, where a step's cost does not matter).
        gather: Every process's one-element list, concatenated in rank order (``accelerate``'s
            ``gather_object``).
    """
    if world == 1:
        return message
    if reduce_sum is not None and float(reduce_sum(torch.tensor([float(message is not None)]))[0]) == 0:
        return None
    return next((m for m in gather([message]) if m is not None), None)


def stop_together(error: BaseException | None, rank: int, world: int) -> None:
    """Raise on every process when any process has ``error`` (all processes must call): the failing process
    raises its own exception, the others an ``AnotherProcessFailedError`` with the same line, so every process
    prints the same line and none is left waiting in a collective."""
    if world == 1:
        if error is not None:
            raise error
        return
    from accelerate.utils import gather_object

    first = first_failure(failure_line(error, rank), world=world, gather=gather_object)
    if first is None:
        return
    if error is not None and failure_line(error, rank) == first:
        raise error
    raise AnotherProcessFailedError(first)


def failure_line(error: BaseException | None, rank: int) -> str | None:
    """The one line every process prints for ``error`` (a bug names its type and the process)."""
    if error is None:
        return None
    if isinstance(error, UserError):
        return str(error)
    first = (str(error).splitlines() or [""])[0]
    return f"process {rank} failed: {type(error).__name__}: {first}"

