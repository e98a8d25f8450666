"""Where the teacher lives (``models.teacher_device``, ``models.teacher_dtype``) and that it costs its weights
only: frozen, outside the optimizer and outside accelerate's ``prepare``; its scores come back float32 on the
student's device whatever its own dtype and device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from eopd.config import ConfigError, ModelsConfig, TrainConfig, load_config
from eopd.sampling.rollout import Rollout, sample
from eopd.teachers import HFTeacher, TeacherScores
from eopd.training.components import build_components, teacher_placement
from eopd.training.trainer import run

from .conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")
SMALL = ("rollout.prompts_per_step=4", "optim.minibatch_size=8", "optim.micro_batch_size=4",
         "rollout.max_new_tokens=12", "save_every=0")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def cfg_of(tiny_models: dict[str, Path], out: Path, *overrides: str) -> TrainConfig:
    base = [f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
            f"output_dir={out}", "num_threads=1", "tensorboard=false"]
    return load_config(TINY, [*base, *overrides])


def a_rollout(c: Any) -> Rollout:
    prompts = [c.prompt_ids[i] for i in range(4)]
    return sample(c.student, prompts, n=2, max_new_tokens=10, eos_token_ids=c.eos_ids,
                  pad_token_id=c.tokenizer.pad_token_id, generator=torch.Generator(c.device).manual_seed(0),
                  vocab_size=c.vocab_size)


def float_fields(s: TeacherScores) -> dict[str, torch.Tensor]:
    return {"logp": s.logp_BT, "entropy": s.entropy_BT, "topk_logprobs": s.topk_logprobs_BTK}


@pytest.mark.parametrize("lora", [False, True])
def test_teacher_is_frozen_and_outside_the_optimizer_and_prepare(tiny_models, tmp_path, lora):
    pytest.importorskip("peft") if lora else None
    extra = ("models.lora.r=4", "models.lora.target_modules=q_proj,v_proj") if lora else ()
    c = build_components(cfg_of(tiny_models, tmp_path, *SMALL, *extra, "max_steps=1"))
    teacher_params = list(c.teacher_model.parameters())
    assert teacher_params and not any(p.requires_grad for p in teacher_params)
    in_optimizer = {id(p) for g in c.optimizer.param_groups for p in g["params"]}
    assert in_optimizer.isdisjoint(id(p) for p in teacher_params)
    assert in_optimizer == {id(p) for p in c.student.parameters() if p.requires_grad}
    assert not any(m is c.teacher_model for m in c.accelerator._models)  # only the student was prepared
    run(c)
    assert all(p.grad is None for p in teacher_params)
    assert not any(id(p) in c.optimizer.state for p in teacher_params)


def test_bfloat16_teacher_with_float32_student_trains_with_float32_scores(tiny_models, tmp_path):
    c = build_components(cfg_of(tiny_models, tmp_path / "bf16", *SMALL, "max_steps=3",
                                "models.teacher_dtype=bfloat16"))
    assert {p.dtype for p in c.teacher_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in c.student.parameters()} == {torch.float32}
    r = a_rollout(c)
    scores = c.teacher.score(r, top_k=4, want_logits=False)
    assert all(v.dtype == torch.float32 for v in float_fields(scores).values())
    # the same teacher as in float32, to bfloat16 precision
    ref = build_components(cfg_of(tiny_models, tmp_path / "fp32", *SMALL, "max_steps=1"))
    assert {p.dtype for p in ref.teacher_model.parameters()} == {torch.float32}
    exact = ref.teacher.score(r, top_k=4, want_logits=False)
    mask = r.completion_mask_BT.bool()
    pairs = {"logp": (scores.logp_BT, exact.logp_BT), "entropy": (scores.entropy_BT, exact.entropy_BT),
             "top-1 logprob": (scores.topk_logprobs_BTK[..., 0], exact.topk_logprobs_BTK[..., 0])}
    for k, (v, ref_v) in pairs.items():  # top-k beyond the first may swap near-ties in bf16
        diff = (v - ref_v)[mask].abs().max()
        mean = (v - ref_v)[mask].abs().mean()
        # differs (it is bf16) but only by rounding: mean error within 2% of the values, none above 0.25 nats
        scale = ref_v[mask].abs().mean()
        assert 0 < mean < 0.02 * scale and diff < 0.25, (k, float(mean), float(diff), float(scale))
    history = run(c)
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def test_teacher_on_cpu_named_explicitly_trains_like_auto(tiny_models, tmp_path):
    runs = {}
    for placement in ("auto", "cpu"):
        c = build_components(cfg_of(tiny_models, tmp_path / placement, *SMALL, "max_steps=2",
                                    f"models.teacher_device={placement}"))
        assert c.teacher.device == torch.device("cpu") and c.teacher_model.device.type == "cpu"
        runs[placement] = [{k: v for k, v in h.items() if not k.startswith(("time/", "tokens_per_s/"))}
                           for h in run(c)]
    assert runs["cpu"] == runs["auto"]


def test_teacher_placement_resolves_auto_and_refuses_what_cannot_be(tiny_models):
    m = ModelsConfig(teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]))
    cpu = torch.device("cpu")
    assert teacher_placement(m, cpu) == (cpu, torch.float32)
    bf16 = ModelsConfig(teacher=m.teacher, student=m.student, dtype="bfloat16")
    assert teacher_placement(bf16, cpu) == (cpu, torch.bfloat16)  # auto follows models.dtype
    fp16 = ModelsConfig(teacher=m.teacher, student=m.student, dtype="bfloat16", teacher_dtype="float16")
    assert teacher_placement(fp16, cpu) == (cpu, torch.float16)
    for bad, key in (({"teacher_device": "gpu"}, "models.teacher_device"),
                     ({"teacher_device": "cuda:x"}, "models.teacher_device"),
                     ({"teacher_dtype": "fp8"}, "models.teacher_dtype")):
        with pytest.raises(ConfigError, match=rf"^{key}: must be"):
            ModelsConfig(teacher=m.teacher, student=m.student, **bad)
    if not torch.cuda.is_available():
        gpu = ModelsConfig(teacher=m.teacher, student=m.student, teacher_device="cuda:1")
        with pytest.raises(ConfigError, match=r"^models\.teacher_device: 'cuda:1' but this machine has 0 GPU"):
            teacher_placement(gpu, cpu)


def test_teacher_scores_the_rollout_on_its_own_device(tiny_models, tmp_path, monkeypatch):
    """The rollout reaches the teacher's forward on the teacher's device (here a stand-in device, meta: the
    forward is replaced, so nothing runs there)."""
    c = build_components(cfg_of(tiny_models, tmp_path, *SMALL, "max_steps=1"))
    r = a_rollout(c)
    expected = c.teacher.score(r, top_k=4, want_logits=False)
    seen = []

    def fake_rows(self: HFTeacher, rollout: Rollout, *args: Any) -> TeacherScores:
        seen.append(rollout.sequences_BL.device)
        return expected.select(slice(0, rollout.sequences_BL.shape[0]))

    monkeypatch.setattr(HFTeacher, "_score_rows", fake_rows)
    c.teacher.device = torch.device("meta")
    scores = c.teacher.score(r, top_k=4, want_logits=False)
    assert seen and all(d.type == "meta" for d in seen)
    assert scores.logp_BT.device == r.sequences_BL.device


@needs_cuda
@pytest.mark.parametrize(("student", "teacher"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_teacher_on_another_device_than_the_student(tiny_models, tmp_path, student, teacher):
    c = build_components(cfg_of(tiny_models, tmp_path / "run", *SMALL, "max_steps=2", f"models.device={student}",
                                f"models.teacher_device={teacher}", "models.dtype=float32"))
    assert c.teacher.device.type == teacher and c.device.type == student
    r = a_rollout(c)
    for want_hidden in (False, True):
        scores = c.teacher.score(r, top_k=4, want_logits=False, want_hidden=want_hidden)
        assert all(v.device == r.sequences_BL.device for v in float_fields(scores).values())
        if want_hidden:
            assert scores.hidden_BTH is not None and scores.head is not None
            assert scores.hidden_BTH.device == scores.head[0].device == r.sequences_BL.device
    same = build_components(cfg_of(tiny_models, tmp_path / "same", *SMALL, "max_steps=1",
                                   f"models.device={student}", "models.dtype=float32"))
    ref = same.teacher.score(r, top_k=4, want_logits=False)
    for k, v in float_fields(scores).items():
        torch.testing.assert_close(v, float_fields(ref)[k], rtol=1e-4, atol=1e-4)
    history = run(c)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
