"""The fused chunked lm_head + loss and the chunked scorer equal the plain full-logit path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from eopd.losses import PRESETS, ObjectiveConfig, TokenBatch, objective, prepare_weights
from eopd.losses.fused import FusedOutput, fused_chunk_size, fused_objective, is_sparse, reference_objective
from eopd.losses.objectives import DIAG_KEYS
from eopd.losses.scoring import (
    balanced_chunk,
    default_chunk_size,
    score_chunked,
    score_from_logits,
    with_teacher_scores,
)

ALL_PRESETS = list(PRESETS)
SPARSE_PRESETS = [p for p in PRESETS if is_sparse(ObjectiveConfig.preset(p))]


@dataclasses.dataclass
class Case:
    """Student and teacher lm_head inputs plus a TokenBatch built from the teacher's exact scores."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    batch: TokenBatch
    vocab_size: int


def make_case(
    cfg: ObjectiveConfig,
    *,
    shape: tuple[int, ...] = (37,),
    H: int = 12,
    V: int = 41,
    pad_rows: int = 0,
    dtype: torch.dtype = torch.float32,
    bias: bool = False,
    mask_p: float = 0.3,
    ratio_noise: float = 0.05,
    seed: int = 0,
) -> Case:
    """Random hidden states and lm_heads (``V + pad_rows`` rows) and a consistent batch at ``cfg.temperature``."""
    g = torch.Generator().manual_seed(seed)
    t = cfg.temperature

    def randn(*s: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)

    hidden = randn(*shape, H).requires_grad_(True)
    weight = randn(V + pad_rows, H, scale=0.6).requires_grad_(True)
    b = randn(V + pad_rows, scale=0.5).requires_grad_(True) if bias else None
    teacher_hidden = randn(*shape, H + 3)
    teacher_weight = randn(V + pad_rows, H + 3, scale=0.6)
    with torch.no_grad():
        student_logits = hidden.double() @ weight[:V].double().T + (0 if b is None else b[:V].double())
        logq = torch.log_softmax(student_logits / t, -1)
        tokens = torch.multinomial(logq.exp().reshape(-1, V), 1, generator=g).reshape(shape)
        noise = (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5) * 2 * ratio_noise
        logp_old = (logq.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) + noise).to(dtype)
        teacher_logits = teacher_hidden @ teacher_weight[:V].T
        scores = score_from_logits(teacher_logits, tokens, top_k=min(cfg.top_k, 5), temperature=t)
    mask = torch.rand(shape, generator=g) > mask_p
    mask.view(-1)[0] = True
    batch = with_teacher_scores(TokenBatch(tokens=tokens, mask=mask.float(), logp_old=logp_old), scores)
    return Case(hidden, weight, b, teacher_hidden, teacher_weight, batch, V)


def median_entropy(case: Case) -> float:
    """A threshold that gates about half of the valid positions (so both terms of every preset are used)."""
    entropy = case.batch.teacher_entropy[case.batch.mask.bool()]
    return float(entropy.median()) if entropy.numel() else 1.0


def run(fn, cfg: ObjectiveConfig, case: Case, *, teacher: str = "hidden", seed: int = 1, **kwargs):
    """Loss, loss_sum, metrics and gradients wrt hidden/weight/bias of one path (``backward`` of ``loss``).

    ``tau`` defaults to the median teacher entropy, so that both terms of every preset are active.
    """
    for x in (case.hidden, case.weight, case.bias):
        if x is not None:
            x.grad = None
    batch = case.batch
    teacher_kwargs = {}
    if cfg.needs_teacher_logits and teacher == "hidden":
        teacher_kwargs = {"teacher_hidden": case.teacher_hidden, "teacher_weight": case.teacher_weight}
    elif cfg.needs_teacher_logits:
        with torch.no_grad():
            logits = case.teacher_hidden @ case.teacher_weight[: case.vocab_size].T
        batch = dataclasses.replace(batch, teacher_logits=logits)
    if "weights" not in kwargs:
        kwargs.setdefault("tau", median_entropy(case))
    out = fn(cfg, case.hidden, case.weight, batch, lm_head_bias=case.bias, vocab_size=case.vocab_size,
             generator=torch.Generator().manual_seed(seed), **teacher_kwargs, **kwargs)
    out.loss.backward()
    grads = [None if x is None else x.grad.clone() for x in (case.hidden, case.weight, case.bias)]
    return out, grads


