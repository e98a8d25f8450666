"""The supervised trainer: prompt masking, the loss, the schedule, determinism, a real tiny run, the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eopd.models import build_tiny_qwen3, load_causal_lm, load_tokenizer
from eopd.sft import (
    IGNORE_INDEX,
    SFTConfig,
    cli,
    collate,
    completion_loss,
    encode_example,
    lr_factor,
    train_sft,
)
from eopd.tasks.arithmetic import ArithmeticConfig, sample_traces
from eopd.tokenizer import build_char_tokenizer


def _tiny_model(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    return build_tiny_qwen3(vocab_size, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                            intermediate_size=64, max_position_embeddings=64, seed=seed)


def test_encode_example_masks_the_prompt_and_learns_eos() -> None:
    tok = build_char_tokenizer()
    ids, labels = encode_example(tok, "1+2+3=", "1+2=3,3+3=6;6")
    assert len(ids) == len(labels) == 6 + 13 + 1
    assert labels[:6] == [IGNORE_INDEX] * 6
    assert labels[6:] == ids[6:]
    assert ids[-1] == tok.eos_token_id


def test_collate_keeps_eos_labels_when_pad_equals_eos() -> None:
    tok = build_char_tokenizer()
    short = encode_example(tok, "1+2=", "1+2=3;3")
    long_ = encode_example(tok, "1+2+3=", "1+2=3,3+3=6;6")
    ids_BL, mask_BL, labels_BL = collate([short, long_], pad_token_id=tok.eos_token_id)
    n = len(short[0])
    assert ids_BL.shape == labels_BL.shape == mask_BL.shape == (2, len(long_[0]))
    assert labels_BL[0, n - 1] == tok.eos_token_id  # the real EOS is learned
    assert (labels_BL[0, n:] == IGNORE_INDEX).all() and (mask_BL[0, n:] == 0).all()
    assert mask_BL[1].all()


def test_completion_loss_is_cross_entropy_on_completion_tokens_only() -> None:
    tok = build_char_tokenizer()
    model = _tiny_model(len(tok))
    encoded = [encode_example(tok, "1+2+3=", "3+2=5,5+1=6;6"), encode_example(tok, "9+9=", "9+9=18;18")]
    ids_BL, mask_BL, labels_BL = collate(encoded, tok.pad_token_id)
    loss = completion_loss(model, ids_BL, mask_BL, labels_BL)
    logits_BLV = model(input_ids=ids_BL, attention_mask=mask_BL).logits
    terms = []
    for b, (ids, labels) in enumerate(encoded):
        for t in range(1, len(ids)):
            if labels[t] != IGNORE_INDEX:
                terms.append(F.cross_entropy(logits_BLV[b, t - 1][None], torch.tensor([labels[t]])))
    assert len(terms) == 13 + 1 + 9 + 1
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    # changing the prompt tokens' labels cannot change the loss: they are ignored
    with pytest.raises(ValueError, match="no completion tokens"):
        completion_loss(model, ids_BL, mask_BL, torch.full_like(labels_BL, IGNORE_INDEX))


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = SFTConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) == pytest.approx(0.1)
    factors = [lr_factor(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(factors))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"steps": 10, "warmup_steps": 10}, "warmup_steps"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"num_threads": 0}, "num_threads"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SFTConfig(**kwargs)


def test_real_tiny_run_lowers_the_loss_and_is_reproducible() -> None:
    tok = build_char_tokenizer()
    task = ArithmeticConfig(num_terms=2, test_size=10)
    examples = sample_traces(task, {"as_written": 1.0}, 3000, seed=0)
    cfg = SFTConfig(steps=150, batch_size=32, lr=1e-2, warmup_steps=10, log_every=15, num_threads=1)

    def run(global_seed: int) -> tuple[list[float], dict[str, torch.Tensor]]:
        torch.manual_seed(global_seed)  # must not matter: the trainer uses its own generator
        losses: list[float] = []
        model = train_sft(_tiny_model(len(tok)), tok, examples, cfg, on_step=lambda s, loss, lr: losses.append(loss))
        return losses, model.state_dict()

    losses, state = run(1)
    assert len(losses) == 10
    assert losses[-1] < 0.25 * losses[0]
    assert losses[-1] < 0.4  # near-deterministic 2-term chains; the untrained model sits near ln(17) = 2.8
    losses2, state2 = run(2)
    assert losses2 == losses
    for k in state:
        torch.testing.assert_close(state[k], state2[k], rtol=0, atol=0)


def test_thread_setting_is_restored() -> None:
    tok = build_char_tokenizer()
    before = torch.get_num_threads()
    cfg = SFTConfig(steps=2, batch_size=2, warmup_steps=0, num_threads=1)
    train_sft(_tiny_model(len(tok)), tok, [("1+2=", "1+2=3;3")], cfg)
    assert torch.get_num_threads() == before


def test_cli_trains_any_jsonl_into_a_loadable_folder(tmp_path: Path) -> None:
    data = tmp_path / "traces.jsonl"
    rows = [{"prompt": f"{a}*{b}=", "completion": str(a * b)} for a in range(1, 6) for b in range(1, 6)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "model"
    code = cli(["--data", str(data), "--output-dir", str(out), "--steps", "5", "--batch-size", "4",
                "--hidden-size", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                "--intermediate-size", "64", "--threads", "1"])
    assert code == 0
    model = load_causal_lm(out)
    tok = load_tokenizer(out)
    assert tok.decode(tok.encode("3*4=12", add_special_tokens=False)) == "3*4=12"
    assert model.get_output_embeddings().weight.shape[0] == len(tok)


def test_cli_reports_a_bad_jsonl_line(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1=", "completion": "1"}\n{"prompt": "2="}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        cli(["--data", str(data), "--output-dir", str(tmp_path / "m")])


def _tiny_world_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "world.yaml"
    path.write_text(
        "world:\n"
        "  task: {num_terms: 3, test_size: 20}\n"
        "  teacher: {hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 64,\n"
        "            sft: {steps: 4, batch_size: 4, warmup_steps: 1}}\n"
        "  student: {hidden_size: 16, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 32,\n"
        "            sft: {steps: 3, batch_size: 4, warmup_steps: 1}}\n"
    )
    return path


def test_cli_role_trains_a_loadable_model_and_measures_it(tmp_path: Path, capsys) -> None:
    out = tmp_path / "student"
    code = cli(["--role", "student", "--world-config", str(_tiny_world_yaml(tmp_path)), "--output-dir", str(out),
                "--steps", "3", "--threads", "1", "--eval-problems", "3"])
    assert code == 0
    info = json.loads((out / "eopd_world.json").read_text())
    assert info["role"] == "student" and info["world"]["task"]["num_terms"] == 3
    assert info["world"]["student"]["hidden_size"] == 16
    assert load_causal_lm(out).config.hidden_size == 16
    printed = capsys.readouterr().out
    assert '"pass@1"' in printed and '"n_problems": 3' in printed


def test_cli_role_world_fills_the_cache_and_rejects_shared_budgets(tmp_path: Path, capsys) -> None:
    world_yaml = _tiny_world_yaml(tmp_path)
    cache = tmp_path / "cache"
    assert cli(["--role", "world", "--world-config", str(world_yaml), "--cache-dir", str(cache),
                "--threads", "1", "--eval-problems", "0"]) == 0
    paths = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(paths["teacher"]).parent.parent == cache
    assert (Path(paths["student"]) / "model.safetensors").exists()
    with pytest.raises(SystemExit):
        cli(["--role", "world", "--steps", "10", "--cache-dir", str(cache)])
    assert "not --steps" in capsys.readouterr().err
