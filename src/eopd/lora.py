"""LoRA students through peft: the one place that wraps, saves, reloads and merges an adapter.

Why LoRA here: a full fine-tune keeps float32 weights, gradients and two AdamW moments for every student
parameter (16 bytes each), which is what stops Qwen3-4B fitting one 80 GB GPU, wherever the teacher is
(docs/scaling.md). With ``models.lora`` only the adapters require gradients, so ``eopd.optim.build_optimizer``
(which keeps only parameters that require gradients) gives AdamW the adapters alone, and checkpoints hold the
adapter, not the model.

The rest of the code needs no LoRA branch, because a ``PeftModel`` forwards what it does not define to the
wrapped model, with the adapters injected in place into its layers:

- the sampler calls the ``PeftModel`` itself, so every rollout is drawn from base + adapter;
- the fused loss reads ``get_output_embeddings()`` (the lm_head, left unadapted) and runs ``get_decoder()``
  (the decoder stack, which holds the adapters); under DDP the wrapper is called instead, with
  ``output_hidden_states``, which ``PeftModelForCausalLM.forward`` passes through.

The lm_head and the embeddings are never adapted (refused in the config and, by module identity, at load):
peft's LoRA wrapper of the lm_head keeps ``.weight`` as the frozen base weight and adds the low-rank term in
its ``forward``, which the fused loss never calls, so the adapter would get no gradient and the loss would score
a distribution the sampler does not draw from; with tied embeddings (Qwen3 0.6B-4B) merging an embedding
adapter would also change the lm_head.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from eopd.config import ConfigError, LoraSpec
from eopd.folders import save_model_folder
from eopd.models import ModelLoadError, load_causal_lm

#: The adapter's folder, in a checkpoint and in ``OUTPUT_DIR/final``.
ADAPTER_DIR = "adapter"


def _peft() -> Any:
    """The peft module, or one line saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ConfigError("models.lora: needs peft, which is not installed: pip install 'eopd[peft]'") from None
    return peft


@contextmanager
def _quiet() -> Iterator[None]:
    """peft 0.21 calls a transformers property that transformers 5 deprecates; nothing for users to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def is_lora(model: Any) -> bool:
    """Whether ``model`` is a peft model (peft is imported only by this module, so without it nothing is)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def peft_config(spec: LoraSpec) -> Any:
    """The ``peft.LoraConfig`` of ``models.lora``."""
    peft = _peft()
    return peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                           target_modules=spec.target_modules, bias="none", task_type="CAUSAL_LM")


def apply_lora(model: torch.nn.Module, spec: LoraSpec, *, seed: int) -> Any:
    """Wrap ``model`` with fresh LoRA adapters; only they require gradients.

    The adapters' random init (LoRA A; B starts at 0, so the wrapped model equals the base) is drawn from a
    generator seeded with ``seed`` under a forked global RNG: the same config gives the same adapters, and
    the caller's random state is untouched.

    Raises:
        ConfigError: a target module is missing from the model, or an embedding / the lm_head would be adapted.
    """
    peft = _peft()
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed)
        try:
            wrapped = peft.get_peft_model(model, peft_config(spec))
        except ValueError as err:  # peft's NoMatchingPeftModuleError is a ValueError
            raise ConfigError(f"models.lora.target_modules: {str(err).splitlines()[0]}") from None
    check_embeddings_not_adapted(wrapped)
    return wrapped


def check_embeddings_not_adapted(model: Any) -> None:
    """Refuse a peft model whose lm_head or input embedding is wrapped (by LoRA or ``modules_to_save``).

    Checked by module identity, so it holds whatever the layers are called (the config refuses the common
    names earlier).

    Raises:
        ConfigError: naming the module.
    """
    base = model.get_base_model()
    heads = {"lm_head": base.get_output_embeddings(), "input embedding": base.get_input_embeddings()}
    tuner = _peft().tuners.tuners_utils.BaseTunerLayer
    wrapper = _peft().utils.other.ModulesToSaveWrapper
    for what, module in heads.items():
        if isinstance(module, tuner | wrapper):
            raise ConfigError(f"models.lora.target_modules: adapts the {what} ({type(module).__name__}); the fused "
                              "loss reads the lm_head weight directly, which peft leaves as the frozen base weight, "
                              "so that adapter would get no gradient; adapt the decoder layers instead")


def describe(model: Any) -> str:
    """``lora: 2,048 of 74,016 parameters train (2.77%), the adapters; the base is frozen``."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"lora: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%), the adapters; "
            "the base is frozen")


def save_adapter_folder(path: Path, model: Any, tokenizer: Any) -> None:
    """The adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``; no base weight), plus the
    tokenizer when given: what ``peft.PeftModel.from_pretrained(base, path)`` loads."""
    with _quiet():
        model.save_pretrained(path, safe_serialization=True, save_embedding_layers=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def adapter_mismatch(folder: Path, spec: LoraSpec) -> str | None:
    """Why the adapter saved in ``folder`` is not the one ``spec`` describes (rank, alpha, dropout, targets),
    or None when it is.

    Raises:
        ModelLoadError: ``adapter_config.json`` is missing or unreadable.
    """
    peft = _peft()
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{str(config_file)!r} is missing")
    try:
        saved = peft.LoraConfig.from_pretrained(str(folder))
    except Exception as err:  # a damaged JSON file: any parsing error means the same to the user
        raise ModelLoadError(f"{str(config_file)!r} cannot be read ({str(err).splitlines()[0]})") from err
    wanted = peft_config(spec)
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules"):
        have, want = getattr(saved, key), getattr(wanted, key)
        as_set = lambda v: set(v) if isinstance(v, list | set) else v  # noqa: E731
        if as_set(have) != as_set(want):
            return f"the adapter in {str(folder)!r} has {key}={have!r} but models.lora asks for {want!r}"
    return None


def load_adapter(base: torch.nn.Module, folder: Path) -> Any:
    """``base`` with the trainable adapter saved in ``folder`` (a checkpoint's).

    Raises:
        ModelLoadError: the adapter does not load (missing or damaged files).
    """
    peft = _peft()
    try:
        with _quiet():
            model = peft.PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    except Exception as err:  # a truncated or corrupt safetensors file surfaces as several exception types
        raise ModelLoadError(f"adapter {str(folder)!r} cannot be loaded ({str(err).splitlines()[0]})") from err
    check_embeddings_not_adapted(model)
    return model


def save_final_folder(path: Path, model: Any, tokenizer: Any, *, trust_remote_code: bool = False) -> None:
    """The trained LoRA student as ``path/adapter`` (peft) and, at ``path``, the merged model (base + adapter)
    that plain ``AutoModelForCausalLM.from_pretrained(path)`` loads.

    The merge runs on a fresh CPU copy of the base, read from where the run read it, with the adapter just
    written loaded into it: the live student (on its GPU, with its optimizer) is left as it is, and the saved
    adapter is proven loadable on the way.
    """
    save_adapter_folder(path / ADAPTER_DIR, model, None)
    base_path = model.peft_config[model.active_adapter].base_model_name_or_path
    dtype = next(model.get_base_model().parameters()).dtype
    base = load_causal_lm(base_path, device="cpu", dtype=dtype, trust_remote_code=trust_remote_code)
    peft = _peft()
    with _quiet():
        merged = peft.PeftModel.from_pretrained(base, str(path / ADAPTER_DIR)).merge_and_unload()
    save_model_folder(path, merged, tokenizer)
