"""``eopd train CONFIG.yaml [key=value ...]``: parse, load the config, run ``eopd.training.trainer.train``.

The help lists every config key with its default and help text, generated from the config dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from eopd.commands import run_command
from eopd.commands.arguments import CommandParser
from eopd.config import TrainConfig, load_config


def config_help(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """One line per config key with its default and help text (nested sections expanded)."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        help_ = f.metadata.get("help", "")
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"  {prefix}{f.name}.*  {help_}")
            lines += config_help(hints[f.name], prefix=f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {prefix}{f.name}={default!s:<10} {help_}")
    return lines


def parser() -> argparse.ArgumentParser:
    """The ``eopd train`` argument parser."""
    p = CommandParser(
        prog="eopd train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="On-policy distillation of a student from a teacher.",
        epilog="config keys (override with key=value, dotted for nested fields):\n" + "\n".join(config_help()),
    )
    p.add_argument("config", nargs="?", help="YAML config (e.g. configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=5 objective=opd")
    return p


def main(argv: list[str]) -> int:
    """Run ``eopd train``; returns the exit code (2 on bad input, 130 when interrupted)."""
    from eopd.training import train

    args = parser().parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]

    def body() -> int:
        from accelerate import PartialState

        cfg = load_config(config, overrides)
        history = train(cfg)
        if history and PartialState().is_main_process:
            print(f"done: {len(history)} steps, final loss {history[-1]['loss']:.4f}; student saved to "
                  f"{Path(cfg.output_dir) / 'final'}")
        return 0

    return run_command("eopd train", body)
