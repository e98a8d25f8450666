"""Memory levers of the update: micro-batch sizes, token-budget micro-batches and gradient checkpointing change how
the gradient is computed, never what it is: after a whole step (two PPO epochs of two minibatches, clipping that
binds, every diagnostic) the weights and every logged metric are the same; checkpointing is on during the update
only, so sampling keeps its KV cache."""

from __future__ import annotations

import pytest
import torch

from eopd.config import load_config
from eopd.sampling.microbatch import micro_batches, padded_tokens, row_widths, token_budget_groups
from eopd.sampling.rollout import Rollout
from eopd.training.components import build_components

from .conftest import REPO
from .rehearsal_grads import step_on_rollout, uneven_rollout
from .test_process_count import ATOL, RTOL, STEP, WALL_CLOCK, WEIGHT_TOL

TINY = str(REPO / "configs" / "tiny.yaml")


def _overrides(tiny_models, out, *extra: str) -> list[str]:
    return [f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
            f"output_dir={out}", "num_threads=1", "tensorboard=false", *STEP, "eval.every=0", *extra]


def test_token_budget_groups_cut_sorted_rows_at_the_fewest_positions_within_the_budget():
    prompt_B = torch.tensor([2, 3, 2, 2, 4, 2])
    completion_B = torch.tensor([1, 20, 2, 3, 18, 1])
    groups = token_budget_groups(prompt_B, completion_B, max_tokens=48)
    # longest first: rows 1 (3+20) and 4 (4+18): 2 x (4 + 20) = 48 fits; then 3, 2, 0, 5 at width 2+3: 4 x 5 = 20
    # (196 positions with 64 per forward; splitting 1 from 4 would compute 257)
    assert [g.tolist() for g in groups] == [[1, 4], [3, 2, 0, 5]]
    assert sorted(torch.cat(groups).tolist()) == list(range(6))
    # a row wider than the budget travels alone
    assert [g.tolist() for g in token_budget_groups(prompt_B, completion_B, max_tokens=10)] == [
        [1], [4], [3, 2], [0, 5]]


def _rollout(prompt_lens: list[int], completion_lens: list[int], P: int = 5, T: int = 8) -> Rollout:
    B = len(prompt_lens)
    attn = torch.zeros(B, P + T, dtype=torch.long)
    cmask = torch.zeros(B, T)
    for b, (p, t) in enumerate(zip(prompt_lens, completion_lens, strict=True)):
        attn[b, P - p : P] = 1
        attn[b, P : P + t] = 1
        cmask[b, :t] = 1
    ids = torch.arange(B * (P + T)).reshape(B, P + T) % 7 + 2
    return Rollout(ids, attn, P, ids[:, P:], cmask, torch.zeros(B, T), torch.arange(B))


def test_trimmed_rollout_drops_only_all_padding_columns():
    r = _rollout([2, 3], [4, 1])
    t = r.trimmed()
    assert t.prompt_len == 3 and t.completion_ids_BT.shape == (2, 4)
    assert torch.equal(t.sequences_BL, r.sequences_BL[:, 2:9])
    assert row_widths(t)[0].tolist() == [2, 3] and row_widths(t)[1].tolist() == [4, 1]


def test_padding_share_falls_with_a_token_budget_on_long_tailed_lengths():
    lengths = [2, 3, 2, 40, 3, 2, 4, 2]
    r = _rollout([3] * 8, lengths, P=3, T=40)
    rows = torch.arange(8)
    fixed = micro_batches(r, rows, size=4, max_tokens=None)
    budget = micro_batches(r, rows, size=4, max_tokens=4 * 10)
    valid = sum(lengths)
    assert padded_tokens(r, fixed) == 4 * 43 + 4 * 7  # the long row pads its three neighbours to 43
    # [40] alone (43 > 40); the rest sorted 4,3,3,2,2,2,2 (+3 prompt): all seven at width 7 exceed 40; of the
    # two-group cuts, [4,3,3] at 7 + [2,2,2,2] at 5 computes the fewest positions (41; one more forward costs 64)
    assert padded_tokens(r, budget) == 43 + 3 * 7 + 4 * 5
    assert valid / padded_tokens(r, budget) > 1.5 * valid / padded_tokens(r, fixed)


def _step(tiny_models, out, *extra: str) -> dict:
    """A fresh run's first step on its fixed rollout (``step_on_rollout``), with its starting weights."""
    c = build_components(load_config(TINY, _overrides(tiny_models, out, *extra)))
    rollout, _ = uneven_rollout(c)
    start = {n: p.detach().clone() for n, p in c.student.named_parameters()}
    return {**step_on_rollout(c, rollout), "start": start, "completion_ids": rollout.completion_ids_BT}


