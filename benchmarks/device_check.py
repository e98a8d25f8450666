"""The GPU check a session with a lent GPU runs as one command (``scripts/device_check.sh``), in under 8 minutes.

What it measures, at the paper's shapes with nothing downloaded:

1. ``benchmarks/loss_memory.py`` on CUDA in bfloat16 at N = 8,192 positions, V = 151,936: the fused loss's
   memory and time against full logits and the lm_head floor (its ``summary:`` line, quoted).
2. A 20-step run of ``configs/paper/qwen3-0.6b-base.yaml`` shortened (32 prompts a step, minibatch 8, so 4
   updates a step as the paper's 128 / 32; 256 new tokens; bf16 autocast) with a randomly initialised
   student of Qwen3-0.6B's shape and teacher of Qwen3-1.7B's shape (built here from their configs: 28 layers,
   head_dim 128, 151,936 lm_head rows, tied) and a 151,669-token tokenizer (the arithmetic task's characters
   plus filler tokens, so the vocabulary is Qwen3's size; random models sample fillers and run to the token
   budget, which is what a throughput check wants). The task is arithmetic so no dataset is needed.

   The same run again with the student sharded (``parallel.strategy=fsdp``, FSDP2 on one process: the
   sharded path's wrapping, forward redirection, unsharded sampling and mixed precision on a GPU).
3. ``benchmarks/sampler_throughput.py`` at Qwen3-0.6B's shape in bfloat16 (64 rows, a 1,024-token budget,
   geometric lengths of mean 128, 16 rows at once): the sampling engine eager and compiled against HF
   ``generate`` (its ``summary:`` line, quoted). ``--only sampler`` runs this part alone.

It prints one block, between ``=== eopd device check`` and ``=== end``, to paste into docs: tokens/s per phase
(sample, teacher, update; mean over steps 2-20), seconds per step, peak GPU memory, and the PPO ratio
statistics of the first update (1 when the learner's old log-probs are its own, docs/metrics.md).

``--cpu-smoke`` runs the same code with tiny shapes on the CPU in well under a minute, so CI keeps it working.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from qwen3_shapes import QWEN3_0_6B, QWEN3_1_7B, Shape

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper" / "qwen3-0.6b-base.yaml"
ALPHABET = "0123456789+=,;"


@dataclass(frozen=True)
class Plan:
    """Everything the mode decides."""

    device: str
    student: Shape  # its vocab is the tokenizer's size
    teacher: Shape
    steps: int
    prompts: int
    minibatch: int
    new_tokens: int
    loss_args: tuple[str, ...]
    sampler_args: tuple[str, ...] = ()


GPU = Plan("cuda", QWEN3_0_6B, QWEN3_1_7B, steps=20, prompts=32, minibatch=8, new_tokens=256,
           loss_args=("--device", "cuda", "--n", "8192", "--dtype", "bfloat16"),
           sampler_args=("--device", "cuda", "--dtype", "bfloat16", "--shape", "qwen3-0.6b", "--budget", "1024",
                         "--rows", "64", "--prompt-len", "64,256", "--repeats", "1", "--variants",
                         "generate,eager,compiled"))
CPU_SMOKE = Plan("cpu", Shape(32, 2, 4, 2, 8, 64, 640, 600), Shape(64, 2, 4, 2, 16, 128, 640, 600), steps=3, prompts=4,
                 minibatch=2, new_tokens=12,
                 loss_args=("--device", "cpu", "--n", "64", "--vocab", "640", "--hidden", "32", "--repeats", "1"),
                 sampler_args=("--device", "cpu", "--rows", "8", "--budget", "32", "--repeats", "1", "--variants",
                               "legacy,generate,eager"))


def filler_tokenizer(size: int):
    """The arithmetic task's character tokenizer grown to ``size`` tokens with fillers (``<|fN|>``) that text
    never produces but a model can sample and decode: a Qwen3-sized vocabulary without a download."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from eopd.models.char_tokenizer import build_char_tokenizer

    base = build_char_tokenizer(ALPHABET)
    state = json.loads(base.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    start = len(vocab)
    vocab.update({f"<|f{i}|>": start + i for i in range(size - start)})
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)),
                                  pad_token=base.pad_token, eos_token=base.eos_token, unk_token=base.unk_token,
                                  padding_side="right", model_max_length=base.model_max_length)
    assert len(tok) == size, (len(tok), size)
    return tok


