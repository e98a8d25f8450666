"""Entropy weighting: how much forward KL a position gets as a function of the teacher's entropy.

EOPD's insight: where the teacher is uncertain (high entropy, several good continuations) the reverse KL
of on-policy distillation collapses the student onto one mode, so the forward KL, which covers every mode,
is added there. ``entropy_weight`` maps the teacher entropy ``H_t`` (nats) to a weight in [0, 1] that is
monotone non-decreasing in ``H_t``:

- ``step``:     ``1[H >= tau]`` (the official EOPD gate)
- ``sigmoid``:  ``sigmoid((H - tau) / width)``
- ``linear``:   0 below ``h_low``, 1 above ``h_high``, a straight ramp between
- ``constant``: 1 everywhere (forward KL on every token)

``AdaptiveTau`` replaces the hand-tuned threshold by a target share of gated tokens: each step it takes the
``1 - share`` quantile of the teacher entropy over the valid tokens of the batch and smooths it across steps
with an exponential moving average, so the gate follows the entropy scale of whatever teacher and data are
in use. The paper names threshold tuning as its open problem; a share is portable across teachers, tau is
not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eopd.losses.divergences import upcast

Tensor = torch.Tensor

SCHEDULES = ("step", "sigmoid", "linear", "constant")


def entropy_weight(
    teacher_entropy: Tensor,
    schedule: str = "step",
    tau: float | Tensor = 0.8,
    width: float = 0.1,
    h_low: float = 0.4,
    h_high: float = 1.2,
) -> Tensor:
    """Forward-KL weight in [0, 1] for each position, monotone in the teacher entropy.

    Args:
        teacher_entropy: ``[...]`` teacher entropy in nats.
        schedule: One of ``step``, ``sigmoid``, ``linear``, ``constant``.
        tau: Threshold (``step``) or centre (``sigmoid``); may be a 0-d tensor (adaptive tau).
        width: Sigmoid temperature in nats (> 0).
        h_low: Start of the linear ramp.
        h_high: End of the linear ramp (> h_low).

    Returns:
        ``[...]`` weights, no gradient (the weight is a function of the teacher only).
    """
    h = upcast(teacher_entropy).detach()
    if schedule == "step":
        return (h >= tau).to(h.dtype)
    if schedule == "sigmoid":
        if width <= 0:
            raise ValueError(f"sigmoid width must be > 0, got {width}")
        return torch.sigmoid((h - tau) / width)
    if schedule == "linear":
        if h_high <= h_low:
            raise ValueError(f"linear ramp needs h_high > h_low, got h_low={h_low}, h_high={h_high}")
        return ((h - h_low) / (h_high - h_low)).clamp(0.0, 1.0)
    if schedule == "constant":
        return torch.ones_like(h)
    raise ValueError(f"unknown entropy schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def entropy_quantile(teacher_entropy: Tensor, mask: Tensor, share: float) -> Tensor:
    """The threshold that gates ``share`` of the valid tokens: the ``1 - share`` quantile of their entropy.

    Args:
        teacher_entropy: ``[...]`` entropies.
        mask: ``[...]`` 1 on valid tokens.
        share: Target share of gated tokens in (0, 1).

    Returns:
        0-d tensor; ``+inf`` (gate nothing) when there is no valid token.
    """
    h = upcast(teacher_entropy).detach()[mask.bool()]
    if h.numel() == 0:
        return torch.tensor(float("inf"), dtype=h.dtype, device=h.device)
    return torch.quantile(h, 1.0 - share, interpolation="higher")


@dataclass
class AdaptiveTau:
    """A threshold that tracks a target share of gated tokens, smoothed across steps.

    Attributes:
        target_share: Share of valid tokens to gate, in (0, 1).
        momentum: EMA factor; 0 uses each batch's own quantile, 0.9 averages over ~10 steps.
        tau: Current threshold (None until the first update).
    """

    target_share: float = 0.2
    momentum: float = 0.9
    tau: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.target_share < 1.0:
            raise ValueError(f"adaptive target_share must be in (0, 1), got {self.target_share}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"adaptive momentum must be in [0, 1), got {self.momentum}")

    def update(self, teacher_entropy: Tensor, mask: Tensor) -> float:
        """Fold one batch's quantile into the threshold and return the new threshold."""
        q = entropy_quantile(teacher_entropy, mask, self.target_share)
        if not torch.isfinite(q):
            return self.tau if self.tau is not None else float("inf")
        value = float(q)
        self.tau = value if self.tau is None else self.momentum * self.tau + (1.0 - self.momentum) * value
        return self.tau

    def state_dict(self) -> dict:
        """For checkpoints: resume continues the same smoothed threshold."""
        return {"target_share": self.target_share, "momentum": self.momentum, "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``."""
        self.target_share = state["target_share"]
        self.momentum = state["momentum"]
        self.tau = state["tau"]