def assert_same(ref, fused, *, rtol: float, atol: float) -> None:
    (r_out, r_grads), (f_out, f_grads) = ref, fused
    torch.testing.assert_close(f_out.loss.detach(), r_out.loss.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(f_out.loss_sum.detach(), r_out.loss_sum.detach(), rtol=rtol, atol=atol)
    assert f_out.num_valid == r_out.num_valid
    assert f_out.metrics.keys() == r_out.metrics.keys()
    for key, value in r_out.metrics.items():
        assert f_out.metrics[key] == pytest.approx(value, rel=rtol, abs=atol), key
    for r, f in zip(r_grads, f_grads, strict=True):
        assert (r is None) == (f is None)
        if r is not None:
            scale = max(1.0, float(r.abs().max()))
            torch.testing.assert_close(f, r, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("name", ALL_PRESETS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_every_preset_matches_plain_path_float32(name: str, temperature: float) -> None:
    cfg = ObjectiveConfig.preset(name, temperature=temperature)
    case = make_case(cfg, bias=True, pad_rows=3, ratio_noise=0.5)
    ref = run(reference_objective, cfg, case)
    fused = run(fused_objective, cfg, case, chunk_size=6)  # 6 does not divide the 24 valid positions
    assert isinstance(fused[0], FusedOutput)
    if cfg.divergence is None and cfg.placement == "entropy" and cfg.schedule == "step":
        assert 0.3 < fused[0].metrics["gated_share"] < 0.7
    assert_same(ref, fused, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ALL_PRESETS)
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_every_preset_matches_plain_path_float64(name: str, chunk: int) -> None:
    cfg = ObjectiveConfig.preset(name, temperature=0.8)
    case = make_case(cfg, shape=(3, 7), dtype=torch.float64, ratio_noise=0.5, seed=2)
    assert_same(run(reference_objective, cfg, case), run(fused_objective, cfg, case, chunk_size=chunk),
                rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["eopd", "fkl_all"])
@pytest.mark.parametrize(("dtype", "temperature", "chunk", "tol"), [
    (torch.float32, 1.0, 6, (1e-4, 1e-5)), (torch.float32, 0.7, 1, (1e-4, 1e-5)),
    (torch.float64, 0.8, 5, (1e-9, 1e-11)), (torch.float64, 1.0, 1000, (1e-9, 1e-11)),
])
@pytest.mark.parametrize("V", [41, 5])  # make_case keeps the top 5: V = 5 is k == V (empty tail)
def test_topk_tail_sparse_matches_plain_path(
    name: str, dtype: torch.dtype, temperature: float, chunk: int, tol: tuple[float, float], V: int
) -> None:
    """``fkl="topk_tail"`` runs on the sparse kernel and equals the plain path's full-logit tail KL."""
    cfg = ObjectiveConfig.preset(name, fkl="topk_tail", temperature=temperature)
    assert is_sparse(cfg)
    case = make_case(cfg, V=V, dtype=dtype, bias=True, pad_rows=2, ratio_noise=0.5)
    assert_same(run(reference_objective, cfg, case), run(fused_objective, cfg, case, chunk_size=chunk),
                rtol=tol[0], atol=tol[1])


def test_topk_tail_sparse_keeps_a_tiny_student_tail_exact() -> None:
    """A student with almost no mass outside the teacher's top-k (q_tail down to ~e^-40) in float32.

    ``1 - sum_k q`` would round to 0 (an infinite loss, silently dropped as an empty tail), and routing the
    tail gradient through the top-k entries would cancel ``g_tail / q_tail`` there (errors ~1e8): the fused
    float32 loss and gradients must still match the float64 plain path.
    """
    g = torch.Generator().manual_seed(0)
    N, V, K = 12, 50, 5
    teacher_logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 1.5
    scores = score_from_logits(teacher_logits, None, top_k=K)
    gap_NK = torch.linspace(5.0, 40.0, N, dtype=torch.float64)[:, None].expand(N, K).contiguous()
    student_logits = torch.randn(N, V, generator=g, dtype=torch.float64).scatter_add(1, scores.topk_ids, gap_NK)
    tokens = scores.topk_ids[:, 0]
    logp_old = torch.log_softmax(student_logits, -1).gather(1, tokens[:, None])[:, 0]
    teacher_logp = torch.log_softmax(teacher_logits, -1).gather(1, tokens[:, None])[:, 0]
    batch = with_teacher_scores(TokenBatch(tokens=tokens, mask=torch.ones(N), logp_old=logp_old,
                                           teacher_logp=teacher_logp), scores)
    cfg = ObjectiveConfig.preset("eopd", fkl="topk_tail", top_k=K, tau=0.0)

    def loss_and_grad(fn, dtype: torch.dtype, **kwargs) -> tuple[float, torch.Tensor]:
        hidden = student_logits.to(dtype).detach().requires_grad_(True)  # identity lm_head: hidden = logits
        cast = batch.map(lambda x: x.to(dtype) if x.is_floating_point() else x)
        out = fn(cfg, hidden, torch.eye(V, dtype=dtype), cast, **kwargs)
        out.loss.backward()
        return float(out.loss.detach()), hidden.grad.double()

    want_loss, want_grad = loss_and_grad(reference_objective, torch.float64)
    got_loss, got_grad = loss_and_grad(fused_objective, torch.float32, chunk_size=5)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=0.0, atol=1e-6)


def gemma_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's final-logit soft-cap as its forward writes it (independent of ``scoring.head_transform_``)."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def capped_reference(cfg, hidden, weight, batch, *, lm_head_bias=None, vocab_size=None, generator=None,
                     teacher_hidden=None, teacher_weight=None, softcap=None, teacher_softcap=None, tau=None,
                     diagnostics=False):
    """The plain path on a soft-capped model's own full logits (student and teacher), then ``objective``."""
    v = vocab_size or weight.shape[0]
    logits = gemma_cap(F.linear(hidden, weight[:v], None if lm_head_bias is None else lm_head_bias[:v]), softcap)
    if teacher_hidden is not None:
        with torch.no_grad():
            batch = dataclasses.replace(batch, teacher_logits=gemma_cap(teacher_hidden @ teacher_weight[:v].T,
                                                                        teacher_softcap))
    return objective(cfg, logits, batch, tau=tau, generator=generator, diagnostics=diagnostics)


def has_diagnostics(out) -> bool:
    """Whether the output carries the per-term diagnostics (single divergences have none)."""
    return all(k in out.token_parts for k in DIAG_KEYS)


@pytest.mark.parametrize("name", ALL_PRESETS)
@pytest.mark.parametrize(("dtype", "temperature", "chunk", "tol"), [
    (torch.float64, 0.8, 5, (1e-9, 1e-11)), (torch.float32, 1.0, 6, (1e-4, 1e-5)),
])
def test_every_preset_on_soft_capped_logits_matches_the_models_own_logits(
    name: str, dtype: torch.dtype, temperature: float, chunk: int, tol: tuple[float, float]
) -> None:
    """``softcap`` / ``teacher_softcap`` (Gemma 2): loss, metrics, the per-term logit-gradient diagnostics and
    the gradients wrt hidden states, lm_head weight and bias equal the plain path on the capped logits (the
    caps bind: the raw logits reach several times the caps)."""
    cfg = ObjectiveConfig.preset(name, temperature=temperature)
    case = make_case(cfg, shape=(3, 7), dtype=dtype, bias=True, pad_rows=2, ratio_noise=0.5, seed=4)
    with torch.no_grad():
        raw = case.hidden @ case.weight[: case.vocab_size].T
    assert float(raw.abs().max()) > 3 * 2.0
    caps = {"softcap": 2.0, "teacher_softcap": 1.5, "diagnostics": True}
    ref = run(capped_reference, cfg, case, **caps)
    fused = run(fused_objective, cfg, case, chunk_size=chunk, **caps)
    assert_same(ref, fused, rtol=tol[0], atol=tol[1])
    for key in DIAG_KEYS if has_diagnostics(ref[0]) else ():
        torch.testing.assert_close(fused[0].token_parts[key].double(), ref[0].token_parts[key].reshape(-1).double(),
                                   rtol=1e-5, atol=1e-9)  # sparse diagnostics are float32


@pytest.mark.parametrize("name", [p for p in ALL_PRESETS if ObjectiveConfig.preset(p).needs_teacher_logits])
def test_precomputed_teacher_logits_match(name: str) -> None:
    cfg = ObjectiveConfig.preset(name, temperature=1.3)
    case = make_case(cfg, dtype=torch.float64, seed=3)
    ref = run(reference_objective, cfg, case, teacher="logits")
    assert_same(ref, run(fused_objective, cfg, case, teacher="logits", chunk_size=4), rtol=1e-9, atol=1e-11)
    assert_same(ref, run(fused_objective, cfg, case, teacher="hidden", chunk_size=4), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["eopd", "opd", "mixture", "jsd", "fkl_random"])
def test_all_masked_batch_gives_zero_loss_and_grads(name: str) -> None:
    cfg = ObjectiveConfig.preset(name)
    case = make_case(cfg, bias=True)
    case.batch.mask.zero_()
    out, grads = run(fused_objective, cfg, case, chunk_size=4)
    assert out.num_valid == 0
    assert float(out.loss.detach()) == 0.0 and float(out.loss_sum.detach()) == 0.0
    for grad in grads:
        assert grad is not None and torch.count_nonzero(grad) == 0
    ref, _ = run(reference_objective, cfg, case)
    assert out.metrics == pytest.approx(ref.metrics)


@pytest.mark.parametrize("name", ["eopd", "fkl"])
def test_masked_positions_get_zero_hidden_grad(name: str) -> None:
    cfg = ObjectiveConfig.preset(name)
    case = make_case(cfg, mask_p=0.5)
    out, (grad_h, _, _) = run(fused_objective, cfg, case, chunk_size=3)
    masked = ~case.batch.mask.bool()
    assert masked.any()
    assert torch.count_nonzero(grad_h[masked]) == 0
    for value in out.token_parts.values():
        assert torch.count_nonzero(value[masked]) == 0


def test_padded_vocab_rows_get_no_gradient_and_no_logits() -> None:
    cfg = ObjectiveConfig.preset("eopd")
    case = make_case(cfg, pad_rows=5, bias=True)
    _, (_, grad_w, grad_b) = run(fused_objective, cfg, case, chunk_size=7)
    assert torch.count_nonzero(grad_w[case.vocab_size :]) == 0
    assert torch.count_nonzero(grad_b[case.vocab_size :]) == 0


@pytest.mark.parametrize("name", ["eopd", "tvd"])
def test_normalizer_and_loss_sum_gradients(name: str) -> None:
    """A global normalizer, and gradients through ``loss_sum`` and a mix of both outputs."""
    cfg = ObjectiveConfig.preset(name)
    case = make_case(cfg, dtype=torch.float64)
    kwargs = {"teacher_hidden": case.teacher_hidden, "teacher_weight": case.teacher_weight,
              "tau": median_entropy(case)}
    grads = []
    for fn in (reference_objective, fused_objective):
        case.hidden.grad, case.weight.grad = None, None
        out = fn(cfg, case.hidden, case.weight, case.batch, normalizer=100, **kwargs)
        (out.loss * 3.0 + out.loss_sum * 0.5).backward()
        grads.append((float(out.loss.detach()), case.hidden.grad.clone(), case.weight.grad.clone()))
    (l_ref, gh_ref, gw_ref), (l_fused, gh_fused, gw_fused) = grads
    assert l_fused == pytest.approx(l_ref, rel=1e-12)
    torch.testing.assert_close(gh_fused, gh_ref)
    torch.testing.assert_close(gw_fused, gw_ref)


def test_precomputed_weights_and_adaptive_tau() -> None:
    cfg = ObjectiveConfig.preset("eopd")
    case = make_case(cfg, dtype=torch.float64)
    tau = median_entropy(case)
    weights = prepare_weights(cfg, case.batch, tau=tau)
    ref = run(reference_objective, cfg, case, weights=weights)
    assert_same(ref, run(fused_objective, cfg, case, weights=weights, chunk_size=8), rtol=1e-9, atol=1e-11)
    assert_same(ref, run(fused_objective, cfg, case, tau=tau), rtol=1e-9, atol=1e-11)
    assert ref[0].metrics["tau"] == tau
    assert 0 < ref[0].metrics["gated_share"] < 1


def test_ppo_clipping_is_exercised() -> None:
    """Later PPO epochs: the student has moved away from the sampler, and the clip is active."""
    cfg = ObjectiveConfig.preset("opd", clip_eps=0.1)
    case = make_case(cfg, dtype=torch.float64, ratio_noise=1.0, mask_p=0.0)
    ref, fused = run(reference_objective, cfg, case), run(fused_objective, cfg, case, chunk_size=5)
    assert_same(ref, fused, rtol=1e-9, atol=1e-11)
    logp = torch.log_softmax(case.hidden.detach() @ case.weight.detach().T, -1)
    ratio = (logp.gather(-1, case.batch.tokens.unsqueeze(-1)).squeeze(-1) - case.batch.logp_old).exp()
    assert bool(((ratio - 1).abs() > 0.1).any())


def test_multi_dim_positions_and_no_bias() -> None:
    cfg = ObjectiveConfig.preset("eopd", temperature=0.6)
    case = make_case(cfg, shape=(4, 9), dtype=torch.float64)
    out, _ = run(fused_objective, cfg, case, chunk_size=10)
    assert out.token_parts["loss"].shape == (36,)
    assert_same(run(reference_objective, cfg, case), run(fused_objective, cfg, case, chunk_size=10),
                rtol=1e-9, atol=1e-11)


def test_only_weight_or_only_hidden_requires_grad() -> None:
    cfg = ObjectiveConfig.preset("eopd")
    case = make_case(cfg, dtype=torch.float64)
    ref_h, ref_w = (g.clone() for g in run(reference_objective, cfg, case)[1][:2])
    hidden = case.hidden.detach()
    out = fused_objective(cfg, hidden, case.weight, case.batch, chunk_size=4, tau=median_entropy(case))
    case.weight.grad = None
    out.loss.backward()
    torch.testing.assert_close(case.weight.grad, ref_w)
    weight = case.weight.detach()
    case.hidden.grad = None
    fused_objective(cfg, case.hidden, weight, case.batch, chunk_size=4, tau=median_entropy(case)).loss.backward()
    torch.testing.assert_close(case.hidden.grad, ref_h)


def test_no_grad_evaluation() -> None:
    cfg = ObjectiveConfig.preset("eopd")
    case = make_case(cfg, dtype=torch.float64)
    with torch.no_grad():
        out = fused_objective(cfg, case.hidden, case.weight, case.batch, chunk_size=4, tau=median_entropy(case))
        ref = reference_objective(cfg, case.hidden, case.weight, case.batch, tau=median_entropy(case))
    assert not out.loss.requires_grad
    assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-12)


