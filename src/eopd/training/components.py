"""Everything one distillation run holds, built from its config: processes, models, data, optimizer, RNG.

``build_components(cfg)`` is the set-up half of ``eopd train``; the loop (``eopd.training.trainer``) only reads and
steps what it returns. Kept apart so a test can build a run's pieces without running it, and so the loop
file stays one screen.

Processes: one CPU, one GPU, or several processes under ``torchrun`` / ``accelerate launch`` with DDP. Each
process samples its share of every step's prompts; losses are normalised by the valid-token count summed
over all processes. FSDP is not supported yet: the fused loss reads the lm_head weight outside the wrapped
module and sampling and saving use the unwrapped model, which is only correct when every process holds
the full weights (DDP).
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
    aligned_vocab_size,
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
from eopd.teachers import HFTeacher, Teacher
from eopd.training import checkpoint as ckpt
from eopd.training.optim import build_optimizer, build_scheduler
from eopd.training.resume import check_same_step, earlier_run, resume_choice
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
    """One run's pieces. ``student`` is the plain model (sampled, saved); ``model`` is the same student as
    prepared by accelerate (DDP-wrapped under several processes), used for the loss forward."""

    cfg: TrainConfig
    obj: ObjectiveConfig
    accelerator: Any
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
                  device: torch.device) -> tuple[Teacher, torch.nn.Module | None, int]:
    """The run's teacher, its local model (None when served) and the vocabulary both models are compared on.

    Served (``teacher.url``): the servers are checked now (model, tokenizer, one scoring request), so a wrong
    or unreachable teacher stops the run at start with one line; ``models.teacher`` is then not loaded.

    In-process: loaded on ``teacher_placement``'s device and dtype (``device`` is the student's), frozen
    (``requires_grad=False``) and never given to the optimizer or to accelerate's ``prepare``, so it holds its
    weights and nothing else; ``HFTeacher`` moves each rollout to it and the scores back.
    """
    m, t = cfg.models, cfg.teacher
    check_output_head(student, m.student)  # the student's head (the teacher's: HFTeacher); outside load_newest
    if t.urls:
        from eopd.teachers import ServedTeacher

        vocab_size = aligned_vocab_size(student, student, tokenizer)
        served = ServedTeacher(t.urls, vocab_size=vocab_size, model=t.model, entropy=t.entropy,
                               top_logprobs=t.top_logprobs, timeout_s=t.timeout_s, retries=t.retries,
                               backoff_s=t.backoff_s, max_in_flight=t.max_in_flight,
                               rows_per_request=cfg.optim.micro_batch_size)
        served.connect(tokenizer, top_k=min(cfg.objective_config().top_k, vocab_size),
                       check_tokenizer=t.check_tokenizer)
        if os.environ.get("RANK", "0") == "0":
            print(served.describe(), flush=True)
        return served, None, vocab_size
    teacher_device, teacher_dtype = teacher_placement(m, device, int(os.environ.get("WORLD_SIZE", "1")))
    teacher_model = load_causal_lm(m.teacher, device=teacher_device, dtype=teacher_dtype,
                                   trust_remote_code=m.trust_remote_code)
    teacher_model.requires_grad_(False)
    vocab_size = aligned_vocab_size(teacher_model, student, tokenizer)
    teacher = HFTeacher(teacher_model, vocab_size, cfg.rollout.temperature, cfg.optim.micro_batch_size,
                        cfg.chunk_size, entropy=t.entropy, entropy_top_k=t.top_logprobs,
                        max_tokens_per_micro_batch=cfg.optim.max_tokens_per_micro_batch)
    return teacher, teacher_model, vocab_size


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
        raise ConfigError(f"accelerate is configured for {accelerator.distributed_type}; eopd supports plain "
                          "data parallelism (DDP) only for now: run `accelerate config` without FSDP/DeepSpeed")
    check_process_count(cfg, accelerator.num_processes)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        ensure_models(cfg)
    accelerator.wait_for_everyone()

    m = cfg.models
    dtype = resolve_dtype(m.dtype, device)
    tokenizer = load_tokenizer(m.tokenizer or m.student, m.trust_remote_code)
    resolve_chat_template(tokenizer, cfg.data.chat_template)  # before any model loads

    # the global RNG feeds what has no generator of its own (LoRA dropout): seeded, so a fresh run repeats;
    # a resumed run gets the checkpoint's state back in restore_state
    torch.manual_seed(cfg.seed * 1_000_003 + accelerator.process_index)
    resume_from, state = None, None
    say = (lambda msg: print(msg, flush=True)) if accelerator.is_main_process else (lambda msg: None)
    if cfg.resume:  # one choice (process 0's), loaded by every process; any failure stops them all
        found = resume_choice(out, lambda p: (build_student(cfg, device, p), load_trainer_state(p)),
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
    optimizer = build_optimizer(student.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    updates = o.ppo_epochs * cfg.rollout.batch_size // o.minibatch_size
    # the scheduler is NOT prepared by accelerate: it would step once per process per call
    scheduler = build_scheduler(optimizer, total_updates=cfg.max_steps * updates, warmup_updates=o.warmup_steps,
                                min_lr_ratio=o.min_lr_ratio)
    model, optimizer = accelerator.prepare(student, optimizer)
    adaptive = AdaptiveTau(obj.adaptive_share, obj.adaptive_momentum) if obj.adaptive_share is not None else None
    c = Components(
        cfg=cfg, obj=obj, accelerator=accelerator, device=device,
        autocast_dtype=dtype if (device.type == "cuda" and dtype != torch.float32) else None,
        tokenizer=tokenizer, student=student, model=model, teacher_model=teacher_model, teacher=teacher,
        vocab_size=vocab_size, eos_ids=eos_token_ids(tokenizer, student), task=task, problems=problems,
        prompt_ids=prompt_ids, optimizer=optimizer, scheduler=scheduler,
        generators=make_generators(cfg.seed, accelerator.process_index, device), adaptive=adaptive,
        state=LoopState(), resume_from=resume_from, out=out,
    )
    if state is not None:
        loop = ckpt.restore_state(state, optimizer=optimizer, scheduler=scheduler,
                                  generators=c.generators, adaptive=adaptive, rank=c.rank, world=c.world)
        c.state = LoopState(**loop)
        check_same_step(c.state.step, c.world)
    return c
