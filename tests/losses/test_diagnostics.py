"""Per-term logit-gradient diagnostics: closed form (fused sparse) and autograd (plain, fused generic) against a
float64 brute force of every term written out from its definition, and a hand-computed example; their step
aggregation (the same whatever the micro-batches), the clip coefficient and token roles."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from eopd.losses import ObjectiveConfig, TokenBatch, TokenWeights, objective, prepare_weights
from eopd.losses.fused import fused_objective, reference_objective
from eopd.losses.objectives import DIAG_KEYS
from eopd.losses.scoring import score_from_logits, with_teacher_scores
from eopd.sampling.rollout import Rollout
from eopd.teachers import TeacherScores
from eopd.training.collect import UNASSIGNED, Batch, token_role_ids
from eopd.training.step_metrics import RAW, finish_raw_sums, merge_metrics, pop_raw_sums
from eopd.training.update import clip_coef, grad_sums, role_sums

Tensor = torch.Tensor
LN2, LN5 = math.log(2.0), math.log(5.0)


# ----------------------------------------------------------------------------------------------------------
# random tiny cases and a float64 brute force
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    hidden: Tensor  # [B, T, H] float32
    weight: Tensor  # [V, H] float32
    batch: TokenBatch  # [B, T] leading
    weights: TokenWeights


def random_case(cfg: ObjectiveConfig, *, top_k: int = 4, vocab: int = 9, mask_p: float = 0.3, seed: int = 0) -> Case:
    """Random student lm_head inputs, a random teacher (top-k from its exact scores), PPO ratios far from 1
    (so some tokens are clipped), masked positions, and tau at the median teacher entropy (both groups)."""
    g = torch.Generator().manual_seed(seed)
    shape, h, t = (3, 6), 5, cfg.temperature
    hidden = torch.randn(*shape, h, generator=g)
    weight = torch.randn(vocab, h, generator=g) * 0.9
    with torch.no_grad():
        logq = torch.log_softmax(hidden.double() @ weight.double().T / t, -1)
        tokens = torch.multinomial(logq.exp().reshape(-1, vocab), 1, generator=g).reshape(shape)
        noise = (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5)
        logp_old = (logq.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) + noise).float()
        teacher_logits = torch.randn(*shape, vocab, generator=g) * 1.5
        scores = score_from_logits(teacher_logits, tokens, top_k=top_k, temperature=t)
    mask = torch.rand(shape, generator=g) > mask_p
    mask[0, 0] = True
    batch = with_teacher_scores(TokenBatch(tokens=tokens, mask=mask.float(), logp_old=logp_old,
                                           teacher_logits=teacher_logits), scores)
    tau = float(batch.teacher_entropy[mask].median())
    weights = prepare_weights(cfg.replace(tau=tau), batch)
    return Case(hidden, weight, batch, weights)


def reference_terms(cfg: ObjectiveConfig, logits: Tensor, case: Case) -> tuple[Tensor, Tensor]:
    """``w_R RKL`` and ``w_F FKL`` per position, written out in float64 from their definitions (no eopd loss
    code): the PPO-clipped surrogate or the exact reverse KL; the renormalised top-k, top-k + tail bucket,
    importance-weighted or exact forward KL. The weights are the case's (an input of the terms)."""
    b, w, t = case.batch, case.weights, cfg.temperature
    logq = torch.log_softmax(logits / t, -1)
    logq_y = logq.gather(-1, b.tokens.unsqueeze(-1)).squeeze(-1)
    logp = torch.log_softmax(b.teacher_logits.double() / t, -1)  # the teacher's full distribution
    zero = torch.zeros_like(logq_y)
    if cfg.rkl == "ppo":
        ratio = torch.exp(logq_y - b.logp_old.double())
        adv = b.teacher_logp.double() - b.logp_old.double()
        rkl = torch.maximum(-ratio * adv, -ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)
    elif cfg.rkl == "exact":
        rkl = (logq.exp() * (logq - logp)).sum(-1)
    else:
        rkl = zero
    logp_K = b.teacher_topk_logprobs.double()
    logq_K = logq.gather(-1, b.teacher_topk_ids)
    if cfg.fkl == "topk":
        p_K = torch.softmax(logp_K, -1)  # the teacher's top-k, renormalised; q is not
        fkl = (p_K * (p_K.log() - logq_K)).sum(-1)
    elif cfg.fkl == "topk_tail":
        fkl = (logp_K.exp() * (logp_K - logq_K)).sum(-1)
        if b.teacher_topk_ids.shape[-1] < logits.shape[-1]:  # k = V: no tail on either side
            p_tail, q_tail = 1 - logp_K.exp().sum(-1), 1 - logq_K.exp().sum(-1)
            fkl = fkl + p_tail * (p_tail.log() - q_tail.log())
    elif cfg.fkl == "importance":
        weight = torch.exp(b.teacher_logp.double() - b.logp_old.double())
        fkl = weight * (b.teacher_logp.double() - logq_y)
    elif cfg.fkl == "exact":
        fkl = (logp.exp() * (logp - logq)).sum(-1)
    else:
        fkl = zero
    mask = b.mask.bool()
    return (torch.where(mask, w.w_rkl.double() * rkl, 0.0), torch.where(mask, w.w_fkl.double() * fkl, 0.0))


