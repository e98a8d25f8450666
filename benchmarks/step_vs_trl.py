"""Per-step wall time of one on-policy distillation step: TRL's ``GKDTrainer`` against ``eopd.training.trainer.step``.

What is measured: the wall time of one whole training step (sample completions with the student, score
them with the teacher, one optimizer update of the student) at tiny model sizes, where fixed per-step and
per-token overheads dominate, on the same saved models, prompts and settings:

    (a) TRL   ``trl.experimental.gkd.GKDTrainer`` (lmbda 1: always on-policy, beta 0.5, temperature 1), run by
              its own ``Trainer.train`` loop; one step = the interval between two ``on_step_end`` callbacks
              (the collator, ``generate``, the student and teacher forwards, the JSD on full logits, backward,
              gradient clipping, AdamW, the scheduler and the loop's own bookkeeping).
    (b) eopd  ``eopd.training.trainer.step`` on ``build_components(load_config(...))`` with ``objective=jsd``
              (GKD's loss,
              exact over the full vocabulary; the fused loss recomputes the teacher's logits chunk by chunk
              from its final hidden states): ``collect_batch`` (KV-cache sampling, teacher scoring) and
              ``ppo_update``, plus the step's metric reductions.

How: the script builds (once, with ``save_pretrained``, into ``--models-dir`` or a temporary folder) a tiny Qwen3
teacher (4 layers x 128) and student (2 layers x 64) that share a tokenizer of exactly ``--vocab`` ids, built
here with ``tokenizers`` (character level, ChatML specials, a ChatML chat template, filler ids up to the
vocabulary size; no download), and a JSONL file of prompts of equal token length. Both trainers run in this
one process, fp32 on the CPU with ``--threads`` torch threads, in alternating blocks (TRL block, eopd block,
TRL block, ...) so that load drift on a shared machine hits both alike: a ``TrainerCallback`` hands control
to an eopd block after every ``--block-steps`` TRL steps. The first ``--warmup`` steps of each are not
counted; the result is the median seconds per step of each (the summary line). Also printed: the median of
the paired ratios (each TRL block over the eopd block that ran right after it), which is robust to load that
changes during the run, and the process CPU seconds per step (with ``--threads 1`` nearly independent of other
load on the machine; with more threads it includes OpenMP spin-waits). Phase times are wall-clock medians:
TRL's ``collate``, ``generate``, ``forward_loss`` (student and teacher forwards and the loss), ``backward`` and
``rest`` (clipping, AdamW, the loop); eopd's ``sample``, ``teacher``, ``update`` (``trainer.step``'s own
``time/*`` metrics) and ``rest`` (prompt choice and the step's metric reductions).

Same work on both sides: the same prompts in the same order at every step (TRL's sampler is sequential
over a dataset laid out in eopd's own step order), one completion per prompt, ``--batch`` prompts per step,
32 new tokens at most, temperature 1, top-k/top-p off, the same two EOS ids, one optimizer update per step
(eopd ``optim.minibatch_size = batch``; TRL ``per_device_train_batch_size = batch``, no accumulation), AdamW
(lr 1e-4, betas 0.9/0.999, no weight decay), gradient clipping at 1, a cosine schedule without warmup, no
evaluation, no checkpoints, no logging (TRL ``logging_strategy="no"``, ``report_to="none"``, no progress bar;
eopd's ``step`` is called directly, so the metrics logger never runs).

Differences that remain (inherent to the two designs):

- TRL tokenizes each batch's chat-templated prompt + assistant message in its collator every step; eopd
  encodes the prompts once at start-up. The collator's time is part of TRL's step and shown separately.
- TRL's forward pass runs over the whole sequence and its JSD is computed on full ``[B, L, V]`` logits of
  both models (prompt positions masked out afterwards); eopd's teacher scores the completion positions only
  (its sampled-token log-prob, entropy and top-k, for metrics) and keeps its final hidden states, and eopd's
  fused loss recomputes both models' logits chunk by chunk at valid completion positions only.
- eopd's micro-batch (``--micro-batch``, default the whole batch as in TRL) also sets how many rollout rows
  its teacher scores per forward.
- Sampled completions differ (different random streams), so completion lengths differ step to step;
  at these sizes nearly every row runs to the 32-token budget on both sides.
- Both trainers start from the same saved student, but each trains its own copy.
- TRL (1.16) divides its JSD sum by ``num_items_in_batch``, which ``Trainer`` counts from the collator's labels
  (the dataset's assistant reply, 4 tokens a row here), not from the sampled completion; the loss scale
  differs from eopd's per-valid-token mean, the time does not.

Usage::

    .venv/bin/python benchmarks/step_vs_trl.py                        # vocab 64, batch 64
    .venv/bin/python benchmarks/step_vs_trl.py --vocab 151936 --batch 16 --blocks 3 --block-steps 2

The last line is machine-readable::

    summary: vocab=<V> trl_s=<s/step> eopd_s=<s/step> ratio=<trl/eopd>
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHARACTERS = "\nabcdefghijklmnopqrstuvwxyz0123456789"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TEACHER = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "seed": 1}
STUDENT = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "seed": 2}
MAX_NEW_TOKENS = 32
LR = 1e-4


def build_tokenizer(vocab_size: int) -> Any:
    """A character-level ``PreTrainedTokenizerFast`` of exactly ``vocab_size`` ids with a ChatML template.

    Ids: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (EOS), one id per character of
    ``CHARACTERS`` (newline, lowercase letters, digits), then filler tokens ``<f0>``, ``<f1>``, ... up to
    ``vocab_size`` (never produced from text, but the models can sample them, as from any large vocabulary).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [END_OF_TEXT, IM_START, IM_END]
    base = specials + list(CHARACTERS)
    if vocab_size < len(base):
        raise ValueError(f"--vocab must be at least {len(base)}, got {vocab_size}")
    vocab = {tok: i for i, tok in enumerate(base)}
    vocab.update({f"<f{i}>": len(base) + i for i in range(vocab_size - len(base))})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=END_OF_TEXT))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=IM_END, pad_token=END_OF_TEXT,
                                  chat_template=CHAT_TEMPLATE, padding_side="left", model_max_length=4096,
                                  clean_up_tokenization_spaces=False)
    if len(tok) != vocab_size:
        raise RuntimeError(f"built a tokenizer of {len(tok)} ids, expected {vocab_size}")
    return tok


