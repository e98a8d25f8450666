"""Training: the on-policy loop and everything one run holds.

- ``trainer``       the loop (collect -> update -> log, evaluate, save); read it first
- ``components``    everything a run holds, built from its config (processes, models, prompts, optimizer, RNG)
- ``collect``       one on-policy batch: student rollout, teacher scores, token weights
- ``update``        PPO epochs x minibatches x micro-batches, global token normalisation, AdamW
- ``step_metrics``  one step's metric sums merged over micro-batches and reduced over processes
- ``checkpoint``    one checkpoint: its layout, atomic save, the state ``trainer.pt`` holds
- ``trainer_state`` reading ``trainer.pt`` without running code; damage told from a refusal
- ``resume``        which checkpoint a run continues from (proven damage only set aside), whose folder it is
- ``agree``         a failure on any process stops every process at one point, with the same line
- ``optim``         the AdamW builder and the warmup + cosine schedule (trainer and SFT)
- ``lora``          LoRA students through peft
"""

from eopd.training.components import Components, build_components
from eopd.training.optim import build_optimizer, build_scheduler
from eopd.training.trainer import run, train

__all__ = ["Components", "build_components", "build_optimizer", "build_scheduler", "run", "train"]