@pytest.mark.parametrize("name", ["eopd", "opd", "fkl"])
def test_tied_embeddings_tiny_qwen3(name: str) -> None:
    """Gradients reach the shared embedding/lm_head from both uses, as with the model's own lm_head."""
    from eopd.models.loading import build_tiny_qwen3

    cfg = ObjectiveConfig.preset(name)
    V = 48
    model = build_tiny_qwen3(vocab_size=V, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                             tie_word_embeddings=True, seed=3).double()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    teacher = build_tiny_qwen3(vocab_size=V, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                               tie_word_embeddings=False, seed=4).double()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, 9), generator=g)
    with torch.no_grad():
        teacher_hidden = teacher.model(input_ids=ids).last_hidden_state[:, :-1]
        scores = score_chunked(teacher_hidden, teacher.lm_head.weight, ids[:, 1:], top_k=4, chunk_size=5)
        logp_old = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0
    batch = with_teacher_scores(TokenBatch(tokens=ids[:, 1:], mask=mask, logp_old=logp_old), scores)
    extra = {"teacher_hidden": teacher_hidden, "teacher_weight": teacher.lm_head.weight,
             "tau": float(scores.entropy.median())}
    grads = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        if fused:
            out = fused_objective(cfg, hidden, model.lm_head.weight, batch, chunk_size=3, **extra)
        else:
            out = reference_objective(cfg, hidden, model.lm_head.weight, batch, **extra)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert "model.embed_tokens.weight" in grads[1]
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-9, atol=1e-12)


