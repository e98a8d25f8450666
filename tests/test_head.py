"""The model's own head transform on every path: a tiny Gemma 2 whose logits are soft-capped
(``cap * tanh(logits / cap)``) gets the teacher scores, the fused loss and gradients, the learner's log-probs
and the evaluation entropy of its OWN logits; a transform eopd does not apply is refused at start in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eopd.losses import ObjectiveConfig
from eopd.losses.objectives import DIAG_KEYS
from eopd.losses.scoring import score_from_logits
from eopd.sampling.forward import completion_entropy_BT
from eopd.sampling.head import UnsupportedHeadError, check_output_head
from eopd.sampling.rollout import Rollout, position_ids_from_mask, sample
from eopd.teachers import HFTeacher
from eopd.training.collect import Batch, collect_batch
from eopd.training.update import learner_logprobs, student_loss

from .conftest import REPO

ROWS, V = 40, 37  # lm_head rows, and the tokenizer's vocabulary (3 padded rows)
EOS, PAD = 2, 0
PROMPTS = [[1, 5, 6], [1, 7], [1, 9, 10, 11]]
TINY = str(REPO / "configs" / "tiny.yaml")


def gemma2(seed: int, hidden: int, cap: float | None):
    """A tiny random Gemma 2 (tied embeddings, final-logit soft-cap ``cap``) whose raw logits reach ~10, so
    that the cap changes its distribution a lot."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=ROWS, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                          final_logit_softcapping=cap, max_position_embeddings=64, sliding_window=16,
                          initializer_range=0.3, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Gemma2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def student():
    return gemma2(seed=0, hidden=32, cap=2.0)


@pytest.fixture(scope="module")
def teacher():
    return gemma2(seed=1, hidden=48, cap=3.0)


def own_logits(model, rollout: Rollout) -> torch.Tensor:
    """The model's own logits (its forward, cap included) predicting each completion token, ``[B, T, V]``."""
    attn = rollout.attention_mask_BL
    with torch.no_grad():
        logits = model(input_ids=rollout.sequences_BL, attention_mask=attn,
                       position_ids=position_ids_from_mask(attn)).logits
    return logits[:, rollout.prompt_len - 1 : -1, :V].float()


def uncapped_logits(model, rollout: Rollout) -> torch.Tensor:
    """``hidden @ W.T`` without the cap: what the chunked paths computed before (to show the case matters)."""
    attn = rollout.attention_mask_BL
    with torch.no_grad():
        hidden = model.model(input_ids=rollout.sequences_BL, attention_mask=attn,
                             position_ids=position_ids_from_mask(attn)).last_hidden_state
    return (hidden @ model.lm_head.weight[:V].T)[:, rollout.prompt_len - 1 : -1].float()


def rollout_of(student, temperature: float = 0.8) -> Rollout:
    return sample(student, PROMPTS, n=2, max_new_tokens=8, temperature=temperature, eos_token_ids=[EOS],
                  pad_token_id=PAD, generator=torch.Generator().manual_seed(3), vocab_size=V)