def build_model(path: Path, shape: Shape, tokenizer, device: str, seed: int) -> Path:
    """A randomly initialised Qwen3 of ``shape`` saved with ``tokenizer`` (bf16 on CUDA: half the bytes to write)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from eopd.folders import save_model_folder

    config = Qwen3Config(vocab_size=shape.rows, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, tie_word_embeddings=True,
                         max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    save_model_folder(path, model, tokenizer)
    del model
    return path


def run_overrides(plan: Plan, teacher: Path, student: Path, out: Path) -> list[str]:
    """The paper's 0.6B recipe, shortened and moved onto the arithmetic task."""
    over = [f"models.teacher={teacher}", f"models.student={student}", "models.tokenizer=null",
            f"models.device={plan.device}", f"output_dir={out}", f"max_steps={plan.steps}", "save_every=0",
            "data.task=arithmetic", "data.path=null", "data.chat_template=false",
            f"rollout.prompts_per_step={plan.prompts}", f"rollout.max_new_tokens={plan.new_tokens}",
            f"optim.minibatch_size={plan.minibatch}", f"optim.micro_batch_size={plan.minibatch}", "eval.every=0",
            "tensorboard=false"]
    return over + (["models.dtype=float32", "num_threads=2"] if plan.device == "cpu" else [])


def benchmark_summary(script: str, args: tuple[str, ...]) -> str:
    """A benchmark's ``summary:`` line (or its last error line)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    found = [line for line in lines if line.startswith("summary:")]
    return found[-1] if found else f"FAILED (exit {proc.returncode}): {lines[-1] if lines else ''}"


def loss_summary(plan: Plan) -> str:
    """The loss benchmark's ``summary:`` line (or its last error line)."""
    return benchmark_summary("loss_memory.py", plan.loss_args)


def sampler_summary(plan: Plan) -> str:
    """The sampler benchmark's ``summary:`` line (or its last error line)."""
    return benchmark_summary("sampler_throughput.py", plan.sampler_args)


def train_summary(plan: Plan, root: Path, extra: tuple[str, ...] = ()) -> dict[str, float]:
    """Build both models, train ``plan.steps`` steps (``extra``: further overrides); throughput, peak memory and
    first-update ratio stats."""
    from eopd.config import load_config
    from eopd.training.trainer import train

    tok = filler_tokenizer(plan.student.vocab)
    t0 = time.perf_counter()
    student = build_model(root / "student", plan.student, tok, plan.device, seed=1)
    teacher = build_model(root / "teacher", plan.teacher, tok, plan.device, seed=2)
    built = time.perf_counter() - t0
    recipe = yaml.safe_load(PAPER.read_text())
    recipe["data"].pop("chat_template_kwargs")  # Qwen3's thinking switch: the arithmetic task has no template
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(root / "recipe.yaml", [*run_overrides(plan, teacher, student, root / "run"), *extra])
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    history = train(cfg)
    wall = time.perf_counter() - t1
    later = history[1:] or history
    mean = lambda key: statistics.fmean(r[key] for r in later)  # noqa: E731
    first = history[0]
    peak = torch.cuda.max_memory_allocated() / 2**30 if plan.device == "cuda" else float("nan")
    out = {"build_s": built, "train_s": wall, "tokens_per_step": mean("tokens"), "peak_gib": peak,
           "step_s": sum(mean(f"time/{phase}") for phase in ("sample", "teacher", "update"))}
    for phase in ("sample", "teacher", "update"):
        out[f"tokens_per_s/{phase}"] = mean(f"tokens_per_s/{phase}")
    for key in ("ppo/ratio_mean", "ppo/ratio_min", "ppo/ratio_max", "ppo/clip_frac", "ppo/sampler_gap_max"):
        out[f"first/{key}"] = first[key]
    return out


