"""The embedded worlds: a multi-path teacher and a weaker base student, trained here, named in a registry.

No model hub is reachable and the user may have only a laptop CPU, so the default distillation job runs
on models trained from scratch on the multi-path arithmetic task (``eopd.tasks.arithmetic``):

- the **teacher** (a tiny Qwen3) learns from traces in several order styles, so its order-choice tokens
  are genuinely high-entropy while its arithmetic tokens are near-deterministic;
- the **base student** (smaller, trained less) is imperfect, so on-policy distillation has room to raise
  its accuracy; whether it starts with one path or several is what distinguishes the worlds.

Which question a world can answer depends on its base student, so worlds are named and kept side by side
(``configs/worlds/NAME.yaml``, read by ``world_document``; docs/worlds.md): ``capability-gap`` (the
``WorldConfig()`` defaults: a one-path student, can distillation teach new paths?) and ``multi-path`` (a
student that already has several paths, does distillation keep them?). A world file also carries the demo
recipe that suits it, read by ``eopd.world.demo``.

Both models are saved as ordinary Hugging Face folders (``config.json``, ``model.safetensors``, tokenizer
files) and cached under ``<cache_dir>/<hash of the WorldConfig>/{teacher,student,tokenizer}`` (plus
``world.json``, the config; each model folder holds ``eopd_world.json``, its role and config); a second
``build_world`` with the same config loads nothing and trains nothing. Every folder is written through
``eopd.folders``, so an interrupted build leaves nothing behind. Reproduce a cached model with ``eopd world
--role teacher --output-dir DIR`` (or ``--role student``; plain ``eopd world`` fills the cache).

Measured defaults: see ``WorldConfig``.

A warning about threads: on a 2-core machine where another process is busy, two torch threads stall in
OpenMP barriers (measured 40-60x slower per step); one thread per process is then far faster.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from eopd.config import ConfigError, deep_merge, from_dict, read_yaml_mapping, require
from eopd.evaluation import evaluate_problems
from eopd.folders import FolderExistsError, atomic_folder, save_model_folder
from eopd.models import DEFAULT_ALPHABET, build_char_tokenizer, build_tiny_qwen3, load_causal_lm, load_tokenizer
from eopd.tasks.arithmetic import (
    ArithmeticConfig,
    ArithmeticTask,
    format_prompt,
    sample_traces,
    trace_for_order,
)
from eopd.world.sft import SFTConfig, train_sft

WORLD_FORMAT_VERSION = 2  # bump when trace format / training code changes what a config produces
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
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.hidden_size % self.num_heads == 0, "hidden_size",
                f"must be divisible by num_heads ({self.num_heads}), got {self.hidden_size}")
        require(self.num_heads % self.num_kv_heads == 0, "num_heads",
                f"must be divisible by num_kv_heads ({self.num_kv_heads}), got {self.num_heads}")


def _default_teacher() -> ModelSpec:
    return ModelSpec(hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=288,
                     init_seed=0, data_seed=1,
                     sft=SFTConfig(steps=1500, batch_size=64, lr=3e-3, beta2=0.98, warmup_steps=50, seed=0))


def _default_student() -> ModelSpec:
    return ModelSpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192,
                     init_seed=10, data_seed=11,
                     sft=SFTConfig(steps=400, batch_size=64, lr=3e-3, beta2=0.98, warmup_steps=30, seed=10))


@dataclass
class WorldConfig:
    """The task, the teacher and the base student of an embedded world (the cache key).

    The defaults are the ``capability-gap`` world (``configs/worlds/capability-gap.yaml`` changes nothing).
    What they measured (``WORLD_FORMAT_VERSION`` 2, torch 2.13 CPU, ``EOPD_CACHE=DIR eopd world --threads
    1``, which builds both models and prints ``measure`` on the first 200 held-out test prompts x 8
    samples at temperature 1):

    ========================  ===================  ========================
    metric                    teacher              base student
    ========================  ===================  ========================
    parameters                334,224              99,776
    SFT budget                1,500 steps x 64     400 steps x 64
    training wall time        407 s                89 s
    pass@1 / pass@8           0.969 / 1.000        0.832 / 1.000
    faithful@1                0.969                0.783
    distinct correct paths/8  4.43                 1.00
    as-written path share     0.35                 1.00
    entropy choice / arith    0.70 / 0.002 nats    0.04 / 0.06 nats
    ========================  ===================  ========================

    (Wall time on one thread of a 2-core machine busy with other jobs: 8 min 25 s for the whole build,
    ``measure`` 5 s per model. Version 1, with a hand-written schedule, took 79 s and 10 s with two threads
    on an idle machine; the work per step is the same.)

    So the teacher is accurate and genuinely multi-path (uncertain only where an order is chosen), and
    the student is single-path and imperfect. The student's accuracy rises steeply with its budget
    (version 1, two seeds each: 300 steps pass@1 0.45-0.50; 400: 0.77-0.80; 500: 0.91-0.94), so 400 leaves
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
        needed = longest_sequence(self.task)
        require(self.max_position_embeddings >= needed, "max_position_embeddings",
                f"must hold the longest prompt + completion + EOS ({needed} tokens), got "
                f"{self.max_position_embeddings}; raise it")

    def key(self) -> str:
        """The cache key: ``config_hash(self)``."""
        return config_hash(self)


