"""``official_alignment``: the public EOPD code's pipeline (the top-k forward KL one position late), checked
against a case computed by hand, and the fused path against the plain one with the switch on.

The hand case (B = 1, R = 2 response tokens, V = 6, k = 4, laid out over R + 1 = 3 positions; probabilities
chosen so that every number below is a short sum of logs, computed in float64 with ``math.log``):

    student q:   p0 [.4 .3 .1 .1 .05 .05]   p1 [.05 .05 .1 .1 .6 .1]   p2 [.5 .2 .1 .1 .05 .05]
    teacher p:   p0 [.2 .2 .2 .2 .1 .1]     p1 [.003 .002 .0005 .0005 .99 .004]   p2 [.5 .3 .1 .05 .025 .025]
    top-4 ids:   p0 [0 1 2 3]               p1 [4 5 0 1]                           p2 [0 1 2 3]
    tokens y = [1, 5]; old log-probs = log q(y) (PPO ratio 1), so RKL_t = log q(y_t) - log p(y_t):
    RKL = [log(.3/.2), log(.1/.004)] = [0.405465108108, 3.218875824868]
    H = -sum p log p = [1.748067348546, 0.069493223794, 1.272254527261]: with tau 0.8 the gate is [1, 0]
    FKL_p = sum_k p~_k (log p~_k - log q_k), p~ = p renormalised on the top 4:
        FKL_0 = log .25 - (log .4 + log .3 + log .1 + log .1) / 4 = 0.295064069427
        FKL_1 = 0.469483030798 (p~ = [.99, .004, .003, .002] / .999 against q [.6, .1, .05, .05])
        FKL_2 = 0.142853476919 (p~ = [.5, .3, .1, .05] / .95 against q [.5, .2, .1, .1])

The paper's equation gives token t the forward KL at its own position, FKL_t: per token [0.2951, 0.4695] and
loss (RKL_0 + RKL_1 + FKL_0) / 2 = 1.959702501202. The pipeline gives token t FKL_{t+1}: per token [0.4695,
0.1429] and loss (RKL_0 + RKL_1 + FKL_1) / 2 = 2.046911981887; the normaliser is the 2 real tokens in both.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from eopd.losses import ObjectiveConfig, TokenBatch, fkl_mask_of, objective, prepare_weights, shift_right
from eopd.losses.fused import fused_objective, reference_objective

from .test_fused import assert_same, make_case, run

Q = [[0.4, 0.3, 0.1, 0.1, 0.05, 0.05], [0.05, 0.05, 0.1, 0.1, 0.6, 0.1], [0.5, 0.2, 0.1, 0.1, 0.05, 0.05]]
P = [[0.2, 0.2, 0.2, 0.2, 0.1, 0.1], [0.003, 0.002, 0.0005, 0.0005, 0.99, 0.004],
     [0.5, 0.3, 0.1, 0.05, 0.025, 0.025]]
IDS = [[0, 1, 2, 3], [4, 5, 0, 1], [0, 1, 2, 3]]
TOKENS = [1, 5]
H = [1.748067348546, 0.069493223794, 1.272254527261]
FKL = [0.295064069427, 0.469483030798, 0.142853476919]
RKL = [0.405465108108, 3.218875824868]
PAPER_LOSS = 1.959702501202
PIPELINE_LOSS = 2.046911981887


def hand_case(aligned: bool) -> tuple[torch.Tensor, TokenBatch]:
    """The module docstring's case: student logits ``log q`` ``[1, 3, 6]`` (a leaf) and its TokenBatch."""
    logits = torch.tensor(Q, dtype=torch.float64).log().unsqueeze(0).requires_grad_(True)
    p = torch.tensor(P, dtype=torch.float64)
    ids = torch.tensor(IDS)
    tokens = torch.tensor([[*TOKENS, 0]])  # the third position is the one after the response (pad token)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logp_old = torch.tensor([[math.log(Q[0][1]), math.log(Q[1][5]), 0.0]], dtype=torch.float64)
    batch = TokenBatch(
        tokens=tokens, mask=mask, logp_old=logp_old,
        teacher_logp=torch.tensor([[math.log(P[0][1]), math.log(P[1][5]), 0.0]], dtype=torch.float64),
        teacher_entropy=torch.tensor([H], dtype=torch.float64),
        teacher_topk_ids=ids.unsqueeze(0), teacher_topk_logprobs=p.gather(1, ids).log().unsqueeze(0),
        fkl_mask=fkl_mask_of(mask) if aligned else None)
    return logits, batch


