"""The training config: a small tree of dataclasses, loaded from YAML plus ``key=value`` overrides.

Every field has help text and every section validates itself in ``__post_init__``, so a bad config stops at
load with one line naming the key and what is allowed, not twenty minutes into a run. Unknown keys and wrong
types are caught by ``from_dict`` before any model is touched.

    cfg = load_config("configs/tiny.yaml", ["max_steps=5", "rollout.n=2", "objective=opd"])
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eopd.errors import UserError
from eopd.losses.objectives import ObjectiveConfig


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message names the key and what is allowed."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class TinyModelSpec:
    """A tiny random Qwen3 model to build at a model path that does not exist yet (tests, smoke runs)."""

    hidden_size: int = field(default=64, metadata=_help("model width"))
    num_layers: int = field(default=2, metadata=_help("decoder layers"))
    num_heads: int = field(default=4, metadata=_help("attention heads"))
    num_kv_heads: int = field(default=2, metadata=_help("key/value heads"))
    vocab_padding: int = field(default=0, metadata=_help("extra lm_head rows beyond the tokenizer (like Qwen3's)"))
    initializer_range: float = field(default=0.02, metadata=_help("init std; larger gives peakier random models"))
    max_position_embeddings: int = field(default=256, metadata=_help("longest sequence the model config declares"))
    seed: int = field(default=0, metadata=_help("initialisation seed"))

    def __post_init__(self) -> None:
        require(self.hidden_size > 0 and self.hidden_size % self.num_heads == 0, "hidden_size",
                 f"must be a positive multiple of num_heads ({self.num_heads}), got {self.hidden_size}")
        require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                 f"must divide num_heads ({self.num_heads}), got {self.num_kv_heads}")
        require(self.vocab_padding >= 0, "vocab_padding", f"must be >= 0, got {self.vocab_padding}")
        require(self.max_position_embeddings > 0, "max_position_embeddings",
                 f"must be > 0, got {self.max_position_embeddings}")


#: Module names that are a causal LM's input or output embedding in common Hugging Face models: a LoRA
#: adapter there is refused (``eopd.training.lora.check_embeddings_not_adapted`` has the reason and the exact check).
EMBEDDING_MODULE_NAMES = ("lm_head", "embed_tokens", "wte", "embed_out", "word_embeddings")


@dataclass
class LoraSpec:
    """A LoRA student through peft (``pip install 'eopd[peft]'``): only the low-rank adapters on
    ``target_modules`` train, the base weights stay frozen, checkpoints hold the adapter alone (docs/scaling.md)."""

    r: int = field(default=16, metadata=_help("adapter rank"))
    alpha: float = field(default=32.0, metadata=_help("scale numerator: the update is (alpha / r) * B @ A"))
    dropout: float = field(default=0.0, metadata=_help(
        "dropout on the adapter's input while training; 0 keeps the first PPO ratio exactly 1 (the learner's "
        "log-probs are computed in eval mode)"))
    target_modules: list[str] | str = field(default="all-linear", metadata=_help(
        "module names to adapt, a list or comma-separated (Qwen3: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
        "down_proj), or all-linear (peft: every linear layer but the output layer); the lm_head and the "
        "embeddings are refused"))

    def __post_init__(self) -> None:
        require(self.r > 0, "models.lora.r", f"must be > 0, got {self.r}")
        require(self.alpha > 0, "models.lora.alpha", f"must be > 0, got {self.alpha}")
        require(0 <= self.dropout < 1, "models.lora.dropout", f"must be in [0, 1), got {self.dropout}")
        targets = self.target_modules
        if isinstance(targets, str):
            targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        require(isinstance(targets, str) or (isinstance(targets, list) and bool(targets)
                                             and all(isinstance(t, str) and t.strip() for t in targets)),
                "models.lora.target_modules", f"must be module names or all-linear, got {self.target_modules!r}")
        adapted_heads = [] if isinstance(targets, str) else [t for t in targets if t in EMBEDDING_MODULE_NAMES]
        require(not adapted_heads, "models.lora.target_modules",
                f"{adapted_heads[0] if adapted_heads else ''!r} is an embedding/lm_head: the fused loss reads the "
                "lm_head weight directly, which peft leaves as the frozen base weight, so that adapter would get "
                "no gradient; adapt the decoder layers (e.g. q_proj,v_proj or all-linear)")
        self.target_modules = targets


@dataclass
class ModelsConfig:
    """Teacher and student: local folders (save_pretrained) or Hub ids."""

    teacher: str = field(default="", metadata=_help("teacher path or Hub id"))
    student: str = field(default="", metadata=_help("student path or Hub id (the model trained)"))
    tokenizer: str | None = field(default=None, metadata=_help("tokenizer path/id (default: the student's)"))
    dtype: str = field(default="auto", metadata=_help("auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16"))
    device: str = field(default="auto", metadata=_help("auto | cpu | cuda | cuda:N"))
    teacher_device: str = field(default="auto", metadata=_help(
        "in-process teacher's device: auto (the student's) | cpu | cuda | cuda:N (one process only); its "
        "scores come back to the student's device"))
    teacher_dtype: str = field(default="auto", metadata=_help(
        "teacher weights: auto (models.dtype, resolved for the teacher's device) | float32 | bfloat16 | float16"))
    lora: LoraSpec | None = field(default=None, metadata=_help(
        "train LoRA adapters instead of every weight (needs peft): {r: 16, alpha: 32, dropout: 0, target_modules: "
        "all-linear}, e.g. models.lora.r=16 (docs/scaling.md); absent: full fine-tuning"))
    trust_remote_code: bool = field(default=False, metadata=_help("allow model code from the Hub (off)"))
    build_teacher: TinyModelSpec | None = field(
        default=None, metadata=_help("build a tiny random teacher at `teacher` when the folder is missing"))
    build_student: TinyModelSpec | None = field(
        default=None, metadata=_help("build a tiny random student at `student` when the folder is missing"))
    build_tokenizer: str = field(default="char", metadata=_help(
        "tokenizer of built models: char (one id per build_alphabet character) | math_bpe (Qwen3-style byte-level "
        "BPE trained on build_corpus: ChatML specials, no BOS, <|im_end|> ends a turn, thinking-switch template)"))
    build_alphabet: str = field(default="0123456789+=,;", metadata=_help("char: characters of a built tokenizer"))
    build_vocab_size: int = field(default=512, metadata=_help("math_bpe: ids in all (256 bytes, merges, 5 specials)"))
    build_corpus: str = field(default="math500", metadata=_help(
        "math_bpe: comma-separated math sources (as data.path) whose problems train the BPE"))

    def __post_init__(self) -> None:
        require(bool(self.student), "models.student", "is required (a local folder or a Hub id)")
        require(self.dtype in ("auto", "float32", "bfloat16", "float16"), "models.dtype",
                 f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        require(self.teacher_dtype in ("auto", "float32", "bfloat16", "float16"), "models.teacher_dtype",
                 f"must be auto, float32, bfloat16 or float16, got {self.teacher_dtype!r}")
        require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "models.device",
                 f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.teacher_device) is not None, "models.teacher_device",
                 f"must be auto, cpu, cuda or cuda:N, got {self.teacher_device!r}")
        require(self.build_tokenizer in ("char", "math_bpe"), "models.build_tokenizer",
                 f"must be char or math_bpe, got {self.build_tokenizer!r}")
        require(self.build_vocab_size >= MIN_VOCAB_SIZE, "models.build_vocab_size",
                 f"must be at least {MIN_VOCAB_SIZE} (256 bytes, 5 specials, one merge), got {self.build_vocab_size}")
        require(bool(self.build_corpus.strip(", ")), "models.build_corpus",
                 "is empty; name the math sources the BPE is trained on (e.g. math500)")
        for key, path, spec in (("models.teacher", self.teacher, self.build_teacher),
                                ("models.student", self.student, self.build_student)):
            if spec is None and _looks_local(path) and not Path(path).expanduser().is_dir():
                raise ConfigError(f"{key}: folder {path!r} does not exist; give a save_pretrained folder, a Hub "
                                  f"id, or a `{key.replace('models.', 'models.build_')}` section to build one")


#: The smallest ``math_bpe`` vocabulary: 256 byte ids, 5 special tokens (3 ChatML, 2 thinking) and one merge.
#: Here, where the config is checked; ``eopd.models.math_tokenizer`` builds that vocabulary and reads it from here.
MIN_VOCAB_SIZE = 256 + 5 + 1


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") >= 2


@dataclass
class DataConfig:
    """Where the prompts come from: the training prompts (``path``) and a held-out eval split, never the same.

    ``eopd.tasks.build_task`` turns this section into a task.
    """

    task: str = field(default="arithmetic", metadata=_help("arithmetic | math | jsonl | hf"))
    path: str | None = field(default=None, metadata=_help(
        "TRAINING prompts. math: comma-separated sources: benchmark names (gsm8k, math500, ...), .jsonl/.json files,"
        " folders, hf:owner/name Hub datasets (e.g. hf:DigitalLearningGmbH/MATH-lighteval); jsonl: a .jsonl/.json "
        "file; hf: a dataset id. Hub ids take an optional config and split: hf:owner/name:config[split] (split "
        "default train)"))
    eval_path: str | None = field(default=None, metadata=_help(
        "EVAL prompts, same forms as path (Hub split default test). math default: the paper's six benchmarks "
        "math500,aime24,aime25,amc23,minerva,olympiadbench; jsonl/hf: a second file or dataset"))
    eval_fraction: float | None = field(default=None, metadata=_help(
        "instead of eval_path: hold out this share (0 < f < 1) of path's distinct prompts as the eval split, "
        "never trained on"))
    split_seed: int = field(default=0, metadata=_help("seed of the eval_fraction hold-out (same seed, same split)"))
    prompt_field: str = field(default="prompt", metadata=_help("jsonl/hf: field holding the prompt text"))
    answer_field: str | None = field(default=None, metadata=_help("jsonl/hf: optional gold answer field"))
    split: str = field(default="train", metadata=_help("which split of the task to train on (train | test)"))
    limit: int | None = field(default=None, metadata=_help("use only the first N prompts"))
    chat_template: bool = field(default=False, metadata=_help("wrap prompts in the tokenizer's chat template"))
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict, metadata=_help(
        "extra keyword arguments of the chat template, e.g. {enable_thinking: false} for Qwen3's non-thinking mode"))
    arithmetic: dict[str, Any] = field(default_factory=dict, metadata=_help("ArithmeticConfig fields"))

    def __post_init__(self) -> None:
        require(self.task in ("arithmetic", "math", "jsonl", "hf"), "data.task",
                 f"must be arithmetic, math, jsonl or hf, got {self.task!r}")
        require(self.task == "arithmetic" or bool(self.path and self.path.strip()), "data.path",
                 f"is required for task {self.task!r} (the training prompts)")
        require(self.eval_path is None or bool(self.eval_path.strip()), "data.eval_path",
                 "is empty; name the eval prompts or leave it unset")
        require(self.eval_fraction is None or 0 < self.eval_fraction < 1, "data.eval_fraction",
                 f"must be in (0, 1), got {self.eval_fraction}")
        require(self.eval_path is None or self.eval_fraction is None, "data.eval_fraction",
                 "give data.eval_path (a second source) or data.eval_fraction (a held-out share), not both")
        require(self.task != "arithmetic" or (self.eval_path is None and self.eval_fraction is None),
                 "data.eval_path", "task arithmetic holds out its own test split (data.arithmetic.test_size); "
                 "eval_path and eval_fraction apply to math, jsonl and hf")
        require(self.split in ("train", "test"), "data.split", f"must be train or test, got {self.split!r}")
        require(self.limit is None or self.limit > 0, "data.limit", f"must be > 0, got {self.limit}")
        require(all(isinstance(k, str) for k in self.chat_template_kwargs), "data.chat_template_kwargs",
                 f"keys must be argument names, got {list(self.chat_template_kwargs)}")
        require(self.chat_template or not self.chat_template_kwargs, "data.chat_template_kwargs",
                 "only apply with data.chat_template: true; set it or remove the kwargs")


@dataclass
class RolloutConfig:
    """Student sampling. The loss uses the same temperature."""

    prompts_per_step: int = field(default=8, metadata=_help("prompts per step (all processes together)"))
    n: int = field(default=4, metadata=_help("completions per prompt"))
    max_new_tokens: int = field(default=32, metadata=_help("completion budget"))
    temperature: float = field(default=1.0, metadata=_help("sampling AND loss temperature"))
    top_p: float = field(default=1.0, metadata=_help("must be 1: training samples the full distribution"))
    max_batch_size: int | None = field(default=None, metadata=_help(
        "sequences decoded at once per process (bounds the KV cache; a finished row's slot goes at once to the "
        "next waiting row; the samples for a seed do not change). Default: the process's whole share of the step"))
    compile: bool = field(default=False, metadata=_help(
        "decode with a compiled one-token step (torch.compile over fixed slots; CUDA graphs on a GPU); falls "
        "back to eager with one warning line if compilation fails. Off until measured on your GPU "
        "(docs/performance.md, Sampling)"))

    def __post_init__(self) -> None:
        require(self.max_batch_size is None or self.max_batch_size > 0, "rollout.max_batch_size",
                f"must be > 0 (or unset), got {self.max_batch_size}")
        require(self.prompts_per_step > 0, "rollout.prompts_per_step", f"must be > 0, got {self.prompts_per_step}")
        require(self.n > 0, "rollout.n", f"must be > 0, got {self.n}")
        require(self.max_new_tokens > 0, "rollout.max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        require(self.temperature > 0, "rollout.temperature", f"must be > 0, got {self.temperature}")
        require(self.top_p == 1, "rollout.top_p",
                f"must be 1 for training, got {self.top_p}: the loss and the PPO ratio use the full distribution, "
                "so samples drawn from a nucleus would be scored by a distribution that did not draw them; "
                "top-p is for evaluation (eval.top_p)")

    @property
    def batch_size(self) -> int:
        """Sequences per step: ``prompts_per_step * n``."""
        return self.prompts_per_step * self.n


@dataclass
class OptimConfig:
    """AdamW with warmup + cosine decay, PPO epochs over minibatches."""

    lr: float = field(default=1e-5, metadata=_help("peak learning rate"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    beta1: float = field(default=0.9, metadata=_help("AdamW beta1"))
    beta2: float = field(default=0.999, metadata=_help("AdamW beta2"))
    warmup_steps: int = field(default=0, metadata=_help("linear warmup, in optimizer updates"))
    min_lr_ratio: float = field(default=0.0, metadata=_help("cosine floor as a fraction of lr"))
    grad_clip: float = field(default=1.0, metadata=_help("max gradient norm (0 disables)"))
    minibatch_size: int = field(default=8, metadata=_help("sequences per optimizer update (recipe: 32 of 128)"))
    micro_batch_size: int = field(default=8, metadata=_help("sequences per forward/backward (memory)"))
    max_tokens_per_micro_batch: int | None = field(default=None, metadata=_help(
        "instead of micro_batch_size: rows sorted by length and packed under this many padded tokens "
        "(rows x (prompt + completion width)) per forward/backward, for the teacher's scoring and the student's "
        "update; the loss stays normalised by the global valid-token count. E.g. 32768"))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "recompute activations in the backward of the update (less memory, ~1/3 more update compute); "
        "sampling keeps its KV cache"))
    ppo_epochs: int = field(default=1, metadata=_help("passes over each rollout batch"))
    recompute_logp_old: bool = field(
        default=True, metadata=_help("old log-probs from the learner's own forward before the update (as verl "
                                     "does), so the PPO ratio starts at 1 even when sampling ran in bf16"))
    diagnostics: bool = field(default=True, metadata=_help(
        "log diag/* (each loss term's logit-gradient norm, their cosine, RKL gradient spread on high/low teacher "
        "entropy tokens, applied clip coefficient) and role/* per token role (docs/metrics.md, Diagnostics)"))
    normalize: str = field(default="global", metadata=_help(
        "global: a minibatch's loss is its token sum over its valid tokens on all processes (the paper's "
        "equation) | micro_batch: each micro-batch's own token mean, divided by the process's number of "
        "micro-batches, processes weighing equally (the public code's pipeline; docs/objectives.md)"))

    def __post_init__(self) -> None:
        require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")
        require(self.minibatch_size > 0, "optim.minibatch_size", f"must be > 0, got {self.minibatch_size}")
        require(self.micro_batch_size > 0 and self.minibatch_size % self.micro_batch_size == 0,
                 "optim.micro_batch_size",
                 f"must divide optim.minibatch_size ({self.minibatch_size}), got {self.micro_batch_size}")
        require(self.max_tokens_per_micro_batch is None or self.max_tokens_per_micro_batch > 0,
                "optim.max_tokens_per_micro_batch", f"must be > 0 (or unset), got {self.max_tokens_per_micro_batch}")
        require(self.ppo_epochs > 0, "optim.ppo_epochs", f"must be > 0, got {self.ppo_epochs}")
        require(self.normalize in ("global", "micro_batch"), "optim.normalize",
                f"must be global or micro_batch, got {self.normalize!r}")


@dataclass
class EvalConfig:
    """Periodic evaluation during training (tasks that can grade answers)."""

    every: int = field(default=0, metadata=_help("evaluate every N steps (0: never)"))
    split: str = field(default="test", metadata=_help("split of the task to evaluate on"))
    problems: int = field(default=64, metadata=_help("problems per evaluation, from each benchmark (its first N)"))
    n: int = field(default=4, metadata=_help("samples per problem (Avg@n, pass@k)"))
    temperature: float = field(default=1.0, metadata=_help("sampling temperature"))
    top_p: float = field(default=1.0, metadata=_help("nucleus mass"))
    max_new_tokens: int | None = field(default=None, metadata=_help("default: rollout.max_new_tokens"))

    def __post_init__(self) -> None:
        require(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}")
        require(self.problems > 0 and self.n > 0, "eval.problems/eval.n", "must be > 0")
        require(self.temperature > 0, "eval.temperature", f"must be > 0, got {self.temperature}")
        require(0 < self.top_p <= 1, "eval.top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.max_new_tokens is None or self.max_new_tokens > 0, "eval.max_new_tokens",
                f"must be > 0, got {self.max_new_tokens}")


@dataclass
class TeacherConfig:
    """Where the teacher runs: in-process (``models.teacher``) or behind servers (``url``: ``vllm serve MODEL
    --max-logprobs 20``, ``python -m sglang.launch_server --model-path MODEL`` or ``eopd serve-teacher MODEL``;
    docs/served_teacher.md). With several teachers (``teachers``) these are every served teacher's defaults."""

    url: str | list[str] | None = field(default=None, metadata=_help(
        "served teacher: base URL(s) ending in /v1, e.g. http://host:8000/v1; a list (or comma-separated) spreads "
        "requests over servers. Unset: models.teacher is loaded in-process"))
    model: str | None = field(default=None, metadata=_help("model name sent to the server (default: the first "
                                                           "GET /v1/models lists)"))
    api: str = field(default="auto", metadata=_help(
        "the servers' scoring API: vllm (POST /v1/completions with prompt_logprobs: vLLM, eopd serve-teacher) | "
        "sglang (POST /generate with logprob_start_len: SGLang, eopd serve-teacher --api sglang) | auto (found "
        "at connect: SGLang by GET /v1/models' owned_by, or when the completions API answers without prompt "
        "log-probs)"))
    entropy: str = field(default="auto", metadata=_help(
        "gate entropy: auto (exact when available: in-process, or a server that sends prompt_entropies; else the "
        "top-k estimate) | exact (required) | topk (estimate from top_logprobs alone, also in-process)"))
    top_logprobs: int = field(default=20, metadata=_help("top-k log-probs the top-k entropy estimate reads "
                                                         "(vLLM's default --max-logprobs is 20)"))
    timeout_s: float = field(default=120.0, metadata=_help("deadline of one scoring request, seconds"))
    retries: int = field(default=3, metadata=_help("further attempts after a failed request (next server, "
                                                   "exponential backoff)"))
    backoff_s: float = field(default=1.0, metadata=_help("wait before the first retry (doubled each retry)"))
    max_in_flight: int = field(default=4, metadata=_help("scoring requests in flight at once (one per micro-batch)"))
    check_tokenizer: bool = field(default=True, metadata=_help(
        "at start, compare the server's /tokenize ids for a probe text with the local tokenizer's"))

    def __post_init__(self) -> None:
        require(self.entropy in ("auto", "exact", "topk"), "teacher.entropy",
                 f"must be auto, exact or topk, got {self.entropy!r}")
        require(self.api in TEACHER_APIS, "teacher.api", f"must be auto, vllm or sglang, got {self.api!r}")
        require(self.top_logprobs >= 1, "teacher.top_logprobs", f"must be >= 1, got {self.top_logprobs}")
        require(self.timeout_s > 0, "teacher.timeout_s", f"must be > 0, got {self.timeout_s}")
        require(self.retries >= 0, "teacher.retries", f"must be >= 0, got {self.retries}")
        require(self.backoff_s >= 0, "teacher.backoff_s", f"must be >= 0, got {self.backoff_s}")
        require(self.max_in_flight >= 1, "teacher.max_in_flight", f"must be >= 1, got {self.max_in_flight}")
        self.urls  # noqa: B018 (checks every URL)

    @property
    def urls(self) -> list[str]:
        """The server URLs (empty: in-process teacher)."""
        return _urls(self.url, "teacher.url")


