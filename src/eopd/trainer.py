"""The on-policy distillation loop, flat: sample -> score -> weigh -> update, once per step.

    for step in 1..max_steps:
        prompts  = next prompts_per_step prompts of a seeded shuffle (each process takes its share)
        rollout  = student samples n completions per prompt (KV cache, seeded generator, mask after EOS)
        scores   = teacher's sampled-token log-prob, entropy, top-k (+ hidden states for exact baselines)
        weights  = which tokens get forward KL (entropy gate, adaptive tau, random placement)
        for epoch in ppo_epochs, for minibatch: sum of per-token losses / global valid-token count -> AdamW

Runs on one CPU, one GPU, or many processes under ``torchrun`` / ``accelerate launch`` (DDP/FSDP through
``accelerate``): each process samples its share of the prompts, the loss of every minibatch is normalised by
the valid-token count summed over all processes and micro-batches, metrics are reduced across processes and
only the main process writes files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from eopd import checkpoint as ckpt
from eopd.config import ConfigError, TrainConfig, load_config, to_dict
from eopd.folders import atomic_folder, save_model_folder
from eopd.forward import completion_hidden_states, completion_logits
from eopd.losses import AdaptiveTau, ObjectiveConfig, TokenBatch, TokenWeights, objective, prepare_weights
from eopd.models import (
    ModelLoadError,
    aligned_vocab_size,
    build_tiny_checkpoint,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from eopd.optim import build_optimizer, build_scheduler
from eopd.prompting import encode_prompts, eos_token_ids
from eopd.rollout import Rollout, sample
from eopd.tasks.base import Task
from eopd.teacher import HFTeacher, TeacherScores
from eopd.tracking import MetricsLogger, truncate_metrics

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# set-up helpers


def build_task(cfg: TrainConfig) -> Task:
    """The prompt source named by ``cfg.data``."""
    d = cfg.data
    if d.task == "arithmetic":
        from eopd.tasks.arithmetic import ArithmeticConfig, ArithmeticTask

        try:
            return ArithmeticTask(ArithmeticConfig(**d.arithmetic))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"data.arithmetic: {err}") from err
    if d.task == "math":
        from eopd.tasks.math import MathTask

        return MathTask(d.path)
    from eopd.tasks.prompts import PromptFileTask

    return PromptFileTask(d.path or "", d.prompt_field, d.answer_field, hf=d.task == "hf", split=d.split)


def ensure_models(cfg: TrainConfig) -> None:
    """Build the tiny random models a config asks for (``models.build_*``) when their folders are missing."""
    m = cfg.models
    for path, spec in ((m.teacher, m.build_teacher), (m.student, m.build_student)):
        if spec is not None and not Path(path).expanduser().is_dir():
            build_tiny_checkpoint(path, alphabet=m.build_alphabet, **dataclasses.asdict(spec))


def make_token_batch(rollout: Rollout, scores: TeacherScores) -> TokenBatch:
    """The objective's per-position inputs for a rollout and its teacher scores (``[B, T]`` leading)."""
    return TokenBatch(
        tokens=rollout.completion_ids_BT, mask=rollout.completion_mask_BT, logp_old=rollout.logp_old_BT,
        teacher_logp=scores.logp_BT, teacher_entropy=scores.entropy_BT, teacher_topk_ids=scores.topk_ids_BTK,
        teacher_topk_logprobs=scores.topk_logprobs_BTK, teacher_logits=scores.logits_BTV,
    )


