"""The sampler: its KV-cache tokens and log-probs equal a no-cache recomputation (plain and LoRA students),
EOS masking, reproducibility, top-p sampling inside the nucleus with full-vocabulary log-probs, padded rows."""

from __future__ import annotations

import pytest
import torch

from eopd.models.loading import build_tiny_qwen3
from eopd.sampling.rollout import completion_mask_from_ids, left_pad, position_ids_from_mask, sample, top_p_filter


def _model(vocab: int = 12):
    return build_tiny_qwen3(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            seed=3, initializer_range=0.2).eval()


def test_logp_old_equals_full_forward_at_temperature():
    model = _model()
    r = sample(model, [[3, 4, 5], [6, 7]], n=3, max_new_tokens=10, temperature=0.7, eos_token_ids=[1],
               pad_token_id=0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=r.sequences_BL, attention_mask=r.attention_mask_BL,
                       position_ids=position_ids_from_mask(r.attention_mask_BL)).logits
    P = r.prompt_len
    lp = torch.log_softmax(logits[:, P - 1 : -1].float() / 0.7, -1).gather(-1, r.completion_ids_BT[..., None])
    lp = lp.squeeze(-1) * r.completion_mask_BT
    torch.testing.assert_close(lp, r.logp_old_BT, atol=1e-5, rtol=1e-5)
    assert r.prompt_index_B.tolist() == [0, 0, 0, 1, 1, 1]


def test_same_generator_seed_same_samples_and_global_rng_untouched():
    model = _model()
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    kw = dict(n=4, max_new_tokens=8, eos_token_ids=[1], pad_token_id=0)
    a = sample(model, [[3, 4]], generator=torch.Generator().manual_seed(5), **kw)
    b = sample(model, [[3, 4]], generator=torch.Generator().manual_seed(5), **kw)
    c = sample(model, [[3, 4]], generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a.completion_ids_BT, b.completion_ids_BT)
    assert not torch.equal(a.completion_ids_BT, c.completion_ids_BT)
    assert torch.equal(before, torch.get_rng_state())


def test_completion_mask_stops_after_first_eos_even_when_pad_is_eos():
    ids = torch.tensor([[5, 1, 1, 1], [5, 6, 7, 8], [1, 5, 1, 1]])
    assert completion_mask_from_ids(ids, [1]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert completion_mask_from_ids(ids, [7, 1]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]


def test_left_pad_and_positions():
    ids, mask = left_pad([[4, 5, 6], [7]], pad_token_id=0)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_left_padding_does_not_change_the_log_probs():
    """logp_old of a completion is the same whether its prompt was sampled alone or left-padded in a batch."""
    model = _model()
    padded = sample(model, [[7], [3, 4, 5, 6]], n=1, max_new_tokens=6, eos_token_ids=[1], pad_token_id=0,
                    generator=torch.Generator().manual_seed(0))
    t = int(padded.completion_mask_BT[0].sum())
    alone_ids = torch.tensor([[7, *padded.completion_ids_BT[0, :t].tolist()]])
    with torch.no_grad():
        logits = model(input_ids=alone_ids).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, alone_ids[0, 1:, None]).squeeze(-1)
    torch.testing.assert_close(lp, padded.logp_old_BT[0, :t], atol=1e-5, rtol=1e-4)


def _no_cache_log_probs(model, r, temperature: float) -> torch.Tensor:
    """Log-probs ``[B, T, V]`` predicting each completion token from one full forward of the sampled sequences
    with no cache."""
    with torch.no_grad():
        logits = model(input_ids=r.sequences_BL, attention_mask=r.attention_mask_BL,
                       position_ids=position_ids_from_mask(r.attention_mask_BL), use_cache=False).logits
    return torch.log_softmax(logits[:, r.prompt_len - 1 : -1].float() / temperature, -1)


def _nucleus(probs_V: torch.Tensor, top_p: float) -> set[int]:
    """The smallest set of most likely ids whose mass reaches ``top_p`` (written here, not ``top_p_filter``)."""
    kept, mass = set(), 0.0
    for p, i in sorted(zip(probs_V.tolist(), range(len(probs_V)), strict=True), reverse=True):
        kept.add(i)
        mass += p
        if mass >= top_p:
            break
    return kept