def test_bfloat16_close_to_float32() -> None:
    cfg = ObjectiveConfig.preset("eopd")
    case = make_case(cfg, dtype=torch.float32, H=32, V=64)
    ref_out, ref_grads = run(reference_objective, cfg, case)
    hidden = case.hidden.detach().bfloat16().requires_grad_(True)
    weight = case.weight.detach().bfloat16().requires_grad_(True)
    out = fused_objective(cfg, hidden, weight, case.batch, chunk_size=5, tau=median_entropy(case))
    out.loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    assert float(out.loss.detach()) == pytest.approx(float(ref_out.loss.detach()), rel=0.05, abs=0.02)
    for got, want in ((hidden.grad, ref_grads[0]), (weight.grad, ref_grads[1])):
        cos = torch.nn.functional.cosine_similarity(got.float().flatten(), want.flatten(), dim=0)
        assert float(cos) > 0.99


def test_missing_teacher_logits_is_an_error() -> None:
    cfg = ObjectiveConfig.preset("jsd")
    case = make_case(cfg)
    with pytest.raises(ValueError, match="teacher_logits or teacher_hidden"):
        fused_objective(cfg, case.hidden, case.weight, case.batch)
    with pytest.raises(ValueError, match="together"):
        fused_objective(cfg, case.hidden, case.weight, case.batch, teacher_hidden=case.teacher_hidden)
    with pytest.raises(ValueError, match=r"\[\.\.\., H\]"):
        fused_objective(cfg, case.hidden[:3], case.weight, case.batch)