def test_teacher_scores_and_eval_entropy_are_the_models_own(student, teacher) -> None:
    rollout = rollout_of(student)
    valid = rollout.completion_mask_BT.bool()
    want = score_from_logits(own_logits(teacher, rollout), rollout.completion_ids_BT, top_k=5, temperature=0.8)
    got = HFTeacher(teacher, V, 0.8, micro_batch_size=4, chunk_size=3).score(rollout, top_k=5, want_logits=False)
    torch.testing.assert_close(got.logp_BT[valid], want.logp[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.entropy_BT[valid], want.entropy[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.topk_logprobs_BTK[valid], want.topk_logprobs[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(got.topk_ids_BTK[valid], want.topk_ids[valid])
    # the cap matters here: without it the teacher's log-probs are off by nats, not rounding
    raw = score_from_logits(uncapped_logits(teacher, rollout), rollout.completion_ids_BT, temperature=0.8)
    assert float((raw.logp - want.logp)[valid].abs().max()) > 1.0
    # the evaluation's entropy (the student's own) goes through the same head path
    entropy_BT = completion_entropy_BT(student, rollout, temperature=0.8, vocab_size=V, rows_per_forward=4,
                                       max_chunk_elements=3 * V)
    expected = score_from_logits(own_logits(student, rollout), temperature=0.8).entropy
    torch.testing.assert_close(entropy_BT[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_learner_logp_old_equals_the_samplers(student) -> None:
    """The learner's recomputed log-probs are the sampler's (model's own logits): the first PPO ratio is 1."""
    rollout = rollout_of(student, temperature=0.7)
    batch = Batch(rollout, None, None, None)  # learner_logprobs reads the rollout only
    valid = rollout.completion_mask_BT.bool()
    for impl in ("fused", "plain"):
        logp_BT = learner_logprobs(student, batch, impl=impl, temperature=0.7, vocab_size=V, chunk_size=3,
                                   rows_per_forward=2)
        torch.testing.assert_close(logp_BT[valid], rollout.logp_old_BT[valid], rtol=1e-5, atol=1e-5)
        assert float((logp_BT - rollout.logp_old_BT)[valid].exp().sub(1).abs().max()) < 1e-4, impl


def _batch(student, teacher, obj: ObjectiveConfig, fused: bool) -> Batch:
    return collect_batch(student, HFTeacher(teacher, V, obj.temperature, micro_batch_size=4), PROMPTS, obj=obj,
                         n=2, max_new_tokens=8, temperature=obj.temperature, top_p=1.0, eos_ids=[EOS], pad_id=PAD,
                         vocab_size=V, sample_generator=torch.Generator().manual_seed(5),
                         loss_generator=torch.Generator().manual_seed(6), fused=fused)


def _loss_and_grads(student, batch: Batch, impl: str, obj: ObjectiveConfig):
    """The loss, its diagnostics at the valid positions, every parameter's gradient and the gradient of the
    final hidden states (captured at the decoder body's output, which both paths run)."""
    captured = []

    def keep(module, args, output) -> None:
        output.last_hidden_state.retain_grad()
        captured.append(output.last_hidden_state)

    student.zero_grad(set_to_none=True)
    handle = student.model.register_forward_hook(keep)
    try:
        out = student_loss(student, obj, batch, normalizer=20.0, impl=impl,
                           vocab_size=V, chunk_size=3, diagnostics=True)
        out.loss.backward()
    finally:
        handle.remove()
    valid = batch.rollout.completion_mask_BT.bool()
    diag = {k: (v[valid] if v.dim() == 2 else v) for k, v in out.token_parts.items() if k in DIAG_KEYS}
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return float(out.loss.detach()), diag, grads, captured[0].grad


@pytest.mark.parametrize(("name", "overrides"), [("eopd", {}), ("eopd", {"fkl": "topk_tail"}), ("fkl", {}),
                                                  ("jsd", {})])
def test_fused_loss_and_gradients_equal_the_plain_path(student, teacher, name: str, overrides: dict) -> None:
    """The fused loss (student and, for exact baselines, teacher logits recomputed from hidden states) equals
    the plain path on the models' own full logits: value, diagnostics, the hidden states' and every
    parameter's gradient (the tied lm_head / embedding included)."""
    obj = ObjectiveConfig.preset(name, temperature=0.9, tau=1.0, top_k=4, **overrides)
    fused = _loss_and_grads(student, _batch(student, teacher, obj, fused=True), "fused", obj)
    plain = _loss_and_grads(student, _batch(student, teacher, obj, fused=False), "plain", obj)
    assert fused[0] == pytest.approx(plain[0], rel=1e-5, abs=1e-6)
    assert fused[1].keys() == plain[1].keys()
    for key in plain[1]:
        torch.testing.assert_close(fused[1][key], plain[1][key], rtol=1e-4, atol=1e-7)
    assert fused[2].keys() == plain[2].keys() and "model.embed_tokens.weight" in plain[2]
    for key, want in plain[2].items():
        torch.testing.assert_close(fused[2][key], want, rtol=1e-4, atol=1e-6 * max(1.0, float(want.abs().max())))
    torch.testing.assert_close(fused[3], plain[3], rtol=1e-4, atol=1e-7)


# --- a transform eopd does not apply: refused at start ------------------------------------------------------


def granite(logits_scaling: float):
    from transformers import GraniteConfig, GraniteForCausalLM

    config = GraniteConfig(vocab_size=ROWS, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, logits_scaling=logits_scaling,
                           pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GraniteForCausalLM(config).eval()


def cohere(logit_scale: float):
    from transformers import CohereConfig, CohereForCausalLM

    config = CohereConfig(vocab_size=ROWS, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, logit_scale=logit_scale,
                          pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CohereForCausalLM(config).eval()


def capped_in_config_only():
    """A Qwen3 whose config claims a soft-cap that its forward never applies."""
    from eopd.models.loading import build_tiny_qwen3

    model = build_tiny_qwen3(vocab_size=ROWS, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                             initializer_range=0.3, seed=2).eval()
    model.config.final_logit_softcapping = 2.0
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_supported_heads_pass_the_start_check(dtype: torch.dtype) -> None:
    """No false refusal, bf16 rounding (model in bf16, our head in float32) included."""
    from eopd.models.loading import build_tiny_qwen3

    for model in (gemma2(0, 32, 2.0), gemma2(1, 48, 30.0), granite(1.0), cohere(1.0),
                  build_tiny_qwen3(vocab_size=ROWS, seed=1, initializer_range=0.3)):
        check_output_head(model.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("build", "says"), [
    (lambda: granite(4.0), "logits_scaling=4.0"),
    (lambda: cohere(0.0625), "logit_scale=0.0625"),
    (capped_in_config_only, "final_logit_softcapping=2.0"),
])
def test_an_unsupported_head_transform_is_refused_in_one_line(build, says: str, dtype: torch.dtype) -> None:
    model = build().to(dtype)
    with pytest.raises(UnsupportedHeadError) as info:
        check_output_head(model, name="tiny-model")
    message = str(info.value)
    assert "\n" not in message and "tiny-model" in message and says in message, message
    with pytest.raises(UnsupportedHeadError):  # every in-process teacher (and so `eopd serve-teacher`) checks
        HFTeacher(model, V, 1.0)


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_train_refuses_a_model_with_an_unsupported_head(tiny_models, tmp_path: Path, capsys, role: str) -> None:
    from transformers import AutoTokenizer

    from eopd.cli import main as eopd_main

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    folder = tmp_path / "granite"
    model = granite(4.0)
    model.resize_token_embeddings(len(tokenizer))
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    capsys.readouterr()  # the save's progress bar
    models = {"teacher": tiny_models["teacher"], "student": tiny_models["student"], role: folder}
    args = ["train", TINY, f"models.teacher={models['teacher']}", f"models.student={models['student']}",
            f"models.tokenizer={tiny_models['student']}", f"output_dir={tmp_path / 'run'}", "tensorboard=false"]
    assert eopd_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("eopd train: ") and str(folder) in err, err
    assert "logits_scaling=4.0" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