@dataclass
class Assets:
    """The saved teacher and student folders (each with the shared tokenizer) and the prompt file."""

    teacher: Path
    student: Path
    prompts: Path
    texts: list[str]


def build_assets(folder: Path, vocab_size: int, num_prompts: int, prompt_chars: int) -> Assets:
    """Build (or reuse) ``folder/v<V>/{teacher,student}`` and ``folder/v<V>/prompts.jsonl``."""
    from eopd.models.loading import build_tiny_checkpoint

    root = folder / f"v{vocab_size}"
    teacher, student, prompts = root / "teacher", root / "student", root / "prompts.jsonl"
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(prompt_chars)) for _ in range(num_prompts)]
    if not (teacher.is_dir() and student.is_dir()):
        tok = build_tokenizer(vocab_size)
        build_tiny_checkpoint(teacher, tokenizer=tok, **TEACHER)
        build_tiny_checkpoint(student, tokenizer=tok, **STUDENT)
    root.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return Assets(teacher, student, prompts, texts)


def eopd_overrides(assets: Assets, batch: int, micro_batch: int, threads: int, output_dir: Path,
                   max_steps: int) -> list[str]:
    """The ``key=value`` overrides of the eopd run (everything else at its default)."""
    return [
        f"output_dir={output_dir}", "seed=0", f"max_steps={max_steps}", "objective=jsd", f"num_threads={threads}",
        "tensorboard=false", f"models.teacher={assets.teacher}", f"models.student={assets.student}",
        "models.device=cpu", "models.dtype=float32", "data.task=jsonl", f"data.path={assets.prompts}",
        "data.chat_template=true", f"rollout.prompts_per_step={batch}", "rollout.n=1",
        f"rollout.max_new_tokens={MAX_NEW_TOKENS}", "rollout.temperature=1.0", f"optim.lr={LR}",
        f"optim.minibatch_size={batch}", f"optim.micro_batch_size={micro_batch}", "optim.warmup_steps=0",
        "optim.grad_clip=1.0", "eval.every=0",
    ]


def build_eopd(assets: Assets, batch: int, micro_batch: int, threads: int, output_dir: Path, max_steps: int,
               extra: Sequence[str] = ()) -> Any:
    """``eopd.training.components.build_components`` of the benchmark's config (plus ``extra`` overrides)."""
    from eopd.config import load_config
    from eopd.training.components import build_components

    cfg = load_config(None, [*eopd_overrides(assets, batch, micro_batch, threads, output_dir, max_steps), *extra])
    return build_components(cfg)


def eopd_prompt_order(num_prompts: int, batch: int, steps: int) -> list[int]:
    """The prompt indices eopd's ``step`` visits, step after step (one process, seed 0)."""
    from eopd.training.collect import step_prompt_indices

    return [i for s in range(steps) for i in step_prompt_indices(num_prompts, s * batch, batch, 0, 0, 1)]