# --- memory: no [N, V] tensor is ever created --------------------------------------------------------------


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ["eopd", "opd", "jsd", "mixture"])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_fused_never_allocates_full_logits(name: str, softcap: float | None) -> None:
    cfg = ObjectiveConfig.preset(name)
    N, H, V, chunk = 120, 6, 64, 8  # N*V = 7680 > V*H, N*H, chunk*V
    case = make_case(cfg, shape=(N,), H=H, V=V, mask_p=0.0)
    kwargs = {"teacher_hidden": case.teacher_hidden, "teacher_weight": case.teacher_weight,
              "tau": median_entropy(case), "softcap": softcap, "teacher_softcap": softcap}
    with _LargestOutput() as fused_mode:
        fused_objective(cfg, case.hidden, case.weight, case.batch, chunk_size=chunk, **kwargs).loss.backward()
    with _LargestOutput() as plain_mode:
        reference_objective(cfg, case.hidden, case.weight, case.batch, **kwargs).loss.backward()
    assert plain_mode.largest >= N * V  # the probe sees the plain path's full logits
    assert fused_mode.largest <= max(chunk * V, V * (H + 3), N * (H + 3))


# --- the chunked scorer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk", [1, 7, 500])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_score_chunked_matches_full_logits(dtype: torch.dtype, temperature: float, chunk: int,
                                           softcap: float | None) -> None:
    g = torch.Generator().manual_seed(5)
    V, pad, H = 53, 4, 10
    hidden = torch.randn(3, 11, H, generator=g, dtype=dtype)
    weight = torch.randn(V + pad, H, generator=g, dtype=dtype)
    bias = torch.randn(V + pad, generator=g, dtype=dtype)
    tokens = torch.randint(0, V, (3, 11), generator=g)
    got = score_chunked(hidden, weight, tokens, top_k=6, temperature=temperature, chunk_size=chunk,
                        vocab_size=V, bias=bias, softcap=softcap)
    want = score_from_logits(gemma_cap(hidden @ weight[:V].T + bias[:V], softcap), tokens, top_k=6,
                             temperature=temperature)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-11, "atol": 1e-11}
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        if a.dtype == torch.long:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b.to(a.dtype), **tol)


