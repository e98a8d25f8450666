"""The commands' arguments: a parser whose errors are one line, and the checked value types every command shares.

Why this file exists: the config keys are validated when a config loads, but a command's own flags went straight
to the library, where a port of 70000, a ``--device gpu`` or a seed beyond 64 bits ended in a traceback (and
``--top-k-max 0`` started a server that refuses every request). Each flag here is checked by argparse itself
(a ``type=`` below, or ``choices=``), so a bad value stops the command before anything loads, with one line::

    eopd serve-teacher: error: argument --port: must be an integer in 0..65535, got 70000 (see ... --help)

and exit code 2. Checks that involve several flags raise ``UsageError``, which ``run_command`` prints as one line.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from eopd.errors import UserError

#: What ``torch.Generator.manual_seed`` accepts and every other RNG of the project can use.
MAX_SEED = 2**63 - 1
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
#: ``--device`` values: the machine's choice, the CPU, the current GPU, or GPU N.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class UsageError(UserError):
    """A command-line argument is wrong; the message names the flag and the accepted values."""


class CommandParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit code 2: ``PROG: error: MESSAGE (see PROG --help)``,
    not the usage block (which names no value and hides the message under a screenful of flags)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """A ``type=`` for whole numbers in ``[low, high]`` (either end open when None)."""
    if low is not None and high is not None:
        wanted = f"an integer in {low}..{high}"
    elif low is not None:
        wanted = f"an integer >= {low}"
    else:
        wanted = f"an integer <= {high}" if high is not None else "an integer"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    return parse


def real(low: float, *, low_open: bool = True, high: float = math.inf, high_open: bool = True,
         ) -> Callable[[str], float]:
    """A ``type=`` for finite numbers in an interval, ``(low, high)`` by default (NaN and inf are refused)."""
    wanted = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if high == math.inf:
        wanted = f"a number {'>' if low_open else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return parse


count = integer(low=1)
port = integer(0, 65535)
seed = integer(0, MAX_SEED)


def nonempty(text: str) -> str:
    """A ``type=`` for names that cannot be blank (a served model name, a host)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def device(text: str) -> str:
    """A ``type=`` for ``auto | cpu | cuda | cuda:N``; a GPU must exist here (torch fails with a traceback)."""
    if DEVICE_PATTERN.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    if text.startswith("cuda"):
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= visible:
            raise argparse.ArgumentTypeError(f"{text!r} but this machine has {visible} GPU(s) visible; use cpu or "
                                             "auto")
    return text


def existing_file(text: str) -> Path:
    """A ``type=`` for a file that must exist (a results file, a config)."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is {'a folder' if path.is_dir() else 'not found'}; give a file")
    return path


def folder_to_write(text: str) -> Path:
    """A ``type=`` for a folder the command creates or writes into: neither it nor any folder above it may be
    a file (found at the end of a long run, that would lose its work)."""
    path = Path(text).expanduser()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise argparse.ArgumentTypeError(f"{text!r} cannot be a folder: {str(p)!r} is a file")
            break
    return path