def brute_force(cfg: ObjectiveConfig, case: Case, terms=reference_terms) -> dict[str, Tensor]:
    """Per-position ``||G^R||^2``, ``||G^F||^2``, ``<G^R, G^F>`` by float64 autograd of each term wrt the logits."""
    logits = (case.hidden.double() @ case.weight.double().T).requires_grad_(True)
    grads = []
    for term in terms(cfg, logits, case):
        grad = torch.autograd.grad(term.sum(), logits, retain_graph=True, allow_unused=True)[0] \
            if term.requires_grad else None
        grads.append(torch.zeros_like(logits) if grad is None else grad)
    g_r, g_f = grads
    return {"grad_rkl_sq": (g_r * g_r).sum(-1), "grad_fkl_sq": (g_f * g_f).sum(-1), "grad_dot": (g_r * g_f).sum(-1)}


def fused_parts(cfg: ObjectiveConfig, case: Case, *, chunk: int = 4, need_grad: bool = True) -> dict[str, Tensor]:
    """The fused path's diagnostics as ``[B, T]`` (it returns flat positions). With ``need_grad`` the sparse
    path sums the unread ids' ``q^2`` inside the gradient's pass, without it in a read of its own."""
    hidden = case.hidden.clone().requires_grad_(need_grad)
    out = fused_objective(cfg, hidden, case.weight, case.batch, weights=case.weights, chunk_size=chunk,
                          diagnostics=True)
    return {k: v.reshape(case.batch.mask.shape) for k, v in out.token_parts.items()}


def assert_diag_close(got: dict[str, Tensor], ref: dict[str, Tensor], rtol: float = 2e-5) -> None:
    for k in DIAG_KEYS:
        scale = float(ref[k].abs().max()) + 1e-12
        torch.testing.assert_close(got[k].double(), ref[k].double(), rtol=rtol, atol=rtol * scale, msg=k)


SPARSE_CASES = [  # (preset, overrides, top_k, vocab)
    ("eopd", {}, 4, 9),
    ("eopd", {"temperature": 0.6}, 4, 9),
    ("eopd", {"temperature": 1.7}, 3, 9),
    ("eopd", {}, 9, 9),  # k == V: the sampled token is always one of the top-k, nothing is left outside
    ("opd", {}, 4, 9),
    ("fkl_all", {"temperature": 0.8, "alpha": 0.3}, 4, 9),
]


