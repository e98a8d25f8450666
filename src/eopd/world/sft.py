"""A small supervised trainer for causal LMs on (prompt, completion) pairs: the SFT library, nothing else.

Why our own loop rather than ``transformers.Trainer`` or TRL's ``SFTTrainer``: the models we train this
way are ~100K-340K parameters trained for a few hundred steps on a laptop CPU, where a trainer's overhead
(accelerate, logging, checkpoints) costs more than the model, and the run must be reproducible from
explicit seeds without the global RNG. The loop is: tokenize once -> per step draw a batch from a seeded
permutation -> the model's own causal-LM loss (``labels``, ``IGNORE_INDEX`` on the prompt and padding) ->
AdamW and the warmup + cosine schedule of ``eopd.training.optim`` (the distiller's, so both follow one curve).

Prompts are encoded by ``eopd.prompting.encode_prompts`` without a chat template, exactly as the distiller
and ``eopd eval`` encode them; the completion follows without special tokens, then the EOS that ends it.

This module knows nothing of the embedded arithmetic world (which builds on it) nor of the command line
(``eopd sft`` lives in ``eopd.commands.sft``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from eopd.config import require
from eopd.prompting import encode_prompts, eos_token_ids
from eopd.training import build_optimizer, build_scheduler

IGNORE_INDEX = -100


@dataclass
class SFTConfig:
    """Optimisation budget and seeds of one supervised run.

    Attributes:
        steps: Optimizer steps.
        batch_size: Examples per step.
        lr: Peak AdamW learning rate (tiny models from scratch like a high one: 1e-3 to 5e-3).
        weight_decay: AdamW decoupled weight decay.
        beta1: AdamW beta1.
        beta2: AdamW beta2 (the distiller's default 0.999; the embedded world uses 0.98).
        warmup_steps: Linear warmup from 0 to ``lr`` (must be < ``steps``).
        min_lr_ratio: The cosine decays towards ``lr * min_lr_ratio`` (``eopd.training.optim.build_scheduler``).
        grad_clip: Global grad-norm clip (0 disables).
        seed: Seed of the batch order (a local ``torch.Generator``).
        num_threads: ``torch.set_num_threads`` during training (restored after); None leaves the
            current setting alone.
        log_every: Call ``on_step`` every this many steps (0: only the last step).
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    num_threads: int | None = None
    log_every: int = 100

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2",
                f"must be in [0, 1), got {self.beta1} and {self.beta2}")
        require(0 <= self.warmup_steps < self.steps, "warmup_steps",
                f"must be in [0, steps) = [0, {self.steps}), got {self.warmup_steps}")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}")
        require(self.num_threads is None or self.num_threads >= 1, "num_threads",
                f"must be >= 1 or None (leave torch's setting), got {self.num_threads}")
        require(self.log_every >= 0, "log_every", f"must be >= 0, got {self.log_every}")


