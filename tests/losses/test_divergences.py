"""Token-level divergences of ``eopd.losses.divergences`` against brute-force references.

The references below use plain Python floats, ``math.exp``/``math.log`` and explicit loops over a small
vocabulary; they share no code with the library.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eopd.losses import (
    adaptive_kl,
    entropy,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    todi,
    topk_forward_kl,
    topk_forward_kl_with_tail,
    total_variation,
)

INF = float("inf")


# ---------------------------------------------------------------------------------------------------------
# brute-force references (one row = one list of floats)
# ---------------------------------------------------------------------------------------------------------
def ref_softmax(row: list[float], T: float = 1.0) -> list[float]:
    finite = [z / T for z in row if z != -INF]
    m = max(finite)
    e = [0.0 if z == -INF else math.exp(z / T - m) for z in row]
    s = sum(e)
    return [x / s for x in e]


def ref_kl(p: list[float], q: list[float]) -> float:
    total = 0.0
    for pi, qi in zip(p, q, strict=True):
        if pi == 0.0:
            continue
        if qi == 0.0:
            return INF
        total += pi * math.log(pi / qi)
    return total


def ref_entropy(row, T=1.0):
    return -sum(pi * math.log(pi) for pi in ref_softmax(row, T) if pi > 0)


def ref_fkl(s, t, T=1.0):
    return ref_kl(ref_softmax(t, T), ref_softmax(s, T))


def ref_rkl(s, t, T=1.0):
    return ref_kl(ref_softmax(s, T), ref_softmax(t, T))


def ref_jsd(s, t, beta, T=1.0):
    p, q = ref_softmax(t, T), ref_softmax(s, T)
    if beta == 0.0:
        return ref_kl(p, q)
    if beta == 1.0:
        return ref_kl(q, p)
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
    return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)


def ref_skew_fkl(s, t, alpha, T=1.0):
    p, q = ref_softmax(t, T), ref_softmax(s, T)
    return ref_kl(p, [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q, strict=True)])


def ref_skew_rkl(s, t, alpha, T=1.0):
    p, q = ref_softmax(t, T), ref_softmax(s, T)
    return ref_kl(q, [(1 - alpha) * pi + alpha * qi for pi, qi in zip(p, q, strict=True)])


def ref_tvd(s, t, T=1.0):
    p, q = ref_softmax(t, T), ref_softmax(s, T)
    return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q, strict=True))


def ref_akl_weight(s, t, mu, T=1.0):
    """Head weight g_head / (g_head + g_tail): the head is the teacher's top tokens up to mass mu."""
    p, q = ref_softmax(t, T), ref_softmax(s, T)
    order = sorted(range(len(p)), key=lambda i: -p[i])
    head, mass = set(), 0.0
    for i in order:
        if mass >= mu:
            break
        head.add(i)
        mass += p[i]
    g_head = sum(abs(p[i] - q[i]) for i in head)
    g_tail = sum(abs(p[i] - q[i]) for i in range(len(p)) if i not in head)
    return 0.5 if g_head + g_tail == 0 else g_head / (g_head + g_tail)


def ref_akl(s, t, mu, T=1.0, w=None):
    w = ref_akl_weight(s, t, mu, T) if w is None else w
    return w * ref_fkl(s, t, T) + (1 - w) * ref_rkl(s, t, T)


def ref_todi_weights(s, t, beta, T=1.0):
    p, q = ref_softmax(t, T), ref_softmax(s, T)
    out = []
    for pi, qi in zip(p, q, strict=True):
        if pi > 0 and qi > 0:
            out.append(1.0 / (1.0 + math.exp(-beta * math.log(pi / qi))))
        else:
            out.append(1.0 if pi > 0 else 0.0)
    return out