def world_config_from_dict(d: dict | None, base: WorldConfig | None = None) -> WorldConfig:
    """A ``WorldConfig`` from a nested dict (a YAML ``world:`` section); missing keys keep ``base``'s values.

    Shape: ``{task: {ArithmeticConfig fields}, teacher: {ModelSpec fields, sft: {SFTConfig fields}},
    student: {...}, max_position_embeddings: int}``. The section is ``deep_merge``d into the defaults, so a
    partial ``teacher``/``student``/``sft`` section overrides only the keys it names (``{teacher: {sft:
    {steps: 500}}}`` keeps the default size), while an order-style mixture the user gives replaces the
    default mixture whole (it is one value, not a section). Then ``from_dict`` checks keys and types.

    Args:
        d: The section (None: no changes).
        base: What the section changes (default ``WorldConfig()``); e.g. a registered world, changed by a
            demo mode's ``world:`` section.

    Raises:
        ConfigError: an unknown key, a wrong type or an impossible value, in one line naming the key
            (``world.teacher.sft.steps: ...``).
    """
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise ConfigError(f"world: must be a mapping of WorldConfig fields, got {d!r}")
    defaults = _without_replaced_values(WorldConfig, config_dict(base or WorldConfig()), d)
    try:
        return from_dict(WorldConfig, deep_merge(defaults, d), prefix="world.")
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # ArithmeticConfig validates with plain ValueErrors
        raise ConfigError(f"world.task: {err}") from None


def _without_replaced_values(cls: type, defaults: dict, update: dict) -> dict:
    """``defaults`` minus the mapping-valued fields (not dataclass sections) that ``update`` sets.

    ``deep_merge`` merges every pair of mappings; a field such as ``task.teacher_styles`` is a single value
    that the user's mapping must replace, so its default is dropped before merging.
    """
    out = dict(defaults)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in update or f.name not in out:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            if isinstance(out[f.name], dict) and isinstance(update[f.name], dict):
                out[f.name] = _without_replaced_values(hints[f.name], out[f.name], update[f.name])
        elif typing.get_origin(hints[f.name]) is dict:
            del out[f.name]
    return out


# ----------------------------------------------------------------------------------------------------------
# The registry of named worlds: one YAML file each under configs/worlds/ (docs/worlds.md)

WORLDS_DIR = Path(__file__).resolve().parents[1] / "configs" / "worlds"
DEFAULT_WORLD = "multi-path"  # the demo's default (configs/demo.yaml): the paper's setting (docs/evidence.md)
WORLD_FILE_KEYS: tuple[str, ...] = ("description", "world", "train", "modes")


def world_names() -> list[str]:
    """The registered worlds: the stems of ``configs/worlds/*.yaml``, sorted."""
    return sorted(p.stem for p in WORLDS_DIR.glob("*.yaml"))


def world_file(name: str) -> Path:
    """The file of a world: a registered name (``multi-path``) or the path of a world file of one's own.

    Raises:
        ConfigError: neither a registered name nor an existing ``.yaml``/``.yml`` file; the one line lists
            the registered names.
    """
    if name in world_names():
        return WORLDS_DIR / f"{name}.yaml"
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    raise ConfigError(f"unknown world {name!r}; known worlds: {', '.join(world_names())} (or the path of a "
                      "world file, docs/worlds.md)")


