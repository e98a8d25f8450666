"""Sampling: the student's rollouts and every model forward over them.

- ``rollout``     ``sample``, the one entry point (checks, per-row uniforms, mask after the first EOS); ``Rollout``
- ``engine``      the loop: continuous batching over fixed slots (finished rows leave, waiting rows take their slot)
- ``slots``       the engine's KV cache: slots x shared columns, rows packed, columns shifted when full
- ``compiled``    the optional compiled decode step (``rollout.compile``), with its eager fallback
- ``grouped``     the loop for models the slots cannot hold (sliding window, recurrent state, flash attention)
- ``draw``        the per-row inverse-CDF draw and its log-prob, shared by every path
- ``padding``     left padding and the positions that skip it
- ``forward``     hidden states, logits and entropies at a rollout's completion positions (learner, teacher, eval)
- ``head``        the model's own output head (lm_head + its logit transform, e.g. a soft-cap) as every path sees it
- ``microbatch``  which rows share a forward: fixed-size or token-budget micro-batches
"""

from eopd.sampling.forward import completion_entropy_BT, completion_hidden_states, completion_logits
from eopd.sampling.head import OutputHead, UnsupportedHeadError, check_output_head, logit_softcap, output_head
from eopd.sampling.microbatch import micro_batches
from eopd.sampling.rollout import Rollout, SamplingInputError, decode_completions, position_ids_from_mask, sample

__all__ = [
    "OutputHead", "Rollout", "SamplingInputError", "UnsupportedHeadError", "check_output_head", "completion_entropy_BT",
    "completion_hidden_states", "completion_logits", "decode_completions", "logit_softcap", "micro_batches",
    "output_head", "position_ids_from_mask", "sample",
]
