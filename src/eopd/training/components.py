"""Everything one distillation run holds, built from its config: processes, models, data, optimizer, RNG.

``build_components(cfg)`` is the set-up half of ``eopd train``; the loop (``eopd.training.trainer``) only reads and
steps what it returns. Kept apart so a test can build a run's pieces without running it, and so the loop
file stays one screen.

Processes: one CPU, one GPU, or several processes under ``torchrun`` / ``accelerate launch``, the student
spread over them by ``parallel.strategy`` (DDP or FSDP2, ``eopd.training.sharding``). Each process samples its
share of every step's prompts; losses are normalised by the valid-token count summed over all processes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eopd.config import ConfigError, ModelsConfig, TrainConfig
from eopd.losses import AdaptiveTau, ObjectiveConfig
from eopd.models import (
    build_tiny_checkpoint,
    build_tiny_tokenizer,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from eopd.prompting import encode_prompts, eos_token_ids, resolve_chat_template
from eopd.sampling import check_output_head
from eopd.tasks import build_task
from eopd.tasks.base import Problem, Task
from eopd.tasks.sources import split_sources
from eopd.teachers import Teacher, TeacherSet, build_teachers
from eopd.training import checkpoint as ckpt
from eopd.training.optim import build_optimizer, build_scheduler
from eopd.training.resume import check_same_step, earlier_run, resume_choice
from eopd.training.sharding import Strategy, build_strategy, check_strategy
from eopd.training.trainer_state import load_trainer_state

Tensor = torch.Tensor


@dataclass
class LoopState:
    """Counters that, with model/optimizer/scheduler/generators, define where a run is."""

    step: int = 0
    data_position: int = 0
    updates: int = 0


@dataclass
class Components:
    """One run's pieces. ``student`` is the model that is sampled and saved; ``model`` is the same student as the
    strategy prepared it (DDP-wrapped under several processes; under FSDP the very same sharded module), used for
    the loss forward through ``strategy.in_forward``."""

    cfg: TrainConfig
    obj: ObjectiveConfig
    accelerator: Any
    strategy: Strategy
    device: torch.device
    autocast_dtype: torch.dtype | None
    tokenizer: Any
    student: torch.nn.Module
    model: torch.nn.Module
    teacher_model: torch.nn.Module | None
    teacher: Teacher
    vocab_size: int
    eos_ids: list[int]
    task: Task
    problems: list[Problem]
    prompt_ids: list[list[int]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generators: dict[str, torch.Generator]
    adaptive: AdaptiveTau | None
    state: LoopState
    resume_from: Path | None
    out: Path

    @property
    def world(self) -> int:
        """Number of processes."""
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        """This process's index."""
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints."""
        return self.accelerator.is_main_process

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per step: PPO epochs x minibatches."""
        return self.cfg.optim.ppo_epochs * self.cfg.rollout.batch_size // self.cfg.optim.minibatch_size

    def reduce_sum(self, x: Tensor) -> Tensor:
        """Sum over processes (identity on one)."""
        return self.accelerator.reduce(x, reduction="sum") if self.world > 1 else x

    def all_keys(self, keys: list[str]) -> list[str]:
        """The sorted union of every process's metric keys (identity on one process)."""
        if self.world == 1:
            return keys
        from accelerate.utils import gather_object

        return sorted({k for ks in gather_object([keys]) for k in ks})

    def reduce_max(self, x: Tensor) -> Tensor:
        """Element-wise max over processes (identity on one)."""
        return self.accelerator.gather(x.unsqueeze(0)).amax(0) if self.world > 1 else x

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16/fp16 autocast on GPU when ``models.dtype`` asks for it; nothing on CPU."""
        if self.autocast_dtype is None:
            yield
        else:
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                yield


def ensure_models(cfg: TrainConfig) -> None:
    """Build the tiny random models a config asks for (``models.build_*``) when their folders are missing.

    Both get the one tokenizer ``models.build_tokenizer`` names, built once (it is deterministic, so a model
    built later gets the same one).
    """
    m = cfg.models
    missing = [(path, spec) for path, spec in ((m.teacher, m.build_teacher), (m.student, m.build_student))
               if spec is not None and not Path(path).expanduser().is_dir()]
    if not missing:
        return
    tokenizer = build_tiny_tokenizer(m.build_tokenizer, alphabet=m.build_alphabet,
                                     corpus=split_sources(m.build_corpus), vocab_size=m.build_vocab_size)
    for path, spec in missing:
        build_tiny_checkpoint(path, tokenizer=tokenizer, **dataclasses.asdict(spec))


def check_process_count(cfg: TrainConfig, world: int) -> None:
    """Batch sizes must split evenly over the processes."""
    r, o = cfg.rollout, cfg.optim
    if r.prompts_per_step % world or o.minibatch_size % world:
        raise ConfigError(f"rollout.prompts_per_step ({r.prompts_per_step}) and optim.minibatch_size "
                          f"({o.minibatch_size}) must be divisible by the number of processes ({world})")
    if cfg.eval.every and cfg.eval.problems < world:
        raise ConfigError(f"eval.problems ({cfg.eval.problems}) must be at least the number of processes "
                          f"({world}): each process evaluates its share")


def pin_requested_gpu(requested: str, num_processes: int) -> torch.device:
    """The device ``models.device`` names; ``cuda:N`` is made the current GPU before accelerate starts, so the
    models, the generators and accelerate's own placement all use GPU N.

    Raises:
        ConfigError: a GPU this machine does not have, or ``cuda:N`` with several processes (each process takes
            the GPU of its local rank).
    """
    device = resolve_device(requested)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ConfigError(f"models.device: {requested!r} but this machine has {count} GPU(s) visible; use auto or cpu")
    if device.type == "cuda" and device.index is not None:
        if num_processes > 1:
            raise ConfigError(f"models.device: {requested!r} names one GPU but this run has {num_processes} "
                              "processes, each of which takes the GPU of its local rank; choose the GPUs with "
                              "CUDA_VISIBLE_DEVICES and leave models.device=auto")
        torch.cuda.set_device(device)
    return device


def make_generators(seed: int, rank: int, device: torch.device) -> dict[str, torch.Generator]:
    """Seeded generators for sampling, minibatch shuffling and loss randomness (never the global RNG)."""
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    base = seed * 1_000_003 + rank * 7919
    return {name: torch.Generator(device=gen_device).manual_seed(base + i)
            for i, name in enumerate(("sample", "shuffle", "loss"))}


def teacher_placement(models: ModelsConfig, student_device: torch.device, num_processes: int = 1,
                      ) -> tuple[torch.device, torch.dtype]:
    """The in-process teacher's device and dtype: ``models.teacher_device`` (auto: the student's) and
    ``models.teacher_dtype`` (auto: ``models.dtype`` resolved for the teacher's device).

    Raises:
        ConfigError: a GPU that this machine does not have, or ``cuda:N`` with several processes.
    """
    requested = models.teacher_device
    device = student_device if requested == "auto" else torch.device(requested)
    if requested.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"models.teacher_device: {requested!r} but this machine has {count} GPU(s) visible")
        if device.index is not None and num_processes > 1:
            raise ConfigError(f"models.teacher_device: {requested!r} names one GPU but this run has {num_processes} "
                              "processes, each of which would load its own teacher there; use auto or cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    dtype = resolve_dtype(models.dtype if models.teacher_dtype == "auto" else models.teacher_dtype, device)
    return device, dtype


def build_teacher(cfg: TrainConfig, student: torch.nn.Module, tokenizer: Any,
                  device: torch.device) -> tuple[Teacher | TeacherSet, torch.nn.Module | None, int]:
    """The run's teacher (several routed per prompt: a ``TeacherSet``), its local model (one in-process teacher
    only, else None) and the vocabulary both models are compared on: ``eopd.teachers.build_teachers``, with an
    in-process teacher placed by ``teacher_placement`` (``device`` is the student's)."""
    check_output_head(student, cfg.models.student)  # the student's head (the teacher's: HFTeacher); outside load_newest
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return build_teachers(cfg, student, tokenizer, placement=lambda: teacher_placement(cfg.models, device, world))


def build_student(cfg: TrainConfig, device: torch.device, checkpoint: Path | None = None) -> torch.nn.Module:
    """The student, float32 on ``device``: ``models.student`` itself or, from a checkpoint, its saved weights.

    With ``models.lora`` the base is always ``models.student`` (frozen, so a checkpoint need not hold it),
    wrapped with fresh adapters (seeded by ``seed``) or the checkpoint's; only the adapters require gradients.
    A checkpoint's files are read strictly: a tensor missing or of another shape is damage, never re-initialised.

    Raises:
        CheckpointMismatchError: the checkpoint holds the other kind of student, or an adapter of other settings.
        DamagedFileError: a file is missing or does not parse, or its tensors disagree with their config.
        ModelLoadError: it does not load for another reason (out of memory, permissions...).
    """
    m = cfg.models
    folder = None if checkpoint is None else ckpt.student_folder(checkpoint, lora=m.lora is not None)
    if m.lora is None:
        return load_causal_lm(folder or m.student, device=device, dtype=torch.float32,
                              trust_remote_code=m.trust_remote_code, strict=folder is not None)
    from eopd.training import lora

    base = load_causal_lm(m.student, device=device, dtype=torch.float32, trust_remote_code=m.trust_remote_code)
    if folder is None:
        return lora.apply_lora(base, m.lora, seed=cfg.seed)
    if (why := lora.adapter_mismatch(folder, m.lora, base)) is not None:
        raise ckpt.CheckpointMismatchError(f"{why}; resume with the run's own models.lora settings")
    return lora.load_adapter(base, folder)


def checked_state(checkpoint: Path, strategy: Strategy) -> dict[str, Any]:
    """``trainer.pt`` of ``checkpoint``, read without running code, from a checkpoint ``strategy`` can resume."""
    state = load_trainer_state(checkpoint)
    strategy.check_checkpoint(checkpoint, state)
    return state


def build_components(cfg: TrainConfig) -> Components:
    """Processes, models, prompts, optimizer and generators of a run (resumed from a checkpoint when asked)."""
    from accelerate import Accelerator
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress line is the one to read
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    requested = pin_requested_gpu(cfg.models.device, int(os.environ.get("WORLD_SIZE", "1")))
    accelerator = Accelerator(cpu=requested.type == "cpu")
    device = requested if requested.index is not None else accelerator.device
    if "FSDP" in str(accelerator.distributed_type) or "DEEPSPEED" in str(accelerator.distributed_type):
        raise ConfigError(f"accelerate is configured for {accelerator.distributed_type}; eopd shards the student "
                          "itself (parallel.strategy=fsdp): run `accelerate config` without FSDP/DeepSpeed")
    check_process_count(cfg, accelerator.num_processes)
    check_strategy(cfg, accelerator.num_processes)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        ensure_models(cfg)
    accelerator.wait_for_everyone()

    m = cfg.models
    dtype = resolve_dtype(m.dtype, device)
    strategy = build_strategy(cfg, accelerator, device, dtype)
    tokenizer = load_tokenizer(m.tokenizer or m.student, m.trust_remote_code)
    resolve_chat_template(tokenizer, cfg.data.chat_template)  # before any model loads

    # the global RNG feeds what has no generator of its own (LoRA dropout): seeded, so a fresh run repeats;
    # a resumed run gets the checkpoint's state back in restore_state
    torch.manual_seed(cfg.seed * 1_000_003 + accelerator.process_index)
    resume_from, state = None, None
    say = (lambda msg: print(msg, flush=True)) if accelerator.is_main_process else (lambda msg: None)
    if cfg.resume:  # one choice (process 0's), loaded by every process; any failure stops them all
        found = resume_choice(out, lambda p: (build_student(cfg, device, p), checked_state(p, strategy)),
                                   say=say, rank=accelerator.process_index, world=accelerator.num_processes)
        if found is None and not earlier_run(out):
            say(f"resume=true but {out / 'checkpoints'} holds no complete checkpoint: starting fresh")
        elif found is not None:
            resume_from, (student, state) = found[0], found[1]
    if resume_from is None:
        student = build_student(cfg, device)
    if m.lora is not None:
        from eopd.training.lora import describe

        say(describe(student))
    if cfg.optim.gradient_checkpointing and not getattr(student, "supports_gradient_checkpointing", False):
        raise ConfigError(f"optim.gradient_checkpointing: {type(student).__name__} does not support it; "
                          "set optim.gradient_checkpointing=false")
    teacher, teacher_model, vocab_size = build_teacher(cfg, student, tokenizer, device)
    obj = cfg.objective_config()
    if obj.top_k > vocab_size:
        raise ConfigError(f"loss.top_k: {obj.top_k} exceeds the vocabulary ({vocab_size} tokens)")

    task = build_task(cfg.data)
    problems = task.problems(cfg.data.split)[: cfg.data.limit]
    if not problems:
        raise ConfigError(f"data: split {cfg.data.split!r} of task {cfg.data.task!r} has no prompts")
    if cfg.eval.every:
        task.problems(cfg.eval.split)  # a missing eval source fails now, not at the first evaluation
    prompt_ids = encode_prompts(tokenizer, [p.prompt for p in problems], chat_template=cfg.data.chat_template,
                                template_kwargs=cfg.data.chat_template_kwargs)

    o = cfg.optim
    built: list[torch.optim.Optimizer] = []

    def optimizer_for(module: torch.nn.Module) -> torch.optim.Optimizer:  # on the parameters the strategy steps
        built.append(build_optimizer(module.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                     weight_decay=o.weight_decay))
        return built[-1]

    model, optimizer = strategy.prepare(student, optimizer_for)
    updates = o.ppo_epochs * cfg.rollout.batch_size // o.minibatch_size
    # the scheduler is NOT prepared by accelerate: it would step once per process per call
    scheduler = build_scheduler(built[0], total_updates=cfg.max_steps * updates, warmup_updates=o.warmup_steps,
                                min_lr_ratio=o.min_lr_ratio)
    adaptive = AdaptiveTau(obj.adaptive_share, obj.adaptive_momentum) if obj.adaptive_share is not None else None
    c = Components(
        cfg=cfg, obj=obj, accelerator=accelerator, strategy=strategy, device=device,
        autocast_dtype=dtype if (device.type == "cuda" and dtype != torch.float32) else None,
        tokenizer=tokenizer, student=student, model=model, teacher_model=teacher_model, teacher=teacher,
        vocab_size=vocab_size, eos_ids=eos_token_ids(tokenizer, student), task=task, problems=problems,
        prompt_ids=prompt_ids, optimizer=optimizer, scheduler=scheduler,
        generators=make_generators(cfg.seed, accelerator.process_index, device), adaptive=adaptive,
        state=LoopState(), resume_from=resume_from, out=out,
    )
    if state is not None:
        assert resume_from is not None
        strategy.load_optimizer(model, optimizer, resume_from, state)
        loop = ckpt.restore_state(state, scheduler=scheduler, generators=c.generators, adaptive=adaptive,
                                  rank=c.rank, world=c.world, any_world=strategy.name == "fsdp")
        c.state = LoopState(**loop)
        check_same_step(c.state.step, c.world)
    return c