def ref_todi(s, t, beta, T=1.0, a=None):
    p, q = ref_softmax(t, T), ref_softmax(s, T)
    a = ref_todi_weights(s, t, beta, T) if a is None else a
    total = 0.0
    for ai, pi, qi in zip(a, p, q, strict=True):
        if pi > 0:
            total += ai * pi * math.log(pi / qi)
        if qi > 0:
            total += (1 - ai) * qi * math.log(qi / pi) if pi > 0 else (INF if ai < 1 else 0.0)
    return total


def ref_topk_fkl(s, ids, teacher_lp, T=1.0):
    """EOPD Eq. 10: renormalised teacher on its top-k, full-vocabulary student log-prob."""
    q = ref_softmax(s, T)
    pk = [math.exp(x) for x in teacher_lp]
    z = sum(pk)
    return sum((pi / z) * (math.log(pi / z) - math.log(q[i])) for i, pi in zip(ids, pk, strict=True) if pi > 0)


def ref_tail_fkl(s, ids, teacher_lp, T=1.0):
    """KL on K + 1 outcomes: the top-k ids and one bucket for every other id."""
    q = ref_softmax(s, T)
    pk = [math.exp(x) for x in teacher_lp]
    qk = [q[i] for i in ids]
    rest = [i for i in range(len(q)) if i not in set(ids) and q[i] > 0]
    # no id with student mass outside the top-k: the bucket is empty (1 - sum pk is rounding only)
    p_tail = max(0.0, 1.0 - sum(pk)) if rest else 0.0
    q_tail = sum(q[i] for i in rest)
    return ref_kl([*pk, p_tail], [*qk, q_tail])


def rowwise(fn, *tensors, **kw) -> torch.Tensor:
    """Apply a row reference to ``[..., V]`` tensors, returning float64 ``[...]``."""
    lead = tensors[0].shape[:-1]
    flat = [
        (x if not x.is_floating_point() else x.detach().double()).reshape(-1, x.shape[-1]).tolist() for x in tensors
    ]
    vals = [fn(*rows, **kw) for rows in zip(*flat, strict=True)]
    return torch.tensor(vals, dtype=torch.float64).reshape(lead)


# Every full-logit divergence, as (library call, reference call), both taking (student, teacher, T).
DIVERGENCES = {
    "forward_kl": (lambda s, t, T=1.0: forward_kl(s, t, temperature=T), ref_fkl),
    "reverse_kl": (lambda s, t, T=1.0: reverse_kl(s, t, temperature=T), ref_rkl),
    "jsd_0.5": (
        lambda s, t, T=1.0: generalized_jsd(s, t, 0.5, temperature=T),
        lambda s, t, T=1.0: ref_jsd(s, t, 0.5, T),
    ),
    "jsd_0.1": (
        lambda s, t, T=1.0: generalized_jsd(s, t, 0.1, temperature=T),
        lambda s, t, T=1.0: ref_jsd(s, t, 0.1, T),
    ),
    "jsd_0.9": (
        lambda s, t, T=1.0: generalized_jsd(s, t, 0.9, temperature=T),
        lambda s, t, T=1.0: ref_jsd(s, t, 0.9, T),
    ),
    "skew_fkl": (
        lambda s, t, T=1.0: skew_forward_kl(s, t, 0.1, temperature=T),
        lambda s, t, T=1.0: ref_skew_fkl(s, t, 0.1, T),
    ),
    "skew_rkl": (
        lambda s, t, T=1.0: skew_reverse_kl(s, t, 0.3, temperature=T),
        lambda s, t, T=1.0: ref_skew_rkl(s, t, 0.3, T),
    ),
    "tvd": (lambda s, t, T=1.0: total_variation(s, t, temperature=T), ref_tvd),
    "akl": (lambda s, t, T=1.0: adaptive_kl(s, t, 0.5, temperature=T), lambda s, t, T=1.0: ref_akl(s, t, 0.5, T)),
    "todi": (lambda s, t, T=1.0: todi(s, t, 1.0, temperature=T), lambda s, t, T=1.0: ref_todi(s, t, 1.0, T)),
    "todi_beta3": (lambda s, t, T=1.0: todi(s, t, 3.0, temperature=T), lambda s, t, T=1.0: ref_todi(s, t, 3.0, T)),
}
NONNEGATIVE = list(DIVERGENCES)  # every one of them is >= 0 (ToDi: each vocabulary term is >= 0)
# Divergences whose weights are computed without gradient (value != function whose gradient autograd gives).
DETACHED_WEIGHTS = {"akl", "todi", "todi_beta3"}
# Finite when the teacher has -inf rows and the student does not (q > 0 where p_T = 0).
FINITE_WITH_TEACHER_PADDING = ["forward_kl", "jsd_0.5", "jsd_0.1", "jsd_0.9", "skew_fkl", "skew_rkl", "tvd"]


