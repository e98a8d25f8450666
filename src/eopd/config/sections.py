"""The training config's sections: models, data, sampling, optimisation, evaluation, how the student is spread.

Each validates itself in ``__post_init__`` (one line naming the key); ``eopd.config.train`` puts them together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eopd.config.fields import ConfigError, _help, require


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
            if spec is None and looks_local(path) and not Path(path).expanduser().is_dir():
                raise ConfigError(f"{key}: folder {path!r} does not exist; give a save_pretrained folder, a Hub "
                                  f"id, or a `{key.replace('models.', 'models.build_')}` section to build one")


#: The smallest ``math_bpe`` vocabulary: 256 byte ids, 5 special tokens (3 ChatML, 2 thinking) and one merge.
#: Here, where the config is checked; ``eopd.models.math_tokenizer`` builds that vocabulary and reads it from here.
MIN_VOCAB_SIZE = 256 + 5 + 1


def looks_local(path: str) -> bool:
    """Whether a model path names a local folder rather than a Hub id (it exists, starts like a path, or has more
    than one ``/``): then a missing folder is an error at load, not a Hub lookup later."""
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