def student_loss(
    model: torch.nn.Module,
    head: torch.nn.Module,
    obj: ObjectiveConfig,
    rollout: Rollout,
    batch: TokenBatch,
    weights: TokenWeights,
    *,
    normalizer: float,
    impl: str,
    vocab_size: int,
    chunk_size: int | None,
    teacher_hidden_BTH: Tensor | None = None,
    teacher_head: tuple[Tensor, Tensor | None] | None = None,
):
    """Loss of one micro-batch, normalised by the global valid-token count (``ObjectiveOutput``).

    ``plain`` materialises the student's ``[b, T, V]`` logits; ``fused`` runs the chunked lm_head + loss that
    keeps at most ``chunk_size x V`` alive and computes the lm_head gradients in the same pass (only the
    first ``vocab_size`` rows of a padded lm_head are used; ``head`` is the model's output embedding). The
    exact full-vocabulary baselines on the fused path get the teacher's hidden states and lm_head instead of
    its logits, and recompute them chunk by chunk.
    """
    if impl == "plain":
        logits_BTV = completion_logits(model, rollout, vocab_size)
        return objective(obj, logits_BTV, batch, weights=weights, normalizer=normalizer)
    from eopd.losses.fused import fused_objective

    mask = rollout.completion_mask_BT.bool()
    hidden_NH = completion_hidden_states(model, rollout)[mask]
    pick = lambda x: x[mask]  # noqa: E731
    teacher = {}
    if teacher_hidden_BTH is not None and teacher_head is not None:
        teacher = {"teacher_hidden": teacher_hidden_BTH[mask], "teacher_weight": teacher_head[0],
                   "teacher_bias": teacher_head[1]}
    return fused_objective(obj, hidden_NH, head.weight, batch.map(pick), weights=weights.map(pick),
                           normalizer=normalizer, chunk_size=chunk_size, lm_head_bias=head.bias,
                           vocab_size=vocab_size, **teacher)


# ----------------------------------------------------------------------------------------------------------
# state that must survive a resume


@dataclasses.dataclass
class LoopState:
    """Counters and generators that, with model/optimizer/scheduler, define where a run is."""

    step: int = 0
    data_position: int = 0
    updates: int = 0


def _generator_states(gens: dict[str, torch.Generator]) -> dict[str, Tensor]:
    return {k: g.get_state() for k, g in gens.items()}


def _set_generator_states(gens: dict[str, torch.Generator], states: dict[str, Tensor]) -> None:
    for k, g in gens.items():
        g.set_state(states[k])


# ----------------------------------------------------------------------------------------------------------
# the loop


