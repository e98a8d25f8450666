"""The on-policy distillation loop. Read top to bottom, this file is a whole run:

    c = build_components(cfg)                 # processes, models, prompts, optimizer, RNG   (components.py)
    while c.state.step < cfg.max_steps:
        batch = collect_batch(...)            # student samples -> teacher scores -> token weights (collect.py)
        ppo_update(c.model, batch, ...)       # PPO epochs x minibatches x micro-batches, AdamW (update.py)
        log; evaluate every eval.every        # the same code as `eopd eval`                  (evaluation.py)
        checkpoint every save_every           # never overwrites; resume is exact              (checkpoint.py)

An interrupt (Ctrl-C or SIGTERM) only sets a flag: the loop stops at the next step boundary and checkpoints
that complete step. A second Ctrl-C exits at once without saving (the last checkpoint stays untouched).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import torch

from eopd.config import TrainConfig, to_dict
from eopd.folders import atomic_folder, save_model_folder
from eopd.tasks.base import Problem
from eopd.teachers import TeacherSet, TeacherUnavailableError, finish_teacher_metrics
from eopd.tracking import MetricsLogger, truncate_metrics
from eopd.training import checkpoint as ckpt
from eopd.training.agree import first_failure, stop_together
from eopd.training.collect import collect_batch, step_prompt_indices
from eopd.training.components import Components, build_components
from eopd.training.resume import claim_output_dir
from eopd.training.sharding import OPTIMIZER_DIR
from eopd.training.step_metrics import reduce_step
from eopd.training.update import ppo_update


def step(c: Components) -> dict[str, float]:
    """One step: collect a batch, update on it; returns metrics reduced over processes."""
    from accelerate.utils import gather_object

    cfg, r = c.cfg, c.cfg.rollout
    prompts = step_prompt_indices(len(c.problems), c.state.data_position, r.prompts_per_step, cfg.seed, c.rank,
                                  c.world)
    roles = getattr(c.task, "token_roles", None)
    several = isinstance(c.teacher, TeacherSet)  # several teachers: each prompt's own, per-teacher metrics
    teacher_ids = c.teacher.routes(c.problems, prompts) if several else None
    with c.autocast():
        batch = collect_batch(
            c.student, c.teacher, [c.prompt_ids[i] for i in prompts], obj=c.obj, n=r.n,
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, eos_ids=c.eos_ids,
            pad_id=c.tokenizer.pad_token_id, vocab_size=c.vocab_size, sample_generator=c.generators["sample"],
            loss_generator=c.generators["loss"], adaptive=c.adaptive, fused=cfg.loss_impl == "fused",
            gather_over_processes=lambda x: torch.cat(gather_object([x.cpu()])).to(x.device) if c.world > 1 else x,
            token_roles=functools.partial(roles, c.tokenizer) if callable(roles) and cfg.optim.diagnostics else None,
            max_batch_size=r.max_batch_size, compile=r.compile, whole_student=lambda: c.strategy.whole(c.student),
            agree_failure=functools.partial(first_failure, world=c.world, reduce_sum=lambda x: c.reduce_sum(
                x.to(c.device)).cpu(), gather=gather_object), teacher_ids=teacher_ids)
    t1 = time.perf_counter()
    lr = c.optimizer.param_groups[0]["lr"]
    sums, grad_norms = ppo_update(
        c.model, batch, obj=c.obj, optim=cfg.optim, optimizer=c.optimizer, scheduler=c.scheduler,
        strategy=c.strategy, generator=c.generators["shuffle"], loss_impl=cfg.loss_impl,
        vocab_size=c.vocab_size, chunk_size=cfg.chunk_size, autocast=c.autocast)
    t2 = time.perf_counter()
    c.state.step += 1
    c.state.updates += c.updates_per_step
    c.state.data_position += r.prompts_per_step

    sums.update({k: sums.get(k, 0.0) + v for k, v in batch.token_sums.items()})
    metrics, tokens, rows, grad_norm = reduce_step(
        sums, tokens=float(batch.rollout.completion_mask_BT.sum()), rows=float(batch.num_rows),
        grad_norm=sum(grad_norms) / max(len(grad_norms), 1),
        reduce_sum=lambda x: c.reduce_sum(x.to(c.device)).cpu(),
        reduce_max=lambda x: c.reduce_max(x.to(c.device)).cpu(), all_keys=c.all_keys)
    times = {**batch.seconds, "update": t2 - t1}
    metrics.update({
        "tau": batch.weights.tau if math.isfinite(batch.weights.tau) else float("nan"),
        "response_length": tokens / max(rows, 1.0), "tokens": tokens, "lr": lr, "grad_norm": grad_norm / c.world,
        **{f"time/{k}": v for k, v in times.items()},
        **{f"tokens_per_s/{k}": tokens / max(v, 1e-9) for k, v in times.items()},
    })
    if several:
        finish_teacher_metrics(metrics, c.teacher.names, c.teacher.objectives)
    return metrics


def step_or_checkpoint(c: Components, logger: MetricsLogger) -> dict[str, float]:
    """``step(c)``; when the teacher fails for good, checkpoint the last complete step (random streams put
    back to that step boundary, so a resume continues exactly) and re-raise its one-line error.

    A failure on one process reaches every process at the same point of the step (``agree.first_failure``,
    right after the teacher's scoring, before the step's first other collective), so all of them save
    together (``save`` is collective) and stop with the same line: the first failing process's message."""
    boundary = {k: g.get_state() for k, g in c.generators.items()}
    try:
        return step(c)
    except TeacherUnavailableError:
        for k, g in c.generators.items():
            g.set_state(boundary[k])
        save(c)
        logger.close()
        if c.is_main:
            print(f"teacher unavailable: checkpoint saved at step {c.state.step}; continue with resume=true",
                  flush=True)
        raise


