"""A model's output head as eopd computes it, and the start-up check that it is the model's own.

The teacher scorer, the fused student loss, the learner's log-probs and the evaluation's entropy never call
the model's lm_head: they compute the logits themselves from the final hidden states, chunk by chunk
(``eopd.losses.scoring``). That is only right if the model's logits ARE its lm_head of its final hidden
states, up to the transforms eopd applies: today Gemma 2's final-logit soft-cap
(``config.final_logit_softcapping``: ``cap * tanh(logits / cap)``). ``output_head`` gives the lm_head
with that transform; ``check_output_head`` runs a short probe through the model's own forward and through
our head path and refuses, in one line, a model whose logits differ (Cohere's ``logit_scale``, Granite's
``logits_scaling``, or any transform in a model's forward that we do not know about).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from eopd.errors import UserError
from eopd.sampling.rollout import Rollout

Tensor = torch.Tensor

#: Config fields of known logit transforms eopd does not apply, named in the refusal (field -> model family).
UNSUPPORTED_FIELDS = {"logit_scale": "Cohere", "logits_scaling": "Granite", "lm_head_multiplier": "Falcon-H1"}
#: Probe length (tokens) of the start-up check.
PROBE_TOKENS = 8


class UnsupportedHeadError(UserError):
    """The model's logits are not what eopd's head path computes from its final hidden states."""


class OutputHead(NamedTuple):
    """The lm_head eopd multiplies by, and the transform it applies to the result.

    Attributes:
        weight: ``[V_rows, H]`` lm_head weight (a reference to the model's parameter).
        bias: ``[V_rows]`` or ``None``.
        softcap: Final-logit soft-cap (``eopd.losses.scoring.head_transform_``), or ``None``.
    """

    weight: Tensor
    bias: Tensor | None
    softcap: float | None


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (a PeftModel forwards ``config`` and the embeddings itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _text_config(model: torch.nn.Module) -> object | None:
    config = getattr(_unwrapped(model), "config", None)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def logit_softcap(model: torch.nn.Module) -> float | None:
    """The model's final-logit soft-cap (``config.final_logit_softcapping``; Gemma 2 and 3), or ``None``."""
    cap = getattr(_text_config(model), "final_logit_softcapping", None)
    return float(cap) if cap else None


def output_head(model: torch.nn.Module) -> OutputHead:
    """The model's lm_head and soft-cap (unwraps DDP)."""
    lm_head = _unwrapped(model).get_output_embeddings()
    return OutputHead(lm_head.weight, getattr(lm_head, "bias", None), logit_softcap(model))


def probe_rollout(vocab_rows: int, device: torch.device) -> Rollout:
    """One row of ``PROBE_TOKENS`` ids spread over the vocabulary, as a rollout whose completion is all but
    the first token (so the probe runs exactly the forwards the scorer and the loss run)."""
    ids_1L = torch.linspace(0, vocab_rows - 1, PROBE_TOKENS, device=device).round().long()[None]
    ones_1L = torch.ones_like(ids_1L)
    completion_1T = ids_1L[:, 1:]
    return Rollout(sequences_BL=ids_1L, attention_mask_BL=ones_1L, prompt_len=1, completion_ids_BT=completion_1T,
                   completion_mask_BT=torch.ones_like(completion_1T, dtype=torch.float32),
                   logp_old_BT=torch.zeros_like(completion_1T, dtype=torch.float32),
                   prompt_index_B=torch.zeros(1, dtype=torch.long, device=device))


def relative_tolerance(dtype: torch.dtype) -> float:
    """Largest logit difference, relative to the largest logit, that rounding explains: our head runs in
    float32, the model's forward in its own dtype (bf16: a few 2^-8 roundings of matmul, cap and scale)."""
    return max(1e-4, 8 * torch.finfo(dtype).eps)


def _what_differs(model: torch.nn.Module, softcap: float | None) -> str:
    """The config fields that explain a mismatch, for the message."""
    config = _text_config(model)
    known = [f"{field}={getattr(config, field)!r} ({family})" for field, family in UNSUPPORTED_FIELDS.items()
             if getattr(config, field, None) not in (None, 1, 1.0)]
    if known:
        return "its config sets " + ", ".join(known) + ", a logit transform eopd does not apply"
    if softcap is not None:
        return (f"its config sets final_logit_softcapping={softcap!r}, which eopd applies, but its forward does "
                "not produce those capped logits")
    return "its forward transforms the lm_head output in a way eopd does not know"


@torch.no_grad()
def check_output_head(model: torch.nn.Module, name: str | None = None) -> None:
    """Refuse a model whose own logits are not eopd's head path (lm_head of the final hidden states, then the
    soft-cap), on a probe of ``PROBE_TOKENS`` tokens: one forward each way, at start.

    Args:
        model: A causal LM (plain, PEFT-wrapped or DDP-wrapped).
        name: What the message calls it (default: its ``name_or_path``, else its class).

    Raises:
        UnsupportedHeadError: the largest logit difference exceeds ``relative_tolerance`` of the largest
            logit; the message names the model, the difference and the config field that explains it.
    """
    from eopd.losses.scoring import scaled_float_logits
    from eopd.sampling.forward import completion_hidden_states, completion_logits  # forward.py imports this module

    base = _unwrapped(model)
    name = name or getattr(base, "name_or_path", "") or type(base).__name__
    if base.get_output_embeddings() is None:
        raise UnsupportedHeadError(f"model {name}: it has no output embeddings (lm_head); eopd computes logits "
                                   "from the lm_head, so it needs a causal LM with one")
    head = output_head(model)
    rows = head.weight.shape[0]
    rollout = probe_rollout(rows, head.weight.device)
    was_training = base.training
    base.eval()
    try:
        theirs_NV = completion_logits(base, rollout, rows)[0].float()
        hidden_NH = completion_hidden_states(base, rollout)[0].float()
    finally:
        base.train(was_training)
    ours_NV = scaled_float_logits(hidden_NH, head.weight.float(), None if head.bias is None else head.bias.float(),
                                  1.0, hidden_NH.new_empty(hidden_NH.shape[0], rows), None, head.softcap)
    if ours_NV.shape != theirs_NV.shape:
        raise UnsupportedHeadError(f"model {name}: its logits have {theirs_NV.shape[-1]} entries but its lm_head "
                                   f"{rows} rows; eopd computes logits from the lm_head, so it cannot use this model")
    gap = float((ours_NV - theirs_NV).abs().max())
    scale = float(theirs_NV.abs().max())
    if gap <= relative_tolerance(head.weight.dtype) * max(scale, 1e-3):
        return
    raise UnsupportedHeadError(
        f"model {name}: its logits differ from its lm_head of its final hidden states"
        f"{'' if head.softcap is None else f' soft-capped at {head.softcap:g}'} by up to {gap:.3g} (logits up to "
        f"{scale:.3g}): {_what_differs(model, head.softcap)}. eopd computes the teacher's scores and the student's "
        "loss from the lm_head (supported: a plain lm_head, with or without final_logit_softcapping); "
        "use another model")