def test_score_chunked_without_tokens_or_topk_and_bf16() -> None:
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(20, 16, generator=g)
    weight = torch.randn(70, 16, generator=g) * 0.3
    got = score_chunked(hidden, weight, chunk_size=6)
    assert got.logp is None and got.topk_ids is None and got.topk_logprobs is None
    torch.testing.assert_close(got.entropy, score_from_logits(hidden @ weight.T).entropy)


def test_score_chunked_soft_caps_bf16_logits_in_float32() -> None:
    """A bf16 soft-capped teacher: the cap is applied to the float32 logits (the learner's ``float32_logits=False``
    path too: bf16 matmul, then the cap in float32), never to bf16-rounded ones before the upcast."""
    g = torch.Generator().manual_seed(7)
    hidden = (torch.randn(20, 16, generator=g) * 4).bfloat16()
    weight = (torch.randn(70, 16, generator=g) * 2).bfloat16()
    tokens = torch.randint(0, 70, (20,), generator=g)
    exact = score_from_logits(gemma_cap(hidden.double() @ weight.double().T, 30.0), tokens, top_k=3)
    got = score_chunked(hidden, weight, tokens, top_k=3, chunk_size=6, softcap=30.0)
    torch.testing.assert_close(got.logp.double(), exact.logp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.entropy.double(), exact.entropy, rtol=1e-5, atol=1e-5)
    learner = score_chunked(hidden, weight, tokens, chunk_size=6, softcap=30.0, float32_logits=False)
    want = score_from_logits(gemma_cap((hidden @ weight.T).float(), 30.0), tokens)
    torch.testing.assert_close(learner.logp, want.logp, rtol=1e-5, atol=1e-5)


