"""The public code's pipeline through the trainer: ``loss.official_alignment`` (the teacher scores each row's
position after its last token and the update's forward reads it) and ``optim.normalize=micro_batch`` (each
micro-batch its own token mean, averaged over micro-batches), with tiny models.

The loss itself is checked against a hand-computed case in ``tests/losses/test_parity.py``; here every number
the trainer feeds it is recomputed independently: each row's own unpadded sequence through the Hugging Face
models, and each micro-batch's gradient on its own.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import torch

import eopd.training.update
from eopd.config import ConfigError
from eopd.losses import TokenBatch, fkl_mask_of, objective, prepare_weights
from eopd.losses.divergences import entropy
from eopd.training.collect import Batch
from eopd.training.components import Components, build_components
from eopd.training.update import ppo_update, student_loss

from .rehearsal_grads import full_batch, record_grads_before_step, uneven_batch
from .test_process_count import ENV, TINY, TORCHRUN
from .test_trainer import tiny_cfg

ALIGNED = ("loss.official_alignment=true", "rollout.max_new_tokens=6")


def ragged_batch(c: Components) -> Batch:
    """The first full batch (seeds 0, 1, ...) with rows that end early and rows that fill every column."""
    for seed in range(50):
        batch = full_batch(c, seed)
        lengths = batch.rollout.completion_mask_BT.sum(1)
        if (lengths == c.cfg.rollout.max_new_tokens).any() and (lengths < c.cfg.rollout.max_new_tokens - 1).any():
            return batch
    raise RuntimeError("no seed below 50 gives both full and early-ending rows")


def row_ids(batch: Batch, b: int) -> tuple[torch.Tensor, int, int]:
    """Row ``b``'s own unpadded ids (prompt + its ``L`` valid completion tokens), its prompt length and ``L``."""
    r = batch.rollout
    P = r.prompt_len
    prompt = r.sequences_BL[b, :P][r.attention_mask_BL[b, :P].bool()]
    L = int(r.completion_mask_BT[b].sum())
    return torch.cat([prompt, r.completion_ids_BT[b, :L]]), prompt.numel(), L


@torch.no_grad()
def own_logits(model: torch.nn.Module, ids: torch.Tensor, prompt_len: int, vocab: int) -> torch.Tensor:
    """``[L + 1, V]``: the logits predicting each of the row's tokens, then the one after its last token."""
    return model(input_ids=ids[None]).logits[0, prompt_len - 1 :, :vocab].float()


def test_the_teacher_scores_each_rows_position_after_its_last_token(tiny_models, tmp_path) -> None:
    c = build_components(tiny_cfg(tiny_models, tmp_path / "run", *ALIGNED))
    batch = ragged_batch(c)
    k = c.obj.top_k
    T = c.cfg.rollout.max_new_tokens
    assert batch.scores.entropy_BT.shape[1] == T + 1  # room for the position after a row that fills all T
    for b in range(batch.num_rows):
        ids, P, L = row_ids(batch, b)
        logp = torch.log_softmax(own_logits(c.teacher.model, ids, P, c.vocab_size), -1)
        top = logp.topk(k, -1)
        torch.testing.assert_close(batch.scores.topk_logprobs_BTK[b, : L + 1], top.values, rtol=1e-5, atol=1e-5)
        assert torch.equal(batch.scores.topk_ids_BTK[b, : L + 1], top.indices)
        torch.testing.assert_close(batch.scores.entropy_BT[b, : L + 1], entropy(logp), rtol=1e-5, atol=1e-5)
        assert batch.tokens.mask[b].tolist() == [1.0] * L + [0.0] * (T + 1 - L)
        assert batch.tokens.fkl_mask[b].tolist() == [0.0] + [1.0] * L + [0.0] * (T - L)
    assert float(batch.rollout.completion_mask_BT.sum()) == float(batch.tokens.mask.sum())  # real tokens only


