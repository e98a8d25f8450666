"""Loading and building Hugging Face causal LMs, and aligning teacher/student vocabularies.

Everything goes through the real ``AutoModelForCausalLM.from_pretrained`` path (safetensors only,
``trust_remote_code`` off unless asked), so tiny models built here and saved with ``save_pretrained`` are
exercised exactly like a Hub checkpoint on a GPU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Qwen3Config, Qwen3ForCausalLM

from eopd.errors import UserError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(UserError, ValueError):
    """A model or tokenizer could not be loaded; the message says what to fix."""


class DamagedFileError(ModelLoadError):
    """Proven damage: a file that is missing or does not parse (a safetensors header, a JSON config, a pickle),
    or tensors that disagree with their config (one missing, another shape). ``path`` is the damaged file or
    folder.

    Only this sets a checkpoint aside (``resume.load_newest``, and only when ``path`` lies inside that
    checkpoint): anything else that stops a load (out of memory, a permission error, a Hub that cannot be
    reached) says nothing against the files, so the run stops and nothing is moved.
    """

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(message)
        self.path = Path(path)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available else cpu; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bfloat16 on GPU, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def build_tiny_qwen3(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    **config_kwargs,
) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3-architecture model of tiny size (no download).

    Args:
        vocab_size: Rows of the embedding / lm_head (may exceed the tokenizer's vocabulary: padding).
        hidden_size: Model width; must be divisible by ``num_heads``.
        num_layers: Decoder layers.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads (grouped-query attention); divides ``num_heads``.
        intermediate_size: MLP width (default ``4 * hidden_size``).
        max_position_embeddings: Longest sequence.
        tie_word_embeddings: Share embedding and lm_head weights.
        seed: Initialisation seed (a local generator state; the global RNG is restored afterwards).
        **config_kwargs: Any other ``Qwen3Config`` field.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **config_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model


def load_causal_lm(
    name_or_path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
    strict: bool = False,
) -> PreTrainedModel:
    """Load a causal LM from a local folder or Hub id with safetensors weights.

    Args:
        strict: The folder is one this project wrote (a checkpoint's ``model/``): a tensor missing from its
            weights or of another shape than its ``config.json`` says is damage, where a plain load would
            initialise it at random.

    Raises:
        DamagedFileError: a local folder's file is missing or does not parse (``config.json``, the weights
            index, a safetensors header) or, with ``strict``, a tensor is missing or of another shape.
        ModelLoadError: anything else (a missing folder, out of memory, a permission error, the Hub).
    """
    device = torch.device(device) if isinstance(device, str) else device
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    path = Path(name_or_path)
    looks_local = path.exists() or str(name_or_path).startswith((".", "/", "~"))
    if looks_local:
        if not path.is_dir():
            raise ModelLoadError(f"model path {str(name_or_path)!r} does not exist; point it at a folder "
                                 "written by save_pretrained or at a Hub id")
        if not (path / "config.json").exists():
            raise DamagedFileError(path / "config.json", f"model folder {str(path)!r} has no config.json; is it a "
                                   "save_pretrained folder?")
        if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").exists():
            raise DamagedFileError(path, f"model folder {str(path)!r} has no *.safetensors weights (only "
                                   "safetensors are loaded; convert with model.save_pretrained(..., "
                                   "safe_serialization=True))")
    checks = {"output_loading_info": True, "ignore_mismatched_sizes": True} if strict else {}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(name_or_path), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **checks
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        damaged = damaged_weight_file(path) if looks_local else None
        if damaged is not None:
            raise DamagedFileError(damaged[0], f"model folder {str(path)!r}: {damaged[1]}") from err
        raise ModelLoadError(f"could not load model {str(name_or_path)!r}: {str(err).splitlines()[0]}") from err
    model, info = loaded if strict else (loaded, {})
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise DamagedFileError(path, f"model folder {str(path)!r}: the weights do not match config.json "
                               f"({_weights_disagreement(info)})")
    return model.to(device)


def _weights_disagreement(info: dict[str, Any]) -> str:
    """The first missing or mis-shaped tensor of transformers' loading info, in words."""
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        return f"{missing[0]} is missing" + (f", and {len(missing) - 1} more" if len(missing) > 1 else "")
    name, saved, expected = sorted(info["mismatched_keys"])[0]
    return f"{name} has shape {list(saved)} but the config asks for {list(expected)}"


