"""The embedded default world: a multi-path teacher and a weak single-path base student, trained here.

No model hub is reachable and the user may have only a laptop CPU, so the default distillation job runs
on models trained from scratch on the multi-path arithmetic task (``eopd.tasks.arithmetic``):

- the **teacher** (a tiny Qwen3, ~334K parameters) learns from traces in several order styles, so its
  order-choice tokens are genuinely high-entropy while its arithmetic tokens are near-deterministic;
- the **base student** (~99K parameters) is trained briefly on as-written traces only: one path, and
  imperfect, so on-policy distillation has room both to raise accuracy and to widen its paths.

Both are saved as ordinary Hugging Face folders (``config.json``, ``model.safetensors``, tokenizer files)
and cached under ``<cache_dir>/<hash of the WorldConfig>/{teacher,student,tokenizer}``; a second
``build_world`` with the same config loads nothing and trains nothing. Reproduce a cached model with
``eopd sft --role teacher --output-dir DIR`` (or ``--role student``; ``--role world`` fills the cache).

Measured defaults: see ``WorldConfig``.

A warning about threads: on a 2-core machine where another process is busy, two torch threads stall in
OpenMP barriers (measured 40-60x slower per step); one thread per process is then far faster.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from eopd.evaluation import pass_at_k
from eopd.models import build_tiny_qwen3, load_causal_lm, load_tokenizer
from eopd.rollout import decode_completions, position_ids_from_mask, sample
from eopd.sft import SFTConfig, train_sft
from eopd.tasks.arithmetic import (
    ArithmeticConfig,
    ArithmeticTask,
    format_prompt,
    order_choice_mask,
    parse_chain,
    sample_traces,
    trace_for_order,
)
from eopd.tokenizer import DEFAULT_ALPHABET, build_char_tokenizer

WORLD_FORMAT_VERSION = 1  # bump when trace format / training code changes what a config produces
ROLES: tuple[str, ...] = ("teacher", "student")


@dataclass
class ModelSpec:
    """Size of a tiny Qwen3 and its supervised budget.

    Attributes:
        hidden_size: Model width (divisible by ``num_heads``).
        num_layers: Decoder layers.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads (divides ``num_heads``).
        intermediate_size: MLP width.
        init_seed: Weight-initialisation seed.
        data_seed: Seed of the sampled training traces.
        sft: Optimisation budget; ``sft.steps * sft.batch_size`` traces are sampled.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    init_seed: int = 0
    data_seed: int = 1
    sft: SFTConfig = field(default_factory=SFTConfig)

    def __post_init__(self) -> None:
        if isinstance(self.sft, dict):  # from a YAML/JSON config
            self.sft = SFTConfig(**self.sft)
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads}")


def _default_teacher() -> ModelSpec:
    return ModelSpec(hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=288,
                     init_seed=0, data_seed=1,
                     sft=SFTConfig(steps=1500, batch_size=64, lr=3e-3, warmup_steps=50, seed=0))


def _default_student() -> ModelSpec:
    return ModelSpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192,
                     init_seed=10, data_seed=11,
                     sft=SFTConfig(steps=400, batch_size=64, lr=3e-3, warmup_steps=30, seed=10))