class Distiller:
    """Holds the models, optimizer and generators of one run; ``run()`` is the loop.

    Kept as a small object rather than a function only so tests and the demo can reach the pieces
    (``student``, ``teacher_model``, ``tokenizer``); there is no inheritance to learn.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        from accelerate import Accelerator
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress line is the one to read

        self.cfg = cfg
        self.obj = cfg.objective_config()
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        device = resolve_device(cfg.models.device)
        self.accelerator = Accelerator(cpu=device.type == "cpu")
        self.device = self.accelerator.device
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self._check_world()
        self.out = Path(cfg.output_dir)
        if self.accelerator.is_main_process:
            ensure_models(cfg)
        self.accelerator.wait_for_everyone()

        self.resume_from = ckpt.latest_checkpoint(self.out) if cfg.resume else None
        if cfg.resume and self.resume_from is None and self.accelerator.is_main_process:
            print(f"resume=true but {self.out / 'checkpoints'} holds no complete checkpoint: starting fresh",
                  flush=True)
        dtype = resolve_dtype(cfg.models.dtype, self.device)
        self.autocast_dtype = dtype if (self.device.type == "cuda" and dtype != torch.float32) else None
        m = cfg.models
        self.tokenizer = load_tokenizer(m.tokenizer or m.student, m.trust_remote_code)
        student_src = self.resume_from / "model" if self.resume_from else m.student
        self.student = load_causal_lm(student_src, device=self.device, dtype=torch.float32,
                                      trust_remote_code=m.trust_remote_code)
        self.teacher_model = load_causal_lm(m.teacher, device=self.device, dtype=dtype,
                                            trust_remote_code=m.trust_remote_code)
        self.teacher_model.requires_grad_(False)
        self.vocab_size = aligned_vocab_size(self.teacher_model, self.student, self.tokenizer)
        if self.obj.top_k > self.vocab_size:
            raise ConfigError(f"loss.top_k: {self.obj.top_k} exceeds the vocabulary ({self.vocab_size} tokens)")
        self.eos = eos_token_ids(self.tokenizer, self.student)
        self.teacher = HFTeacher(self.teacher_model, self.vocab_size, cfg.rollout.temperature,
                                 cfg.optim.micro_batch_size, cfg.chunk_size)

        self.task = build_task(cfg)
        self.problems = self.task.problems(cfg.data.split)[: cfg.data.limit]
        if not self.problems:
            raise ConfigError(f"data: split {cfg.data.split!r} of task {cfg.data.task!r} has no prompts")
        self.prompt_ids = encode_prompts(self.tokenizer, [p.prompt for p in self.problems],
                                         chat_template=cfg.data.chat_template)

        o = cfg.optim
        self.updates_per_step = o.ppo_epochs * cfg.rollout.batch_size // o.minibatch_size
        optimizer = build_optimizer(self.student.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                    weight_decay=o.weight_decay)
        scheduler = build_scheduler(optimizer, total_updates=cfg.max_steps * self.updates_per_step,
                                    warmup_updates=o.warmup_steps, min_lr_ratio=o.min_lr_ratio)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.student, optimizer, scheduler)
        self.adaptive = (AdaptiveTau(self.obj.adaptive_share, self.obj.adaptive_momentum)
                         if self.obj.adaptive_share is not None else None)
        gen_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        base = cfg.seed * 1_000_003 + self.rank * 7919
        self.gens = {name: torch.Generator(device=gen_device).manual_seed(base + i)
                     for i, name in enumerate(("sample", "shuffle", "loss"))}
        self.state = LoopState()
        if self.resume_from is not None:
            self._load_state(self.resume_from)

    # -- data ----------------------------------------------------------------------------------------------
    def _check_world(self) -> None:
        r, o = self.cfg.rollout, self.cfg.optim
        if r.prompts_per_step % self.world or (o.minibatch_size % self.world):
            raise ConfigError(f"rollout.prompts_per_step ({r.prompts_per_step}) and optim.minibatch_size "
                              f"({o.minibatch_size}) must be divisible by the number of processes ({self.world})")
        if self.cfg.eval.every and self.cfg.eval.problems < self.world:
            raise ConfigError(f"eval.problems ({self.cfg.eval.problems}) must be at least the number of processes "
                              f"({self.world}): each process evaluates its share")

    def _prompt_order(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 7_919 + epoch)
        return torch.randperm(len(self.problems), generator=g)

    def _step_prompts(self) -> list[int]:
        """Global indices of this step's prompts; this process keeps every ``world``-th."""
        n, k = len(self.problems), self.cfg.rollout.prompts_per_step
        idx = []
        for pos in range(self.state.data_position, self.state.data_position + k):
            idx.append(int(self._prompt_order(pos // n)[pos % n]))
        return idx[self.rank :: self.world]

    # -- one step ------------------------------------------------------------------------------------------
    def _sample(self, prompt_idx: list[int]) -> Rollout:
        r = self.cfg.rollout
        unwrapped = self.accelerator.unwrap_model(self.model)
        with self._autocast():
            return sample(unwrapped, [self.prompt_ids[i] for i in prompt_idx], n=r.n,
                          max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                          eos_token_ids=self.eos, pad_token_id=self.tokenizer.pad_token_id,
                          generator=self.gens["sample"], vocab_size=self.vocab_size)

    def _weights(self, batch: TokenBatch) -> TokenWeights:
        tau = None
        if self.adaptive is not None:
            local = self.adaptive.update(batch.teacher_entropy, batch.mask)
            tau = float(self._reduce(torch.tensor([local], device=self.device), "mean")[0])
            self.adaptive.tau = tau
        return prepare_weights(self.obj, batch, tau=tau, generator=self.gens["loss"])

    def _reduce(self, x: Tensor, op: str = "sum") -> Tensor:
        return self.accelerator.reduce(x, reduction=op) if self.world > 1 else x

    @contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
        else:
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                yield

    def _update(self, rollout: Rollout, batch: TokenBatch, weights: TokenWeights,
                scores: TeacherScores) -> dict[str, float]:
        """PPO epochs over minibatches; returns token-weighted metric sums of the first epoch + grad norms."""
        o = self.cfg.optim
        B = rollout.completion_ids_BT.shape[0]
        mb, micro = o.minibatch_size // self.world, o.micro_batch_size
        sums: dict[str, float] = {}
        grad_norms: list[float] = []
        head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        self.model.train()
        for epoch in range(o.ppo_epochs):
            order = torch.randperm(B, generator=self.gens["shuffle"], device=self.gens["shuffle"].device).cpu()
            for start in range(0, B, mb):
                rows = order[start : start + mb].to(rollout.completion_ids_BT.device)
                count = rollout.completion_mask_BT[rows].sum().reshape(1)
                global_count = float(self._reduce(count.clone())[0])
                # DDP/FSDP average gradients over processes; our loss is a sum over all of them
                normalizer = max(global_count, 1.0) / self.world
                micro_rows = [rows[i : i + micro] for i in range(0, len(rows), micro)]
                for j, r in enumerate(micro_rows):
                    sync = j == len(micro_rows) - 1
                    ctx = nullcontext() if sync or self.world == 1 else self.accelerator.no_sync(self.model)
                    with ctx, self._autocast():
                        out = student_loss(self.model, head, self.obj, rollout.select(r),
                                           batch.map(lambda x, r=r: x[r]), weights.map(lambda x, r=r: x[r]),
                                           normalizer=normalizer, impl=self.cfg.loss_impl,
                                           vocab_size=self.vocab_size, chunk_size=self.cfg.chunk_size,
                                           teacher_hidden_BTH=None if scores.hidden_BTH is None
                                           else scores.hidden_BTH[r], teacher_head=scores.head)
                        self.accelerator.backward(out.loss)
                    if epoch == 0:
                        for k, v in out.metrics.items():
                            sums[k] = sums.get(k, 0.0) + v * out.num_valid
                if o.grad_clip > 0:
                    norm = self.accelerator.clip_grad_norm_(self.model.parameters(), o.grad_clip)
                    grad_norms.append(float(norm))
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.updates += 1
        sums["grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        return sums

    def step(self) -> dict[str, float]:
        """One full step; returns metrics reduced over processes."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self.model.eval()
        rollout = self._sample(self._step_prompts())
        t1 = time.perf_counter()
        with self._autocast():
            exact = self.obj.needs_teacher_logits
            fused = self.cfg.loss_impl == "fused"
            scores = self.teacher.score(rollout, top_k=min(self.obj.top_k, self.vocab_size),
                                        want_logits=exact and not fused, want_hidden=exact and fused)
        batch = make_token_batch(rollout, scores)
        weights = self._weights(batch)
        t2 = time.perf_counter()
        sums = self._update(rollout, batch, weights, scores)
        t3 = time.perf_counter()
        self.state.step += 1
        self.state.data_position += cfg.rollout.prompts_per_step

        n_tok = float(rollout.completion_mask_BT.sum())
        grad_norm = sums.pop("grad_norm")
        keys = sorted(sums)
        local = torch.tensor([sums[k] for k in keys] + [n_tok, float(rollout.completion_ids_BT.shape[0]),
                                                         grad_norm], dtype=torch.float64, device=self.device)
        total = self._reduce(local)
        tokens, rows = float(total[-3]), float(total[-2])
        metrics = {k: float(total[i]) / max(tokens, 1.0) for i, k in enumerate(keys) if k != "num_valid"}
        metrics["tau"] = weights.tau if math.isfinite(weights.tau) else float("nan")
        times = {"sample": t1 - t0, "teacher": t2 - t1, "update": t3 - t2}
        metrics.update({
            "response_length": tokens / max(rows, 1.0),
            "tokens": tokens,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(total[-1]) / self.world,
            **{f"time/{k}": v for k, v in times.items()},
            **{f"tokens_per_s/{k}": tokens / max(v, 1e-9) for k, v in times.items()},
        })
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        from accelerate.utils import gather_object

        per_rank = gather_object([{"rank": self.rank, "gens": _generator_states(self.gens)}])
        return {
            "loop": dataclasses.asdict(self.state),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generators": {d["rank"]: d["gens"] for d in per_rank},
            "torch_rng": torch.get_rng_state(),
            "adaptive_tau": None if self.adaptive is None else self.adaptive.state_dict(),
            "world_size": self.world,
            "config": to_dict(self.cfg),
        }

    def save(self) -> Path | None:
        """Checkpoint the current step (all processes must call; the main one writes)."""
        state = self._trainer_state()
        path = None
        if self.accelerator.is_main_process:
            path = ckpt.save_checkpoint(self.out, self.state.step, self.accelerator.unwrap_model(self.model),
                                        self.tokenizer, state, keep=self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return path

    def _load_state(self, path: Path) -> None:
        state = ckpt.load_trainer_state(path)
        if state.get("world_size", 1) != self.world:
            raise ckpt.CheckpointError(f"checkpoint {path} was written by {state['world_size']} processes; resume "
                                       f"with the same number (now {self.world})")
        self.state = LoopState(**state["loop"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_generator_states(self.gens, state["generators"][self.rank])
        torch.set_rng_state(state["torch_rng"])
        if self.adaptive is not None and state["adaptive_tau"] is not None:
            self.adaptive.load_state_dict(state["adaptive_tau"])

    def save_final(self) -> Path | None:
        """The trained student (+ tokenizer) at ``OUTPUT_DIR/final``, written atomically."""
        if not self.accelerator.is_main_process:
            return None
        final = self.out / "final"
        with atomic_folder(final) as tmp:
            save_model_folder(tmp, self.accelerator.unwrap_model(self.model), self.tokenizer)
        return final

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self) -> list[dict[str, float]]:
        """Train to ``max_steps``; returns the metrics of the steps run in this call."""
        cfg = self.cfg
        main = self.accelerator.is_main_process
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
            if self.resume_from is not None:
                truncate_metrics(self.out / "metrics.jsonl", self.state.step)
                print(f"resumed from {self.resume_from} at step {self.state.step}", flush=True)
            elif (self.out / "metrics.jsonl").exists():
                (self.out / "metrics.jsonl").unlink()
        logger = MetricsLogger(self.out, cfg.max_steps, enabled=main, tensorboard=cfg.tensorboard,
                               wandb_project=cfg.wandb_project if cfg.wandb else None, config=to_dict(cfg),
                               log_every=cfg.log_every, start_step=self.state.step)
        history: list[dict[str, float]] = []
        interrupted = False
        previous = signal.getsignal(signal.SIGINT)
        try:
            if cfg.eval.every and self.state.step == 0:
                logger.log(0, self.evaluate())  # the starting point of every curve
            while self.state.step < cfg.max_steps:
                metrics = self.step()
                if cfg.eval.every and self.state.step % cfg.eval.every == 0:
                    metrics.update(self.evaluate())
                logger.log(self.state.step, metrics)
                history.append({"step": self.state.step, **metrics})
                if cfg.save_every and self.state.step % cfg.save_every == 0 and self.state.step < cfg.max_steps:
                    self.save()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            signal.signal(signal.SIGINT, previous)
        self.save()
        if interrupted:
            if main:
                print(f"\ninterrupted: checkpoint saved at step {self.state.step}; continue with resume=true",
                      flush=True)
            logger.close()
            raise KeyboardInterrupt
        self.save_final()
        logger.close()
        return history

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Periodic evaluation on the task's eval split with the shared evaluation code (``eopd eval``'s).

        Besides Avg@n and pass@k, tasks with a notion of reasoning path (``path_key``) report the mean number
        of distinct paths among each problem's correct samples, and, when the task names a reference path
        (``reference_path``), the share of correct samples that take it.
        """
        from eopd.evaluation import evaluate_problems
        from eopd.tasks.math import extract_boxed

        e = self.cfg.eval
        problems = self.task.problems(e.split)[: e.problems][self.rank :: self.world]
        g = torch.Generator(device=self.gens["sample"].device).manual_seed(self.cfg.seed + 12_345)
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        result = evaluate_problems(
            model, self.tokenizer, problems, self.task.grade, n=e.n, temperature=e.temperature, top_p=e.top_p,
            max_new_tokens=e.max_new_tokens or self.cfg.rollout.max_new_tokens, generator=g,
            use_chat_template=self.cfg.data.chat_template, answer_fn=getattr(self.task, "answer_of", extract_boxed),
        )
        records = [r for b in result.benchmarks.values() for r in b.problems]
        # per-problem means of the shared metrics, summed here and divided after the cross-process reduce
        sums = {k: sum(b.metrics[k] * len(b.problems) for b in result.benchmarks.values())
                for k in next(iter(result.benchmarks.values())).metrics if k != "num_problems"}
        sums["avg@n"] = sums[f"avg@{e.n}"]
        ref = getattr(self.task, "reference_path", None)
        by_id = {p.id: p for p in problems}
        correct_total = on_reference = distinct = 0.0
        for rec in records:
            paths = [self.task.path_key(x.text) for x in rec.completions if x.correct]
            distinct += len({q for q in paths if q is not None})
            if ref is not None:
                target = ref(by_id[rec.id])
                correct_total += len(paths)
                on_reference += sum(1 for q in paths if q == target)
        sums["distinct_correct_paths"] = distinct
        keys = sorted(sums)
        local = torch.tensor([sums[k] for k in keys] + [len(records), on_reference, correct_total],
                             dtype=torch.float64, device=self.device)
        total = self._reduce(local)
        count = max(float(total[len(keys)]), 1.0)
        out = {f"eval/{k}": float(total[i]) / count for i, k in enumerate(keys)}
        if ref is not None:
            out["eval/base_path_share"] = float(total[-2]) / max(float(total[-1]), 1.0)
        model.train()
        return out


def train(cfg: TrainConfig) -> list[dict[str, float]]:
    """Run one distillation; returns the metrics of each step run."""
    return Distiller(cfg).run()


# ----------------------------------------------------------------------------------------------------------
# command line


def _config_help(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """One line per config key with its default and help text (nested sections expanded)."""
    import typing

    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        help_ = f.metadata.get("help", "")
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"  {prefix}{f.name}.*  {help_}")
            lines += _config_help(hints[f.name], prefix=f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {prefix}{f.name}={default!s:<10} {help_}")
    return lines


def cli(argv: list[str]) -> int:
    """``eopd train CONFIG.yaml [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="eopd train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="On-policy distillation of a student from a teacher.",
        epilog="config keys (override with key=value, dotted for nested fields):\n" + "\n".join(_config_help()),
    )
    parser.add_argument("config", nargs="?", help="YAML config (e.g. configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=5 objective=opd")
    args = parser.parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    try:
        cfg = load_config(config, overrides)
        history = train(cfg)
    except (ConfigError, ModelLoadError, ckpt.CheckpointError) as err:
        print(f"eopd train: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    from accelerate import PartialState

    if history and PartialState().is_main_process:
        last = history[-1]
        print(f"done: {len(history)} steps, final loss {last['loss']:.4f}; student saved to "
              f"{Path(cfg.output_dir) / 'final'}")
    return 0