def encode_examples(tokenizer: Any, examples: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids of each ``prompt + completion + EOS`` and labels that are ``IGNORE_INDEX`` on the prompt.

    The prompt goes through ``encode_prompts`` (no chat template: a BOS-adding tokenizer adds its BOS, as in
    training and evaluation); the completion is encoded separately without special tokens, so the boundary
    is exact, and the tokenizer's EOS ends it.

    Returns:
        One ``(input_ids, labels)`` pair per example, equal length; ``labels[i] = input_ids[i]`` on the
        completion and EOS tokens.

    Raises:
        ValueError: the tokenizer has no EOS token, or a prompt encodes to nothing (``PromptFormatError``).
    """
    eos = eos_token_ids(tokenizer)[0]
    prompts_ids = encode_prompts(tokenizer, [p for p, _ in examples], chat_template=False)
    completions = [c for _, c in examples]
    completions_ids = tokenizer(completions, add_special_tokens=False)["input_ids"] if completions else []
    out = []
    for p_ids, c_ids in zip(prompts_ids, completions_ids, strict=True):
        target = [*c_ids, eos]
        out.append(([*p_ids, *target], [IGNORE_INDEX] * len(p_ids) + target))
    return out


def encode_example(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """``encode_examples`` of one pair: ``(input_ids, labels)``."""
    return encode_examples(tokenizer, [(prompt, completion)])[0]


def collate(
    encoded: Sequence[tuple[list[int], list[int]]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad encoded examples into ``(input_ids_BL, attention_mask_BL, labels_BL)``.

    Padding gets attention 0 and label ``IGNORE_INDEX``, so pad may equal EOS: a real EOS keeps its label.
    """
    width = max(len(ids) for ids, _ in encoded)
    B = len(encoded)
    input_ids_BL = torch.full((B, width), pad_token_id, dtype=torch.long)
    attention_mask_BL = torch.zeros((B, width), dtype=torch.long)
    labels_BL = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labels) in enumerate(encoded):
        input_ids_BL[i, : len(ids)] = torch.tensor(ids)
        attention_mask_BL[i, : len(ids)] = 1
        labels_BL[i, : len(labels)] = torch.tensor(labels)
    return input_ids_BL, attention_mask_BL, labels_BL


def completion_loss(
    model: torch.nn.Module, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, labels_BL: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (completion + EOS) positions, a scalar.

    The model's own causal-LM loss: it shifts ``labels_BL`` by one and skips ``IGNORE_INDEX`` targets.
    """
    return model(input_ids=input_ids_BL, attention_mask=attention_mask_BL, labels=labels_BL).loss


def _batch_indices(n: int, cfg: SFTConfig, generator: torch.Generator) -> Iterator[list[int]]:
    """Yield ``cfg.steps`` index batches: successive seeded permutations of ``range(n)``, cut in batches."""
    perm = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(cfg.steps):
        if pos + cfg.batch_size > n:
            perm = torch.cat([perm[pos:], torch.randperm(n, generator=generator)])
            pos = 0
        yield perm[pos : pos + cfg.batch_size].tolist()
        pos += cfg.batch_size


def train_sft(
    model: PreTrainedModel,
    tokenizer: Any,
    examples: Sequence[tuple[str, str]],
    cfg: SFTConfig,
    on_step: Callable[[int, float, float], None] | None = None,
) -> PreTrainedModel:
    """Train ``model`` in place on ``(prompt, completion)`` pairs; the loss covers completion + EOS only.

    Args:
        model: A Hugging Face causal LM (its device is used; float32 recommended on CPU).
        tokenizer: Encodes the text; needs an eos token (pad falls back to eos when absent).
        examples: Training pairs; reused in fresh seeded permutations if ``steps * batch_size`` exceeds
            their number.
        cfg: Budget and seeds.
        on_step: Called as ``on_step(step, loss, lr)`` every ``cfg.log_every`` steps and at the last step
            (``step`` is 1-based; ``lr`` is the learning rate that step used).

    Returns:
        The same model, trained and left in eval mode.
    """
    if not examples:
        raise ValueError("no training examples; pass a non-empty list of (prompt, completion) pairs")
    encoded = encode_examples(tokenizer, examples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = build_optimizer(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=(cfg.beta1, cfg.beta2))
    scheduler = build_scheduler(optimizer, total_updates=cfg.steps, warmup_updates=cfg.warmup_steps,
                                min_lr_ratio=cfg.min_lr_ratio)
    old_threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    model.train()
    try:
        for step, idx in enumerate(_batch_indices(len(encoded), cfg, generator), start=1):
            input_ids_BL, attention_mask_BL, labels_BL = (
                t.to(device) for t in collate([encoded[i] for i in idx], pad_id)
            )
            loss = completion_loss(model, input_ids_BL, attention_mask_BL, labels_BL)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            is_log = (cfg.log_every and step % cfg.log_every == 0) or step == cfg.steps
            if on_step is not None and is_log:
                on_step(step, float(loss.item()), lr)
    finally:
        torch.set_num_threads(old_threads)
        model.eval()
    return model