def world_document(name: str) -> dict:
    """The checked mapping of a world file: ``description``, ``world``, ``train`` and ``modes``.

    ``world`` changes ``WorldConfig()`` (``world_config_from_dict``); ``train`` and ``modes`` are the demo
    recipe that suits the world, read by ``eopd.world.demo`` (which validates them with the trainer's config);
    missing sections are empty.

    Raises:
        ConfigError: an unknown world, an unknown top-level key, a section that is not a mapping, or an
            invalid ``world`` section; one line naming the file.
    """
    path = world_file(name)
    doc = read_yaml_mapping(path, "world file")
    unknown = sorted(set(doc) - set(WORLD_FILE_KEYS))
    if unknown:
        raise ConfigError(f"{path.name}: unknown key '{unknown[0]}'; a world file holds "
                          f"{', '.join(WORLD_FILE_KEYS)}")
    out: dict = {"description": doc.get("description") or ""}
    require(isinstance(out["description"], str), f"{path.name}: description", "must be a string")
    for key in ("world", "train", "modes"):
        out[key] = doc.get(key) or {}
        require(isinstance(out[key], dict), f"{path.name}: {key}", f"must be a mapping, got {out[key]!r}")
    try:
        world_config_from_dict(out["world"])
    except ConfigError as err:
        raise ConfigError(f"{path.name}: {err}") from None
    return out


def named_world_config(name: str) -> WorldConfig:
    """The ``WorldConfig`` of a registered world (or of a world file's path); see ``world_document``."""
    return world_config_from_dict(world_document(name)["world"])


def longest_completion(task: ArithmeticConfig) -> int:
    """Tokens in the longest completion of a task, EOS included (character-level tokenizer): the least
    ``max_new_tokens`` that lets every correct answer finish."""
    terms = [task.max_digit] * task.num_terms
    return len(trace_for_order(terms, list(range(task.num_terms)))) + 1


def longest_sequence(task: ArithmeticConfig) -> int:
    """Tokens in the longest prompt + completion + EOS of a task (character-level tokenizer)."""
    return len(format_prompt([task.max_digit] * task.num_terms)) + longest_completion(task)


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