def logits_pair(shape, V, scale=2.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*shape, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(*shape, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    return s, t


def teacher_topk(t: torch.Tensor, k: int, T: float = 1.0):
    top = torch.log_softmax(t.double() / T, dim=-1).topk(k, dim=-1)
    return top.indices, top.values.to(t.dtype)


# ---------------------------------------------------------------------------------------------------------
# 1. brute-force references
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("T", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("V", [5, 7])
def test_divergence_matches_bruteforce(name, T, V):
    fn, ref = DIVERGENCES[name]
    s, t = logits_pair((2, 3), V, seed=V)
    out = fn(s, t, T)
    assert out.shape == (2, 3) and out.dtype == torch.float64
    torch.testing.assert_close(out, rowwise(ref, s, t, T=T), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_divergence_float32_matches_bruteforce(name):
    fn, ref = DIVERGENCES[name]
    s, t = logits_pair((4,), 6, seed=3, dtype=torch.float32)
    out = fn(s, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), rowwise(ref, s, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 0.5, 3.0])
def test_entropy_matches_bruteforce(T):
    s, _ = logits_pair((3, 2), 7, seed=1)
    out = entropy(s, temperature=T)
    assert out.shape == (3, 2)
    torch.testing.assert_close(out, rowwise(ref_entropy, s, T=T), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 4, 6])
@pytest.mark.parametrize("T", [1.0, 0.6])
def test_topk_forward_kl_matches_bruteforce(k, T):
    s, t = logits_pair((2, 2), 6, seed=k)
    ids, lp = teacher_topk(t, k, T)
    out = topk_forward_kl(s, ids, lp, temperature=T)
    assert out.shape == (2, 2)
    torch.testing.assert_close(out, rowwise(ref_topk_fkl, s, ids, lp, T=T), rtol=1e-10, atol=1e-12)
    # the order of the top-k ids does not matter
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(topk_forward_kl(s, ids[..., perm], lp[..., perm], temperature=T), out)


def test_topk_forward_kl_uses_full_vocabulary_student():
    """log q is the full-vocabulary log-softmax, NOT renormalised over the top-k (Eq. 10)."""
    s = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64))
    ids = torch.tensor([[0, 1]])
    lp = torch.log(torch.tensor([[0.5, 0.3]], dtype=torch.float64))
    # p~ = (0.625, 0.375); q = (0.4, 0.3) unnormalised -> 0.625 ln(0.625/0.4) + 0.375 ln(0.375/0.3)
    expected = 0.625 * math.log(0.625 / 0.4) + 0.375 * math.log(0.375 / 0.3)
    assert topk_forward_kl(s, ids, lp).item() == pytest.approx(expected, rel=1e-12)
    # a renormalised student (q~ = (4/7, 3/7)) would give a different number
    wrong = 0.625 * math.log(0.625 / (4 / 7)) + 0.375 * math.log(0.375 / (3 / 7))
    assert abs(expected - wrong) > 0.1


@pytest.mark.parametrize("k", [1, 3, 5])
def test_tail_bucket_matches_bruteforce(k):
    s, t = logits_pair((3,), 6, seed=10 + k)
    ids, lp = teacher_topk(t, k)
    out = topk_forward_kl_with_tail(s, ids, lp)
    torch.testing.assert_close(out, rowwise(ref_tail_fkl, s, ids, lp), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# 2. gradients
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(set(DIVERGENCES) - DETACHED_WEIGHTS))
@pytest.mark.parametrize("T", [1.0, 1.7])
def test_gradcheck_divergences(name, T):
    fn, _ = DIVERGENCES[name]
    s, t = logits_pair((2, 2), 5, seed=4)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fn(x, t, T), (s,))