@dataclass
class WorldConfig:
    """The task, the teacher and the base student of the embedded world (the cache key).

    What the defaults measured (torch 2.13 CPU, ``torch.set_num_threads(2)`` on an otherwise idle 2-core
    VM; ``measure`` on the first 200 held-out test prompts x 8 samples at temperature 1):

    ========================  ===================  ========================
    metric                    teacher              base student
    ========================  ===================  ========================
    parameters                334,224              99,776
    SFT budget                1,500 steps x 64     400 steps x 64
    training wall time        79 s                 10 s
    pass@1 / pass@8           0.973 / 1.000        0.799 / 1.000
    faithful@1                0.973                0.725
    distinct correct paths/8  4.52                 1.00
    entropy choice / arith    0.70 / 0.002 nats    0.06 / 0.07 nats
    entropy, first token      1.04 nats            0.04 nats
    ========================  ===================  ========================

    So the teacher is accurate and genuinely multi-path (uncertain only where an order is chosen), and
    the student is single-path and imperfect. The student's accuracy rises steeply with its budget
    (300 steps: pass@1 0.45-0.50; 400: 0.77-0.80; 500: 0.91-0.94 over two seeds each), so 400 leaves
    distillation room while staying stable across seeds.

    Attributes:
        task: The arithmetic task, including the teacher's and the student's order-style mixtures.
        teacher: Teacher size and budget (trained on ``task.teacher_styles`` traces).
        student: Base-student size and budget (trained on ``task.student_styles`` traces).
        max_position_embeddings: Position capacity of both models (prompt + completion must fit).
    """

    task: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    teacher: ModelSpec = field(default_factory=_default_teacher)
    student: ModelSpec = field(default_factory=_default_student)
    max_position_embeddings: int = 128

    def __post_init__(self) -> None:
        if isinstance(self.task, dict):
            self.task = ArithmeticConfig(**self.task)
        for role in ROLES:
            spec = getattr(self, role)
            if isinstance(spec, dict):
                setattr(self, role, ModelSpec(**spec))
        needed = longest_sequence(self.task)
        if self.max_position_embeddings < needed:
            raise ValueError(f"max_position_embeddings {self.max_position_embeddings} is shorter than the "
                             f"longest prompt + completion + EOS ({needed}); raise it")

    def key(self) -> str:
        """The cache key: ``config_hash(self)``."""
        return config_hash(self)


def _checked_fields(cls: type, d: dict, where: str) -> dict:
    """``d`` unchanged when every key is a field of dataclass ``cls``; else a ValueError naming the keys."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; valid keys: {', '.join(sorted(names))}")
    return d


def world_config_from_dict(d: dict | None) -> WorldConfig:
    """A ``WorldConfig`` from a nested dict (a YAML ``world:`` section); missing keys keep their defaults.

    Shape: ``{task: {ArithmeticConfig fields}, teacher: {ModelSpec fields, sft: {SFTConfig fields}},
    student: {...}, max_position_embeddings: int}``. A partial ``teacher``/``student``/``sft`` section
    overrides only the keys it names (so ``{teacher: {sft: {steps: 500}}}`` keeps the default size).

    Raises:
        ValueError: an unknown key (the message lists the valid ones) or an invalid value.
    """
    d = _checked_fields(WorldConfig, dict(d or {}), "world")
    base = WorldConfig()
    kwargs: dict = {}
    if "task" in d:
        kwargs["task"] = ArithmeticConfig(**(asdict(base.task) | _checked_fields(ArithmeticConfig, d["task"],
                                                                                  "world.task")))
    for role in ROLES:
        if role not in d:
            continue
        section = dict(_checked_fields(ModelSpec, d[role], f"world.{role}"))
        default_spec: ModelSpec = getattr(base, role)
        sft = asdict(default_spec.sft) | _checked_fields(SFTConfig, section.pop("sft", {}) or {}, f"world.{role}.sft")
        spec = {f.name: getattr(default_spec, f.name) for f in dataclasses.fields(ModelSpec)} | section
        kwargs[role] = ModelSpec(**(spec | {"sft": SFTConfig(**sft)}))
    if "max_position_embeddings" in d:
        kwargs["max_position_embeddings"] = d["max_position_embeddings"]
    return WorldConfig(**kwargs)


def longest_sequence(task: ArithmeticConfig) -> int:
    """Tokens in the longest prompt + completion + EOS of a task (character-level tokenizer)."""
    terms = [task.max_digit] * task.num_terms
    return len(format_prompt(terms)) + len(trace_for_order(terms, list(range(task.num_terms)))) + 1


def config_dict(cfg: WorldConfig) -> dict:
    """A JSON-ready dict of the config (what is hashed and written beside the models)."""
    return asdict(cfg)


def config_hash(cfg: WorldConfig) -> str:
    """16 hex digits of a SHA-256 over the config and ``WORLD_FORMAT_VERSION``.

    ``num_threads`` and ``log_every`` are left out: they change how fast training runs, not what it learns
    (float rounding may differ across thread counts; bitwise equality is promised only for equal ones).
    """
    d = config_dict(cfg)
    for role in ROLES:
        d[role]["sft"].pop("num_threads")
        d[role]["sft"].pop("log_every")
    payload = json.dumps({"version": WORLD_FORMAT_VERSION, "config": d}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$EOPD_CACHE`` when set, else ``~/.cache/eopd/world``."""
    env = os.environ.get("EOPD_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/eopd/world").expanduser()


