"""The ``eopd`` command line: a thin dispatcher over subcommands that live beside their code.

Each subcommand is ``module:function`` taking ``argv: list[str]`` and returning an exit code, imported
lazily so ``eopd --help`` stays fast and a missing optional dependency only affects its own command.
"""

from __future__ import annotations

import importlib
import sys

from eopd import __version__

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("eopd.commands.train:main", "distil a student from a teacher on-policy (YAML config + overrides)"),
    "demo": ("eopd.commands.demo:main", "the embedded default: build an arithmetic world, compare objectives"),
    "eval": ("eopd.commands.eval:main", "Avg@k / pass@k on math benchmarks for a checkpoint; --compare two runs"),
    "sft": ("eopd.commands.sft:main", "train a small model from scratch on (prompt, completion) traces"),
    "world": ("eopd.commands.world:main", "build the demo's arithmetic world (teacher + base student) and measure it"),
    "serve-teacher": ("eopd.commands.serve_teacher:main", "serve a teacher model for teacher.url (vLLM API)"),
}


def _usage() -> str:
    lines = [
        f"eopd {__version__}: on-policy distillation with Entropy-Aware OPD (arXiv 2603.07079)",
        "",
        "usage: eopd <command> [args...]      (eopd <command> --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<6} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``eopd`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"eopd {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"eopd: unknown command {name!r}; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module_name, func_name = SUBCOMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)