def test_the_hand_case_gives_the_pipeline_numbers_with_the_switch_and_the_equations_without() -> None:
    logits, batch = hand_case(aligned=True)
    cfg = ObjectiveConfig.preset("eopd", official_alignment=True)
    out = objective(cfg, logits, batch)
    # the forward KL is evaluated at positions 1 and 2: token 0 (gated) takes FKL_1, token 1 takes FKL_2
    torch.testing.assert_close(out.token_parts["fkl"], torch.tensor([[0.0, FKL[1], FKL[2]]], dtype=torch.float64),
                               rtol=0, atol=1e-11)
    torch.testing.assert_close(out.token_parts["rkl"], torch.tensor([[RKL[0], RKL[1], 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-11)
    assert out.num_valid == 2
    assert float(out.loss.detach()) == pytest.approx(PIPELINE_LOSS, abs=1e-11)
    assert out.metrics["gated_share"] == pytest.approx(0.5)  # one of the two tokens, wherever its term sits
    assert out.metrics["loss_fkl"] == pytest.approx(FKL[1] / 2, abs=1e-11)
    assert out.metrics["fkl_high_entropy"] == pytest.approx(FKL[1], abs=1e-11)  # what the gated token takes

    logits, batch = hand_case(aligned=False)
    paper = objective(ObjectiveConfig.preset("eopd"), logits, batch)
    torch.testing.assert_close(paper.token_parts["fkl"], torch.tensor([[FKL[0], FKL[1], 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-11)
    assert float(paper.loss.detach()) == pytest.approx(PAPER_LOSS, abs=1e-11)


def test_the_last_token_takes_the_distribution_after_the_response() -> None:
    """tau 0.05 gates both tokens: the last token's forward KL is FKL_2, the position whose input is it, and only
    that term reaches position 2's logits: ``(q_2 - p~_2) / 2``."""
    logits, batch = hand_case(aligned=True)
    out = objective(ObjectiveConfig.preset("eopd", official_alignment=True, tau=0.05), logits, batch)
    # (RKL_0 + RKL_1 + FKL_1 + FKL_2) / 2 = 2.118338720346
    assert float(out.loss.detach()) == pytest.approx((RKL[0] + RKL[1] + FKL[1] + FKL[2]) / 2, abs=1e-11)
    out.loss.backward()
    # (q_2 - p~_2) / 2 with p~_2 = [.5, .3, .1, .05] / .95 on ids 0..3
    want = torch.tensor([-0.013157894737, -0.057894736842, -0.002631578947, 0.023684210526, 0.025, 0.025],
                        dtype=torch.float64)
    torch.testing.assert_close(logits.grad[0, 2], want, rtol=0, atol=1e-11)

    logits, batch = hand_case(aligned=False)  # the equation: position 2 is padding, no gradient
    objective(ObjectiveConfig.preset("eopd", tau=0.05), logits, batch).loss.backward()
    assert float(logits.grad[0, 2].abs().max()) == 0.0


def test_shift_gate_and_fkl_mask_move_each_token_one_position_later() -> None:
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert fkl_mask_of(mask).tolist() == [[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]]
    assert shift_right(torch.tensor([1, 2, 3])).tolist() == [0, 1, 2]
    h = torch.tensor([[2.0, 0.1, 2.0, 9.0], [2.0, 9.0, 9.0, 9.0]])
    batch = TokenBatch(tokens=torch.zeros(2, 4, dtype=torch.long), mask=mask, teacher_entropy=h,
                       fkl_mask=fkl_mask_of(mask))
    w = prepare_weights(ObjectiveConfig.preset("eopd", official_alignment=True, alpha=2.0), batch)
    assert w.w_fkl.tolist() == [[0.0, 2.0, 0.0, 2.0], [0.0, 2.0, 0.0, 0.0]]
    # flattened row-major, as the fused path sees it without precomputed weights: the same placement
    flat = batch.map(lambda x: x.reshape(-1))
    w_flat = prepare_weights(ObjectiveConfig.preset("eopd", official_alignment=True, alpha=2.0), flat)
    assert w_flat.w_fkl.tolist() == w.w_fkl.reshape(-1).tolist()


@pytest.mark.parametrize(("dtype", "chunk", "tol"), [(torch.float32, 4, (1e-4, 1e-5)),
                                                     (torch.float64, 3, (1e-9, 1e-11))])
@pytest.mark.parametrize("precomputed", [False, True])
def test_fused_path_equals_plain_path_with_the_switch(dtype: torch.dtype, chunk: int, tol: tuple[float, float],
                                                      precomputed: bool) -> None:
    """Rows of 6, 3, 1 and 4 tokens over 7 positions (the longest fills 6, its position 6 is the one after it)."""
    cfg = ObjectiveConfig.preset("eopd", official_alignment=True)
    case = make_case(cfg, shape=(4, 7), dtype=dtype, bias=True, pad_rows=2, ratio_noise=0.5, seed=3)
    lengths = torch.tensor([6, 3, 1, 4])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).float()
    case.batch = dataclasses.replace(case.batch, mask=mask, fkl_mask=fkl_mask_of(mask))
    tau = float(case.batch.teacher_entropy[mask.bool()].median())
    kwargs = {"weights": prepare_weights(cfg, case.batch, tau=tau)} if precomputed else {"tau": tau}
    ref = run(reference_objective, cfg, case, **kwargs)
    fused = run(fused_objective, cfg, case, chunk_size=chunk, **kwargs)
    assert_same(ref, fused, rtol=tol[0], atol=tol[1])
    assert ref[0].num_valid == 14
    # the positions after each row's last token got gradient (a gated last token) or none (an ungated one)
    after = fkl_mask_of(mask).bool() & ~mask.bool()
    gated_last = prepare_weights(cfg, case.batch, tau=tau).w_fkl[after] > 0
    assert gated_last.any() and (~gated_last).any()
    got = case.hidden.grad[after].abs().amax(-1) > 0
    assert torch.equal(got, gated_last)


def test_the_switch_needs_the_shifted_positions_and_the_top_k_term() -> None:
    logits, batch = hand_case(aligned=False)
    with pytest.raises(ValueError, match="fkl_mask"):
        objective(ObjectiveConfig.preset("eopd", official_alignment=True), logits, batch)
    for preset, changes in (("opd", {}), ("eopd", {"fkl": "exact"}), ("mixture", {"fkl": "topk"}), ("jsd", {})):
        with pytest.raises(ValueError, match="official_alignment"):
            ObjectiveConfig.preset(preset, official_alignment=True, **changes)
