"""The ``eopd`` subcommands: each module parses its arguments and calls the library; no training logic here.

``run_command`` is how every command ends: a ``UserError`` (bad config, data, checkpoint, model...) prints
one line and exits 2, Ctrl-C exits 130, anything else is a bug and keeps its traceback. A command run under
``torchrun`` leaves its process group closed: left to the interpreter's exit, gloo's threads can abort a process
that finished its work ("terminate called without an active exception").
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from eopd.errors import UserError


def run_command(prog: str, body: Callable[[], int | None], *, also: tuple[type[Exception], ...] = ()) -> int:
    """Run ``body`` and turn bad input into one line on stderr (exit 2) and Ctrl-C into exit 130.

    Args:
        prog: Printed before the message, e.g. ``"eopd train"``.
        body: The command's work; returns its exit code.
        also: Further exception types that are the user's to fix (e.g. ImportError of an optional extra).
    """
    import torch

    from eopd.training.sharding import close_process_group

    threads = torch.get_num_threads()
    try:
        return int(body() or 0)
    except (UserError, *also) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, the demo) keep their setting
        close_process_group()