@pytest.mark.parametrize(("name", "overrides", "top_k", "vocab"), SPARSE_CASES)
@pytest.mark.parametrize(("seed", "need_grad"), [(0, True), (1, False)])
def test_closed_form_equals_float64_brute_force(name, overrides, top_k, vocab, seed, need_grad) -> None:
    cfg = ObjectiveConfig.preset(name, **overrides)
    case = random_case(cfg, top_k=top_k, vocab=vocab, seed=seed)
    ref = brute_force(cfg, case)
    assert ref["grad_rkl_sq"].abs().max() > 1e-3  # the case exercises the term
    if cfg.fkl != "none":
        assert ref["grad_fkl_sq"].abs().max() > 1e-3 and ref["grad_dot"].abs().max() > 1e-4
    got = fused_parts(cfg, case, need_grad=need_grad)
    assert_diag_close(got, ref)
    assert not got["grad_rkl_sq"][~case.batch.mask.bool()].any()  # masked positions: exactly 0


@pytest.mark.parametrize(("overrides", "top_k"), [({"fkl": "topk_tail"}, 4), ({"fkl": "importance"}, 4),
                                                  ({"fkl": "topk_tail", "temperature": 0.7}, 9)])
def test_closed_form_with_tail_and_importance_terms(overrides, top_k) -> None:
    cfg = ObjectiveConfig.preset("eopd", **overrides)
    case = random_case(cfg, top_k=top_k, seed=3)
    for need_grad in (True, False):
        assert_diag_close(fused_parts(cfg, case, need_grad=need_grad), brute_force(cfg, case))


@pytest.mark.parametrize("name", ["eopd", "opd", "mixture", "fkl", "rkl"])
def test_plain_path_autograd_equals_brute_force(name) -> None:
    cfg = ObjectiveConfig.preset(name, temperature=0.9)
    case = random_case(cfg, seed=4)
    logits = (case.hidden @ case.weight.T).requires_grad_(True)
    out = objective(cfg, logits, case.batch, weights=case.weights, diagnostics=True)
    assert_diag_close(out.token_parts, brute_force(cfg, case), rtol=1e-4)


@pytest.mark.parametrize("name", ["mixture", "fkl", "rkl", "fixed_mix"])
@pytest.mark.parametrize("temperature", [1.0, 1.4])
def test_fused_generic_path_equals_plain(name, temperature) -> None:
    cfg = ObjectiveConfig.preset(name, temperature=temperature)
    case = random_case(cfg, seed=5)
    plain = reference_objective(cfg, case.hidden, case.weight, case.batch, weights=case.weights, diagnostics=True)
    fused = fused_parts(cfg, case, chunk=5)
    assert_diag_close(fused, plain.token_parts, rtol=1e-5)
    assert plain.token_parts["grad_fkl_sq"].abs().max() > 1e-3 or cfg.name == "rkl"


def test_single_divergences_have_no_split_and_no_diagnostics() -> None:
    cfg = ObjectiveConfig.preset("jsd")
    case = random_case(cfg, seed=6)
    assert not set(DIAG_KEYS) & set(fused_parts(cfg, case))
    plain = reference_objective(cfg, case.hidden, case.weight, case.batch, weights=case.weights, diagnostics=True)
    assert not set(DIAG_KEYS) & set(plain.token_parts)


@pytest.mark.parametrize(("name", "overrides"), [("eopd", {}), ("opd", {}), ("eopd", {"fkl": "importance"}),
                                                ("eopd", {"fkl": "topk_tail"}), ("mixture", {})])
def test_diagnostics_leave_the_training_gradient_bit_identical(name, overrides) -> None:
    cfg = ObjectiveConfig.preset(name, temperature=0.8, **overrides)
    case = random_case(cfg, seed=7)
    grads = []
    for diagnostics in (False, True):
        hidden, weight = case.hidden.clone().requires_grad_(True), case.weight.clone().requires_grad_(True)
        out = fused_objective(cfg, hidden, weight, case.batch, weights=case.weights, chunk_size=4,
                              diagnostics=diagnostics)
        out.loss.backward()
        grads.append((out.loss.detach(), hidden.grad, weight.grad))
    for off, on in zip(*grads, strict=True):
        assert torch.equal(off, on)