@dataclass
class Timings:
    """Per-step seconds (warm-up included; ``measured`` drops it) and per-phase seconds of each step."""

    warmup: int
    steps: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # process CPU seconds of each step (all threads)
    phases: list[dict[str, float]] = field(default_factory=list)

    def measured(self) -> list[float]:
        return self.steps[self.warmup :]

    def median(self) -> float:
        return statistics.median(self.measured())

    def cpu_median(self) -> float:
        return statistics.median(self.cpu[self.warmup :])

    def phase_medians(self) -> dict[str, float]:
        kept = self.phases[self.warmup :]
        keys = sorted({k for p in kept for k in p})
        return {k: statistics.median(p.get(k, 0.0) for p in kept) for k in keys}


class EopdSide:
    """Runs blocks of ``eopd.training.trainer.step`` and records each step's wall time and phase times."""

    def __init__(self, components: Any, warmup: int) -> None:
        self.c = components
        self.t = Timings(warmup)

    def run(self, steps: int) -> None:
        from eopd.training.trainer import step

        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            metrics = step(self.c)
            total = time.perf_counter() - t0
            self.t.steps.append(total)
            self.t.cpu.append(time.process_time() - c0)
            phases = {k.removeprefix("time/"): v for k, v in metrics.items() if k.startswith("time/")}
            phases["rest"] = total - sum(phases.values())
            self.t.phases.append(phases)


