"""What an objective is: its configuration and named presets, and the per-position tensors it reads and returns.

Why apart from ``objectives`` (the math): these are the types every caller builds or reads (the trainer's
batches, the fused path, the teacher scorer, the config loader), and they import nothing but torch and the
weight schedules' names, so a caller never needs the loss code to describe a batch. ``objectives`` composes
the loss from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

import torch

from eopd.losses.weights import SCHEDULES

Tensor = torch.Tensor

RKL_KINDS = ("ppo", "exact", "none")
FKL_KINDS = ("topk", "topk_tail", "exact", "importance", "none")
DIVERGENCES = ("jsd", "skew_fkl", "skew_rkl", "akl", "todi", "tvd")
WEIGHTINGS = ("additive", "mixture")
PLACEMENTS = ("entropy", "all", "random")


@dataclass
class ObjectiveConfig:
    """One distillation objective. Build it from a preset: ``ObjectiveConfig.preset("eopd", tau=1.0)``."""

    name: str = field(default="eopd", metadata={"help": "preset name this config came from (for logs)"})
    rkl: str = field(default="ppo", metadata={"help": "reverse-KL term: ppo | exact | none"})
    fkl: str = field(default="topk", metadata={"help": "forward-KL term: topk | topk_tail | exact | importance | none"})
    divergence: str | None = field(
        default=None, metadata={"help": "use a single divergence instead: jsd | skew_fkl | skew_rkl | akl | todi | tvd"}
    )
    weighting: str = field(default="additive", metadata={"help": "additive (1, alpha*g) or mixture (1-lam*g, lam*g)"})
    schedule: str = field(default="step", metadata={"help": "g(H): step | sigmoid | linear | constant"})
    placement: str = field(
        default="entropy", metadata={"help": "which tokens get FKL: entropy (g(H)) | all | random (same share)"}
    )
    tau: float = field(default=0.8, metadata={"help": "entropy threshold / sigmoid centre, nats"})
    adaptive_share: float | None = field(
        default=None, metadata={"help": "if set, tau tracks this share of gated tokens (quantile, EMA)"}
    )
    adaptive_momentum: float = field(default=0.9, metadata={"help": "EMA factor of the adaptive tau"})
    width: float = field(default=0.1, metadata={"help": "sigmoid width, nats"})
    h_low: float = field(default=0.4, metadata={"help": "linear ramp start, nats"})
    h_high: float = field(default=1.2, metadata={"help": "linear ramp end, nats"})
    alpha: float = field(default=1.0, metadata={"help": "FKL coefficient in the additive form"})
    lam: float = field(default=1.0, metadata={"help": "max FKL share in the mixture form"})
    top_k: int = field(default=16, metadata={"help": "teacher top-k ids for topk FKL"})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip epsilon"})
    beta: float = field(default=0.5, metadata={"help": "GKD generalized-JSD beta (0 = FKL, 1 = RKL)"})
    skew_alpha: float = field(default=0.1, metadata={"help": "DistiLLM skew alpha"})
    akl_mu: float = field(default=0.5, metadata={"help": "AKL head mass"})
    todi_beta: float = field(default=1.0, metadata={"help": "ToDi sigmoid scale"})
    is_max_weight: float | None = field(default=None, metadata={"help": "truncate importance weights (biased)"})
    temperature: float = field(default=1.0, metadata={"help": "divides both models' logits; = sampling temperature"})
    official_alignment: bool = field(default=False, metadata={"help": (
        "reproduce the public code's pipeline, not the paper's equation: token t, gated on H_t, takes the top-k "
        "forward KL of the distribution predicting token t+1 (the last token: the one after the response); "
        "needs fkl=topk, additive weighting and an in-process teacher (docs/objectives.md)")})

    def __post_init__(self) -> None:
        checks = [
            (self.rkl in RKL_KINDS, f"rkl must be one of {RKL_KINDS}, got {self.rkl!r}"),
            (self.fkl in FKL_KINDS, f"fkl must be one of {FKL_KINDS}, got {self.fkl!r}"),
            (self.divergence is None or self.divergence in DIVERGENCES,
             f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}"),
            (self.weighting in WEIGHTINGS, f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.placement in PLACEMENTS, f"placement must be one of {PLACEMENTS}, got {self.placement!r}"),
            (self.tau >= 0, f"tau must be >= 0 (nats), got {self.tau}"),
            (self.adaptive_share is None or 0 < self.adaptive_share < 1,
             f"adaptive_share must be in (0, 1), got {self.adaptive_share}"),
            (0 <= self.adaptive_momentum < 1, f"adaptive_momentum must be in [0, 1), got {self.adaptive_momentum}"),
            (self.width > 0, f"width must be > 0, got {self.width}"),
            (self.h_high > self.h_low, f"h_high must exceed h_low, got {self.h_low}..{self.h_high}"),
            (self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}"),
            (0 <= self.lam <= 1, f"lam must be in [0, 1], got {self.lam}"),
            (self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
            (self.clip_eps >= 0, f"clip_eps must be >= 0, got {self.clip_eps}"),
            (0 <= self.beta <= 1, f"beta must be in [0, 1], got {self.beta}"),
            (0 <= self.skew_alpha < 1, f"skew_alpha must be in [0, 1), got {self.skew_alpha}"),
            (0 < self.akl_mu <= 1, f"akl_mu must be in (0, 1], got {self.akl_mu}"),
            (self.todi_beta > 0, f"todi_beta must be > 0, got {self.todi_beta}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.divergence is not None or self.rkl != "none" or self.fkl != "none",
             "objective has no term: set rkl, fkl or divergence"),
            (isinstance(self.official_alignment, bool),
             f"official_alignment must be true or false, got {self.official_alignment!r}"),
            (not self.official_alignment or (self.divergence is None and self.fkl == "topk"
                                             and self.weighting == "additive"),
             "official_alignment reproduces the public code's top-k forward KL: it needs fkl='topk', additive "
             "weighting and no single divergence"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"objective {self.name!r}: {message}")

    @classmethod
    def preset(cls, name: str, **overrides) -> ObjectiveConfig:
        """A named preset (see ``PRESETS``) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown objective {name!r}; choose one of: {', '.join(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown objective field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    # What the teacher must provide -------------------------------------------------------------
    @property
    def needs_teacher_logits(self) -> bool:
        """Full-vocabulary teacher logits (exact terms and single divergences)."""
        return self.divergence is not None or self.rkl == "exact" or self.fkl == "exact"

    @property
    def needs_topk(self) -> bool:
        """Teacher top-k ids and log-probs."""
        return self.divergence is None and self.fkl in ("topk", "topk_tail")

    @property
    def needs_logp_old(self) -> bool:
        """Sampler log-probs of the sampled tokens."""
        return self.divergence is None and (self.rkl == "ppo" or self.fkl == "importance")

    def replace(self, **changes) -> ObjectiveConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict] = {
    # OPD base: PPO-clipped reverse KL on sampled tokens.
    "opd": {"rkl": "ppo", "fkl": "none"},
    # Official EOPD: OPD + alpha * 1[H >= tau] * topk-FKL, normalised by N_valid. tau 0.8, k 16, alpha 1.
    "eopd": {"rkl": "ppo", "fkl": "topk", "weighting": "additive", "schedule": "step", "tau": 0.8,
             "top_k": 16, "alpha": 1.0},
    # The design doc's (1 - lambda(H)) RKL + lambda(H) FKL, exact terms, sigmoid lambda.
    "mixture": {"rkl": "exact", "fkl": "exact", "weighting": "mixture", "schedule": "sigmoid", "tau": 0.8,
                "width": 0.1, "lam": 1.0},
    "rkl": {"rkl": "exact", "fkl": "none"},
    "fkl": {"rkl": "none", "fkl": "exact", "schedule": "constant"},
    "fixed_mix": {"rkl": "exact", "fkl": "exact", "weighting": "mixture", "schedule": "constant", "lam": 0.5},
    # Placement ablations of the paper: FKL on every token / on a random share equal to the gated share.
    "fkl_all": {"rkl": "ppo", "fkl": "topk", "placement": "all", "tau": 0.8, "top_k": 16, "alpha": 1.0},
    "fkl_random": {"rkl": "ppo", "fkl": "topk", "placement": "random", "tau": 0.8, "top_k": 16, "alpha": 1.0},
    "jsd": {"divergence": "jsd", "beta": 0.5},
    "skew_fkl": {"divergence": "skew_fkl", "skew_alpha": 0.1},
    "skew_rkl": {"divergence": "skew_rkl", "skew_alpha": 0.1},
    "akl": {"divergence": "akl", "akl_mu": 0.5},
    "todi": {"divergence": "todi", "todi_beta": 1.0},
    "tvd": {"divergence": "tvd"},
}


@dataclass
class TokenBatch:
    """Per-position inputs of the objective. Leading shape ``[...]`` (``[B, T]`` or flat ``[N]``).

    Attributes:
        tokens: Sampled token ids ``y_t``.
        mask: 1 on valid completion tokens (float or bool).
        logp_old: Sampler log-prob of ``y_t`` at the loss temperature (``ppo``, ``importance``).
        teacher_logp: Teacher log-prob of ``y_t``.
        teacher_entropy: Teacher full-vocabulary entropy ``H_t`` in nats.
        teacher_topk_ids: ``[..., K]`` teacher's top-k ids.
        teacher_topk_logprobs: ``[..., K]`` teacher log-probs of those ids.
        teacher_logits: ``[..., V]`` full teacher logits (exact terms only).
        fkl_mask: With ``official_alignment`` only: 1 on the positions that take the forward-KL term, ``mask``
            shifted right by one (``alignment.fkl_mask_of`` on a layout with one more position per row); the
            positions of ``mask`` keep the reverse KL and the normaliser's count.
    """

    tokens: Tensor
    mask: Tensor
    logp_old: Tensor | None = None
    teacher_logp: Tensor | None = None
    teacher_entropy: Tensor | None = None
    teacher_topk_ids: Tensor | None = None
    teacher_topk_logprobs: Tensor | None = None
    teacher_logits: Tensor | None = None
    fkl_mask: Tensor | None = None

    def map(self, fn) -> TokenBatch:
        """Apply ``fn`` to every tensor field (e.g. slicing a chunk of positions)."""
        return TokenBatch(**{f.name: (None if (v := getattr(self, f.name)) is None else fn(v)) for f in fields(self)})


@dataclass
class TokenWeights:
    """Per-position term weights decided from the teacher alone (no gradient). Shapes ``[...]``.

    Attributes:
        w_rkl: Weight of the reverse-KL term.
        w_fkl: Weight of the forward-KL term.
        gate: ``g(H_t)`` as placed (entropy, all or random), in [0, 1]; its masked mean is the gated share.
        tau: The threshold used (adaptive or fixed).
    """

    w_rkl: Tensor
    w_fkl: Tensor
    gate: Tensor
    tau: float

    def map(self, fn) -> TokenWeights:
        """Apply ``fn`` to every tensor field."""
        return TokenWeights(fn(self.w_rkl), fn(self.w_fkl), fn(self.gate), self.tau)


@dataclass
class ObjectiveOutput:
    """Result of ``objective``.

    Attributes:
        loss: ``loss_sum / normalizer`` (0-d, carries gradient).
        loss_sum: Sum of per-token losses over valid tokens.
        num_valid: Number of valid tokens in this call.
        metrics: Diagnostics (``summarize``): means over valid tokens, and the ``raw/`` sums a step of several
            calls finishes ``fkl_high_entropy`` from (floats).
        token_parts: Per-position parts, detached, 0 at masked positions: ``"loss"``, ``"rkl"``, ``"fkl"``,
            ``"student_entropy"``, ``"logq"`` (``[...]`` on full logits, flat ``[N]`` on the fused path) and,
            with ``diagnostics=True``, the logit-gradient parts of ``logit_grad_parts`` (``DIAG_KEYS``).
    """

    loss: Tensor
    loss_sum: Tensor
    num_valid: int
    metrics: dict[str, float]
    token_parts: dict[str, Tensor] = field(default_factory=dict)