def damaged_weight_file(folder: Path) -> tuple[Path, str] | None:
    """The first file of a model or adapter folder that is proven damaged, and why; None when every file parses.

    Checked: ``config.json`` and the weights index parse as JSON, each ``*.safetensors`` header parses and
    covers the file. A file that cannot be opened at all (permissions) proves nothing and is passed over.
    """
    for name in ("config.json", "model.safetensors.index.json", "adapter_config.json"):
        file = folder / name
        try:
            text = file.read_bytes()
        except OSError:  # absent (not every folder has each) or unreadable: no evidence either way
            continue
        try:
            data = json.loads(text)
        except ValueError as err:
            return file, f"{name} is damaged (not valid JSON: {err})"
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        shards = {v for v in weight_map.values() if isinstance(v, str)} if isinstance(weight_map, dict) else set()
        for shard in sorted(shards):
            if not (folder / shard).exists():
                return folder / shard, f"{shard} is missing (listed in {name})"
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with file.open("rb"):
                pass
        except OSError:
            continue
        try:
            with safe_open(str(file), framework="pt") as f:
                names = f.keys()  # a safe_open handle is not iterable
                for name in names:
                    f.get_slice(name)
        except (SafetensorError, OSError) as err:
            return file, f"{file.name} is damaged ({str(err).splitlines()[0]})"
    return None


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False):
    """Load a tokenizer; gives it a pad token (the EOS) when it has none."""
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load tokenizer {str(name_or_path)!r}: {err}") from err
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelLoadError(f"tokenizer {str(name_or_path)!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_vocab_size(tokenizer) -> int:
    """Number of ids the tokenizer can emit (base vocabulary plus added tokens)."""
    return len(tokenizer)


def aligned_vocab_size(teacher: PreTrainedModel, student: PreTrainedModel, tokenizer) -> int:
    """The vocabulary both models' logits are compared over.

    Padded lm_heads (e.g. Qwen3's 151,936 rows for a 151,669-token tokenizer) are fine: both models are
    sliced to the tokenizer's vocabulary. A model with *fewer* rows than the tokenizer cannot score every
    token, so that is an error, as is a mismatch that padding cannot explain.

    Raises:
        ModelLoadError: a model's lm_head is smaller than the tokenizer's vocabulary.
    """
    v_tok = tokenizer_vocab_size(tokenizer)
    v_t = teacher.get_output_embeddings().weight.shape[0]
    v_s = student.get_output_embeddings().weight.shape[0]
    for who, v in (("teacher", v_t), ("student", v_s)):
        if v < v_tok:
            raise ModelLoadError(
                f"{who} lm_head has {v} rows but the tokenizer has {v_tok} tokens: the two models do not share "
                "this tokenizer's vocabulary; use a teacher and student from the same model family"
            )
    return v_tok


def build_tiny_tokenizer(kind: str, *, alphabet: str, corpus: Sequence[str], vocab_size: int) -> Any:
    """The tokenizer of built tiny models: ``char`` (one id per character of ``alphabet``,
    ``eopd.models.char_tokenizer``)
    or ``math_bpe`` (a Qwen3-style byte-level BPE of ``vocab_size`` ids trained on the problems of the math
    sources ``corpus``, ``eopd.models.math_tokenizer``).

    Raises:
        ValueError: ``kind`` is neither.
    """
    if kind == "char":
        from eopd.models.char_tokenizer import build_char_tokenizer

        return build_char_tokenizer(alphabet)
    if kind == "math_bpe":
        from eopd.models.math_tokenizer import build_math_tokenizer

        return build_math_tokenizer(corpus, vocab_size)
    raise ValueError(f"tokenizer kind must be char or math_bpe, got {kind!r}")


def build_tiny_checkpoint(
    path: str | Path,
    *,
    alphabet: str | None = None,
    tokenizer: Any = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_padding: int = 0,
    initializer_range: float = 0.02,
    max_position_embeddings: int = 256,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> Path:
    """Build a tiny random Qwen3 model and save it with its tokenizer at ``path`` (atomically).

    Used by ``configs/tiny.yaml``, ``configs/paper/rehearsal.yaml`` and the tests so that the real
    ``from_pretrained`` path is exercised with no download. The tokenizer is ``tokenizer``, or a character
    tokenizer over ``alphabet``. ``vocab_padding`` adds lm_head rows beyond the tokenizer, like Qwen3's padded
    vocabulary. The model follows the tokenizer's conventions: no BOS, its EOS and pad ids, and
    ``generation_config.eos_token_id`` listing ``<|endoftext|>`` beside the EOS when the tokenizer has it
    (Qwen3's chat models stop at either).

    Raises:
        ValueError: neither or both of ``alphabet`` and ``tokenizer`` are given.
    """
    from eopd.models.char_tokenizer import build_char_tokenizer
    from eopd.models.math_tokenizer import generation_eos_ids

    if (alphabet is None) == (tokenizer is None):
        raise ValueError("give build_tiny_checkpoint a tokenizer or an alphabet (for a character tokenizer), not both")
    tok = tokenizer if tokenizer is not None else build_char_tokenizer(alphabet)
    path = Path(path).expanduser()
    model = build_tiny_qwen3(
        vocab_size=len(tok) + vocab_padding, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, seed=seed, initializer_range=initializer_range,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    eos = generation_eos_ids(tok)
    model.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    from eopd.folders import atomic_folder, save_model_folder

    with atomic_folder(path, keep_existing=True) as tmp:
        save_model_folder(tmp, model, tok)
    return path