def test_score_chunked_computes_bf16_models_logits_in_float32() -> None:
    """A bf16 teacher's log-probs and entropy are those of its exact logits, not of bf16-rounded logits."""
    g = torch.Generator().manual_seed(6)
    hidden = (torch.randn(20, 16, generator=g) * 4).bfloat16()
    weight = (torch.randn(70, 16, generator=g) * 2).bfloat16()  # logits of size ~30: bf16 rounds them by ~0.1
    tokens = torch.randint(0, 70, (20,), generator=g)
    low = score_chunked(hidden, weight, tokens, top_k=3, chunk_size=6)
    exact = score_from_logits(hidden.double() @ weight.double().T, tokens, top_k=3)
    rounded = score_from_logits((hidden @ weight.T).float(), tokens, top_k=3)
    assert low.entropy.dtype == torch.float32
    torch.testing.assert_close(low.entropy.double(), exact.entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low.logp.double(), exact.logp, rtol=1e-5, atol=1e-4)
    assert (rounded.logp.double() - exact.logp).abs().max() > 1e-2  # what bf16 logits would have given


def test_score_chunked_rejects_bad_vocab() -> None:
    hidden, weight = torch.randn(4, 3), torch.randn(10, 3)
    with pytest.raises(ValueError, match="vocab_size"):
        score_chunked(hidden, weight, vocab_size=11)
    with pytest.raises(ValueError, match="top_k"):
        score_chunked(hidden, weight, top_k=11)
    with pytest.raises(ValueError, match="temperature"):
        score_chunked(hidden, weight, temperature=0.0)


def test_default_chunk_sizes() -> None:
    assert default_chunk_size(151_936) == 165  # 96 MiB of float32 logits on a CPU
    assert default_chunk_size(151_936, device="cuda") == 1766
    assert fused_chunk_size(ObjectiveConfig.preset("eopd"), 151_936) == 165
    assert fused_chunk_size(ObjectiveConfig.preset("eopd"), 151_936, torch.bfloat16) < 165
    assert fused_chunk_size(ObjectiveConfig.preset("jsd"), 151_936) < 165
    assert default_chunk_size(10) == 8192


@pytest.mark.parametrize(("n", "chunk", "want"), [(2048, 165, 158), (10, 3, 3), (10, 4, 4), (9, 4, 3), (5, 100, 5)])
def test_balanced_chunk(n: int, chunk: int, want: int) -> None:
    assert balanced_chunk(n, chunk) == want
    assert -(-n // want) == -(-n // chunk)  # same number of chunks