@pytest.mark.parametrize("name", ["eopd", "mixture"])
def test_all_masked_batch_gives_zeros(name) -> None:
    cfg = ObjectiveConfig.preset(name)
    case = random_case(cfg, seed=8)
    case.batch = dataclasses.replace(case.batch, mask=torch.zeros_like(case.batch.mask))
    case.weights = prepare_weights(cfg, case.batch)
    for parts in (fused_parts(cfg, case),
                  reference_objective(cfg, case.hidden, case.weight, case.batch, weights=case.weights,
                                      diagnostics=True).token_parts):
        for k in DIAG_KEYS:
            assert torch.equal(parts[k], torch.zeros_like(parts[k])), k
    metrics = finish_raw_sums(grad_sums(fused_parts(cfg, case), batch_of(case), 1.0))
    assert all(v == 0.0 for v in metrics.values()), metrics


# ----------------------------------------------------------------------------------------------------------
# the hand-computed example: 4-token vocabulary, uniform student, 3 valid tokens + 1 masked
# ----------------------------------------------------------------------------------------------------------
#   t0: sampled y=0, log p_T(y) = ln 1/2, log q_old = ln 1/4 (A = ln 2); teacher top-2 ids (0, 1) with
#       p = (1/2, 1/4) -> renormalised (2/3, 1/3); H_T = 1.75 ln 2 >= tau 0.8: gated (alpha 1).
#       G^R = -A (e_0 - q) = -ln2 (3/4, -1/4, -1/4, -1/4)             ||G^R||^2 = 3/4 ln^2 2
#       G^F = -(2/3, 1/3, 0, 0) + q = (-5/12, -1/12, 3/12, 3/12)      ||G^F||^2 = 44/144 = 11/36
#       <G^R, G^F> = -ln2 (-15 + 1 - 6) / 48                          = 5/12 ln 2
#   t1: y=2, log p_T(y) = ln 0.01 (A = ln 0.04 = -2 ln 5), H_T = 0.1: not gated; ||G^R||^2 = 3/4 A^2 = 3 ln^2 5
#   t2: y=1, log p_T(y) = ln 1/4 (A = 0), not gated: all zero
#   t3: masked
# At temperature T every logit gradient is divided by T (the student is uniform at any T).


def hand_tokens() -> tuple[TokenBatch, TokenWeights]:
    q = math.log(0.25)
    batch = TokenBatch(
        tokens=torch.tensor([[0, 2], [1, 3]]),
        mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
        logp_old=torch.full((2, 2), q),
        teacher_logp=torch.tensor([[math.log(0.5), math.log(0.01)], [q, q]]),
        teacher_entropy=torch.tensor([[1.75 * LN2, 0.1], [0.1, 0.1]]),
        teacher_topk_ids=torch.tensor([[[0, 1], [0, 1]], [[0, 1], [0, 1]]]),
        teacher_topk_logprobs=torch.tensor([[[math.log(0.5), q], [math.log(0.97), math.log(0.01)]],
                                            [[math.log(0.97), math.log(0.01)], [math.log(0.5), q]]]),
    )
    return batch, prepare_weights(ObjectiveConfig.preset("eopd", top_k=2), batch)


HAND = {"grad_rkl_sq": [[0.75 * LN2**2, 3 * LN5**2], [0.0, 0.0]],
        "grad_fkl_sq": [[11 / 36, 0.0], [0.0, 0.0]],
        "grad_dot": [[5 / 12 * LN2, 0.0], [0.0, 0.0]]}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("path", ["fused", "plain"])
def test_hand_computed_example(temperature, path) -> None:
    cfg = ObjectiveConfig.preset("eopd", top_k=2, temperature=temperature)
    batch, weights = hand_tokens()
    assert weights.w_fkl.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    hidden = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    weight = torch.zeros(4, 3, requires_grad=True)  # uniform student: q = 1/4 everywhere
    fn = fused_objective if path == "fused" else reference_objective
    out = fn(cfg, hidden, weight, batch, weights=weights, diagnostics=True)
    for k, expected in HAND.items():
        got = out.token_parts[k].reshape(2, 2)
        torch.testing.assert_close(got, torch.tensor(expected) / temperature**2, rtol=1e-6, atol=1e-7, msg=k)