def build_trl(assets: Assets, order: list[int], batch: int, threads: int, output_dir: Path, max_steps: int,
              on_step: Callable[[int], None], timings: Timings) -> Any:
    """A ``GKDTrainer`` (subclass that times its phases) whose every ``on_step_end`` calls ``on_step(step)``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.utils import DataCollatorForChatML

    phase: dict[str, float] = {}

    class TimedGKDTrainer(GKDTrainer):
        """``GKDTrainer`` with its generation, loss forward and whole training step timed."""

        def generate_on_policy_outputs(self, model: Any, inputs: Any, generation_config: Any) -> Any:  # type: ignore[override]
            t0 = time.perf_counter()
            out = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            phase["generate"] = time.perf_counter() - t0
            return out

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            t0 = time.perf_counter()
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            phase["forward_loss"] = time.perf_counter() - t0
            return out

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            t0 = time.perf_counter()
            out = super().training_step(model, inputs, num_items_in_batch)
            phase["training_step"] = time.perf_counter() - t0
            return out

    class TimedCollator:
        """TRL's ChatML collator, timed."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            t0 = time.perf_counter()
            out = self.inner(examples)
            phase["collate"] = time.perf_counter() - t0
            return out

    class Alternate(TrainerCallback):
        """Time each TRL step as the interval between ``on_step_end`` calls, then yield to the other side."""

        def __init__(self) -> None:
            self.last, self.last_cpu = 0.0, 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            total = time.perf_counter() - self.last
            timings.steps.append(total)
            timings.cpu.append(time.process_time() - self.last_cpu)
            p = dict(phase)
            p["backward"] = p.pop("training_step", 0.0) - p.get("generate", 0.0) - p.get("forward_loss", 0.0)
            p["rest"] = total - sum(p.values())
            timings.phases.append(p)
            on_step(state.global_step)
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

    tokenizer = AutoTokenizer.from_pretrained(str(assets.student))
    student = AutoModelForCausalLM.from_pretrained(str(assets.student), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(str(assets.teacher), dtype=torch.float32)
    rows = [{"messages": [{"role": "user", "content": assets.texts[i]}, {"role": "assistant", "content": "ok"}]}
            for i in order]
    args = GKDConfig(
        output_dir=str(output_dir), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        max_steps=max_steps, learning_rate=LR, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=0, lmbda=1.0, beta=0.5, temperature=1.0,
        max_new_tokens=MAX_NEW_TOKENS, seq_kd=False, bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=True, seed=0, train_sampling_strategy="sequential", dataloader_num_workers=0,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        max_length=None,
    )
    torch.set_num_threads(threads)
    collator = TimedCollator(DataCollatorForChatML(tokenizer=tokenizer, max_length=4096))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = TimedGKDTrainer(model=student, teacher_model=teacher, args=args, data_collator=collator,
                                  train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                  callbacks=[Alternate()])
    return trainer


def paired_ratios(trl: Sequence[float], eopd: Sequence[float], block: int) -> list[float]:
    """Median of each TRL block over the median of the eopd block that ran right after it (drift-robust)."""
    return [statistics.median(trl[i : i + block]) / statistics.median(eopd[i : i + block])
            for i in range(0, min(len(trl), len(eopd)), block)]


def ms(xs: Sequence[float]) -> str:
    return " ".join(f"{x * 1e3:.0f}" for x in xs)


def fmt_phases(p: dict[str, float]) -> str:
    return " ".join(f"{k} {v * 1e3:.1f}" for k, v in p.items())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vocab", type=int, default=64, help="tokenizer vocabulary (64, or 151936 as Qwen3)")
    ap.add_argument("--batch", type=int, default=64, help="prompts per step, one completion each")
    ap.add_argument("--micro-batch", type=int, default=None, help="eopd optim.micro_batch_size (default: --batch)")
    ap.add_argument("--warmup", type=int, default=2, help="steps of each side not counted")
    ap.add_argument("--blocks", type=int, default=16, help="alternating block pairs (TRL block, eopd block)")
    ap.add_argument("--block-steps", type=int, default=1, help="steps per block")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (both sides)")
    ap.add_argument("--num-prompts", type=int, default=512, help="prompts in the dataset")
    ap.add_argument("--prompt-chars", type=int, default=8,
                    help="characters (= tokens) of each prompt's text, before the chat template adds 19")
    ap.add_argument("--models-dir", type=Path, default=None, help="where the models are built (default: a temp dir)")
    ap.add_argument("--eopd-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra eopd config override (repeatable)")
    ap.add_argument("--json", type=Path, default=None, help="write every step's times here")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the comparison; prints a table and the summary line, returns the medians."""
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    micro = a.micro_batch or a.batch
    with tempfile.TemporaryDirectory(prefix="step_vs_trl-") as tmp:
        models_dir = a.models_dir or Path(tmp) / "models"
        assets = build_assets(models_dir, a.vocab, a.num_prompts, a.prompt_chars)
        steps = a.warmup + a.blocks * a.block_steps
        eopd = EopdSide(build_eopd(assets, a.batch, micro, a.threads, Path(tmp) / "eopd", steps, a.eopd_set),
                        a.warmup)
        trl_t = Timings(a.warmup)

        def on_trl_step(global_step: int) -> None:
            # after TRL's warm-up and then after each of its blocks: one eopd block
            done = global_step == a.warmup or (global_step > a.warmup and (global_step - a.warmup) % a.block_steps == 0)
            if done:
                k = a.warmup if global_step == a.warmup else a.block_steps
                eopd.run(k)
                span = f"step {global_step}" if k == 1 else f"steps {global_step - k + 1}-{global_step}"
                print(f"  {span} (ms): trl {ms(trl_t.steps[-k:])} | eopd {ms(eopd.t.steps[-k:])}", flush=True)

        trainer = build_trl(assets, eopd_prompt_order(a.num_prompts, a.batch, steps), a.batch, a.threads,
                            Path(tmp) / "trl", steps, on_trl_step, trl_t)
        print(f"vocab {a.vocab}, batch {a.batch} (eopd micro-batch {micro}), {MAX_NEW_TOKENS} new tokens, fp32, "
              f"{torch.get_num_threads()} threads; {a.blocks} x ({a.block_steps} TRL + {a.block_steps} eopd) steps "
              f"after {a.warmup} warm-up each", flush=True)
        load0 = os.getloadavg()[0]
        trainer.train()
        load1 = os.getloadavg()[0]
        if len(eopd.t.steps) != steps or len(trl_t.steps) != steps:
            raise RuntimeError(f"ran {len(trl_t.steps)} TRL and {len(eopd.t.steps)} eopd steps, expected {steps}")
    trl_s, eopd_s = trl_t.median(), eopd.t.median()
    for name, t in (("trl", trl_t), ("eopd", eopd.t)):
        steps_ms = ms(t.measured())
        print(f"{name:5s} median {t.median() * 1e3:8.1f} ms/step (cpu {t.cpu_median() * 1e3:.1f} ms)  "
              f"phases (median ms): {fmt_phases(t.phase_medians())}")
        print(f"      steps (ms): {steps_ms}")
    pairs = paired_ratios(trl_t.measured(), eopd.t.measured(), a.block_steps)
    print(f"paired block ratios trl/eopd (block i of TRL against the eopd block right after it): "
          f"{' '.join(f'{r:.2f}' for r in pairs)}; median {statistics.median(pairs):.2f}")
    print(f"cpu seconds/step (all threads, spin-waits included): trl {trl_t.cpu_median():.4f} "
          f"eopd {eopd.t.cpu_median():.4f} ratio {trl_t.cpu_median() / eopd.t.cpu_median():.2f}; "
          f"1-min load average {load0:.1f} at start, {load1:.1f} at end ({os.cpu_count()} CPUs)")
    if a.json is not None:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                      "trl": vars(trl_t), "eopd": vars(eopd.t)}, indent=1))
    print(f"summary: vocab={a.vocab} trl_s={trl_s:.4f} eopd_s={eopd_s:.4f} ratio={trl_s / eopd_s:.2f}", flush=True)
    return {"trl_s": trl_s, "eopd_s": eopd_s}


if __name__ == "__main__":
    main(sys.argv[1:])