def test_gradcheck_entropy_and_topk():
    s, t = logits_pair((2, 3), 6, seed=5)
    s.requires_grad_(True)
    ids, lp = teacher_topk(t, 3, T=1.3)
    assert torch.autograd.gradcheck(lambda x: entropy(x, temperature=1.3), (s,))
    assert torch.autograd.gradcheck(lambda x: topk_forward_kl(x, ids, lp, temperature=1.3), (s,))
    assert torch.autograd.gradcheck(lambda x: topk_forward_kl_with_tail(x, ids, lp, temperature=1.3), (s,))


def test_gradcheck_wrt_teacher_logits():
    s, t = logits_pair((2,), 5, seed=6)
    t.requires_grad_(True)
    for name in sorted(set(DIVERGENCES) - DETACHED_WEIGHTS):
        fn, _ = DIVERGENCES[name]
        assert torch.autograd.gradcheck(lambda y, fn=fn: fn(s, y), (t,)), name


def numeric_grad(f, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    g = torch.zeros_like(x)
    flat = x.reshape(-1)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = h
        g.reshape(-1)[i] = (f((flat + e).view_as(x)) - f((flat - e).view_as(x))) / (2 * h)
    return g


@pytest.mark.parametrize("name", sorted(DETACHED_WEIGHTS))
def test_detached_weight_divergences_gradient(name):
    """AKL and ToDi stop the gradient through their weights: the gradient is that of the brute-force
    formula with the weights frozen at the evaluation point."""
    s, t = logits_pair((2,), 5, seed=7)
    x = s.clone().requires_grad_(True)
    fn, _ = DIVERGENCES[name]
    fn(x, t, 1.3).sum().backward()
    rows_s, rows_t = s.tolist(), t.tolist()
    if name == "akl":
        frozen = [ref_akl_weight(a, b, 0.5, 1.3) for a, b in zip(rows_s, rows_t, strict=True)]

        def f(y):
            return sum(ref_akl(r, b, 0.5, 1.3, w=w) for r, b, w in zip(y.tolist(), rows_t, frozen, strict=True))
    else:
        beta = 3.0 if name == "todi_beta3" else 1.0
        frozen = [ref_todi_weights(a, b, beta, 1.3) for a, b in zip(rows_s, rows_t, strict=True)]

        def f(y):
            return sum(ref_todi(r, b, beta, 1.3, a=w) for r, b, w in zip(y.tolist(), rows_t, frozen, strict=True))

    torch.testing.assert_close(x.grad, numeric_grad(f, s), rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------
# 3. closed forms
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [0.5, 1.0, 2.5])
def test_forward_kl_gradient_closed_form(T):
    s, t = logits_pair((3, 2), 7, seed=8)
    x = s.clone().requires_grad_(True)
    forward_kl(x, t, temperature=T).sum().backward()
    q = torch.softmax(s / T, -1)
    p = torch.softmax(t / T, -1)
    torch.testing.assert_close(x.grad, (q - p) / T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.5])
def test_entropy_gradient_closed_form(T):
    """dH/dz_i = -(1/T) p_i (log p_i + H)."""
    s, _ = logits_pair((4,), 6, seed=9)
    x = s.clone().requires_grad_(True)
    H = entropy(x, temperature=T)
    H.sum().backward()
    p = torch.softmax(s / T, -1)
    expected = -(p * (torch.log(p) + H.detach().unsqueeze(-1))) / T
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)


