"""LoRA students through peft: the one place that wraps, saves, reloads and merges an adapter.

Why LoRA here: a full fine-tune keeps float32 weights, gradients and two AdamW moments for every student
parameter (16 bytes each), which is what stops Qwen3-4B fitting one 80 GB GPU, wherever the teacher is
(docs/scaling.md). With ``models.lora`` only the adapters require gradients, so ``eopd.training.optim.build_optimizer``
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

import copy
import json
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from eopd.config import ConfigError, LoraSpec
from eopd.folders import save_model_folder
from eopd.models.loading import DamagedFileError, ModelLoadError, damaged_weight_file, load_causal_lm

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


def adapter_mismatch(folder: Path, spec: LoraSpec, base: torch.nn.Module) -> str | None:
    """Why the adapter saved in ``folder`` is not the one ``spec`` describes on ``base`` (rank, alpha, dropout
    or the modules it adapts), or None when it is.

    The targets are compared by the modules they select on ``base``, never by how they are spelled: peft saves
    ``all-linear`` expanded into module names, which select what the string selects.

    Raises:
        DamagedFileError: ``adapter_config.json`` is missing or does not parse.
    """
    saved = read_adapter_config(folder)
    wanted = peft_config(spec)
    for key in ("r", "lora_alpha", "lora_dropout"):
        have, want = getattr(saved, key), getattr(wanted, key)
        if have != want:
            return f"the adapter in {str(folder)!r} has {key}={have!r} but models.lora asks for {want!r}"
    have, want = selected_modules(base, saved), selected_modules(base, wanted)
    if have != want:
        return (f"the adapter in {str(folder)!r} adapts {len(have)} modules but models.lora.target_modules="
                f"{spec.target_modules!r} selects {len(want)} (only the adapter's: {_few(have - want)}; only the "
                f"settings': {_few(want - have)})")
    return None


def read_adapter_config(folder: Path) -> Any:
    """The ``peft.LoraConfig`` saved in ``folder``.

    Raises:
        DamagedFileError: ``adapter_config.json`` is missing or is not JSON.
        ModelLoadError: peft cannot read it otherwise (e.g. written by another peft version).
    """
    peft = _peft()
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise DamagedFileError(config_file, f"{str(config_file)!r} is missing")
    try:
        json.loads(config_file.read_bytes())
    except ValueError as err:
        raise DamagedFileError(config_file, f"{str(config_file)!r} is damaged (not valid JSON: {err})") from None
    try:
        return peft.LoraConfig.from_pretrained(str(folder))
    except Exception as err:  # peft reports a config it cannot use in several exception types
        raise ModelLoadError(f"{str(config_file)!r} cannot be read ({str(err).splitlines()[0]})") from err


def selected_modules(model: torch.nn.Module, config: Any) -> set[str]:
    """Names of the modules of ``model`` that a ``peft.LoraConfig`` adapts, decided as peft decides it when it
    wraps: ``all-linear`` expanded by peft's own rule (every linear layer but the output layer), then peft's
    name matching (suffixes, exclusions)."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

    config = _maybe_include_all_linear_layers(copy.copy(config), model)
    return {name for name, _ in model.named_modules() if name and bool(check_target_module_exists(config, name))}


def _few(names: set[str], shown: int = 3) -> str:
    """``a, b, c and 4 more`` (``none`` when empty)."""
    if not names:
        return "none"
    first = sorted(names)[:shown]
    return ", ".join(first) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def load_adapter(base: torch.nn.Module, folder: Path) -> Any:
    """``base`` with the trainable adapter saved in ``folder`` (a checkpoint's).

    Raises:
        DamagedFileError: the adapter's weights are missing or do not parse, or a tensor is missing or of
            another shape than ``adapter_config.json`` asks for.
        ModelLoadError: it does not load for another reason (out of memory, permissions...).
    """
    peft = _peft()
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise DamagedFileError(weights, f"{str(weights)!r} is missing")
    try:
        with _quiet():
            model = peft.PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    except Exception as err:  # a truncated or corrupt safetensors file surfaces as several exception types
        damaged = damaged_weight_file(folder)
        if damaged is not None:
            raise DamagedFileError(damaged[0], f"adapter {str(folder)!r}: {damaged[1]}") from err
        shape = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), None)
        if shape is not None:  # torch's load_state_dict: the file's tensor disagrees with adapter_config.json
            raise DamagedFileError(weights, f"adapter {str(folder)!r}: {shape}") from err
        raise ModelLoadError(f"adapter {str(folder)!r} cannot be loaded ({str(err).splitlines()[0]})") from err
    with safe_open(str(weights), framework="pt") as f:
        stored = {name.replace(".default", "") for name in f.keys()}  # noqa: SIM118 (a handle, not a dict)
    missing = {name.replace(".default", "") for name in peft.get_peft_model_state_dict(model)} - stored
    if missing:  # peft warns and keeps the fresh init of a missing tensor: the adapter would silently restart
        raise DamagedFileError(weights, f"adapter {str(folder)!r}: {weights.name} lacks {_few(missing)}")
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
