"""LoRA students (``models.lora``, peft): only the adapters train, checkpoints hold the adapter alone, resume
is exact, the final folder is a merged model plain transformers loads plus the adapter peft loads, and the
fused loss, the sampler and DDP all see base + adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from eopd.config import ConfigError, LoraSpec, TrainConfig, load_config
from eopd.losses import reverse_kl
from eopd.models.loading import load_causal_lm
from eopd.prompting import encode_prompts
from eopd.sampling.forward import completion_hidden_states, completion_logits
from eopd.sampling.rollout import Rollout, sample
from eopd.training.checkpoint import CheckpointMismatchError, latest_checkpoint, list_checkpoints
from eopd.training.components import build_components
from eopd.training.trainer import run, train

from .conftest import REPO
from .test_trainer import check_kill_and_resume

peft = pytest.importorskip("peft")

TINY = str(REPO / "configs" / "tiny.yaml")
LORA = ("models.lora.r=4", "models.lora.alpha=8", "models.lora.target_modules=q_proj,v_proj")
SMALL = ("rollout.prompts_per_step=4", "optim.minibatch_size=8", "optim.micro_batch_size=4",
         "rollout.max_new_tokens=12")


def cfg_of(tiny_models: dict[str, Path], out: Path, *overrides: str) -> TrainConfig:
    base = [f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
            f"output_dir={out}", "num_threads=1", "tensorboard=false"]
    return load_config(TINY, [*base, *overrides])


def logits_of(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def probe_ids() -> torch.Tensor:
    return torch.tensor([[1, 2, 10, 3, 10, 4, 11], [5, 10, 6, 10, 7, 10, 8]])


def base_state(model: Any) -> dict[str, torch.Tensor]:
    """Every weight of the wrapped base model (the adapters excluded), cloned."""
    return {k: v.detach().clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}


def test_only_the_adapters_train_and_the_base_stays_bit_identical(tiny_models, tmp_path):
    c = build_components(cfg_of(tiny_models, tmp_path, *LORA, *SMALL, "max_steps=3", "save_every=0"))
    assert isinstance(c.student, peft.PeftModel)
    trainable = {id(p) for n, p in c.student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n, p in c.student.named_parameters() if p.requires_grad)
    in_optimizer = {id(p) for g in c.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == trainable  # AdamW holds state for the adapters alone
    base, adapters = base_state(c.student), adapter_state(c.student)
    run(c)
    after = base_state(c.student)
    assert base.keys() == after.keys() and all(torch.equal(base[k], after[k]) for k in base)
    changed = [k for k, v in adapter_state(c.student).items() if not torch.equal(v, adapters[k])]
    assert len(changed) == len(adapters)  # every A and B moved (B starts at 0)


def test_checkpoint_holds_only_the_adapter(tiny_models, tmp_path):
    c = build_components(cfg_of(tiny_models, tmp_path, *LORA, *SMALL, "max_steps=2", "save_every=1"))
    run(c)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and not (ckpt / "model").exists()
    saved = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved)
    expected = {k.replace(".default", "") for k in adapter_state(c.student)}
    assert set(saved) == expected
    adapter_bytes = (ckpt / "adapter" / "adapter_model.safetensors").stat().st_size
    model_bytes = (Path(tiny_models["student"]) / "model.safetensors").stat().st_size
    assert adapter_bytes * 10 < model_bytes, (adapter_bytes, model_bytes)
    # the optimizer state holds the adapters' moments alone
    state = torch.load(ckpt / "trainer.pt", weights_only=False)
    numel = sum(v.numel() for s in state["optimizer"]["state"].values() for k, v in s.items() if k != "step")
    assert numel == 2 * sum(v.numel() for v in saved.values())


@pytest.mark.slow
@pytest.mark.parametrize("settings", [(*LORA, "models.lora.dropout=0.1"), ("models.lora={}",)],
                         ids=["explicit", "defaults"])
def test_kill_and_resume_reproduces_uninterrupted_lora_run(tiny_models, tmp_path, settings):
    # bit for bit on CPU, dropout included (the torch RNG is in the checkpoint); at the defaults peft saves
    # target_modules=all-linear expanded into module names, which must still count as the run's own settings
    full, cut = check_kill_and_resume(cfg_of, tiny_models, tmp_path, *settings)
    for file in ("adapter/adapter_model.safetensors", "model.safetensors"):
        sa, sb = load_file(full / "final" / file), load_file(cut / "final" / file)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), file


def test_final_folder_is_a_merged_model_and_a_peft_adapter(tiny_models, tmp_path):
    c = build_components(cfg_of(tiny_models, tmp_path, *LORA, *SMALL, "max_steps=2", "save_every=0",
                                "optim.lr=3e-2"))
    run(c)
    final = tmp_path / "final"
    ids = probe_ids()
    trained = logits_of(c.student, ids)  # the PeftModel that trained: base + adapter
    merged = AutoModelForCausalLM.from_pretrained(final)  # plain transformers, no peft involved
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits_of(merged, ids), trained, rtol=1e-5, atol=1e-5)
    reloaded = peft.PeftModel.from_pretrained(load_causal_lm(tiny_models["student"]), final / "adapter")
    torch.testing.assert_close(logits_of(reloaded, ids), trained, rtol=1e-5, atol=1e-5)
    base = load_causal_lm(tiny_models["student"])
    assert (logits_of(base, ids) - trained).abs().max() > 1e-3  # the adapter changed the model
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert not (final / "adapter" / "model.safetensors").exists()


def _exact_reverse_kl(student: Any, teacher: Any, prompts: list[list[int]], tok: Any, vocab_size: int) -> float:
    g = torch.Generator().manual_seed(123)
    r = sample(student, prompts, n=4, max_new_tokens=16, eos_token_ids=[tok.eos_token_id],
               pad_token_id=tok.pad_token_id, generator=g, vocab_size=vocab_size)
    with torch.no_grad():
        kl = reverse_kl(completion_logits(student, r, vocab_size), completion_logits(teacher, r, vocab_size))
    m = r.completion_mask_BT
    return float((kl * m).sum() / m.sum())


@pytest.mark.slow
def test_lora_student_learns(tiny_models, tmp_path):
    # the frozen lm_head bounds how peaked any adapter can make the student: the session's student (init std
    # 0.02) is near uniform and stays near its floor (reverse KL -6% here), so this run adapts a student whose
    # random head is as expressive as a trained one's (init std 0.3, like the teacher's)
    from eopd.models.loading import build_tiny_checkpoint

    student = build_tiny_checkpoint(tmp_path / "student", alphabet="0123456789+=,;", hidden_size=32, num_layers=2,
                                    initializer_range=0.3, seed=2)
    models = {**tiny_models, "student": student}
    c = build_components(cfg_of(models, tmp_path / "run", "models.lora.r=8", "models.lora.alpha=16",
                                "objective=opd", "max_steps=30", "rollout.prompts_per_step=4",
                                "rollout.max_new_tokens=16", "optim.minibatch_size=8", "optim.micro_batch_size=8",
                                "optim.lr=1e-2", "save_every=0"))
    prompts = encode_prompts(c.tokenizer, [p.prompt for p in c.task.problems("test")[:16]], chat_template=False)
    before = _exact_reverse_kl(c.student, c.teacher_model, prompts, c.tokenizer, c.vocab_size)
    history = run(c)
    after = _exact_reverse_kl(c.student, c.teacher_model, prompts, c.tokenizer, c.vocab_size)
    assert after < 0.8 * before, (before, after)  # measured: 3.37 -> 1.79
    first, last = (sum(h["loss"] for h in part) / 5 for part in (history[:5], history[-5:]))
    assert last < first, (first, last)


def test_fused_loss_reads_the_adapted_model_like_the_plain_one(tiny_models, tmp_path):
    """The fused path (decoder body via ``get_decoder()`` + ``get_output_embeddings()``) gives the plain path's
    losses through a PeftModel, so it sees the adapters."""
    steps = {}
    for impl in ("fused", "plain"):
        c = build_components(cfg_of(tiny_models, tmp_path / impl, *LORA, *SMALL, f"loss_impl={impl}",
                                    "max_steps=3", "save_every=0", "optim.lr=3e-2"))
        steps[impl] = run(c)
    for f, p in zip(steps["fused"], steps["plain"], strict=True):
        for key in ("loss", "rkl", "fkl", "student_entropy", "grad_norm"):
            assert f[key] == pytest.approx(p[key], rel=1e-4, abs=1e-6), (key, f[key], p[key])


def _rollout(model: Any, tokenizer: Any, vocab_size: int, seed: int = 0) -> Rollout:
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in ("1+2+3+4=", "9+8+7+6=")]
    return sample(model, prompts, n=2, max_new_tokens=8, eos_token_ids=[tokenizer.eos_token_id],
                  pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(seed),
                  vocab_size=vocab_size)


def _perturb_adapters(model: Any) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_sampler_and_hidden_states_see_the_adapter(tiny_models, tmp_path):
    c = build_components(cfg_of(tiny_models, tmp_path, *LORA, *SMALL, "max_steps=1"))
    _perturb_adapters(c.student)
    merged = peft.PeftModel.from_pretrained(load_causal_lm(tiny_models["student"]), _saved(c.student, tmp_path))
    merged = merged.merge_and_unload()
    r = _rollout(c.student, c.tokenizer, c.vocab_size)
    r_merged = _rollout(merged, c.tokenizer, c.vocab_size)
    assert torch.equal(r.completion_ids_BT, r_merged.completion_ids_BT)
    torch.testing.assert_close(r.logp_old_BT, r_merged.logp_old_BT, rtol=1e-5, atol=1e-5)
    with c.student.disable_adapter():
        r_base = _rollout(c.student, c.tokenizer, c.vocab_size)
    assert (r_base.logp_old_BT - r.logp_old_BT).abs().max() > 1e-3
    with torch.no_grad():  # the fused path's hidden states and lm_head are the merged model's
        torch.testing.assert_close(completion_hidden_states(c.student, r), completion_hidden_states(merged, r),
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(c.student.get_output_embeddings().weight, merged.get_output_embeddings().weight)


def _saved(model: Any, tmp_path: Path) -> Path:
    folder = tmp_path / "adapter-copy"
    model.save_pretrained(folder)
    return folder


def test_ddp_wrapped_peft_model_forwards_and_trains_the_adapters(tiny_models, tmp_path):
    """Under several processes the loss calls the DDP wrapper (no ``get_decoder``), which must reach
    base + adapter and send gradients to the adapters only; one gloo process exercises that path."""
    import torch.distributed as dist
    from accelerate.utils import extract_model_from_parallel
    from torch.nn.parallel import DistributedDataParallel

    c = build_components(cfg_of(tiny_models, tmp_path / "run", *LORA, *SMALL, "max_steps=1"))
    _perturb_adapters(c.student)
    r = _rollout(c.student, c.tokenizer, c.vocab_size)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(c.student)
        assert extract_model_from_parallel(ddp) is c.student  # what accelerator.unwrap_model returns
        hidden_ddp = completion_hidden_states(ddp, r)
        hidden = completion_hidden_states(c.student, r)
        torch.testing.assert_close(hidden_ddp, hidden, rtol=1e-5, atol=1e-5)
        head = extract_model_from_parallel(ddp).get_output_embeddings()
        (hidden_ddp @ head.weight.T).logsumexp(-1).sum().backward()
    finally:
        dist.destroy_process_group()
    grads = {n: p.grad for n, p in c.student.named_parameters()}
    assert all(g is not None for n, g in grads.items() if "lora_" in n)
    assert all(g is None for n, g in grads.items() if "lora_" not in n)


def test_adapted_lm_head_is_refused_and_why(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match=r"^models.lora.target_modules: 'lm_head' is an embedding/lm_head"):
        cfg_of(tiny_models, tmp_path, "models.lora.target_modules=q_proj,lm_head")
    with pytest.raises(ConfigError, match=r"^models\.lora\.target_modules: 'embed_tokens'"):
        cfg_of(tiny_models, tmp_path, "models.lora.target_modules=embed_tokens")
    # why: peft's LoRA lm_head keeps .weight as the frozen base weight and adds B @ A in forward only, so the
    # fused loss (which reads .weight) would never see or train the adapter
    from eopd.training.lora import check_embeddings_not_adapted

    model = peft.get_peft_model(load_causal_lm(tiny_models["student"]),
                                peft.LoraConfig(r=4, target_modules=["lm_head"], task_type="CAUSAL_LM"))
    _perturb_adapters(model)
    head = model.get_output_embeddings()
    plain = load_causal_lm(tiny_models["student"])
    assert torch.equal(head.weight, plain.get_output_embeddings().weight)
    assert (logits_of(model, probe_ids()) - logits_of(plain, probe_ids())).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="adapts the lm_head"):
        check_embeddings_not_adapted(model)


def test_bad_lora_settings_stop_in_one_line(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match=r"^models.lora.r: must be > 0, got 0$"):
        cfg_of(tiny_models, tmp_path, "models.lora.r=0")
    with pytest.raises(ConfigError, match=r"^models.lora.dropout"):
        cfg_of(tiny_models, tmp_path, "models.lora.dropout=1.5")
    with pytest.raises(ConfigError) as err:
        build_components(cfg_of(tiny_models, tmp_path, "models.lora.target_modules=nope_proj"))
    assert str(err.value).startswith("models.lora.target_modules: ") and "nope_proj" in str(err.value)
    assert "\n" not in str(err.value)
    assert LoraSpec(target_modules="q_proj, v_proj").target_modules == ["q_proj", "v_proj"]
    assert LoraSpec().target_modules == "all-linear"


def test_resume_refuses_a_checkpoint_of_other_settings_and_leaves_it(tiny_models, tmp_path):
    train(cfg_of(tiny_models, tmp_path, *SMALL, "max_steps=1", "save_every=1"))  # full fine-tuning
    with pytest.raises(CheckpointMismatchError, match="holds a fully fine-tuned student but this run is LoRA"):
        build_components(cfg_of(tiny_models, tmp_path, *SMALL, *LORA, "max_steps=2", "resume=true"))
    lora_out = tmp_path / "lora"
    train(cfg_of(tiny_models, lora_out, *SMALL, *LORA, "max_steps=1", "save_every=1"))
    with pytest.raises(CheckpointMismatchError, match=r"has r=4 but models\.lora asks for 8"):
        build_components(cfg_of(tiny_models, lora_out, *SMALL, *LORA, "models.lora.r=8", "max_steps=2",
                                "resume=true"))
    with pytest.raises(CheckpointMismatchError, match="holds a LoRA adapter but this run is full fine-tuning"):
        build_components(cfg_of(tiny_models, lora_out, *SMALL, "max_steps=2", "resume=true"))
    # never set aside as damaged: the checkpoints are where they were
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]
    assert [p.name for p in list_checkpoints(lora_out)] == ["step_000001"]


def test_adapter_settings_are_compared_by_what_they_select(tiny_models, tmp_path):
    """peft saves all-linear as the list of module names it expanded to: that list, the string and the same
    modules spelled as suffixes are one selection; a genuinely different one is named in one line."""
    from eopd.training.lora import adapter_mismatch, apply_lora, save_adapter_folder

    every_linear = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    saved = {}
    for name, targets in (("default", "all-linear"), ("explicit", every_linear)):
        saved[name] = tmp_path / name
        save_adapter_folder(saved[name], apply_lora(load_causal_lm(tiny_models["student"]),
                                                    LoraSpec(r=4, target_modules=targets), seed=0), None)
    written = peft.LoraConfig.from_pretrained(str(saved["default"])).target_modules
    assert written != "all-linear" and "model.layers.1.self_attn.o_proj" in written  # what peft stores
    base = load_causal_lm(tiny_models["student"])
    for folder in saved.values():
        for targets in ("all-linear", every_linear):
            assert adapter_mismatch(folder, LoraSpec(r=4, target_modules=targets), base) is None, (folder, targets)
        why = adapter_mismatch(folder, LoraSpec(r=4, target_modules="q_proj,v_proj"), base)
        assert why is not None and "\n" not in why and "adapts 14 modules" in why and "selects 4" in why, why
        assert "model.layers.0.mlp.down_proj" in why  # names what only the adapter adapts


def test_fresh_adapters_follow_the_run_seed(tiny_models, tmp_path):
    def first_adapters(seed: int) -> dict[str, torch.Tensor]:
        c = build_components(cfg_of(tiny_models, tmp_path / str(seed), *LORA, *SMALL, f"seed={seed}"))
        return adapter_state(c.student)

    a, again, other = first_adapters(0), first_adapters(0), first_adapters(1)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert any(not torch.equal(a[k], other[k]) for k in a if "lora_A" in k)
    assert all(not v.any() for k, v in a.items() if "lora_B" in k)  # B starts at 0: the student starts as its base