@torch.no_grad()
def evaluate(c: Components) -> dict[str, float]:
    """Periodic evaluation on the task's held-out split through ``eopd eval``'s own ``evaluate_problems``.

    The processes share the problems (``evaluate_across_processes``: whole sampling blocks each, a problem's
    samples a function of the seed and its index), so the records, and the metrics aggregated once from
    them, are exactly those of a single-process evaluation, whatever the number of processes.
    """
    from accelerate.utils import gather_object

    from eopd.evaluation import evaluate_across_processes, names_paths, result_from_records

    e = c.cfg.eval
    g = torch.Generator(device=c.generators["sample"].device).manual_seed(c.cfg.seed + 12_345)
    with c.strategy.whole(c.student):  # FSDP: unsharded once, no gather per token
        records = evaluate_across_processes(
            c.student, c.tokenizer, first_of_each_benchmark(c.task.problems(e.split), e.problems), c.task,
            rank=c.rank, world=c.world, gather=gather_object, n=e.n, temperature=e.temperature, top_p=e.top_p,
            max_new_tokens=e.max_new_tokens or c.cfg.rollout.max_new_tokens, generator=g,
            use_chat_template=c.cfg.data.chat_template, chat_template_kwargs=c.cfg.data.chat_template_kwargs)
    c.student.train()
    result = result_from_records(records, with_paths=names_paths(c.task))
    metrics = {f"eval/{k}": v for k, v in result.metrics.items() if k != "num_problems"}
    metrics["eval/avg@n"] = metrics.pop(f"eval/avg@{e.n}")
    return metrics


def first_of_each_benchmark(problems: list[Problem], n: int) -> list[Problem]:
    """The first ``n`` problems of each benchmark (``meta["benchmark"]``), in order: a budget per benchmark, so
    an evaluation on several benchmarks covers every one of them."""
    seen: dict[str, int] = {}
    out = []
    for p in problems:
        b = str(p.meta.get("benchmark", ""))
        seen[b] = seen.get(b, 0) + 1
        if seen[b] <= n:
            out.append(p)
    return out


def save(c: Components) -> Path | None:
    """Checkpoint the current step (all processes call; the main one writes, after every process wrote its part of
    a sharded optimizer). A checkpoint of this step that exists already (a run resumed at its last step) holds this
    very state and is left as it is."""
    from accelerate.utils import broadcast_object_list

    optimizer_state = c.strategy.optimizer_state(c.optimizer)  # None: sharded, saved apart below
    state = ckpt.capture_state(loop=vars(c.state), optimizer_state=optimizer_state,
                               scheduler=c.scheduler, generators=c.generators, adaptive=c.adaptive, rank=c.rank,
                               world=c.world, config=to_dict(c.cfg), strategy=c.strategy.name)
    path = ckpt.checkpoint_dir(c.out, c.state.step)
    exists = path.exists()
    if c.world > 1:  # the main process decides, so that every process runs the same collectives below
        exists = broadcast_object_list([exists])[0]
    if exists:
        return path
    shards = {}
    if optimizer_state is None:  # every process writes its shard
        staged = ckpt.staging_dir(c.out, c.state.step, OPTIMIZER_DIR)
        if c.is_main and staged.exists():
            shutil.rmtree(staged)  # a save that died half-way
        c.accelerator.wait_for_everyone()
        c.strategy.save_optimizer(c.model, c.optimizer, staged)
        shards = {OPTIMIZER_DIR: staged}
    model_state = c.strategy.full_state_dict(c.model)  # FSDP: gathered on the main process
    if c.is_main:
        ckpt.save_checkpoint(c.out, c.state.step, c.student, c.tokenizer, state, keep=c.cfg.keep_checkpoints,
                             model_state=model_state, shards=shards)
    c.accelerator.wait_for_everyone()
    return path