def _is_http_url(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


#: ``teacher.api`` values (``eopd.teachers.wire.APIS``; here, where the config is checked).
TEACHER_APIS = ("auto", "vllm", "sglang")
#: What a teacher's name may hold: it becomes a metric key (``teacher/NAME/loss``) and a routing value.
TEACHER_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _urls(value: str | list[str] | None, key: str) -> list[str]:
    """Server URLs from a string (comma-separated) or a list of strings; empty when unset."""
    items = value if isinstance(value, list) else [value] if value else []
    items = [part for item in items for part in (item.split(",") if isinstance(item, str) else [item])]
    require(all(isinstance(u, str) for u in items), key, f"must be URL strings, got {value!r}")
    urls = [u.strip() for u in items if u.strip()]
    for url in urls:
        require(_is_http_url(url), key, f"must be http(s)://host:port/v1 URLs, got {url!r}")
    return urls


@dataclass
class TeacherSpec:
    """One of several teachers (``teachers.NAME``; docs/multi_teacher.md): in-process (``model``) or served
    (``url``), with its own gate settings where they differ from the run's (``loss.tau``, ``loss.top_k``)."""

    model: str | None = field(default=None, metadata=_help(
        "in-process: the teacher's folder or Hub id; served (with url): the model name sent (default: the first "
        "the server lists)"))
    url: str | list[str] | None = field(default=None, metadata=_help(
        "served: base URL(s) ending in /v1 (a list or comma-separated spreads requests over servers); unset: model "
        "is loaded in-process"))
    api: str | None = field(default=None, metadata=_help("served: auto | vllm | sglang (default: teacher.api)"))
    tau: float | None = field(default=None, metadata=_help("this teacher's entropy threshold (default: loss.tau)"))
    top_k: int | None = field(default=None, metadata=_help("this teacher's top-k (default: loss.top_k)"))
    entropy: str | None = field(default=None, metadata=_help("auto | exact | topk (default: teacher.entropy)"))
    top_logprobs: int | None = field(default=None, metadata=_help(
        "top-k the top-k entropy estimate reads (default: teacher.top_logprobs)"))

    def __post_init__(self) -> None:
        require(bool(self.model) or bool(self.url), "model", "or url is required: the teacher's folder or Hub id "
                "(in-process), or its server's URL (served)")
        self.url = _urls(self.url, "url") or None
        require(self.api is None or self.api in TEACHER_APIS, "api", f"must be auto, vllm or sglang, got {self.api!r}")
        require(self.tau is None or self.tau >= 0, "tau", f"must be >= 0 (nats), got {self.tau}")
        require(self.top_k is None or self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")
        require(self.entropy is None or self.entropy in ("auto", "exact", "topk"), "entropy",
                f"must be auto, exact or topk, got {self.entropy!r}")
        require(self.top_logprobs is None or self.top_logprobs >= 1, "top_logprobs",
                f"must be >= 1, got {self.top_logprobs}")
        if self.url is None and self.model is not None and _looks_local(self.model):
            require(Path(self.model).expanduser().is_dir(), "model",
                    f"folder {self.model!r} does not exist; give a save_pretrained folder or a Hub id")


@dataclass
class RoutingConfig:
    """Which of several teachers scores a prompt (docs/multi_teacher.md); decided once per prompt."""

    by: str = field(default="field", metadata=_help(
        "field: a field of the prompt's row (data.task jsonl/hf keep each row's short scalar fields; math keeps "
        "benchmark, the data source, subject, level) | hash: a stable hash of the prompt id, equal shares over the "
        "teachers in the order listed"))
    field: str = field(default="teacher", metadata=_help("by=field: the row field read"))
    # ``dataclasses.field``: the attribute ``field`` above hides the function in this class body
    map: dict[str, str] = dataclasses.field(default_factory=dict, metadata=_help(
        "by=field: {field value: teacher name}; empty: the value is the teacher's name"))
    default: str | None = dataclasses.field(default=None, metadata=_help(
        "the teacher of prompts whose value is not mapped (or lack the field); unset: such a prompt stops the run "
        "at its first step, with one line naming it"))

    def __post_init__(self) -> None:
        require(self.by in ("field", "hash"), "routing.by", f"must be field or hash, got {self.by!r}")
        require(bool(self.field.strip()), "routing.field", "is empty; name the row field that picks the teacher")
        self.map = {_route_key(k): v for k, v in self.map.items()}


def _route_key(value: Any) -> str:
    """A ``routing.map`` key as the router compares it (YAML may read ``1`` or ``true`` as non-strings)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def check_teachers(cfg: TrainConfig) -> None:
    """Where the teachers are and what they can score: ``models.teacher``, ``teacher.url`` or ``teachers``
    (exactly one way), a served teacher's limits (temperature 1, top-k only), several teachers' (top-k
    objectives, a fixed tau) and a routing rule that names them."""
    served = bool(cfg.teacher.urls) or any(spec.url for spec in cfg.teachers.values())
    if cfg.teachers:
        require(not cfg.teacher.urls, "teacher.url", "give each teacher's url under teachers.NAME.url, not both")
        for name in cfg.teachers:
            require(TEACHER_NAME.fullmatch(name) is not None, f"teachers.{name}",
                    "a teacher's name may hold letters, digits, '_', '-' and '.' only (it names its metrics)")
        obj = cfg.objective_config()
        require(not obj.needs_teacher_logits, "objective",
                f"{cfg.objective!r} reads the teacher's full distribution; with several teachers only top-k "
                "objectives (eopd, opd, ...) are supported")
        require(obj.adaptive_share is None, "loss.adaptive_share",
                "an adaptive tau is not supported with several teachers (each has its own entropy scale): give "
                "each its tau (teachers.NAME.tau)")
        names = sorted(cfg.teachers)
        for value, name in cfg.routing.map.items():
            require(name in cfg.teachers, "routing.map", f"{value!r} -> {name!r} names no teacher (teachers: "
                    f"{', '.join(names)})")
        require(cfg.routing.default is None or cfg.routing.default in cfg.teachers, "routing.default",
                f"{cfg.routing.default!r} names no teacher (teachers: {', '.join(names)})")
    else:
        require(bool(cfg.models.teacher) or bool(cfg.teacher.urls), "models.teacher",
                "is required (a local folder or a Hub id), unless teacher.url or a teachers section names the teacher")
    if not served:
        return
    require(cfg.rollout.temperature == 1, "rollout.temperature",
            f"must be 1 with a served teacher (teacher.url), got {cfg.rollout.temperature}: served log-probs are "
            "the temperature-1 teacher's and cannot be moved to another temperature from the top-k alone")
    require(not cfg.objective_config().needs_teacher_logits, "objective",
            f"{cfg.objective!r} reads the teacher's full distribution, which a served teacher (teacher.url) does "
            "not return; use a top-k objective (eopd, opd, ...) or an in-process teacher")


def check_official_alignment(cfg: TrainConfig) -> None:
    """``loss.official_alignment`` scores one more position per row (the one after its last token): only the
    in-process teacher can, one teacher at a time."""
    if not cfg.objective_config().official_alignment:
        return
    require(not cfg.teacher.urls and not cfg.teachers, "loss.official_alignment",
            "needs one in-process teacher (models.teacher): it reads the teacher's top-k after the last token, which "
            "a served teacher's prompt log-probs do not reach and several teachers do not support")


@dataclass
class ParallelConfig:
    """How the student is spread over the run's processes (``eopd.training.sharding``; docs/scaling.md)."""

    strategy: str = field(default="ddp", metadata=_help(
        "ddp: every process holds the whole student, its gradients and AdamW state | fsdp: each holds a shard "
        "(FSDP2: every decoder layer and the root sharded, float32 master weights, models.dtype compute); fsdp is "
        "what fits students that DDP cannot (the paper's 4B on 8 x 80 GB)"))
    shard_size: int | None = field(default=None, metadata=_help(
        "fsdp: processes a shard group spans (default: all). Fewer gives HSDP: shard within each group (set it to "
        "the GPUs of one node), replicate across groups"))
    reduce_every_micro_batch: bool = field(default=False, metadata=_help(
        "fsdp: reduce-scatter gradients after every micro-batch instead of once per minibatch: no full-size "
        "unsharded gradient kept between micro-batches, more communication"))

    def __post_init__(self) -> None:
        require(self.strategy in ("ddp", "fsdp"), "parallel.strategy", f"must be ddp or fsdp, got {self.strategy!r}")
        require(self.shard_size is None or self.shard_size > 0, "parallel.shard_size",
                f"must be > 0 (or unset: all processes), got {self.shard_size}")


@dataclass
class TrainConfig:
    """One distillation run."""

    output_dir: str = field(default="runs/default", metadata=_help("metrics, checkpoints and the final student"))
    seed: int = field(default=0, metadata=_help("seeds data order, sampling and init"))
    max_steps: int = field(default=20, metadata=_help("training steps (one rollout batch each)"))
    objective: str = field(default="eopd", metadata=_help("loss preset of eopd.losses (opd, eopd, fkl, ...)"))
    loss: dict[str, Any] = field(default_factory=dict, metadata=_help("ObjectiveConfig overrides (tau, top_k...)"))
    loss_impl: str = field(default="fused", metadata=_help("fused (chunked, never [N,V]) | plain (full logits)"))
    chunk_size: int | None = field(
        default=None, metadata=_help("positions per lm_head chunk (default: a memory budget, ~96 MiB CPU, 1 GiB GPU)"))
    resume: bool = field(default=False, metadata=_help("continue from the last complete checkpoint"))
    start_over: bool = field(default=False, metadata=_help(
        "begin at step 1 in an output_dir holding an earlier run (its checkpoints, metrics.jsonl, tb/, final/) by "
        "moving those to OUTPUT_DIR/earlier_run/ (never deleted); without it such a run stops with one line"))
    save_every: int = field(default=0, metadata=_help("checkpoint every N steps (0: only at the end)"))
    keep_checkpoints: int = field(default=2, metadata=_help("how many step checkpoints to keep"))
    log_every: int = field(default=1, metadata=_help("print a line every N steps"))
    num_threads: int | None = field(default=None, metadata=_help("torch CPU threads (default: torch's)"))
    wandb: bool = field(default=False, metadata=_help("log to Weights & Biases (needs wandb)"))
    wandb_project: str = field(default="eopd", metadata=_help("W&B project"))
    tensorboard: bool = field(default=True, metadata=_help("log to TensorBoard when it is installed"))
    models: ModelsConfig = field(default_factory=ModelsConfig, metadata=_help("teacher and student"))
    data: DataConfig = field(default_factory=DataConfig, metadata=_help("prompts"))
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata=_help("sampling"))
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=_help("optimizer"))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=_help("periodic evaluation"))
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata=_help("in-process or served teacher"))
    teachers: dict[str, TeacherSpec] = field(default_factory=dict, metadata=_help(
        "several teachers routed per prompt: {NAME: {model | url, tau, top_k, ...}} (docs/multi_teacher.md); "
        "empty: the one teacher of models.teacher / teacher.url"))
    routing: RoutingConfig = field(default_factory=RoutingConfig, metadata=_help(
        "with several teachers: which one scores a prompt"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata=_help(
        "ddp or fsdp (sharded) over the processes"))

    def __post_init__(self) -> None:
        require(self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        require(self.save_every >= 0, "save_every", f"must be >= 0, got {self.save_every}")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        require(self.loss_impl in ("fused", "plain"), "loss_impl", f"must be fused or plain, got {self.loss_impl!r}")
        require(self.chunk_size is None or self.chunk_size > 0, "chunk_size", f"must be > 0, got {self.chunk_size}")
        require(self.log_every > 0, "log_every", f"must be > 0, got {self.log_every}")
        require(self.rollout.batch_size % self.optim.minibatch_size == 0, "optim.minibatch_size",
                 f"must divide the rollout batch (rollout.prompts_per_step * rollout.n = {self.rollout.batch_size}),"
                 f" got {self.optim.minibatch_size}")
        self.objective_config()  # validates objective + loss overrides now
        check_teachers(self)
        check_official_alignment(self)

    def objective_config(self) -> ObjectiveConfig:
        """The loss: preset ``objective`` with ``loss`` overrides and the rollout temperature."""
        if "temperature" in self.loss and self.loss["temperature"] != self.rollout.temperature:
            raise ConfigError(f"loss.temperature ({self.loss['temperature']}) must equal rollout.temperature "
                              f"({self.rollout.temperature}): sampling and loss use one temperature")
        try:
            return ObjectiveConfig.preset(self.objective, **{**self.loss, "temperature": self.rollout.temperature})
        except (ValueError, TypeError) as err:
            raise ConfigError(f"objective/loss: {err}") from err


# ----------------------------------------------------------------------------------------------------------
# dict -> dataclass with type checks, YAML loading, dotted overrides


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check (and lightly coerce: int -> float) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping of {_type_name(tp)} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {value!r}")
        item = typing.get_args(tp)[1] if typing.get_args(tp) else None
        if dataclasses.is_dataclass(item):  # e.g. teachers: {NAME: TeacherSpec}
            return {k: _convert(v, item, f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}'; allowed under {prefix.rstrip('.') or 'the top level'}:"
                          f" {', '.join(names)}")
    kwargs = {name: _convert(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(prefix) or not prefix else f"{prefix}{msg}") from None


def _parse_scalar(raw: str) -> Any:
    """A YAML scalar, plus ``3e-3``-style floats that YAML 1.1 reads as strings."""
    if not raw:
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["rollout.n=2", "objective=opd"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (dotted keys for nested fields)")
        key, raw = item.split("=", 1)
        value = _parse_scalar(raw)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping at the top of a YAML (or JSON) file; ``what`` names the file in errors.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or does not hold a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(path)!r} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML config (or defaults when ``path`` is None) and apply ``key=value`` overrides.

    Relative model paths in the YAML are taken relative to the current directory, as typed on a command line.

    Raises:
        ConfigError: missing file, bad YAML, unknown key, wrong type or impossible value.
    """
    data = read_yaml_mapping(path, "config file") if path is not None else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    return from_dict(TrainConfig, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (saved next to every run)."""
    return dataclasses.asdict(cfg)
