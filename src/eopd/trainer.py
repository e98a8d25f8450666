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
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import torch

from eopd import checkpoint as ckpt
from eopd.collect import collect_batch, step_prompt_indices
from eopd.components import Components, build_components
from eopd.config import TrainConfig, to_dict
from eopd.folders import atomic_folder, save_model_folder
from eopd.step_metrics import reduce_step
from eopd.tasks.base import Problem
from eopd.teacher import TeacherUnavailableError
from eopd.tracking import MetricsLogger, truncate_metrics
from eopd.update import ppo_update


def step(c: Components) -> dict[str, float]:
    """One step: collect a batch, update on it; returns metrics reduced over processes."""
    cfg, r = c.cfg, c.cfg.rollout
    prompts = step_prompt_indices(len(c.problems), c.state.data_position, r.prompts_per_step, cfg.seed, c.rank,
                                  c.world)
    roles = getattr(c.task, "token_roles", None)
    with c.autocast():
        batch = collect_batch(
            c.student, c.teacher, [c.prompt_ids[i] for i in prompts], obj=c.obj, n=r.n,
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, eos_ids=c.eos_ids,
            pad_id=c.tokenizer.pad_token_id, vocab_size=c.vocab_size, sample_generator=c.generators["sample"],
            loss_generator=c.generators["loss"], adaptive=c.adaptive, fused=cfg.loss_impl == "fused",
            mean_over_processes=lambda x: float(c.reduce_sum(torch.tensor([x], device=c.device))[0]) / c.world,
            token_roles=functools.partial(roles, c.tokenizer) if callable(roles) and cfg.optim.diagnostics else None,
            max_batch_size=r.max_batch_size)
    t1 = time.perf_counter()
    lr = c.optimizer.param_groups[0]["lr"]
    sums, grad_norms = ppo_update(
        c.model, batch, obj=c.obj, optim=cfg.optim, optimizer=c.optimizer, scheduler=c.scheduler,
        accelerator=c.accelerator, generator=c.generators["shuffle"], loss_impl=cfg.loss_impl,
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
    return metrics


def step_or_checkpoint(c: Components, logger: MetricsLogger) -> dict[str, float]:
    """``step(c)``; when the teacher fails for good, checkpoint the last complete step (random streams put
    back to that step boundary, so a resume continues exactly) and re-raise its one-line error."""
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

    Each process evaluates its share of the problems; the graded records are gathered and aggregated once,
    so the metrics are exactly those of a single-process ``evaluate_problems`` on all of them.
    """
    from accelerate.utils import gather_object

    from eopd.evaluation import evaluate_problems, names_paths, result_from_records

    e = c.cfg.eval
    problems = first_of_each_benchmark(c.task.problems(e.split), e.problems)[c.rank :: c.world]
    g = torch.Generator(device=c.generators["sample"].device).manual_seed(c.cfg.seed + 12_345)
    local = evaluate_problems(
        c.student, c.tokenizer, problems, c.task, n=e.n, temperature=e.temperature, top_p=e.top_p,
        max_new_tokens=e.max_new_tokens or c.cfg.rollout.max_new_tokens, generator=g,
        use_chat_template=c.cfg.data.chat_template, chat_template_kwargs=c.cfg.data.chat_template_kwargs)
    c.student.train()
    records = [r for b in local.benchmarks.values() for r in b.problems]
    if c.world > 1:
        records = gather_object(records)
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
    """Checkpoint the current step (all processes call; the main one writes). A checkpoint of this step that
    exists already (a run resumed at its last step) holds this very state and is left as it is."""
    state = ckpt.capture_state(loop=vars(c.state), optimizer=c.optimizer, scheduler=c.scheduler,
                               generators=c.generators, adaptive=c.adaptive, rank=c.rank, world=c.world,
                               config=to_dict(c.cfg))
    path = ckpt.checkpoint_dir(c.out, c.state.step)
    if c.is_main and not path.exists():
        ckpt.save_checkpoint(c.out, c.state.step, c.student, c.tokenizer, state, keep=c.cfg.keep_checkpoints)
    c.accelerator.wait_for_everyone()
    return path


def save_final(c: Components) -> Path:
    """The trained student (+ tokenizer) at ``OUTPUT_DIR/final``, written atomically, never over another.

    A LoRA student is saved twice: merged into its base at ``final`` (plain transformers loads it) and as the
    adapter alone at ``final/adapter`` (peft loads it onto ``models.student``)."""
    from eopd.lora import is_lora, save_final_folder

    final = c.out / "final"
    if c.is_main:
        with atomic_folder(final) as tmp:
            if is_lora(c.student):
                save_final_folder(tmp, c.student, c.tokenizer, trust_remote_code=c.cfg.models.trust_remote_code)
            else:
                save_model_folder(tmp, c.student, c.tokenizer)
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
    """Write the config; on resume drop metrics past the checkpoint, on a fresh start refuse to mix runs."""
    if not c.is_main:
        return
    if c.resume_from is None and ckpt.list_checkpoints(c.out):
        raise ckpt.CheckpointError(f"{c.out} holds checkpoints of an earlier run; continue it with resume=true or "
                                   "choose another output_dir (nothing was overwritten)")
    c.out.mkdir(parents=True, exist_ok=True)
    (c.out / "config.json").write_text(json.dumps(to_dict(c.cfg), indent=2))
    limited = f"; data.limit: training on the first {len(c.problems):,}" if c.cfg.data.limit else ""
    print(f"data: {c.task.describe()}{limited}", flush=True)
    metrics = c.out / "metrics.jsonl"
    if c.resume_from is not None:
        truncate_metrics(metrics, c.state.step)
        print(f"resumed from {c.resume_from} at step {c.state.step}", flush=True)
    elif metrics.exists():
        metrics.unlink()


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
