"""``eopd eval``: Avg@n and unbiased pass@k of a checkpoint on math benchmarks, or ``--compare`` two runs.

The command parses and checks its arguments, loads the benchmarks, the tokenizer and (``hf`` backend) the
model, and calls ``eopd.evaluation.loop.evaluate_problems`` (the loop the trainer and ``eopd.world.build.measure``
use too), then writes ``results.json`` / ``results.md``::

    eopd eval --model PATH_OR_HUB_ID --benchmarks math500,aime24 --n 8
    eopd eval --compare runs/eval/A/results.json runs/eval/B/results.json

Bad input (a sampling setting out of range, a model folder that does not exist, a malformed benchmark
file, a backend that cannot run here) ends with one line on stderr and exit code 2, before any sampling.
Protocol and outputs: ``docs/evaluation.md``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch

from eopd.commands import run_command
from eopd.commands.arguments import (
    DTYPE_CHOICES,
    CommandParser,
    UsageError,
    device,
    folder_to_write,
    nonempty,
    seed,
)
from eopd.evaluation import compare_results, load_results
from eopd.evaluation.loop import DEFAULT_MAX_NEW_TOKENS, MathGrading, evaluate_problems
from eopd.evaluation.results import write_results
from eopd.tasks.benchmarks import PAPER_BENCHMARKS, PROMPT_SUFFIX


class _Parser(CommandParser):
    """argparse whose errors are one ``UsageError`` line, printed by ``run_command`` (exit 2, no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see eopd eval --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="eopd eval",
        description="Avg@n and unbiased pass@k of a checkpoint on math benchmarks (paper protocol by default), "
        "or --compare two results.json files.",
    )
    p.add_argument("--model", type=nonempty, help="checkpoint folder or Hub id (owner/name)")
    p.add_argument("--tokenizer", type=nonempty, help="tokenizer folder or Hub id (default: --model)")
    p.add_argument(
        "--benchmarks",
        default="paper",
        help="comma list of names (math500,aime24,aime25,amc23,minerva,olympiadbench,gsm8k), files, "
        "folders or hf:owner/name; 'paper' = the six, 'all' = the six + gsm8k",
    )
    p.add_argument("--data-dir", help="folder holding <name>.jsonl (default: $EOPD_MATH_DATA or shared/data/math)")
    p.add_argument("--n", type=int, default=8, help="samples per problem")
    p.add_argument("--limit", type=int, help="first N problems of each benchmark")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, > 0")
    p.add_argument("--top-p", type=float, default=0.8, help="nucleus mass, in (0, 1] (1: the whole vocabulary)")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed, >= 0")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per sampling call (hf backend)")
    p.add_argument("--output-dir", type=folder_to_write,
                   help="where results.json / results.md go (default: runs/eval/<model name>)")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    p.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--chat-template", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--grade-timeout", type=int, default=5, help="math-verify seconds per step")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two runs side by side")
    p.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap replicates for --compare")
    return p


def missing_local_folder(flag: str, spec: str) -> str | None:
    """Why ``spec`` (a ``--model`` / ``--tokenizer`` value) cannot be a checkpoint folder, or None.

    A value that starts with ``.``, ``/`` or ``~``, or has more than one ``/``, is a local path (a Hub id is
    ``owner/name``); it must be an existing folder. Anything else is left to the Hub loader.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return None
    if path.exists():
        return f"{flag} {spec!r} is a file; point it at the checkpoint folder (written by save_pretrained)"
    if spec.startswith((".", "/", "~")) or spec.endswith("/") or spec.count("/") > 1:
        return (f"{flag} folder {spec!r} does not exist; point it at a checkpoint folder written by "
                "save_pretrained (or at a Hub id, owner/name)")
    return None


def check_args(args: argparse.Namespace) -> None:
    """Reject out-of-range settings before anything is loaded.

    Raises:
        UsageError: the first wrong argument, named with its accepted values.
    """
    if args.compare is not None:
        if args.bootstrap < 1:
            raise UsageError(f"--bootstrap must be >= 1, got {args.bootstrap}")
        return
    if not args.model:
        raise UsageError("--model is required (or use --compare A.json B.json)")
    for flag, value in (("--n", args.n), ("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size), ("--grade-timeout", args.grade_timeout)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if math.isinf(args.temperature):
        raise UsageError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0 (sampling divides the logits by it), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1] (1 keeps the whole vocabulary), got {args.top_p}")
    for flag, spec in (("--model", args.model), ("--tokenizer", args.tokenizer)):
        problem = missing_local_folder(flag, spec) if spec else None
        if problem:
            raise UsageError(problem)
    try:  # the default folder too: found only when the results are written, it would lose the whole run
        folder_to_write(str(output_dir(args)))
    except argparse.ArgumentTypeError as err:
        raise UsageError(f"--output-dir {err}") from None
    if not benchmark_list(args.benchmarks):
        raise UsageError(f"--benchmarks {args.benchmarks!r} names no benchmark; give e.g. paper, math500,aime24 or a "
                         "file")


def output_dir(args: argparse.Namespace) -> Path:
    """``--output-dir``, or ``runs/eval/<model name>``."""
    return Path(args.output_dir or Path("runs") / "eval" / Path(str(args.model).rstrip("/")).name)


def benchmark_list(spec: str) -> list[str]:
    """``"paper,gsm8k"`` -> the benchmark names / sources, ``paper`` and ``all`` expanded."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    expanded: list[str] = []
    for name in names:
        expanded += {"paper": list(PAPER_BENCHMARKS), "all": [*PAPER_BENCHMARKS, "gsm8k"]}.get(name, [name])
    return expanded


def _run_compare(args: argparse.Namespace) -> int:
    a, b = (load_results(path) for path in args.compare)
    print(compare_results(a, b, num_resamples=args.bootstrap, seed=args.seed), end="")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from eopd.models import load_causal_lm, load_tokenizer, resolve_device
    from eopd.tasks.benchmarks import load_benchmark

    problems = [
        p for b in benchmark_list(args.benchmarks) for p in load_benchmark(b, data_dir=args.data_dir, limit=args.limit)
    ]
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    chat = {"auto": "auto", "on": True, "off": False}[args.chat_template]
    device = resolve_device(args.device)
    model: torch.nn.Module | str = args.model
    generator = None
    if args.backend == "hf":
        model = load_causal_lm(args.model, device=device, dtype=args.dtype)
        generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.time()
    result = evaluate_problems(
        model,
        tokenizer,
        problems,
        MathGrading(timeout_s=args.grade_timeout),
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        generator=generator,
        seed=args.seed,
        use_chat_template=chat,
        backend=args.backend,
    )
    result.config.update(
        model=args.model,
        prompt_suffix=PROMPT_SUFFIX,
        benchmarks=sorted(result.benchmarks),
        limit=args.limit,
        device=str(device),
        dtype=args.dtype,
        seconds=round(time.time() - start, 1),
    )
    out_dir = output_dir(args)
    json_path, md_path = write_results(result, out_dir)
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {json_path} and {md_path}")
    return 0


def main(argv: list[str]) -> int:
    """``eopd eval``: see the module docstring. Returns the exit code (2 on bad input, 130 when interrupted)."""
    def body() -> int:
        args = _parser().parse_args(argv)
        check_args(args)
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        return _run_compare(args) if args.compare else _run_eval(args)

    # ImportError: an optional package, named with its install line
    return run_command("eopd eval", body, also=(ImportError,))