def test_topk_gradient_closed_form():
    """d/dz of sum_k p~_k (log p~_k - log q_k) = q * (sum_k p~_k) - p~ scattered = q - p~ (p~ sums to 1)."""
    s, t = logits_pair((3,), 6, seed=11)
    ids, lp = teacher_topk(t, 3)
    x = s.clone().requires_grad_(True)
    topk_forward_kl(x, ids, lp).sum().backward()
    p_tilde = torch.zeros_like(s).scatter(-1, ids, torch.softmax(lp, -1))
    torch.testing.assert_close(x.grad, torch.softmax(s, -1) - p_tilde, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# 4. identities
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_divergence_of_identical_distributions_is_zero(name, dtype):
    fn, _ = DIVERGENCES[name]
    s, _ = logits_pair((3, 2), 7, scale=4.0, seed=12, dtype=dtype)
    x = s.clone().requires_grad_(True)
    out = fn(x, s.clone(), 1.3)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-6 if dtype == torch.float32 else 1e-13, rtol=0)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    # a shifted copy is the same distribution
    out2 = fn(s, s + 3.0)
    torch.testing.assert_close(out2, torch.zeros_like(out2), atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0)


def test_identical_distributions_zero_with_padding_rows():
    s, _ = logits_pair((3,), 6, seed=13)
    s[:, -2:] = -INF
    for name, (fn, _) in DIVERGENCES.items():
        out = fn(s, s.clone())
        torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-13, rtol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1.0, 0.8])
def test_jsd_endpoints_are_the_two_kls_exactly(dtype, T):
    s, t = logits_pair((3, 4), 6, seed=14, dtype=dtype)
    assert torch.equal(generalized_jsd(s, t, 0.0, temperature=T), forward_kl(s, t, temperature=T))
    assert torch.equal(generalized_jsd(s, t, 1.0, temperature=T), reverse_kl(s, t, temperature=T))
    # skew with alpha = 0 is the plain KL too
    assert torch.equal(skew_forward_kl(s, t, 0.0, temperature=T), forward_kl(s, t, temperature=T))
    assert torch.equal(skew_reverse_kl(s, t, 0.0, temperature=T), reverse_kl(s, t, temperature=T))


def test_jsd_symmetry_and_bounds():
    s, t = logits_pair((5,), 7, scale=5.0, seed=15)
    torch.testing.assert_close(generalized_jsd(s, t, 0.5), generalized_jsd(t, s, 0.5))
    # beta-JSD <= h(beta) = -beta log beta - (1 - beta) log(1 - beta)
    for beta in (0.1, 0.5, 0.9):
        bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert (generalized_jsd(s, t, beta) <= bound + 1e-12).all()
    # swapping the roles: JSD_beta(q, p) = JSD_{1-beta}(p, q)
    torch.testing.assert_close(generalized_jsd(s, t, 0.2), generalized_jsd(t, s, 0.8))
    torch.testing.assert_close(total_variation(s, t), total_variation(t, s))
    assert (total_variation(s, t) <= 1.0).all()