def new_model(cfg: WorldConfig, role: str, tokenizer) -> PreTrainedModel:
    """A freshly initialised tiny Qwen3 of ``role``'s size whose config names the tokenizer's EOS/pad."""
    vocab_size, eos_token_id, pad_token_id = len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id
    spec: ModelSpec = getattr(cfg, role)
    return build_tiny_qwen3(
        vocab_size, hidden_size=spec.hidden_size, num_layers=spec.num_layers, num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads, intermediate_size=spec.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True, seed=spec.init_seed,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None,
    )


def train_role(
    cfg: WorldConfig, role: str, on_step: Callable[[int, float, float], None] | None = None
) -> tuple[PreTrainedModel, object]:
    """Train ``role`` (``"teacher"`` or ``"student"``) from scratch; returns ``(model, tokenizer)``.

    The teacher's traces follow ``cfg.task.teacher_styles``, the student's ``cfg.task.student_styles``;
    both are drawn from the train split only.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    spec: ModelSpec = getattr(cfg, role)
    tokenizer = build_char_tokenizer(DEFAULT_ALPHABET)
    model = new_model(cfg, role, tokenizer)
    styles = cfg.task.teacher_styles if role == "teacher" else cfg.task.student_styles
    examples = sample_traces(cfg.task, styles, spec.sft.steps * spec.sft.batch_size, seed=spec.data_seed)
    train_sft(model, tokenizer, examples, spec.sft, on_step=on_step)
    return model, tokenizer


def save_model(model: PreTrainedModel, tokenizer, path: Path, info: dict) -> None:
    """``save_pretrained`` the model and tokenizer into ``path`` and write ``info`` as ``eopd_world.json``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "eopd_world.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def world_paths(cfg: WorldConfig, cache_dir: str | Path | None = None) -> tuple[Path, Path, Path]:
    """Where ``build_world`` puts (or finds) ``(teacher, student, tokenizer)`` for ``cfg``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / config_hash(cfg)
    return folder / "teacher", folder / "student", folder / "tokenizer"


def _is_complete(folder: Path) -> bool:
    return all((folder / role / "model.safetensors").exists() for role in ROLES) and (
        folder / "tokenizer" / "tokenizer.json"
    ).exists()


def build_world(
    cfg: WorldConfig | None = None,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Path, Path, Path]:
    """Train (or find cached) the teacher and base student; returns ``(teacher, student, tokenizer)`` paths.

    Everything is written into a temporary sibling folder and renamed into place in one step, so an
    interrupted run never leaves a half-written world that a later run would trust. If another process
    finished the same world first, its copy wins and ours is discarded.

    Args:
        cfg: The world (default ``WorldConfig()``).
        cache_dir: Cache root (default ``default_cache_dir()``); the world lives in ``<root>/<hash>``.
        log: Receives progress lines (None: silent).
    """
    cfg = cfg or WorldConfig()
    say = log or (lambda _msg: None)
    teacher_path, student_path, tok_path = world_paths(cfg, cache_dir)
    folder = teacher_path.parent
    if _is_complete(folder):
        say(f"world {folder.name}: cached at {folder}")
        return teacher_path, student_path, tok_path
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for role in ROLES:
            say(f"world {folder.name}: training the {role}")
            start = time.perf_counter()
            model, tokenizer = train_role(
                cfg, role, on_step=lambda s, loss, lr, r=role: say(f"  {r} step {s} loss {loss:.4f} lr {lr:.2e}")
            )
            elapsed = time.perf_counter() - start
            say(f"world {folder.name}: {role} trained in {elapsed:.1f}s")
            save_model(model, tokenizer, tmp / role,
                       {"role": role, "world": config_dict(cfg), "hash": folder.name, "train_seconds": elapsed,
                        "reproduce": f"eopd sft --role {role} --output-dir DIR"})
        build_char_tokenizer(DEFAULT_ALPHABET).save_pretrained(tmp / "tokenizer")
        (tmp / "world.json").write_text(json.dumps(config_dict(cfg), indent=2, sort_keys=True))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _is_complete(folder):
                raise
            say(f"world {folder.name}: another process finished it first; using theirs")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return teacher_path, student_path, tok_path


def load_world(
    cfg: WorldConfig | None = None, cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None
) -> tuple[PreTrainedModel, PreTrainedModel, object]:
    """``build_world`` then load ``(teacher, student, tokenizer)`` on CPU in float32."""
    teacher_path, student_path, tok_path = build_world(cfg, cache_dir, log)
    return load_causal_lm(teacher_path), load_causal_lm(student_path), load_tokenizer(tok_path)


def _aligned_text(tokenizer, ids: list[int]) -> str:
    """One character per token: the token's own character, ``"?"`` for a special token (EOS, pad, unk).

    Lets per-character roles (``order_choice_mask``) index per-token entropies even when a sample emits
    special tokens mid-way (which ``decode(skip_special_tokens=True)`` would drop, shifting positions).

    Raises:
        ValueError: a token is longer than one character (not the embedded character tokenizer).
    """
    special = set(tokenizer.all_special_ids)
    chars = []
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        if i in special:
            chars.append("?")
        elif len(piece) != 1:
            raise ValueError(f"measure needs one token per character (the embedded character tokenizer); "
                             f"token {piece!r} spans {len(piece)}")
        else:
            chars.append(piece)
    return "".join(chars)


@torch.no_grad()
def token_entropies(model: PreTrainedModel, rollout) -> torch.Tensor:
    """Entropy (nats, temperature 1) of the model's next-token distribution at each completion position.

    Returns:
        ``entropy_BT``: entry ``[b, t]`` is the entropy of the distribution that produced completion token
        ``t`` of row ``b`` (masked positions hold garbage; use ``rollout.completion_mask_BT``).
    """
    P = rollout.prompt_len
    seq_BL = rollout.sequences_BL
    mask_BL = rollout.attention_mask_BL
    logits_BLV = model(input_ids=seq_BL, attention_mask=mask_BL, position_ids=position_ids_from_mask(mask_BL)).logits
    logits_BTV = logits_BLV[:, P - 1 : -1].float()
    logp_BTV = torch.log_softmax(logits_BTV, dim=-1)
    return -(logp_BTV.exp() * logp_BTV).sum(-1)


def faithful_path(task: ArithmeticTask, completion: str, terms: list[int]) -> str | None:
    """The path key when the completion is a correct chain over exactly ``terms``, else None.

    Stricter than ``grade`` (answer only): a chain that miscopies a term but lands on the right total
    by luck is correct for the grader but is no path of this prompt.
    """
    values = parse_chain(completion)
    if values is None or sorted(values) != sorted(terms):
        return None
    return task.path_key(completion)


def measure(
    model: PreTrainedModel,
    tokenizer,
    task: ArithmeticTask,
    n_problems: int = 200,
    n_samples: int = 8,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    batch_prompts: int = 100,
) -> dict[str, float]:
    """Accuracy, path diversity and per-role entropy of a model on the task's first test prompts.

    Entropy is split by token role (``order_choice_mask``): at order-choice tokens (naming a term while
    >= 2 remain) a multi-path teacher should be clearly uncertain; at arithmetic tokens (sums, separators,
    the answer, EOS) any good model should be near 0. Needs one token per character (the embedded
    tokenizer), which is checked.

    Args:
        model: The model (sampled on its own device).
        tokenizer: Its tokenizer.
        task: The arithmetic task (its fixed test split).
        n_problems: Test prompts used (the first ones of the split).
        n_samples: Samples per prompt (the ``k`` of pass@k).
        generator: Sampling randomness (default: seed 0 on CPU).
        temperature: Sampling temperature.
        batch_prompts: Prompts per sampling batch.

    Returns:
        ``pass@1`` and ``pass@{n_samples}`` (graded on the final answer), ``faithful@1`` (fraction of
        samples that are a correct chain over exactly the prompt's terms), ``distinct_correct_paths``
        (mean number of distinct faithful paths per prompt), ``entropy_choice``, ``entropy_arithmetic``,
        ``entropy_first`` (mean nats at the first completion token), ``n_problems``, ``n_samples``.
    """
    generator = generator or torch.Generator().manual_seed(0)
    problems = task.problems("test")[:n_problems]
    n_correct: list[int] = []
    n_paths: list[int] = []
    n_faithful = 0
    ent_choice: list[float] = []
    ent_arith: list[float] = []
    ent_first: list[float] = []
    model.eval()
    for start in range(0, len(problems), batch_prompts):
        chunk = problems[start : start + batch_prompts]
        ids = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in chunk]
        rollout = sample(model, ids, n=n_samples, max_new_tokens=longest_sequence(task.config) + 4,
                         temperature=temperature, eos_token_ids=[tokenizer.eos_token_id],
                         pad_token_id=tokenizer.pad_token_id, generator=generator, vocab_size=len(tokenizer))
        texts = decode_completions(tokenizer, rollout)
        entropy_BT = token_entropies(model, rollout).cpu()
        lengths_B = rollout.lengths_B().long().tolist()
        completion_ids_BT = rollout.completion_ids_BT.tolist()
        for i, problem in enumerate(chunk):
            rows = range(i * n_samples, (i + 1) * n_samples)
            n_correct.append(sum(task.grade(texts[b], problem.answer) for b in rows))
            keys = [faithful_path(task, texts[b], problem.meta["terms"]) for b in rows]
            n_faithful += sum(k is not None for k in keys)
            n_paths.append(len(set(keys) - {None}))
        for b in range(len(texts)):
            ent_T = entropy_BT[b, : lengths_B[b]].tolist()
            choice_T = order_choice_mask(_aligned_text(tokenizer, completion_ids_BT[b][: lengths_B[b]]))
            ent_choice += [e for e, c in zip(ent_T, choice_T, strict=True) if c]
            ent_arith += [e for e, c in zip(ent_T, choice_T, strict=True) if not c]
            ent_first += ent_T[:1]
    return {
        "pass@1": float(np.mean(n_correct)) / n_samples,
        f"pass@{n_samples}": float(np.mean([pass_at_k(n_samples, c, n_samples) for c in n_correct])),
        "faithful@1": n_faithful / (len(problems) * n_samples),
        "distinct_correct_paths": float(np.mean(n_paths)),
        "entropy_choice": float(np.mean(ent_choice)) if ent_choice else 0.0,
        "entropy_arithmetic": float(np.mean(ent_arith)) if ent_arith else 0.0,
        "entropy_first": float(np.mean(ent_first)) if ent_first else 0.0,
        "n_problems": len(problems),
        "n_samples": n_samples,
    }


def replace_budgets(cfg: WorldConfig, teacher_steps: int, student_steps: int) -> WorldConfig:
    """A copy of ``cfg`` with other SFT step counts (warmup clipped to fit); handy for tests and sweeps."""
    def with_steps(spec: ModelSpec, steps: int) -> ModelSpec:
        sft = dataclasses.replace(spec.sft, steps=steps, warmup_steps=min(spec.sft.warmup_steps, steps // 10))
        return dataclasses.replace(spec, sft=sft)

    return dataclasses.replace(cfg, teacher=with_steps(cfg.teacher, teacher_steps),
                               student=with_steps(cfg.student, student_steps))