def hand_batch(role_names: tuple[str, ...] = ("arithmetic", "choice")) -> Batch:
    """The hand example as a training ``Batch`` with roles: t0 ``choice``, t1 and t2 ``arithmetic``."""
    tokens, weights = hand_tokens()
    mask = tokens.mask
    rollout = Rollout(sequences_BL=tokens.tokens, attention_mask_BL=mask.long(), prompt_len=0,
                      completion_ids_BT=tokens.tokens, completion_mask_BT=mask, logp_old_BT=tokens.logp_old,
                      prompt_index_B=torch.arange(2))
    scores = TeacherScores(tokens.teacher_logp, tokens.teacher_entropy)
    index = {n: i for i, n in enumerate(role_names)}
    role_ids = torch.tensor([[index["choice"], index["arithmetic"]], [index["arithmetic"], -1]])
    return Batch(rollout, scores, tokens, weights, role_ids_BT=role_ids, role_names=role_names)


def batch_of(case: Case) -> Batch:
    """A ``Batch`` around a random case (for the aggregation functions)."""
    b = case.batch
    rollout = Rollout(sequences_BL=b.tokens, attention_mask_BL=b.mask.long(), prompt_len=0, completion_ids_BT=b.tokens,
                      completion_mask_BT=b.mask, logp_old_BT=b.logp_old, prompt_index_B=torch.arange(b.tokens.shape[0]))
    return Batch(rollout, TeacherScores(b.teacher_logp, b.teacher_entropy), b, case.weights)


def test_step_aggregation_of_the_hand_example() -> None:
    """Norms over tokens with the 1/N normaliser, cosine, and mean/variance of the unnormalised per-token norm."""
    batch = hand_batch()
    cfg = ObjectiveConfig.preset("eopd", top_k=2)
    logits = torch.zeros(2, 2, 4, requires_grad=True)
    out = objective(cfg, logits, batch.tokens, weights=batch.weights, diagnostics=True)
    sums: dict[str, float] = {}
    # two micro-batches of a 3-token minibatch (summing raw sums must equal one pass over all tokens)
    for rows in (torch.tensor([0]), torch.tensor([1])):
        mb = batch.rows(rows)
        parts = {k: v[rows] for k, v in out.token_parts.items()}
        merge_metrics(sums, grad_sums(parts, mb, 3.0), 0)
    m = finish_raw_sums(pop_raw_sums(sums))
    assert sums == {}
    rkl_sq, fkl_sq, dot = 0.75 * LN2**2 + 3 * LN5**2, 11 / 36, 5 / 12 * LN2
    assert m["diag/grad_rkl"] == pytest.approx(math.sqrt(rkl_sq) / 3, rel=1e-6)
    assert m["diag/grad_fkl"] == pytest.approx(math.sqrt(fkl_sq) / 3, rel=1e-6)
    assert m["diag/grad_cos"] == pytest.approx(dot / math.sqrt(rkl_sq * fkl_sq), rel=1e-6)
    assert m["diag/rkl_gnorm_mean_high"] == pytest.approx(math.sqrt(0.75) * LN2, rel=1e-6)
    assert m["diag/rkl_gnorm_var_high"] == pytest.approx(0.0, abs=1e-9)
    assert m["diag/rkl_gnorm_mean_low"] == pytest.approx(math.sqrt(3) * LN5 / 2, rel=1e-6)
    assert m["diag/rkl_gnorm_var_low"] == pytest.approx(3 * LN5**2 / 4, rel=1e-6)


