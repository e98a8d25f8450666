"""Peak memory of the memory levers of docs/scaling.md, each against its baseline, measured in one run.

Why: docs/scaling.md estimates what fits on one 80 GB GPU from parameter counts; this measures, on a
benchmark-sized model, that each lever saves what the arithmetic says, through the real training step
(``eopd.training.components.build_components`` + ``eopd.training.trainer.step``: rollout, teacher scores, fused
loss, AdamW).

Levers (``--levers``, comma-separated):

    lora           full fine-tuning  vs  ``models.lora`` (all-linear, r 16): a big student, a tiny teacher
    teacher_dtype  float32 teacher   vs  ``models.teacher_dtype=bfloat16``: a big teacher, a tiny student
    grad_ckpt      a LoRA student    vs  the same with ``optim.gradient_checkpointing=true`` (LoRA, a bounded
                   KV cache and a small loss chunk in both, ``GRAD_CKPT_BASE``, so that the activations the
                   backward keeps are the peak, not the optimizer state, the rollout or the loss buffers;
                   they grow with tokens: raise ``--new-tokens``)

Each variant runs in a fresh subprocess that builds the run (models loaded, every weight read once:
transformers maps safetensors lazily), then trains ``--steps`` steps (AdamW allocates its moments on the
first). On CPU memory is the kernel's high-water mark of the resident set, as in benchmarks/loss_memory.py
(``ru_maxrss`` there; here ``VmHWM`` of ``/proc/self/status``, the same counter, which can be reset: after the
build it is restarted from the current resident set, so a loading transient cannot hide the training peak); on
CUDA ``torch.cuda.max_memory_allocated``, reset the same way. All in MiB above the process before loading
(Python, torch, transformers imported). Per variant: ``load`` (the peak while building: a float32 file cast
to bfloat16 holds both for a moment), ``built`` (resident after building: the weights), ``train`` (the peak
of the steps above ``built``: gradients, optimizer state, activations, loss buffers) and ``peak`` = ``built``
+ ``train``. The big
model has Qwen3-0.6B's width and vocabulary rows (hidden 1,024, 16 heads, 151,936 lm_head rows, tied) and
``--layers`` decoder layers; the tokenizer is the arithmetic task's (its lm_head rows beyond the tokenizer are
padding, as Qwen3's are).

``--activations`` instead measures what backward keeps per decoder layer of the paper's three students
(Qwen3-0.6B/1.7B/4B shapes: hidden, heads, KV heads, head_dim 128, intermediate), the input of
docs/scaling.md's activation estimate: one and two randomly initialised layers run forward under bfloat16
autocast with float32 weights (as ``models.dtype=bfloat16`` trains on GPU) inside
``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor autograd saves (counted once per storage,
parameters excluded); two lengths separate the part that grows with tokens (bytes per token per layer) from
the part that does not (autocast's bfloat16 weight copies, bytes per weight). Full fine-tuning and LoRA
(all-linear, r 16) differ: a frozen linear does not keep its input.

Usage::

    python benchmarks/memory_levers.py                        # CPU, both levers, 8 layers, 2 steps
    python benchmarks/memory_levers.py --levers lora --layers 4 --device cuda
    python benchmarks/memory_levers.py --levers grad_ckpt --new-tokens 256
    python benchmarks/memory_levers.py --activations          # bytes per token per layer, Qwen3 shapes

The last line is machine-readable::

    summary: lora_peak_ratio=<full / lora peak> lora_train_ratio=<full / lora train> teacher_bf16_peak_ratio=<...>
             grad_ckpt_peak_ratio=<...> grad_ckpt_train_ratio=<...>   (the levers run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ALPHABET = "0123456789+=,;"
QWEN3_VOCAB_ROWS = 151_936
MIB = 2**20


@dataclass(frozen=True)
class Lever:
    """A baseline and the lever, as config overrides, and which model is the big one."""

    name: str
    big: str  # "student" or "teacher"
    baseline: tuple[str, tuple[str, ...]]
    lever: tuple[str, tuple[str, ...]]


#: Both arms of ``grad_ckpt``: LoRA (no optimizer state to speak of), the KV cache bounded by generating two rows
#: at a time and the fused loss's logits chunk held to 128 positions, so the update's activations are the peak.
GRAD_CKPT_BASE = ("models.lora.r=16", "models.lora.alpha=32", "rollout.max_batch_size=2", "chunk_size=128")

LEVERS = {
    "lora": Lever("lora", "student", ("full fine-tuning", ()),
                  ("lora r16 all-linear", ("models.lora.r=16", "models.lora.alpha=32"))),
    "teacher_dtype": Lever("teacher_dtype", "teacher", ("teacher float32", ("models.teacher_dtype=float32",)),
                           ("teacher bfloat16", ("models.teacher_dtype=bfloat16",))),
    "grad_ckpt": Lever("grad_ckpt", "student", ("lora r16", GRAD_CKPT_BASE),
                       ("lora r16 + grad ckpt", (*GRAD_CKPT_BASE, "optim.gradient_checkpointing=true"))),
}


def status_bytes(key: str) -> int:
    """A ``/proc/self/status`` memory line (``VmRSS``: resident now, ``VmHWM``: its high-water mark), bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_high_water_mark() -> None:
    """Start ``VmHWM`` again from the current resident set (Linux >= 4.0: ``clear_refs`` value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_models(root: Path, layers: int) -> dict[str, Path]:
    """A big and a tiny Qwen3 of one tokenizer (skipped when already built under ``root``)."""
    from eopd.models.char_tokenizer import build_char_tokenizer
    from eopd.models.loading import build_tiny_checkpoint

    rows = QWEN3_VOCAB_ROWS - len(build_char_tokenizer(ALPHABET))
    big = dict(hidden_size=1024, num_layers=layers, num_heads=16, num_kv_heads=8, vocab_padding=rows,
               initializer_range=0.02)
    tiny = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, initializer_range=0.3)
    out = {}
    for name, spec in (("big", big), ("tiny", tiny)):
        out[name] = root / f"{name}-{layers}" if name == "big" else root / name
        if not out[name].is_dir():
            print(f"building the {name} model ...", file=sys.stderr, flush=True)
            build_tiny_checkpoint(out[name], alphabet=ALPHABET, seed=1, **spec)
    return out


def run_overrides(args: argparse.Namespace, lever: Lever, extra: tuple[str, ...], models: dict[str, Path],
                  out: Path) -> list[str]:
    student, teacher = (models["big"], models["tiny"]) if lever.big == "student" else (models["tiny"], models["big"])
    return [f"models.student={student}", f"models.teacher={teacher}", "models.build_student=null",
            "models.build_teacher=null", f"models.device={args.device}", f"output_dir={out}", "save_every=0",
            "tensorboard=false", f"num_threads={args.threads}",
            "objective=eopd", "loss.top_k=8", "rollout.prompts_per_step=4", "rollout.n=2",
            f"rollout.max_new_tokens={args.new_tokens}", "optim.minibatch_size=8", "optim.micro_batch_size=4",
            f"max_steps={args.steps}", *extra]


def meters(device: str) -> tuple[Callable[[], int], Callable[[], int], Callable[[], None]]:
    """``(now, high, reset)``: bytes in use, their high-water mark, and restarting that mark (CUDA's allocator on a
    GPU; the resident set's ``VmRSS`` / ``VmHWM`` on a CPU)."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated, torch.cuda.max_memory_allocated, torch.cuda.reset_peak_memory_stats
    return (lambda: status_bytes("VmRSS")), (lambda: status_bytes("VmHWM")), reset_high_water_mark


def worker(overrides: list[str], device: str) -> dict[str, float]:
    """Build one run, train its steps; bytes above the resident set before loading."""
    from eopd.config import load_config
    from eopd.training.components import build_components
    from eopd.training.trainer import step

    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    cuda = device.startswith("cuda")
    now, high, reset = meters(device)
    base = now()
    c = build_components(cfg)
    with torch.no_grad():  # transformers may map safetensors lazily: make every weight resident now
        for t in [*c.student.parameters(), *c.teacher_model.parameters()]:
            t.sum()
    load, built = high() - base, now() - base
    reset()  # the training peak is measured on its own, not hidden under a higher loading transient
    for _ in range(cfg.max_steps):
        step(c)
    if cuda:
        torch.cuda.synchronize()
    train = high() - base - built
    trainable = sum(p.numel() for p in c.student.parameters() if p.requires_grad)
    return {"load": load, "built": built, "train": train, "peak": built + train, "trainable": trainable,
            "student_params": sum(p.numel() for p in c.student.parameters()),
            "teacher_params": sum(p.numel() for p in c.teacher_model.parameters())}


def spawn(overrides: list[str], device: str) -> dict[str, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(overrides), "--device", device]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


#: The paper's students: hidden, attention heads, KV heads, intermediate (Hugging Face config.json of each;
#: head_dim 128, docs/scaling.md cites them).
QWEN3_SHAPES = {"Qwen3-0.6B-Base": (1024, 16, 8, 3072), "Qwen3-1.7B-Base": (2048, 16, 8, 6144),
                "Qwen3-4B-Base": (2560, 32, 8, 9728)}


def saved_bytes(name: str, layers: int, tokens: int, lora: bool) -> tuple[int, int]:
    """(bytes autograd keeps for backward over one forward of ``layers`` layers on 2 x ``tokens`` tokens,
    linear weights of one layer)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hidden, heads, kv_heads, inter = QWEN3_SHAPES[name]
    cfg = Qwen3Config(vocab_size=32, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model: torch.nn.Module = Qwen3ForCausalLM(cfg)
        if lora:
            import peft

            config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
            model = peft.get_peft_model(model, config).get_base_model()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    ids = torch.randint(0, 32, (2, tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, : tokens // 8] = 0  # left padding, as rollouts have: the masked attention path
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    linear = 2 * hidden * heads * 128 + 2 * hidden * kv_heads * 128 + 3 * hidden * inter
    return sum(seen.values()), linear


def activations() -> None:
    """Per decoder layer: bytes kept per token, and bytes kept per linear weight, for each student shape."""
    short, long = 64, 128
    print("saved for backward per decoder layer, bfloat16 autocast, float32 weights (two layers minus one; "
          f"lengths {short} and {long} tokens x 2 rows)")
    print(f"{'student':<18}{'mode':<7}{'bytes/token':>13}{'bytes/weight':>14}")
    summary = []
    for name in QWEN3_SHAPES:
        for lora in (False, True):
            per_len = {}
            for t in (short, long):
                two, linear = saved_bytes(name, 2, t, lora)
                one, _ = saved_bytes(name, 1, t, lora)
                per_len[t] = two - one
            per_token = (per_len[long] - per_len[short]) / (2 * (long - short))
            per_weight = (per_len[short] - per_token * 2 * short) / linear
            mode = "lora" if lora else "full"
            print(f"{name:<18}{mode:<7}{per_token:>13,.0f}{per_weight:>14.2f}", flush=True)
            summary.append(f"{name.removeprefix('Qwen3-').removesuffix('-Base').lower()}_{mode}={per_token:.0f}")
    print("summary: bytes_per_token_per_layer " + " ".join(summary))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of {', '.join(LEVERS)}")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the big model (Qwen3-0.6B: 28)")
    p.add_argument("--steps", type=int, default=2, help="training steps per variant")
    p.add_argument("--new-tokens", type=int, default=32, help="rollout.max_new_tokens")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--device", default="cpu")
    p.add_argument("--root", default=None, help="where the models are built (default: a temporary folder)")
    p.add_argument("--activations", action="store_true", help="measure bytes kept per token per layer instead")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), args.device)))
        return
    if args.activations:
        activations()
        return
    levers = [LEVERS[name.strip()] for name in args.levers.split(",") if name.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        models = build_models(root, args.layers)
        results: dict[str, dict[str, dict[str, float]]] = {}
        for lever in levers:
            results[lever.name] = {}
            for label, extra in (lever.baseline, lever.lever):
                print(f"{lever.name}: {label} ...", file=sys.stderr, flush=True)
                out = Path(tmp) / f"run-{lever.name}-{len(results[lever.name])}"
                results[lever.name][label] = spawn(run_overrides(args, lever, extra, models, out), args.device)
    report(args, levers, results)


def report(args: argparse.Namespace, levers: list[Lever], results: dict[str, dict[str, dict[str, float]]]) -> None:
    how = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "VmHWM (ru_maxrss's counter)"
    print(f"device={args.device} big model: hidden 1024, {args.layers} layers, {QWEN3_VOCAB_ROWS:,} lm_head rows "
          f"(tied); {args.steps} steps of 4 prompts x 2 samples x {args.new_tokens} new tokens; peak by {how}, "
          "MiB above the process before loading; peak = built + train (the loading transient apart)")
    print(f"{'lever':<14}{'variant':<22}{'trainable':>12}{'load MiB':>10}{'built MiB':>11}{'train MiB':>11}"
          f"{'peak MiB':>10}{'peak vs base':>14}")
    summary = []
    for lever in levers:
        (base_label, _), (lever_label, _) = lever.baseline, lever.lever
        base = results[lever.name][base_label]
        for label in (base_label, lever_label):
            r = results[lever.name][label]
            print(f"{lever.name:<14}{label:<22}{int(r['trainable']):>12,}{r['load'] / MIB:>10.0f}"
                  f"{r['built'] / MIB:>11.0f}{r['train'] / MIB:>11.0f}{r['peak'] / MIB:>10.0f}"
                  f"{base['peak'] / r['peak']:>13.2f}x")
        lev = results[lever.name][lever_label]
        if lever.name == "lora":
            summary += [f"lora_peak_ratio={base['peak'] / lev['peak']:.2f}",
                        f"lora_train_ratio={base['train'] / max(lev['train'], 1):.2f}"]
        elif lever.name == "grad_ckpt":
            summary += [f"grad_ckpt_peak_ratio={base['peak'] / lev['peak']:.2f}",
                        f"grad_ckpt_train_ratio={base['train'] / max(lev['train'], 1):.2f}"]
        else:
            summary += [f"teacher_bf16_peak_ratio={base['peak'] / lev['peak']:.2f}"]
    print("summary: " + " ".join(summary))


if __name__ == "__main__":
    main()