def save_final(c: Components) -> Path:
    """The trained student (+ tokenizer) at ``OUTPUT_DIR/final``, written atomically, never over another.

    A LoRA student is saved twice: merged into its base at ``final`` (plain transformers loads it) and as the
    adapter alone at ``final/adapter`` (peft loads it onto ``models.student``)."""
    from eopd.training.lora import is_lora, save_final_folder

    final = c.out / "final"
    model_state = c.strategy.full_state_dict(c.model)  # all processes: FSDP gathers the shards on the main one
    if c.is_main:
        with atomic_folder(final) as tmp:
            if is_lora(c.student):
                save_final_folder(tmp, c.student, c.tokenizer, trust_remote_code=c.cfg.models.trust_remote_code)
            else:
                save_model_folder(tmp, c.student, c.tokenizer, state_dict=model_state)
    return final


class StopFlag:
    """Set by the first SIGINT/SIGTERM; a second SIGINT raises KeyboardInterrupt (exit without saving)."""

    def __init__(self) -> None:
        self.requested = False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(Ctrl-C again to exit now without saving)", flush=True)

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """Handle SIGINT and SIGTERM inside the block (main thread only), restoring the old handlers after."""
        old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def should_stop(c: Components, flag: StopFlag) -> bool:
    """Whether any process was asked to stop (agreed by all, so every process leaves at the same step)."""
    return c.reduce_sum(torch.tensor([float(flag.requested)], device=c.device)).item() > 0


def prepare_output(c: Components) -> None:
    """Write the config; on resume drop metrics past the checkpoint. A run that starts at step 1 never mixes
    with or deletes an earlier run's files: it stops, or with ``start_over=true`` moves them aside
    (``resume.claim_output_dir``). All processes call: a refusal on the main one stops every process alike."""
    error = None
    if c.is_main:
        try:
            if c.resume_from is None:
                claim_output_dir(c.out, start_over=c.cfg.start_over, resume=c.cfg.resume,
                                      say=lambda m: print(m, flush=True))
            c.out.mkdir(parents=True, exist_ok=True)
            (c.out / "config.json").write_text(json.dumps(to_dict(c.cfg), indent=2))
            limited = f"; data.limit: training on the first {len(c.problems):,}" if c.cfg.data.limit else ""
            print(f"data: {c.task.describe()}{limited}", flush=True)
            metrics = c.out / "metrics.jsonl"
            if c.resume_from is not None:
                truncate_metrics(metrics, c.state.step)
                print(f"resumed from {c.resume_from} at step {c.state.step}", flush=True)
            else:
                metrics.unlink(missing_ok=True)  # empty: a recorded history stopped the run or was moved aside
        except Exception as err:  # every process must stop, with the same line
            error = err
    stop_together(error, c.rank, c.world)


def run(c: Components) -> list[dict[str, float]]:
    """Train to ``max_steps`` (or until interrupted); returns the metrics of the steps run in this call."""
    cfg = c.cfg
    prepare_output(c)
    logger = MetricsLogger(c.out, cfg.max_steps, enabled=c.is_main, tensorboard=cfg.tensorboard,
                           wandb_project=cfg.wandb_project if cfg.wandb else None, config=to_dict(cfg),
                           log_every=cfg.log_every, start_step=c.state.step)
    history: list[dict[str, float]] = []
    with StopFlag().installed() as flag:
        if cfg.eval.every and c.state.step == 0:
            logger.log(0, evaluate(c))  # the starting point of every curve
        while c.state.step < cfg.max_steps and not should_stop(c, flag):
            metrics = step_or_checkpoint(c, logger)
            if cfg.eval.every and c.state.step % cfg.eval.every == 0:
                metrics.update(evaluate(c))
            logger.log(c.state.step, metrics)
            history.append({"step": c.state.step, **metrics})
            if cfg.save_every and c.state.step % cfg.save_every == 0:
                save(c)
        save(c)
        if c.state.step < cfg.max_steps:
            logger.close()
            if c.is_main:
                print(f"stopped: checkpoint saved at step {c.state.step}; continue with resume=true", flush=True)
            raise KeyboardInterrupt
    save_final(c)
    logger.close()
    return history


def train(cfg: TrainConfig) -> list[dict[str, float]]:
    """Run one distillation; returns the metrics of each step run."""
    return run(build_components(cfg))