@pytest.mark.parametrize("impl", ["fused", "plain"])
def test_the_update_loss_is_the_shifted_objective_on_each_rows_own_logits(tiny_models, tmp_path, impl) -> None:
    """The trimmed micro-batch's loss (``student_loss``) equals ``objective`` on logits and teacher scores that
    each row's own forward gives at its ``L + 1`` positions: the extra position is read, nothing is misplaced."""
    c = build_components(tiny_cfg(tiny_models, tmp_path / "run", *ALIGNED, f"loss_impl={impl}"))
    batch = ragged_batch(c)
    B, V, k = batch.num_rows, c.vocab_size, c.obj.top_k
    width = int(batch.rollout.completion_mask_BT.sum(1).max()) + 1
    logits = torch.zeros(B, width, V)
    teacher_logp = torch.zeros(B, width, V)
    tokens = torch.zeros(B, width, dtype=torch.long)
    mask = torch.zeros(B, width)
    for b in range(B):
        ids, P, L = row_ids(batch, b)
        logits[b, : L + 1] = own_logits(c.student, ids, P, V)
        teacher_logp[b, : L + 1] = torch.log_softmax(own_logits(c.teacher.model, ids, P, V), -1)
        tokens[b, :L] = ids[P:]
        mask[b, :L] = 1.0
    top = teacher_logp.topk(k, -1)
    want_batch = TokenBatch(tokens=tokens, mask=mask, logp_old=batch.rollout.logp_old_BT[:, :width],
                            teacher_logp=teacher_logp.gather(-1, tokens[..., None])[..., 0],
                            teacher_entropy=entropy(teacher_logp), teacher_topk_ids=top.indices,
                            teacher_topk_logprobs=top.values, fkl_mask=fkl_mask_of(mask))
    want = objective(c.obj, logits, want_batch, weights=prepare_weights(c.obj, want_batch), normalizer=50.0)
    mb = batch.rows(torch.arange(B)).trimmed()
    got = student_loss(c.model, c.obj, mb, normalizer=50.0, impl=impl, vocab_size=V, chunk_size=None)
    assert got.num_valid == want.num_valid == int(mask.sum())
    assert float(got.loss.detach()) == pytest.approx(float(want.loss), rel=1e-5)
    for key in ("fkl", "rkl", "gated_share", "loss_fkl"):
        assert got.metrics[key] == pytest.approx(want.metrics[key], rel=1e-4, abs=1e-7), key


def two_micro_batches(c: Components, *, empty_first: bool = False) -> tuple[Batch, list[torch.Tensor], list[int]]:
    """Four rows of a batch: the two shortest (first micro-batch) and the two longest (second), so that their
    valid-token counts differ; with ``empty_first`` the first micro-batch has no valid token at all."""
    batch = full_batch(c, 0)
    order = batch.rollout.completion_mask_BT.sum(1).argsort(stable=True)
    batch = batch.rows(torch.cat([order[:2], order[-2:]]))
    if empty_first:
        mask = batch.rollout.completion_mask_BT.clone()
        mask[:2] = 0.0
        batch = dataclasses.replace(batch, rollout=dataclasses.replace(batch.rollout, completion_mask_BT=mask),
                                    tokens=dataclasses.replace(batch.tokens, mask=mask))
    groups = [torch.arange(2), torch.arange(2, 4)]
    counts = [int(batch.rollout.completion_mask_BT[g].sum()) for g in groups]
    return batch, groups, counts


def token_sum_grads(c: Components, mb: Batch) -> dict[str, torch.Tensor]:
    """The gradient of one micro-batch's summed per-token loss (normaliser 1), computed on its own."""
    c.student.zero_grad(set_to_none=True)
    student_loss(c.model, c.obj, mb.trimmed(), normalizer=1.0, impl=c.cfg.loss_impl, vocab_size=c.vocab_size,
                 chunk_size=None).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in c.student.named_parameters() if p.grad is not None}
    c.student.zero_grad(set_to_none=True)
    return grads


def update_grads(c: Components, batch: Batch, normalize: str
                 ) -> tuple[dict[str, torch.Tensor], list[tuple[float, float]]]:
    """The gradient the first update applies, one minibatch of the 4 rows in 2 micro-batches of 2, in order, and
    each micro-batch's ``(loss, loss_sum)`` as the update backpropagated it."""
    optim = dataclasses.replace(c.cfg.optim, minibatch_size=4, micro_batch_size=2, grad_clip=0.0, ppo_epochs=1,
                                recompute_logp_old=False, normalize=normalize)
    grads = record_grads_before_step(c)
    losses: list[tuple[float, float]] = []

    def recording(*args, **kwargs):
        out = student_loss(*args, **kwargs)
        losses.append((float(out.loss.detach()), float(out.loss_sum.detach())))
        return out

    with mock.patch.object(eopd.training.update, "minibatches", lambda *a, **k: [torch.arange(4)]), \
            mock.patch.object(eopd.training.update, "student_loss", recording):
        ppo_update(c.model, batch, obj=c.obj, optim=optim, optimizer=c.optimizer, scheduler=c.scheduler,
                   strategy=c.strategy, generator=torch.Generator().manual_seed(0), loss_impl=c.cfg.loss_impl,
                   vocab_size=c.vocab_size, chunk_size=None)
    return grads, losses


