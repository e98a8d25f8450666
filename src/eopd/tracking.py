"""Where step metrics go: ``metrics.jsonl`` always, TensorBoard when installed, W&B when asked, and a
progress line on the terminal (a redrawn bar with ETA on a TTY, plain lines in CI/pipes).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep only records with ``step <= last_step`` (resume replays the steps after the checkpoint).

    Written atomically: the kept records go to a temporary file beside it, synced to disk, which then replaces
    the old file in one ``os.replace``; a crash at any point leaves either the old history or the new one.
    """
    p = Path(path)
    if not p.exists():
        return
    kept = [r for r in read_metrics(p) if r.get("step", 0) <= last_step]
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def format_duration(seconds: float) -> str:
    """``75`` -> ``1:15``; ``3700`` -> ``1:01:40``."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
    """Writes one JSON object per step and mirrors it to optional trackers. Only the main process logs.

    Args:
        output_dir: Run folder (``metrics.jsonl`` lives there).
        total_steps: For the ETA.
        enabled: False on non-main processes (everything becomes a no-op).
        tensorboard: Log to ``output_dir/tb`` if ``torch.utils.tensorboard`` works.
        wandb_project: If set, log to W&B (``wandb`` must be installed).
        config: Run config for W&B.
        log_every: Print every N steps.
        start_step: Steps already done (resume): TensorBoard hides the earlier run's events from step
            ``start_step + 1`` on (``purge_step``), so the replayed steps show once.
    """

    def __init__(self, output_dir: str | Path, total_steps: int, *, enabled: bool = True, tensorboard: bool = True,
                 wandb_project: str | None = None, config: dict | None = None, log_every: int = 1,
                 start_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.total_steps = total_steps
        self.log_every = log_every
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.tty = sys.stdout.isatty()
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = {"purge_step": start_step + 1} if start_step else {}
                self._tb = SummaryWriter(str(Path(output_dir) / "tb"), **purge)
            except Exception:  # tensorboard is optional: absent or broken means skip
                self._tb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise RuntimeError("wandb=true needs the wandb package: pip install wandb") from err
            self._wandb = wandb.init(project=wandb_project, config=config, dir=str(output_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of ``step`` and print a progress line."""
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        self._print(step, metrics)

    #: The progress line's training fields (metric key, label, format): a step prints those it has, so the
    #: step-0 line (evaluation only) shows no training numbers that do not exist yet.
    FIELDS = (("loss", "loss", ".4f"), ("rkl_estimate", "rkl", ".3f"), ("fkl", "fkl", ".3f"),
              ("gated_share", "gated", ".2f"), ("teacher_entropy", "H_T", ".2f"), ("student_entropy", "H_S", ".2f"),
              ("response_length", "len", ".1f"))

    def _print(self, step: int, m: dict[str, float]) -> None:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        shown = [f"{label} {m[key]:{fmt}}" for key, label, fmt in self.FIELDS if key in m]
        text = " ".join([f"step {step}/{self.total_steps}", *shown,
                         f"elapsed {format_duration(elapsed)} eta {format_duration(eta)}"])
        if "eval/avg@n" in m:
            text += f" eval avg@n {m['eval/avg@n']:.3f}"
        if self.tty:
            width = 20
            filled = int(width * step / max(self.total_steps, 1))
            sys.stdout.write("\r[" + "#" * filled + "." * (width - filled) + "] " + text + "\033[K")
            if step >= self.total_steps:
                sys.stdout.write("\n")
            sys.stdout.flush()
        elif step % self.log_every == 0 or step == self.total_steps:
            print(text, flush=True)

    def close(self) -> None:
        """Flush trackers."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