def write_role(folder: Path, model: PreTrainedModel, tokenizer, info: dict) -> None:
    """Write a trained role into a fresh ``folder`` (an ``atomic_folder``'s): HF model, tokenizer, ``info``.

    ``info`` (see ``role_info``) goes to ``eopd_world.json`` beside the model.
    """
    save_model_folder(folder, model, tokenizer)
    (folder / "eopd_world.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def role_info(cfg: WorldConfig, role: str, train_seconds: float) -> dict:
    """What ``eopd_world.json`` records: the role, the whole config, its hash and the training time.

    The file is itself a world config (its ``world`` key), so ``eopd world --role ROLE --config
    eopd_world.json --output-dir DIR`` trains the same model again.
    """
    return {"role": role, "world": config_dict(cfg), "hash": config_hash(cfg), "train_seconds": train_seconds,
            "reproduce": f"eopd world --role {role} --config THIS_FILE --output-dir DIR"}


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

    The whole world is written through ``eopd.folders.atomic_folder`` and appears in one rename, so an
    interrupted run (an error, Ctrl-C) leaves neither a half-written world that a later run would trust nor
    a temporary folder. If another process finished the same world first, its copy wins and ours is
    discarded.

    Args:
        cfg: The world (default ``WorldConfig()``).
        cache_dir: Cache root (default ``default_cache_dir()``); the world lives in ``<root>/<hash>``.
        log: Receives progress lines (None: silent).

    Raises:
        FolderExistsError: the world's folder exists but is incomplete (not written by this code); it is
            never overwritten.
    """
    cfg = cfg or WorldConfig()
    say = log or (lambda _msg: None)
    teacher_path, student_path, tok_path = world_paths(cfg, cache_dir)
    folder = teacher_path.parent
    if _is_complete(folder):
        say(f"world {folder.name}: cached at {folder}")
        return teacher_path, student_path, tok_path
    _refuse_incomplete(folder)
    with atomic_folder(folder, keep_existing=True) as tmp:
        for role in ROLES:
            say(f"world {folder.name}: training the {role}")
            start = time.perf_counter()
            model, tokenizer = train_role(
                cfg, role, on_step=lambda s, loss, lr, r=role: say(f"  {r} step {s} loss {loss:.4f} lr {lr:.2e}")
            )
            elapsed = time.perf_counter() - start
            say(f"world {folder.name}: {role} trained in {elapsed:.1f}s")
            (tmp / role).mkdir()
            write_role(tmp / role, model, tokenizer, role_info(cfg, role, elapsed))
        build_char_tokenizer(DEFAULT_ALPHABET).save_pretrained(tmp / "tokenizer")
        (tmp / "world.json").write_text(json.dumps(config_dict(cfg), indent=2, sort_keys=True))
        if folder.exists():
            say(f"world {folder.name}: another process finished it first; using theirs")
    _refuse_incomplete(folder)
    return teacher_path, student_path, tok_path


def _refuse_incomplete(folder: Path) -> None:
    """Raise ``FolderExistsError`` when ``folder`` exists but is not a complete world."""
    if folder.exists() and not _is_complete(folder):
        raise FolderExistsError(f"{str(folder)!r} exists but is not a complete world (a model or the tokenizer "
                                "is missing); it is never overwritten: delete it and build again")


def load_world(
    cfg: WorldConfig | None = None, cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None
) -> tuple[PreTrainedModel, PreTrainedModel, object]:
    """``build_world`` then load ``(teacher, student, tokenizer)`` on CPU in float32."""
    teacher_path, student_path, tok_path = build_world(cfg, cache_dir, log)
    return load_causal_lm(teacher_path), load_causal_lm(student_path), load_tokenizer(tok_path)


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

    A thin view of ``eopd.evaluation.loop.evaluate_problems`` (the loop ``eopd eval`` and the trainer use, so the
    teacher's figures and the students' measure the same thing): full-vocabulary sampling (top-p 1), no chat
    template, a budget of the longest completion + 4 tokens. Entropy is split by token role
    (``ArithmeticTask.token_roles``): at order-choice tokens (naming a term while >= 2 remain) a multi-path
    teacher should be clearly uncertain; at arithmetic tokens (sums, separators, the answer, EOS) any good
    model should be near 0. Needs one token per character (the embedded tokenizer), which is checked.

    Args:
        model: The model (sampled on its own device).
        tokenizer: Its tokenizer.
        task: The arithmetic task (its fixed test split).
        n_problems: Test prompts used (the first ones of the split).
        n_samples: Samples per prompt (the ``k`` of pass@k).
        generator: Sampling randomness (default: seed 0 on CPU).
        temperature: Sampling temperature (the entropies are of the same temperature-scaled distribution).
        batch_prompts: Prompts per sampling batch.

    Returns:
        ``pass@1`` and ``pass@{n_samples}`` (graded on the final answer), ``faithful@1`` (share of samples
        with a path: a correct chain over exactly the prompt's terms), ``distinct_correct_paths`` (mean
        number of distinct paths per prompt), ``reference_path_share`` (share of pathed samples that add the
        terms as written), ``entropy_choice`` and ``entropy_arithmetic`` (token-weighted mean nats per role),
        ``n_problems``, ``n_samples``. Definitions: ``docs/metrics.md``.
    """
    problems = task.problems("test")[:n_problems]
    result = evaluate_problems(
        model, tokenizer, problems, task, n=n_samples, temperature=temperature, top_p=1.0,
        max_new_tokens=longest_sequence(task.config) + 4, batch_size=batch_prompts * n_samples,
        generator=generator or torch.Generator().manual_seed(0), use_chat_template=False,
    )
    (m,) = [b.metrics for b in result.benchmarks.values()]
    return {
        "pass@1": m["pass@1"],
        f"pass@{n_samples}": m[f"pass@{n_samples}"],
        "faithful@1": m["faithful@1"],
        "distinct_correct_paths": m["distinct_correct_paths"],
        "reference_path_share": m["reference_path_share"],
        "entropy_choice": m.get("entropy/choice", 0.0),
        "entropy_arithmetic": m.get("entropy/arithmetic", 0.0),
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