@pytest.mark.parametrize("names", [("arithmetic", "choice"), ("choice", "arithmetic")])
def test_role_metrics_of_the_hand_example(names) -> None:
    batch = hand_batch(names)
    cfg = ObjectiveConfig.preset("eopd", top_k=2)
    out = objective(cfg, torch.zeros(2, 2, 4), batch.tokens, weights=batch.weights)
    # the process-wide role list can hold a role this batch lacks: its sums are zeros
    m = finish_raw_sums(role_sums(out.token_parts, batch, ("arithmetic", "choice", "other")))
    fkl0 = 2 / 3 * math.log(8 / 3) + 1 / 3 * math.log(4 / 3)  # KL((2/3, 1/3) || (1/4, 1/4)) on the top-2
    expected = {
        "role/choice/share": 1 / 3, "role/arithmetic/share": 2 / 3, "role/other/share": 0.0,
        "role/choice/loss": -LN2 + fkl0, "role/arithmetic/loss": LN5,  # rkl = -A at ratio 1; t1: 2 ln 5, t2: 0
        "role/choice/rkl": -LN2, "role/arithmetic/rkl": LN5, "role/choice/fkl": fkl0,
        "role/choice/gated_share": 1.0, "role/arithmetic/gated_share": 0.0,
        "role/choice/teacher_entropy": 1.75 * LN2, "role/arithmetic/teacher_entropy": 0.1,
        "role/choice/student_entropy": math.log(4), "role/arithmetic/student_entropy": math.log(4),
        "role/other/loss": 0.0,
    }
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k


def test_raw_sums_bypass_token_weighting() -> None:
    sums: dict[str, float] = {}
    merge_metrics(sums, {"loss": 2.0, f"{RAW}x": 3.0, "ppo/ratio_max": 1.5}, num_valid=4)
    merge_metrics(sums, {"loss": 1.0, f"{RAW}x": 1.0, "ppo/ratio_max": 1.2}, num_valid=2)
    assert sums == {"loss": 10.0, f"{RAW}x": 4.0, "ppo/ratio_max": 1.5}
    assert pop_raw_sums(sums) == {f"{RAW}x": 4.0} and f"{RAW}x" not in sums


def test_clip_coef_is_what_clip_grad_norm_applies() -> None:
    assert clip_coef(4.0, 1.0) == pytest.approx(0.25, rel=1e-6)
    assert clip_coef(0.5, 1.0) == 1.0 and clip_coef(0.0, 1.0) == 1.0
    assert clip_coef(3.0, 0.0) == 1.0  # clipping off
    grad = torch.full((4,), 2.0, requires_grad=True)  # norm 4
    grad.grad = grad.detach().clone()
    norm = float(torch.nn.utils.clip_grad_norm_([grad], 1.0))
    assert float(grad.grad.norm()) == pytest.approx(clip_coef(norm, 1.0) * norm, rel=1e-7)
    raw = {f"{RAW}diag/clip_coef": 0.25 + 1.0, f"{RAW}diag/updates": 2.0}
    assert finish_raw_sums(raw) == {"diag/clip_coef": 0.625}


