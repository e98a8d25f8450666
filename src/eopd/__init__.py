"""eopd: on-policy distillation of language models with Entropy-Aware On-Policy Distillation.

Read-me-first map of the package:

- ``eopd.losses``   pure loss functions (divergences, entropy weights, composed objectives, fused path)
- ``eopd.sampling.rollout``  student sampling with a KV cache and an explicit ``torch.Generator``
- ``eopd.teachers``  teacher scoring (entropy, top-k, sampled-token log-probs): in-process, served, several routed
- ``eopd.training.trainer``  one flat on-policy loop: sample -> score -> loss -> AdamW
- ``eopd.evaluation`` Avg@k, unbiased pass@k, math benchmarks
- ``eopd.tasks``    prompts + graders (synthetic multi-path arithmetic, math benchmarks)
"""

__version__ = "0.1.0"