def report(plan: Plan, loss: str | None, run: dict[str, float] | None, sampler: str,
           sharded: dict[str, float] | None = None) -> str:
    """The block to paste into docs (``loss`` and ``run`` None: the sampler part alone)."""
    gpu = torch.cuda.get_device_name(0) if plan.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    import transformers

    lines = [f"=== eopd device check: {gpu}; torch {torch.__version__}, transformers {transformers.__version__} ==="]
    if loss is not None and run is not None:
        lines += train_lines(plan, loss, run)
    if sharded is not None:
        lines += sharded_lines(sharded)
    lines += [f"sampler, {' '.join(plan.sampler_args)}: {sampler}", "=== end ==="]
    return "\n".join(lines)


def train_lines(plan: Plan, loss: str, run: dict[str, float]) -> list[str]:
    """The block's lines on the fused loss and the shortened training run."""
    s, t = plan.student, plan.teacher
    return [
        f"fused loss, {' '.join(plan.loss_args)}: {loss}",
        f"run: configs/paper/qwen3-0.6b-base.yaml shortened: {plan.steps} steps x {plan.prompts} prompts x "
        f"{plan.new_tokens} new tokens, minibatch {plan.minibatch}; random student {s.hidden}x{s.layers} "
        f"(Qwen3-0.6B shape when on GPU), teacher {t.hidden}x{t.layers}, {s.rows:,} lm_head rows, "
        f"{plan.student.vocab:,}-token tokenizer",
        f"  models built and saved in {run['build_s']:.0f} s; {plan.steps} steps in {run['train_s']:.0f} s "
        f"({run['step_s']:.2f} s/step after the first, {run['tokens_per_step']:.0f} completion tokens/step)",
        "  tokens/s (steps 2+): " + "  ".join(f"{p}={run[f'tokens_per_s/{p}']:.0f}" for p in ("sample", "teacher",
                                                                                            "update")),
        f"  peak GPU memory: {run['peak_gib']:.1f} GiB (torch.cuda.max_memory_allocated)" if plan.device == "cuda"
        else "  peak GPU memory: n/a on the CPU",
        f"  first step ({plan.prompts // plan.minibatch} updates; the first at ratio 1 by construction, the others "
        "moved by the updates before them): "
        + "  ".join(f"{k.split('/', 2)[2]}={run[k]:.6f}" for k in run if k.startswith("first/")),
    ]


def sharded_lines(run: dict[str, float]) -> list[str]:
    """The block's lines on the same run with the student sharded (FSDP2, one process)."""
    peak = f"{run['peak_gib']:.1f} GiB" if run["peak_gib"] == run["peak_gib"] else "n/a on the CPU"
    return [
        f"  sharded (parallel.strategy=fsdp, one process): {run['step_s']:.2f} s/step; tokens/s "
        + "  ".join(f"{p}={run[f'tokens_per_s/{p}']:.0f}" for p in ("sample", "teacher", "update"))
        + f"; peak {peak}; first step: "
        + "  ".join(f"{k.split('/', 2)[2]}={run[k]:.6f}" for k in run if k.startswith("first/")),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (CI keeps the script working)")
    p.add_argument("--root", default=None, help="where the models and the run go (default: a temporary folder)")
    p.add_argument("--only", choices=["sampler"], default=None, help="run one part alone (sampler: the sampling "
                   "engine against HF generate, benchmarks/sampler_throughput.py)")
    args = p.parse_args(argv)
    plan = CPU_SMOKE if args.cpu_smoke else GPU
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device_check: no CUDA device here; run with --cpu-smoke on a CPU")
    loss, run, sharded = None, None, None
    if args.only is None:
        loss = loss_summary(plan)
        with tempfile.TemporaryDirectory(dir=args.root) as tmp:
            run = train_summary(plan, Path(tmp))
        with tempfile.TemporaryDirectory(dir=args.root) as tmp:
            sharded = train_summary(plan, Path(tmp), ("parallel.strategy=fsdp",))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the one-process group FSDP made for itself
    print(report(plan, loss, run, sampler_summary(plan), sharded), flush=True)


if __name__ == "__main__":
    main()