def test_token_role_ids_index_sorted_names_and_mask_the_rest() -> None:
    def roles(ids: list[int]) -> list[str]:
        return ["even" if i % 2 == 0 else "odd" for i in ids]

    ids = torch.tensor([[2, 3, 5, 0], [7, 1, 1, 1]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    role_ids, names = token_role_ids(roles, ids, mask)
    assert names == ("even", "odd")
    assert role_ids.tolist() == [[0, 1, 1, -1], [1, -1, -1, -1]]
    with pytest.raises(ValueError, match="one role per token"):
        token_role_ids(lambda ids: ["even"], ids, mask)

    def picky(ids: list[int]) -> list[str]:  # as the arithmetic roles on a multi-character token
        if 7 in ids:
            raise ValueError("cannot tell")
        return roles(ids)

    role_ids, names = token_role_ids(picky, ids, mask)
    assert names == ("even", "odd", UNASSIGNED)
    assert role_ids.tolist() == [[0, 1, 1, -1], [2, -1, -1, -1]]


def test_reduce_step_agrees_on_keys_that_only_some_processes_hold() -> None:
    """Two fake processes with different keys: the union is reduced position by position, extremes by
    min/max with neutral fill-ins, so a key one process lacks never shifts another key's value."""
    from eopd.training.step_metrics import reduce_step

    a = {"loss": 2.0 * 4, "ppo/ratio_max": 1.5, "ppo/ratio_min": 0.9}  # 4 tokens, ratio keys present
    b = {"loss": 1.0 * 2, "zz_only_b": 3.0 * 2}  # 2 tokens, no ratio keys (an empty micro-batch)
    keys = sorted(set(a) | set(b))
    stacked: dict[str, list[torch.Tensor]] = {"sum": [], "max": []}

    def run(sums: dict[str, float], tokens: float) -> None:
        def reduce_sum(x: torch.Tensor) -> torch.Tensor:
            stacked["sum"].append(x)
            return x
        def reduce_max(x: torch.Tensor) -> torch.Tensor:
            stacked["max"].append(x)
            return x
        reduce_step(sums, tokens=tokens, rows=1.0, grad_norm=0.0, reduce_sum=reduce_sum, reduce_max=reduce_max,
                    all_keys=lambda _: keys)

    run(a, 4.0)
    run(b, 2.0)
    total = stacked["sum"][0] + stacked["sum"][1]
    maxed = torch.maximum(stacked["max"][0], stacked["max"][1])
    additive = [k for k in keys if not k.endswith(("_min", "_max"))]
    sums = dict(zip(additive, total[:-3].tolist(), strict=True))
    assert sums["loss"] / 6.0 == pytest.approx((8.0 + 2.0) / 6.0)
    assert sums["zz_only_b"] == pytest.approx(6.0)
    extreme = [k for k in keys if k.endswith(("_min", "_max"))]
    signs = torch.tensor([-1.0 if k.endswith("_min") else 1.0 for k in extreme], dtype=torch.float64)
    assert dict(zip(extreme, (maxed * signs).tolist(), strict=True)) == {"ppo/ratio_max": 1.5, "ppo/ratio_min": 0.9}


@pytest.mark.parametrize("path", ["plain", "fused"])
def test_fkl_high_entropy_is_the_gated_mean_whatever_the_micro_batches(path) -> None:
    """The step's ``fkl_high_entropy`` is sum(FKL * gate) / sum(gate) over all its tokens, from raw sums: the
    same for one call or several micro-batches (a token-weighted mean of per-call means is not)."""
    from eopd.training.step_metrics import reduce_step

    cfg = ObjectiveConfig.preset("eopd", top_k=4)
    case = random_case(cfg, seed=11)
    b, gate, mask = case.batch, case.weights.gate.double(), case.batch.mask.bool()
    logq = torch.log_softmax(case.hidden.double() @ case.weight.double().T, -1)
    p_K = torch.softmax(b.teacher_topk_logprobs.double(), -1)
    fkl = (p_K * (p_K.log() - logq.gather(-1, b.teacher_topk_ids))).sum(-1)  # from scratch, float64
    true = float((fkl * gate)[mask].sum() / gate[mask].sum())
    mean_of_means = 0.0
    for groups in ([[0, 1, 2]], [[0], [1, 2]], [[2], [0], [1]]):
        sums: dict[str, float] = {}
        for rows in groups:
            r = torch.tensor(rows)
            tokens, weights = b.map(lambda x, r=r: x[r]), case.weights.map(lambda x, r=r: x[r])
            if path == "plain":
                out = objective(cfg, case.hidden[r] @ case.weight.T, tokens, weights=weights)
            else:
                out = fused_objective(cfg, case.hidden[r], case.weight, tokens, weights=weights, chunk_size=4)
            merge_metrics(sums, out.metrics, out.num_valid)
            mean_of_means += out.metrics["fkl_high_entropy"] * out.num_valid / float(mask.sum()) if len(groups) == 3 \
                else 0.0
        metrics, *_ = reduce_step(sums, tokens=float(mask.sum()), rows=3.0, grad_norm=0.0, reduce_sum=lambda x: x,
                                  reduce_max=lambda x: x)
        assert metrics["fkl_high_entropy"] == pytest.approx(true, rel=1e-5), groups
    assert abs(mean_of_means - true) > 0.2 * true  # the case tells the two rules apart