def test_top_p_samples_inside_the_nucleus_and_logp_old_is_the_full_distributions():
    """With top_p < 1 every sampled token lies in the nucleus of the model's distribution at its position,
    and ``logp_old`` is that token's log-prob under the whole (untruncated) distribution."""
    model, top_p, temperature = _model(), 0.6, 0.9
    r = sample(model, [[3, 4, 5], [6], [7, 8]], n=8, max_new_tokens=8, temperature=temperature, top_p=top_p,
               eos_token_ids=[1], pad_token_id=0, generator=torch.Generator().manual_seed(2))
    logp_BTV = _no_cache_log_probs(model, r, temperature)
    valid = r.completion_mask_BT.bool()
    outside_mass = []
    for b, t in valid.nonzero().tolist():
        token, nucleus = int(r.completion_ids_BT[b, t]), _nucleus(logp_BTV[b, t].exp(), top_p)
        assert token in nucleus, (b, t, token, nucleus)
        outside_mass.append(1.0 - float(logp_BTV[b, t].exp()[sorted(nucleus)].sum()))
    want = logp_BTV.gather(-1, r.completion_ids_BT[..., None]).squeeze(-1)
    torch.testing.assert_close(r.logp_old_BT[valid], want[valid], atol=1e-5, rtol=1e-5)
    # not degenerate: the nucleus leaves out ~40% of the mass, so tokens sampled from the whole distribution
    # would have fallen outside it many times over these positions
    assert valid.sum() > 50 and sum(outside_mass) / len(outside_mass) > 0.3


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.1)).tolist() == [[True, False, False, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_padded_vocab_rows_are_never_sampled():
    model = _model(vocab=12)
    with torch.no_grad():
        model.lm_head.weight[9:] *= 0
        model.lm_head.weight[9:] += 50 * model.model.embed_tokens.weight[:3].mean(0)  # would dominate
    r = sample(model, [[3, 4]], n=16, max_new_tokens=6, eos_token_ids=[1], pad_token_id=0,
               generator=torch.Generator().manual_seed(0), vocab_size=9)
    assert int(r.completion_ids_BT.max()) < 9


def test_max_batch_size_gives_the_same_samples_for_a_seed():
    """Chunked generation (bounded KV cache) draws exactly what one pass draws: same ids, mask and log-probs."""
    model = _model()
    prompts = [[3, 4, 5], [6], [7, 8], [2, 9, 10, 11]]
    kw = dict(n=3, max_new_tokens=9, temperature=0.9, eos_token_ids=[1], pad_token_id=0)
    whole = sample(model, prompts, generator=torch.Generator().manual_seed(4), **kw)
    for size in (1, 5):
        part = sample(model, prompts, generator=torch.Generator().manual_seed(4), max_batch_size=size, **kw)
        assert torch.equal(part.completion_ids_BT, whole.completion_ids_BT)
        assert torch.equal(part.sequences_BL, whole.sequences_BL) and part.prompt_len == whole.prompt_len
        torch.testing.assert_close(part.logp_old_BT, whole.logp_old_BT, atol=1e-5, rtol=1e-5)
    assert len({tuple(r) for r in whole.completion_ids_BT.tolist()}) > 1  # the case is not degenerate


def test_inverse_cdf_sampling_follows_the_distribution_and_skips_zero_mass():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3]]).repeat(20_000, 1)
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(0))
    from eopd.sampling.rollout import inverse_cdf_sample

    ids = inverse_cdf_sample(probs, u)
    freq = torch.bincount(ids, minlength=5).float() / ids.numel()
    assert freq[0] == 0 and freq[2] == 0
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)
    assert inverse_cdf_sample(probs[:1], torch.zeros(1)).item() == 1  # u = 0 never picks a zero-mass id


def _lora(model):
    """``model`` with a LoRA adapter whose weights are random (not the identity), so the adapter changes the
    logits; a PeftModel forwards ``**kwargs``, so the cache keyword must be read from the wrapped forward."""
    peft = pytest.importorskip("peft")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False)).eval()


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "lora"])
def test_cached_sampling_equals_a_recomputation_without_cache(wrap: bool):
    """The KV-cache sampler draws exactly what a sampler without cache would: at every position, the inverse-CDF
    draw of that row's uniform (``sample``'s documented contract: a ``[B, T]`` block drawn first) from the full
    no-cache forward's distribution is the sampled token, and ``logp_old`` is its log-prob there."""
    model = _lora(_model()) if wrap else _model()
    prompts, n, T, temperature, seed = [[3, 4, 5], [6], [7, 8, 9, 10]], 3, 10, 0.8, 11
    r = sample(model, prompts, n=n, max_new_tokens=T, temperature=temperature, eos_token_ids=[1], pad_token_id=0,
               generator=torch.Generator().manual_seed(seed))
    uniform_BT = torch.rand((len(prompts) * n, T), generator=torch.Generator().manual_seed(seed))
    logp_BTV = _no_cache_log_probs(model, r, temperature)
    valid = r.completion_mask_BT.bool()
    for b, t in valid.nonzero().tolist():
        cdf_V = logp_BTV[b, t].double().exp().cumsum(0)
        drawn = int((cdf_V > uniform_BT[b, t].double() * cdf_V[-1]).nonzero()[0])  # first id past the uniform
        assert int(r.completion_ids_BT[b, t]) == drawn, (b, t)
    want = logp_BTV.gather(-1, r.completion_ids_BT[..., None]).squeeze(-1)
    torch.testing.assert_close(r.logp_old_BT[valid], want[valid], atol=1e-5, rtol=1e-5)
    assert valid.sum() > 20 and len({tuple(row) for row in r.completion_ids_BT.tolist()}) > 1
    if wrap:  # the adapter is in the sampled distribution: the base model's differs
        with model.disable_adapter():
            base = _no_cache_log_probs(model, r, temperature)
        assert float((base - logp_BTV)[valid].abs().max()) > 1e-2
