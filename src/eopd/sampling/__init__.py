"""Sampling: the student's rollouts and every model forward over them.

- ``rollout``     ``sample``: the KV-cache sampler (seeded per-row uniforms, mask after the first EOS), ``Rollout``
- ``forward``     hidden states, logits and entropies at a rollout's completion positions (learner, teacher, eval)
- ``head``        the model's own output head (lm_head + its logit transform, e.g. a soft-cap) as every path sees it
- ``microbatch``  which rows share a forward: fixed-size or token-budget micro-batches
"""

from eopd.sampling.forward import completion_entropy_BT, completion_hidden_states, completion_logits
from eopd.sampling.head import OutputHead, UnsupportedHeadError, check_output_head, logit_softcap, output_head
from eopd.sampling.microbatch import micro_batches
from eopd.sampling.rollout import Rollout, decode_completions, position_ids_from_mask, sample

__all__ = [
    "OutputHead", "Rollout", "UnsupportedHeadError", "check_output_head", "completion_entropy_BT",
    "completion_hidden_states", "completion_logits", "decode_completions", "logit_softcap", "micro_batches",
    "output_head", "position_ids_from_mask", "sample",
]
