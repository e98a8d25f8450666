"""The supervised trainer: prompt masking, the loss, the shared schedule, determinism, a real tiny run, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import processors

import eopd.training.optim
import eopd.world.sft
from eopd.commands.sft import main
from eopd.config import ConfigError
from eopd.models.char_tokenizer import build_char_tokenizer
from eopd.models.loading import build_tiny_qwen3, load_causal_lm, load_tokenizer
from eopd.prompting import encode_prompts
from eopd.tasks.arithmetic import ArithmeticConfig, sample_traces
from eopd.training.optim import lr_curve
from eopd.world.sft import IGNORE_INDEX, SFTConfig, collate, completion_loss, encode_example, train_sft


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


def test_prompt_ids_are_the_ones_training_and_eval_use_even_with_a_bos() -> None:
    tok = build_char_tokenizer()
    bos = tok.convert_tokens_to_ids("<unk>")  # stands in for a BOS that this tokenizer adds to every text
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<unk> $A", special_tokens=[("<unk>", bos)])
    ids, labels = encode_example(tok, "1+2=", "1+2=3;3")
    prompt_ids = encode_prompts(tok, ["1+2="], chat_template=False)[0]
    assert prompt_ids[0] == bos
    assert ids[: len(prompt_ids)] == prompt_ids
    completion_ids = [*tok.encode("1+2=3;3", add_special_tokens=False), tok.eos_token_id]
    assert ids[len(prompt_ids):] == completion_ids  # no BOS inside the sequence
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids


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
    # the ids at padding positions cannot change the loss: their labels are ignored, so what a pad id
    # would "predict" or be predicted as never counts
    other_pad_BL = torch.where(mask_BL.bool(), ids_BL, torch.full_like(ids_BL, 7))
    assert not torch.equal(other_pad_BL, ids_BL)
    torch.testing.assert_close(completion_loss(model, other_pad_BL, mask_BL, labels_BL), loss)


def test_learning_rates_and_betas_come_from_eopd_optim(monkeypatch) -> None:
    tok = build_char_tokenizer()
    cfg = SFTConfig(steps=12, batch_size=2, lr=2e-3, warmup_steps=3, min_lr_ratio=0.1, beta1=0.8, beta2=0.95,
                    log_every=1)
    optimizers: list[torch.optim.Optimizer] = []

    def recording_build_optimizer(*args, **kwargs):
        optimizers.append(eopd.training.optim.build_optimizer(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(eopd.world.sft, "build_optimizer", recording_build_optimizer)
    lrs: list[float] = []
    train_sft(_tiny_model(len(tok)), tok, [("1+2=", "1+2=3;3"), ("2+2=", "2+2=4;4")], cfg,
              on_step=lambda s, loss, lr: lrs.append(lr))
    expected = [cfg.lr * f for f in lr_curve(cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert optimizers[0].param_groups[0]["betas"] == (0.8, 0.95)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"beta2": 1.0}, "beta1/beta2"),
        ({"steps": 10, "warmup_steps": 10}, "warmup_steps"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"num_threads": 0}, "num_threads"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=f"^{match}: "):
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


_SMALL = ["--steps", "5", "--batch-size", "4", "--hidden-size", "32", "--layers", "1", "--heads", "2",
          "--kv-heads", "1", "--intermediate-size", "64", "--threads", "1"]


def _traces(tmp_path: Path) -> Path:
    data = tmp_path / "traces.jsonl"
    rows = [{"prompt": f"{a}*{b}=", "completion": str(a * b)} for a in range(1, 6) for b in range(1, 6)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data


def test_cli_trains_any_jsonl_into_a_loadable_folder(tmp_path: Path) -> None:
    out = tmp_path / "model"
    assert main(["--data", str(_traces(tmp_path)), "--output-dir", str(out), *_SMALL]) == 0
    model = load_causal_lm(out)
    tok = load_tokenizer(out)
    assert tok.decode(tok.encode("3*4=12", add_special_tokens=False)) == "3*4=12"
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def _fails_in_one_line(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("eopd sft: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize(
    "bad_line",
    ['{"prompt": "2="}', '{"prompt": "2=", "completion": 4}', '["2=", "4"]', '{"prompt": "2=", "completion": "4"'],
)
def test_cli_names_a_malformed_jsonl_line(tmp_path: Path, capsys, bad_line: str) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1=", "completion": "1"}\n\n' + bad_line + "\n")
    code = main(["--data", str(data), "--output-dir", str(tmp_path / "m")])
    _fails_in_one_line(capsys, code, "bad.jsonl: line 3")
    assert not (tmp_path / "m").exists()


def test_cli_never_overwrites_an_existing_output_dir(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the output folder exists")

    monkeypatch.setattr("eopd.commands.sft.train_sft", no_training)
    code = main(["--data", str(_traces(tmp_path)), "--output-dir", str(out), *_SMALL])
    _fails_in_one_line(capsys, code, str(out), "exists already")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