@pytest.mark.parametrize("V", [2, 5, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entropy_of_uniform_is_log_v(V, dtype):
    z = torch.full((2, 3, V), 1.7, dtype=dtype)
    torch.testing.assert_close(entropy(z), torch.full((2, 3), math.log(V), dtype=dtype))
    # -inf rows are outside the support: H = log(#finite)
    z[..., : V // 2] = -INF
    torch.testing.assert_close(entropy(z), torch.full((2, 3), math.log(V - V // 2), dtype=dtype))
    # a one-hot distribution has zero entropy
    one_hot = torch.full((V,), -INF, dtype=dtype)
    one_hot[0] = 0.0
    assert entropy(one_hot).item() == 0.0


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_topk_with_k_equal_v_is_exact_forward_kl(T):
    s, t = logits_pair((3, 2), 7, scale=3.0, seed=16)
    ids, lp = teacher_topk(t, 7, T)
    torch.testing.assert_close(topk_forward_kl(s, ids, lp, temperature=T), forward_kl(s, t, temperature=T))
    torch.testing.assert_close(topk_forward_kl_with_tail(s, ids, lp, temperature=T), forward_kl(s, t, temperature=T))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tail_bucket_bounds(dtype):
    s, t = logits_pair((50,), 9, scale=3.0, seed=17, dtype=dtype)
    exact = forward_kl(s, t)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for k in range(1, 10):
        ids, lp = teacher_topk(t, k)
        tail = topk_forward_kl_with_tail(s, ids, lp)
        assert (tail >= -tol).all(), k
        assert (tail <= exact + tol).all(), k
        # the official top-k value is >= 0 too (Gibbs with a sub-normalised q)
        assert (topk_forward_kl(s, ids, lp) >= -tol).all(), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tail_bucket_equals_exact_when_tail_empty(dtype):
    """Empty teacher tail: k = V, or the top-k covers every id the teacher can emit (rest padded -inf)."""
    s, t = logits_pair((200,), 8, scale=5.0, seed=18, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    ids, lp = teacher_topk(t, 8)
    x = s.clone().requires_grad_(True)
    out = topk_forward_kl_with_tail(x, ids, lp)
    torch.testing.assert_close(out, forward_kl(s, t), **tol)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.softmax(s, -1) - torch.softmax(t, -1), **tol)
    # both models padded at the last two ids; k = 6 covers the teacher's whole support
    s2, t2 = s.clone(), t.clone()
    s2[:, -2:] = -INF
    t2[:, -2:] = -INF
    ids, lp = teacher_topk(t2, 6)
    x = s2.clone().requires_grad_(True)
    out = topk_forward_kl_with_tail(x, ids, lp)
    torch.testing.assert_close(out, forward_kl(s2, t2), **tol)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    # teacher padded only: the student's mass on the padded ids is the tail bucket, p_tail = 0
    ids, lp = teacher_topk(t2, 6)
    torch.testing.assert_close(topk_forward_kl_with_tail(s, ids, lp), forward_kl(s, t2), **tol)


# ---------------------------------------------------------------------------------------------------------
# 5. hypothesis: shapes, scales, temperatures
# ---------------------------------------------------------------------------------------------------------
@st.composite
def logit_inputs(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    V = draw(st.integers(2, 40))
    scale = draw(st.floats(0.01, 50.0))
    T = draw(st.floats(0.25, 4.0))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale
    t = torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale
    k = draw(st.integers(1, V))
    return s, t, T, k


@settings(max_examples=30, deadline=None)
@given(logit_inputs())
def test_hypothesis_finite_nonnegative_and_precision(inp):
    s, t, T, k = inp
    lead = s.shape[:-1]
    V = s.shape[-1]
    for name, (fn, _) in DIVERGENCES.items():
        out64 = fn(s, t, T)
        out32 = fn(s.float(), t.float(), T)
        assert out64.shape == lead and out64.dtype == torch.float64, name
        assert out32.shape == lead and out32.dtype == torch.float32, name
        assert torch.isfinite(out64).all() and torch.isfinite(out32).all(), name
        if name in NONNEGATIVE:
            assert (out64 >= -1e-12).all(), name
            assert (out32 >= -1e-5).all(), name
        torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4, msg=name)
    assert (total_variation(s, t, T) <= 1.0 + 1e-12).all()
    H = entropy(t, T)
    assert H.shape == lead and (H >= -1e-12).all() and (H - math.log(V) <= 1e-12).all()
    torch.testing.assert_close(entropy(t.float(), T).double(), H, rtol=1e-4, atol=1e-4)
    ids, lp = teacher_topk(t, k, T)
    exact = forward_kl(s, t, T)
    for fn in (topk_forward_kl, topk_forward_kl_with_tail):
        out64 = fn(s, ids, lp, temperature=T)
        out32 = fn(s.float(), ids, lp.float(), temperature=T)
        assert out64.shape == lead and torch.isfinite(out64).all() and torch.isfinite(out32).all()
        assert (out64 >= -1e-9).all()
        torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)
    assert (topk_forward_kl_with_tail(s, ids, lp, temperature=T) <= exact + 1e-9).all()


@settings(max_examples=30, deadline=None)
@given(logit_inputs())
def test_hypothesis_gradients_finite(inp):
    s, t, T, k = inp
    ids, lp = teacher_topk(t, k, T)
    fns = [fn for fn, _ in DIVERGENCES.values()]
    fns += [
        lambda x, y, T: entropy(x, T),
        lambda x, y, T: topk_forward_kl(x, ids, lp, temperature=T),
        lambda x, y, T: topk_forward_kl_with_tail(x, ids, lp, temperature=T),
    ]
    for fn in fns:
        x = s.float().requires_grad_(True)
        fn(x, t.float(), T).sum().backward()
        assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------------------
# 6. masking: -inf rows, bf16
# ---------------------------------------------------------------------------------------------------------
def padded_pair(dtype=torch.float64, pad=2, V=7, seed=19):
    s, t = logits_pair((3, 2), V, scale=3.0, seed=seed, dtype=dtype)
    t[..., -pad:] = -INF
    return s, t


@pytest.mark.parametrize("name", FINITE_WITH_TEACHER_PADDING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_teacher_padding_rows_finite(name, dtype):
    fn, ref = DIVERGENCES[name]
    s, t = padded_pair(dtype)
    x = s.clone().requires_grad_(True)
    out = fn(x, t)
    assert torch.isfinite(out).all()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.double(), rowwise(ref, s, t), **tol)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_teacher_padding_rows_where_math_is_infinite():
    """The reverse KL (and what contains it) is +inf when the student has mass where p_T = 0: true value."""
    s, t = padded_pair()
    assert torch.isinf(reverse_kl(s, t)).all()
    assert torch.isinf(generalized_jsd(s, t, 1.0)).all()
    assert not torch.isnan(adaptive_kl(s, t)).any()
    assert not torch.isnan(todi(s, t)).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_teacher_padding_rows_topk(dtype):
    s, t = padded_pair(dtype)
    for k in (1, 3, 5, 7):  # k = 7 takes the two -inf rows into the top-k
        ids, lp = teacher_topk(t, k)
        for fn, ref in ((topk_forward_kl, ref_topk_fkl), (topk_forward_kl_with_tail, ref_tail_fkl)):
            x = s.clone().requires_grad_(True)
            out = fn(x, ids, lp)
            assert torch.isfinite(out).all(), (fn.__name__, k)
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(out.double(), rowwise(ref, s, ids, lp), **tol)
            out.sum().backward()
            assert torch.isfinite(x.grad).all(), (fn.__name__, k)


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_padded_rows_finite_and_equal_to_truncated_vocab(name, dtype):
    """Rows that are -inf in both models are absent outcomes: value and gradient equal those on the
    vocabulary without them, and the padded rows get a zero gradient."""
    fn, _ = DIVERGENCES[name]
    s, t = padded_pair(dtype)
    s[..., -2:] = -INF
    x = s.clone().requires_grad_(True)
    out = fn(x, t, 1.2)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[..., -2:], torch.zeros_like(x.grad[..., -2:]))
    y = s[..., :-2].clone().requires_grad_(True)
    trunc = fn(y, t[..., :-2], 1.2)
    trunc.sum().backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, trunc, **tol)
    torch.testing.assert_close(x.grad[..., :-2], y.grad, **tol)


def test_both_padded_rows_entropy_and_topk():
    s, t = padded_pair()
    s[..., -2:] = -INF
    x = s.clone().requires_grad_(True)
    entropy(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(entropy(s), entropy(s[..., :-2]))
    ids, lp = teacher_topk(t, 3)
    for fn in (topk_forward_kl, topk_forward_kl_with_tail):
        x = s.clone().requires_grad_(True)
        out = fn(x, ids, lp)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
        torch.testing.assert_close(out, fn(s[..., :-2], ids, lp))


def test_bf16_inputs_give_float32_outputs():
    s, t = logits_pair((2, 3), 11, seed=20)
    sb, tb = s.bfloat16(), t.bfloat16()
    for name, (fn, _) in DIVERGENCES.items():
        out = fn(sb, tb)
        assert out.dtype == torch.float32, name
        torch.testing.assert_close(out, fn(sb.float(), tb.float()), msg=name)
    assert entropy(sb).dtype == torch.float32
    ids, lp = teacher_topk(tb, 4)
    assert lp.dtype == torch.bfloat16
    assert topk_forward_kl(sb, ids, lp).dtype == torch.float32
    assert topk_forward_kl_with_tail(sb, ids, lp).dtype == torch.float32
    x = sb.clone().requires_grad_(True)
    forward_kl(x, tb).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_scalar_and_flat_shapes():
    s, t = logits_pair((), 5, seed=21)
    for name, (fn, _) in DIVERGENCES.items():
        assert fn(s, t).shape == (), name
    s, t = logits_pair((2, 3, 4), 5, seed=21)
    for name, (fn, _) in DIVERGENCES.items():
        assert fn(s, t).shape == (2, 3, 4), name


# ---------------------------------------------------------------------------------------------------------
# 7. temperature
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [0.3, 0.7, 1.0, 2.0])
def test_temperature_equals_dividing_logits(T):
    s, t = logits_pair((3, 2), 6, scale=3.0, seed=22)
    for name, (fn, _) in DIVERGENCES.items():
        torch.testing.assert_close(fn(s, t, T), fn(s / T, t / T), rtol=1e-12, atol=1e-13, msg=name)
    torch.testing.assert_close(entropy(s, temperature=T), entropy(s / T), rtol=1e-12, atol=1e-13)
    ids, lp = teacher_topk(t, 3, T)  # the teacher's top-k log-probs are already at temperature T
    for fn in (topk_forward_kl, topk_forward_kl_with_tail):
        torch.testing.assert_close(fn(s, ids, lp, temperature=T), fn(s / T, ids, lp), rtol=1e-12, atol=1e-13)
    if T != 1.0:
        assert not torch.allclose(forward_kl(s, t, temperature=T), forward_kl(s, t))


def test_invalid_arguments_raise():
    s, t = logits_pair((2,), 4)
    for T in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            forward_kl(s, t, temperature=T)
        with pytest.raises(ValueError, match="temperature"):
            entropy(s, temperature=T)
    for beta in (-0.1, 1.1):
        with pytest.raises(ValueError, match="beta"):
            generalized_jsd(s, t, beta)
    for alpha in (-0.1, 1.0):
        with pytest.raises(ValueError, match="alpha"):
            skew_forward_kl(s, t, alpha)
        with pytest.raises(ValueError, match="alpha"):
            skew_reverse_kl(s, t, alpha)
    for mu in (0.0, 1.5):
        with pytest.raises(ValueError, match="mu"):
            adaptive_kl(s, t, mu)


def test_akl_head_and_tail_weighting():
    """Gaps only in the head give the forward KL, gaps only in the tail the reverse KL."""
    p = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.1], dtype=torch.float64))  # mu = 0.7: head = {0, 1}
    q_head = torch.log(torch.tensor([0.3, 0.5, 0.1, 0.1], dtype=torch.float64))
    q_tail = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64))
    torch.testing.assert_close(adaptive_kl(q_head, p, mu=0.7), forward_kl(q_head, p))
    torch.testing.assert_close(adaptive_kl(q_tail, p, mu=0.7), reverse_kl(q_tail, p))
    # mu = 1: every token is in the head
    s, t = logits_pair((4,), 6, seed=23)
    torch.testing.assert_close(adaptive_kl(s, t, mu=1.0), forward_kl(s, t))
    # in general a convex combination of the two KLs
    lo = torch.minimum(forward_kl(s, t), reverse_kl(s, t))
    hi = torch.maximum(forward_kl(s, t), reverse_kl(s, t))
    out = adaptive_kl(s, t)
    assert ((out >= lo - 1e-12) & (out <= hi + 1e-12)).all()