@pytest.mark.parametrize("aligned", [False, True])
def test_micro_batch_normalisation_divides_each_micro_batch_by_its_own_count(tiny_models, tmp_path, aligned) -> None:
    """Counts n1 < n2: micro_batch gives g1 / (2 n1) + g2 / (2 n2), global gives (g1 + g2) / (n1 + n2), where g_j
    is micro-batch j's summed-loss gradient on its own."""
    extra = ALIGNED if aligned else ()
    c = build_components(tiny_cfg(tiny_models, tmp_path / "run", *extra))
    batch, groups, (n1, n2) = two_micro_batches(c)
    assert n1 < n2
    g1, g2 = (token_sum_grads(c, batch.rows(g)) for g in groups)
    got, losses = update_grads(c, batch, "micro_batch")
    global_grads, global_losses = update_grads(build_components(tiny_cfg(tiny_models, tmp_path / "run2", *extra)),
                                               batch, "global")
    # each micro-batch's loss is its token sum over 2 n_j (micro_batch) or over n1 + n2 (global)
    for (loss, loss_sum), n in zip(losses, (n1, n2), strict=True):
        assert loss == pytest.approx(loss_sum / (2 * n), rel=1e-6)
    for loss, loss_sum in global_losses:
        assert loss == pytest.approx(loss_sum / (n1 + n2), rel=1e-6)
    for name, grad in got.items():
        torch.testing.assert_close(grad, g1[name] / (2 * n1) + g2[name] / (2 * n2), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(global_grads[name], (g1[name] + g2[name]) / (n1 + n2), rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(got[n], global_grads[n], rtol=1e-2) for n in got)


@pytest.mark.parametrize("impl", ["fused", "plain"])
def test_a_micro_batch_without_valid_tokens_adds_zero_not_nan(tiny_models, tmp_path, impl) -> None:
    """The public code divides by the micro-batch's count: 0 / 0 = NaN. Ours adds 0; the other micro-batch keeps
    its weight 1 / (2 n2)."""
    c = build_components(tiny_cfg(tiny_models, tmp_path / "run", f"loss_impl={impl}"))
    batch, groups, (n1, n2) = two_micro_batches(c, empty_first=True)
    assert n1 == 0 < n2
    g2 = token_sum_grads(c, batch.rows(groups[1]))
    got, losses = update_grads(c, batch, "micro_batch")
    assert losses[0] == (0.0, 0.0)
    assert losses[1][0] == pytest.approx(losses[1][1] / (2 * n2), rel=1e-6)
    for name, grad in got.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, g2[name] / (2 * n2), rtol=1e-4, atol=1e-7)


def test_two_processes_weigh_equally_under_micro_batch_normalisation(tiny_models, tmp_path) -> None:
    """Two processes, one micro-batch each, of n_0 != n_1 valid tokens: the synchronised gradient is the mean of
    the two processes' token means, (g_0 / n_0 + g_1 / n_1) / 2, not the global (g_0 + g_1) / (n_0 + n_1)."""
    overrides = ("optim.normalize=micro_batch", "optim.recompute_logp_old=false")
    base = [f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
            f"output_dir={tmp_path / 'two'}", "num_threads=1", "tensorboard=false", *overrides]
    prefix = tmp_path / "grads"
    script = str(Path(__file__).with_name("rehearsal_grads.py"))
    proc = subprocess.run([*TORCHRUN, script, str(prefix), TINY, *base], capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    two = torch.load(f"{prefix}.rank0.pt", weights_only=False)
    c = build_components(tiny_cfg(tiny_models, tmp_path / "one", *overrides))
    batch, _ = uneven_batch(c)
    assert torch.equal(batch.rollout.completion_ids_BT, two["completion_ids"])  # the same batch
    halves = [torch.arange(r, batch.num_rows, 2) for r in (0, 1)]
    n = [int(batch.rollout.completion_mask_BT[h].sum()) for h in halves]
    assert n[0] != n[1]
    g = [token_sum_grads(c, batch.rows(h)) for h in halves]
    for name, grad in two["grads"].items():
        torch.testing.assert_close(grad, (g[0][name] / n[0] + g[1][name] / n[1]) / 2, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(two["grads"][k], (g[0][k] + g[1][k]) / sum(n), rtol=1e-2) for k in two["grads"])


@pytest.mark.parametrize(("overrides", "message"), [
    (("loss.official_alignment=true", "teachers.a.model=A", "teachers.b.model=B"), "loss.official_alignment: "
     "supports one teacher"),
    (("objective=opd", "loss.official_alignment=true"), "official_alignment reproduces the public code's top-k"),
    (("optim.normalize=token",), "optim.normalize: must be global or micro_batch"),
    (("loss.official_alignment=maybe",), "official_alignment must be true or false, got 'maybe'"),
])
def test_the_parity_options_refuse_what_they_cannot_do_in_one_line(tiny_models, tmp_path, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        tiny_cfg(tiny_models, tmp_path / "run", *overrides)
    assert "\n" not in str(err.value)