def _assert_same_step(a: dict, b: dict) -> None:
    """The same rollout, every logged metric to ``RTOL`` and the weights to ``WEIGHT_TOL`` of the step's move."""
    assert torch.equal(a["completion_ids"], b["completion_ids"])  # the very same batch
    ma, mb = ({k: v for k, v in r["metrics"].items() if not k.startswith(WALL_CLOCK)} for r in (a, b))
    assert set(ma) == set(mb) and "fkl_high_entropy" in ma and "diag/grad_cos" in ma
    assert ma["diag/clip_coef"] < 1  # clipping binds
    differ = {k: (ma[k], mb[k]) for k in ma if mb[k] != pytest.approx(ma[k], rel=RTOL, abs=ATOL)}
    assert not differ, differ
    wa, wb, start = a["weights"], b["weights"], a["start"]
    assert wa.keys() == wb.keys() and wa
    moved = sum(float(((wa[k] - start[k]) ** 2).sum()) for k in wa) ** 0.5
    apart = sum(float(((wb[k] - wa[k]) ** 2).sum()) for k in wa) ** 0.5
    assert moved > 0 and apart < WEIGHT_TOL * moved, (apart, moved)


@pytest.mark.slow
def test_micro_batch_size_changes_nothing_after_a_whole_step(tiny_models, tmp_path):
    """Micro-batches of 4 rows or of 1: the same step (fkl_high_entropy is the gated mean of the step, not a
    mean of the micro-batches' own means)."""
    _assert_same_step(_step(tiny_models, tmp_path / "four"), _step(tiny_models, tmp_path / "one",
                                                                   "optim.micro_batch_size=1"))


@pytest.mark.slow
def test_token_budget_micro_batches_give_the_fixed_size_step(tiny_models, tmp_path):
    fixed = _step(tiny_models, tmp_path / "fixed")
    c = build_components(load_config(TINY, _overrides(tiny_models, tmp_path / "probe")))
    rollout, _ = uneven_rollout(c)
    rows = torch.arange(c.cfg.optim.minibatch_size)
    p, t = row_widths(rollout.select(rows))
    budget = int(len(rows) * (p.max() + t.max()) // 3)
    groups = micro_batches(rollout, rows, size=4, max_tokens=budget)
    assert len({len(g) for g in groups}) > 1  # rows really were regrouped by length
    _assert_same_step(fixed, _step(tiny_models, tmp_path / "packed", f"optim.max_tokens_per_micro_batch={budget}"))


@pytest.mark.slow
def test_token_budget_also_for_the_plain_loss_and_a_one_row_budget(tiny_models, tmp_path):
    fixed = _step(tiny_models, tmp_path / "fixed", "loss_impl=plain")
    packed = _step(tiny_models, tmp_path / "packed", "loss_impl=plain", "optim.max_tokens_per_micro_batch=1")
    _assert_same_step(fixed, packed)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_step(tiny_models, tmp_path):
    plain = _step(tiny_models, tmp_path / "off")
    ckpt = _step(tiny_models, tmp_path / "on", "optim.gradient_checkpointing=true")
    _assert_same_step(plain, ckpt)


def test_checkpointing_is_on_in_the_update_only_and_sampling_keeps_its_cache(tiny_models, tmp_path):
    from eopd.training.trainer import step

    c = build_components(load_config(TINY, _overrides(tiny_models, tmp_path, "optim.gradient_checkpointing=true")))
    calls: list[tuple[bool, bool, int]] = []  # (grad enabled, checkpointing on, input width)
    layer = c.student.model.layers[0]

    def record(module, args, kwargs):
        width = kwargs["hidden_states"].shape[1] if "hidden_states" in kwargs else args[0].shape[1]
        calls.append((torch.is_grad_enabled(), bool(module.gradient_checkpointing), width))

    handle = layer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        step(c)
    finally:
        handle.remove()
    sampling = [cl for cl in calls if not cl[0] and cl[2] == 1]
    training = [cl for cl in calls if cl[0]]
    assert len(sampling) > 5, "the sampler's decoding steps feed one token each: the KV cache is in use"
    assert not any(on for _, on, _ in sampling)
    assert training and all(on for _, on, _ in training)
    assert not layer.gradient_checkpointing  # off again after the update


@pytest.mark.slow
def test_gradient_checkpointing_with_a_lora_student_gives_the_same_adapter_step(tiny_models, tmp_path):
    pytest.importorskip("peft")
    lora = ("models.lora.r=4", "models.lora.alpha=8", "models.lora.dropout=0")
    plain = _step(tiny_models, tmp_path / "off", *lora)
    ckpt = _step(tiny_models, tmp_path / "on", *lora, "optim.gradient_checkpointing=true")
    trained = [k for k in plain["weights"] if not torch.equal(plain["weights"][k], plain["start"][k])]
    assert trained and all("lora_" in name for name in trained)  # only the adapters train
    _assert_same_step(plain, ckpt)
