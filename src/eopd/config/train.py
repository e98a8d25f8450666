"""One distillation run's config (``TrainConfig``) and how it is loaded (``load_config``).

    cfg = load_config("configs/tiny.yaml", ["max_steps=5", "rollout.n=2", "objective=opd"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eopd.config.fields import ConfigError, _help, deep_merge, from_dict, parse_overrides, read_yaml_mapping, require
from eopd.config.sections import (
    DataConfig,
    EvalConfig,
    ModelsConfig,
    OptimConfig,
    ParallelConfig,
    RolloutConfig,
)
from eopd.config.teachers import RoutingConfig, TeacherConfig, TeacherSpec, check_teachers
from eopd.losses.spec import ObjectiveConfig


def check_official_alignment(cfg: TrainConfig) -> None:
    """``loss.official_alignment`` scores one more position per row (the one after its last token), one teacher at
    a time: in process, or served (the row is sent with one more token, whose prompt log-prob entry is that
    distribution)."""
    if not cfg.objective_config().official_alignment:
        return
    require(not cfg.teachers, "loss.official_alignment",
            "supports one teacher (models.teacher, or teacher.url), not several (teachers.*): the position after each "
            "row's last token is scored by the single-teacher path only")


@dataclass
class TrainConfig:
    """One distillation run."""

    output_dir: str = field(default="runs/default", metadata=_help("metrics, checkpoints and the final student"))
    seed: int = field(default=0, metadata=_help("seeds data order, sampling and init"))
    max_steps: int = field(default=20, metadata=_help("training steps (one rollout batch each)"))
    objective: str = field(default="eopd", metadata=_help("loss preset of eopd.losses (opd, eopd, fkl, ...)"))
    loss: dict[str, Any] = field(default_factory=dict, metadata=_help("ObjectiveConfig overrides (tau, top_k...)"))
    loss_impl: str = field(default="fused", metadata=_help("fused (chunked, never [N,V]) | plain (full logits)"))
    chunk_size: int | None = field(
        default=None, metadata=_help("positions per lm_head chunk (default: a memory budget, ~96 MiB CPU, 1 GiB GPU)"))
    resume: bool = field(default=False, metadata=_help("continue from the last complete checkpoint"))
    start_over: bool = field(default=False, metadata=_help(
        "begin at step 1 in an output_dir holding an earlier run (its checkpoints, metrics.jsonl, tb/, final/) by "
        "moving those to OUTPUT_DIR/earlier_run/ (never deleted); without it such a run stops with one line"))
    save_every: int = field(default=0, metadata=_help("checkpoint every N steps (0: only at the end)"))
    keep_checkpoints: int = field(default=2, metadata=_help("how many step checkpoints to keep"))
    log_every: int = field(default=1, metadata=_help("print a line every N steps"))
    num_threads: int | None = field(default=None, metadata=_help("torch CPU threads (default: torch's)"))
    wandb: bool = field(default=False, metadata=_help("log to Weights & Biases (needs wandb)"))
    wandb_project: str = field(default="eopd", metadata=_help("W&B project"))
    tensorboard: bool = field(default=True, metadata=_help("log to TensorBoard when it is installed"))
    models: ModelsConfig = field(default_factory=ModelsConfig, metadata=_help("teacher and student"))
    data: DataConfig = field(default_factory=DataConfig, metadata=_help("prompts"))
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata=_help("sampling"))
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=_help("optimizer"))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=_help("periodic evaluation"))
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata=_help("in-process or served teacher"))
    teachers: dict[str, TeacherSpec] = field(default_factory=dict, metadata=_help(
        "several teachers routed per prompt: {NAME: {model | url, tau, top_k, ...}} (docs/multi_teacher.md); "
        "empty: the one teacher of models.teacher / teacher.url"))
    routing: RoutingConfig = field(default_factory=RoutingConfig, metadata=_help(
        "with several teachers: which one scores a prompt"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata=_help(
        "ddp or fsdp (sharded) over the processes"))

    def __post_init__(self) -> None:
        require(self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        require(self.save_every >= 0, "save_every", f"must be >= 0, got {self.save_every}")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        require(self.loss_impl in ("fused", "plain"), "loss_impl", f"must be fused or plain, got {self.loss_impl!r}")
        require(self.chunk_size is None or self.chunk_size > 0, "chunk_size", f"must be > 0, got {self.chunk_size}")
        require(self.log_every > 0, "log_every", f"must be > 0, got {self.log_every}")
        require(self.rollout.batch_size % self.optim.minibatch_size == 0, "optim.minibatch_size",
                 f"must divide the rollout batch (rollout.prompts_per_step * rollout.n = {self.rollout.batch_size}),"
                 f" got {self.optim.minibatch_size}")
        self.objective_config()  # validates objective + loss overrides now
        check_teachers(self)
        check_official_alignment(self)

    def objective_config(self) -> ObjectiveConfig:
        """The loss: preset ``objective`` with ``loss`` overrides and the rollout temperature."""
        if "temperature" in self.loss and self.loss["temperature"] != self.rollout.temperature:
            raise ConfigError(f"loss.temperature ({self.loss['temperature']}) must equal rollout.temperature "
                              f"({self.rollout.temperature}): sampling and loss use one temperature")
        try:
            return ObjectiveConfig.preset(self.objective, **{**self.loss, "temperature": self.rollout.temperature})
        except (ValueError, TypeError) as err:
            raise ConfigError(f"objective/loss: {err}") from err


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML config (or defaults when ``path`` is None) and apply ``key=value`` overrides.

    Relative model paths in the YAML are taken relative to the current directory, as typed on a command line.

    Raises:
        ConfigError: missing file, bad YAML, unknown key, wrong type or impossible value.
    """
    data = read_yaml_mapping(path, "config file") if path is not None else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    return from_dict(TrainConfig, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (saved next to every run)."""
    return dataclasses.asdict(cfg)

