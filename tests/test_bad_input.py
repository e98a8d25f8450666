"""Bad input gives ONE line that names what is wrong and how to fix it, never a traceback, and loses nothing:
prompt files, rows, fields, Hub ids and the data config (raised as ``UserError``, printed by the command
line), a tokenizer without the chat template a config asks for, ``eopd eval`` sampling flags and model
folders, ``eopd sft --data``, every argument of every command, and an interrupted world build."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub.constants
import pytest

from eopd.cli import main as eopd_main
from eopd.commands.sft import main as sft_main
from eopd.config import ConfigError, DataConfig, from_dict
from eopd.errors import UserError
from eopd.models.char_tokenizer import build_char_tokenizer
from eopd.tasks import DataError, MissingDataError, build_task
from eopd.world import build as world
from eopd.world.build import WorldConfig, build_world

from .conftest import REPO
from .test_world import _tiny_world

TINY = str(REPO / "configs" / "tiny.yaml")


def _data(**fields: Any) -> DataConfig:
    return from_dict(DataConfig, fields, prefix="data.")


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _one_line_error(data: DataConfig) -> str:
    """Build the task and return its error message, checking the error is a one-line ``UserError``."""
    with pytest.raises(UserError) as info:
        build_task(data)
    message = str(info.value)
    assert "\n" not in message and message
    assert isinstance(info.value, DataError)
    return message


def test_missing_prompt_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    message = _one_line_error(_data(task="jsonl", path=str(missing)))
    assert str(missing) in message and "not found" in message
    with pytest.raises(MissingDataError, match="neither a registered name"):  # also a FileNotFoundError
        build_task(_data(task="math", path=str(missing))).problems("train")


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c",\n{"prompt": "d"}\n')
    message = _one_line_error(_data(task="jsonl", path=str(path)))
    assert f"{path}: line 4 is not valid JSON" in message


def test_a_line_that_is_not_an_object_is_named(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n[{"prompt": "b"}, {"prompt": "c"}]\n')
    assert f"{path}: line 2 is a JSON array, not an object" in _one_line_error(_data(task="jsonl", path=str(path)))


@pytest.mark.parametrize(("value", "kind"), [(5, "number"), (["a", "b"], "array")])
def test_prompt_field_that_is_not_text(tmp_path: Path, value: Any, kind: str) -> None:
    """The old reader turned a number or list into its str() and trained on it."""
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": "fine too"}, {"prompt": value}])
    message = _one_line_error(_data(task="jsonl", path=str(path)))
    assert f"{path}: row 3: field 'prompt' is a JSON {kind}" in message and "not text" in message


def test_missing_prompt_field_names_row_fields_and_key(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"question": "b", "id": 7}])
    message = _one_line_error(_data(task="jsonl", path=str(path)))
    assert f"{path}: row 2 has no field 'prompt' (its fields: id, question)" in message
    assert "data.prompt_field" in message


def test_missing_answer_field(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "gold": "1"}, {"prompt": "b"}])
    message = _one_line_error(_data(task="jsonl", path=str(path), answer_field="gold"))
    assert "row 2 has no field 'gold'" in message and "data.answer_field" in message


def test_unreachable_dataset_id_is_one_line_and_quick(monkeypatch: pytest.MonkeyPatch) -> None:
    # offline mode, as the environment variables HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 would set it, but after
    # import (the libraries read them once): without it an unreachable network retries for ~25 s
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    message = _one_line_error(_data(task="hf", path="nonexistent/x"))
    assert time.monotonic() - start < 10
    assert "hf:nonexistent/x[train]" in message
    assert "check the dataset id" in message and "network" in message and "local .jsonl" in message


def test_empty_file_and_bad_json_list(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert "the file is empty" in _one_line_error(_data(task="jsonl", path=str(empty)))
    as_json = tmp_path / "p.json"
    as_json.write_text('{"prompt": "a"}')
    assert "must hold a list of row objects" in _one_line_error(_data(task="jsonl", path=str(as_json)))


# ---------------------------------------------------------------------------------------------- DataConfig


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"task": "csv", "path": "x"}, r"data\.task: must be arithmetic, math, jsonl or hf, got 'csv'"),
        ({"task": "jsonl"}, r"data\.path: is required for task 'jsonl'"),
        ({"task": "jsonl", "path": "p.jsonl", "eval_fraction": 0}, r"data\.eval_fraction: must be in \(0, 1\)"),
        ({"task": "jsonl", "path": "p.jsonl", "eval_fraction": 1.5}, r"data\.eval_fraction: must be in \(0, 1\)"),
        ({"task": "jsonl", "path": "p.jsonl", "eval_fraction": 0.1, "eval_path": "e.jsonl"}, "not both"),
        ({"task": "math", "path": "gsm8k", "eval_path": " "}, r"data\.eval_path: is empty"),
        ({"eval_fraction": 0.1}, r"data\.eval_path: task arithmetic holds out its own test split"),
        ({"split": "validation"}, r"data\.split: must be train or test"),
        ({"chat_template_kwargs": {"enable_thinking": False}}, r"data\.chat_template_kwargs: only apply with"),
        ({"eval_fraction": "0.1"}, r"data\.eval_fraction"),
    ],
)
def test_data_config_rejects(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _data(**fields)


def test_data_config_accepts_the_new_keys() -> None:
    data = _data(task="math", path="hf:DigitalLearningGmbH/MATH-lighteval", eval_fraction=0.05, split_seed=2,
                 chat_template=True, chat_template_kwargs={"enable_thinking": False})
    assert (data.eval_fraction, data.split_seed, data.chat_template_kwargs) == (0.05, 2, {"enable_thinking": False})


def test_hold_out_that_leaves_a_side_empty(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}])
    message = _one_line_error(_data(task="jsonl", path=str(path), eval_fraction=0.1))
    assert "data.eval_fraction=0.1 of 2 distinct prompts leaves the eval split empty" in message


# ---------------------------------------------------------------------------------------- the commands


def test_train_with_a_chat_template_the_tokenizer_lacks(tiny_models, tmp_path: Path, capsys) -> None:
    args = ["train", TINY, f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
            f"output_dir={tmp_path / 'run'}", "data.chat_template=true", "tensorboard=false"]
    assert eopd_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("eopd train: ") and "has none" in err, err
    assert "data.chat_template=false" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("args", "flag", "says"),
    [
        (["--top-p", "0"], "--top-p", "(0, 1]"),
        (["--top-p", "1.5"], "--top-p", "(0, 1]"),
        (["--top-p", "-0.2"], "--top-p", "(0, 1]"),
        (["--temperature", "0"], "--temperature", "> 0"),
        (["--temperature", "-1"], "--temperature", "> 0"),
    ],
)
def test_eopd_eval_rejects_sampling_settings_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], flag: str, says: str
) -> None:
    assert eopd_main(["eval", "--model", str(tmp_path), "--benchmarks", "nothing.jsonl", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and says in err, err
    assert "Traceback" not in err


def test_eopd_eval_names_a_missing_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no" / "such-model"
    assert eopd_main(["eval", "--model", str(missing), "--benchmarks", "nothing.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--model folder {str(missing)!r} does not exist" in err, err
    assert eopd_main(["eval", "--model", "./relative-missing", "--benchmarks", "nothing.jsonl"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_reports_a_missing_data_file(tmp_path: Path, capsys) -> None:
    code = sft_main(["--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "missing.jsonl" in err and "not found" in err, err


# ------------------------------------------------------------------------- every command's own arguments
# (issue 17 item 11) Each row: a command line with one bad argument, and words its one line must hold. {file}
# is an existing file, {dir} an existing (empty) folder, {missing} a model folder that does not exist: the
# argument must be refused before anything loads, so no case reaches a model.

BAD_ARGUMENTS: list[tuple[list[str], list[str]]] = [
    # eopd serve-teacher
    (["serve-teacher", "{missing}", "--port", "70000"], ["--port", "0..65535", "70000"]),
    (["serve-teacher", "{missing}", "--port", "-1"], ["--port", "0..65535", "-1"]),
    (["serve-teacher", "{missing}", "--port", "http"], ["--port", "'http'"]),
    (["serve-teacher", "{missing}"], ["--port", "required"]),
    (["serve-teacher", "{missing}", "--port", "0", "--top-k-max", "0"], ["--top-k-max", ">= 1", "got 0"]),
    (["serve-teacher", "{missing}", "--port", "0", "--micro-batch-size", "0"], ["--micro-batch-size", ">= 1"]),
    (["serve-teacher", "{missing}", "--port", "0", "--num-threads", "-1"], ["--num-threads", ">= 1", "-1"]),
    (["serve-teacher", "{missing}", "--port", "0", "--max-request-mb", "0"], ["--max-request-mb", ">= 1"]),
    (["serve-teacher", "{missing}", "--port", "0", "--max-batch-tokens", "-3"], ["--max-batch-tokens", ">= 1"]),
    (["serve-teacher", "{missing}", "--port", "0", "--dtype", "float8"], ["--dtype", "'float8'", "bfloat16"]),
    (["serve-teacher", "{missing}", "--port", "0", "--device", "gpu"], ["--device", "cuda:N", "'gpu'"]),
    (["serve-teacher", "{missing}", "--port", "0", "--device", "cuda:99"], ["--device", "'cuda:99'", "GPU(s)"]),
    (["serve-teacher", "{missing}", "--port", "0", "--host", " "], ["--host", "must not be empty"]),
    (["serve-teacher", "{missing}", "--port", "0", "--served-model-name", ""], ["--served-model-name", "empty"]),
    (["serve-teacher", "{missing}", "--port", "0", "--host", "no-such-host.invalid"], ["--host", "does not resolve"]),
    (["serve-teacher", "{missing}", "--port", "0", "--host", "0.0.0.0"],
     ["0.0.0.0", "EOPD_TEACHER_API_KEY", "--allow-no-auth"]),
    (["serve-teacher", "{missing}", "--port", "0", "--api-key", ""], ["--api-key is empty"]),
    # eopd eval (sampling settings and model folders: the tests above)
    (["eval", "--model", "{dir}", "--device", "gpu"], ["--device", "'gpu'"]),
    (["eval", "--model", "{dir}", "--device", "cuda:99"], ["--device", "'cuda:99'", "GPU(s)"]),
    (["eval", "--model", "{dir}", "--dtype", "fp8"], ["--dtype", "'fp8'", "float16"]),
    (["eval", "--model", "{dir}", "--seed", "-1"], ["--seed", "-1"]),
    (["eval", "--model", "{dir}", "--seed", str(2**64)], ["--seed", str(2**64)]),
    (["eval", "--model", "{dir}", "--benchmarks", " , "], ["--benchmarks", "names no benchmark"]),
    (["eval", "--model", "{dir}", "--output-dir", "{file}"], ["--output-dir", "is a file"]),
    (["eval", "--model", "{dir}", "--output-dir", "{file}/results"], ["--output-dir", "is a file"]),
    (["eval", "--model", "{dir}", "--n", "0"], ["--n", ">= 1", "got 0"]),
    (["eval", "--model", "{dir}", "--limit", "-2"], ["--limit", ">= 1"]),
    (["eval", "--model", "{dir}", "--temperature", "inf"], ["--temperature", "finite"]),
    (["eval", "--compare", "{file}", "{file}", "--bootstrap", "0"], ["--bootstrap", ">= 1"]),
    (["eval", "--model", "{dir}", "--chat-template", "yes"], ["--chat-template", "'yes'"]),
    # eopd sft
    (["sft", "--data", "{file}", "--output-dir", "{dir}/m", "--steps", "0"], ["--steps", ">= 1", "got 0"]),
    (["sft", "--data", "{file}", "--output-dir", "{dir}/m", "--lr", "nan"], ["--lr", "> 0", "nan"]),
    (["sft", "--data", "{file}", "--output-dir", "{dir}/m", "--seed", "-1"], ["--seed", "-1"]),
    (["sft", "--data", "{file}", "--output-dir", "{dir}/m", "--threads", "0"], ["--threads", ">= 1"]),
    (["sft", "--data", "{file}", "--output-dir", "{dir}/m", "--hidden-size", "0"], ["--hidden-size", ">= 1"]),
    (["sft", "--data", "{file}", "--output-dir", "{dir}/m", "--layers", "0"], ["--layers", ">= 1"]),
    (["sft", "--data", "{file}", "--output-dir", "{dir}/m", "--heads", "0"], ["--heads", ">= 1"]),
    (["sft", "--data", "{file}", "--output-dir", "{dir}/m", "--intermediate-size", "-4"],
     ["--intermediate-size", ">= 1"]),
    (["sft", "--data", "{file}", "--output-dir", "{dir}/m", "--kv-heads", "3"], ["--kv-heads 3", "divide --heads 4"]),
    (["sft", "--data", "{file}", "--output-dir", "{dir}/m", "--hidden-size", "12"], ["--hidden-size 12", "even"]),
    (["sft", "--data", "{file}", "--output-dir", "{file}/m"], ["--output-dir", "is a file"]),
    # eopd world
    (["world", "--eval-problems", "-1"], ["--eval-problems", ">= 0", "-1"]),
    (["world", "--threads", "0"], ["--threads", ">= 1"]),
    (["world", "--role", "student", "--output-dir", "{dir}/s", "--seed", str(2**64)], ["--seed", str(2**64)]),
    (["world", "--role", "student", "--output-dir", "{dir}/s", "--lr", "-1"], ["--lr", "> 0", "-1"]),
    (["world", "--role", "student", "--output-dir", "{dir}/s", "--steps", "0"], ["--steps", ">= 1"]),
    (["world", "--role", "student", "--output-dir", "{file}/s"], ["--output-dir", "is a file"]),
    (["world", "--cache-dir", "{file}"], ["--cache-dir", "is a file"]),
    # eopd demo
    (["demo", "--output-dir", "{dir}/d", "--steps", "0"], ["--steps", ">= 1", "got 0"]),
    (["demo", "--output-dir", "{dir}/d", "--seeds", "-5"], ["--seeds", ">= 1", "-5"]),
    (["demo", "--output-dir", "{dir}/d", "--workers", "0"], ["--workers", ">= 1"]),
    (["demo", "--output-dir", "{dir}/d", "--objectives", ","], ["--objectives", "names no objective"]),
    (["demo", "--output-dir", "{file}"], ["--output-dir", "is a file"]),
    (["demo", "--output-dir", "{dir}/d", "--cache-dir", "{file}/c"], ["--cache-dir", "is a file"]),
    # eopd train (its config keys: tests/test_trainer.py)
    (["train", "--resume"], ["unrecognized arguments", "--resume"]),
    (["train", "{missing}.yaml"], ["not found"]),
]


@contextmanager
def _within(seconds: float) -> Iterator[None]:
    """Fail instead of hanging when a command starts working on a bad argument (a server, a build)."""
    def stop(signum: int, frame: Any) -> None:
        raise AssertionError(f"still running after {seconds} s: the argument was not refused")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(("argv", "words"), BAD_ARGUMENTS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_ARGUMENTS])
def test_every_command_refuses_a_bad_argument_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, argv: list[str], words: list[str]
) -> None:
    monkeypatch.delenv("EOPD_TEACHER_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # a default output folder (runs/...) would land here
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    places = {"{file}": str(tmp_path / "file"), "{dir}": str(tmp_path / "dir"), "{missing}": str(tmp_path / "no")}
    for placeholder, path in places.items():
        argv = [a.replace(placeholder, path) for a in argv]
    with _within(30):
        try:
            code = eopd_main(argv)
        except SystemExit as exit_:  # argparse's own errors exit
            code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and err and "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"eopd {argv[0]}: "), err
    for word in words:
        assert word in err, (word, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"] and not any((tmp_path / "dir").iterdir())


def test_an_interrupted_build_leaves_nothing_in_the_cache(tmp_path: Path, monkeypatch) -> None:
    cfg = _tiny_world()
    trained: list[str] = []

    def teacher_then_ctrl_c(cfg: WorldConfig, role: str, on_step=None):
        if trained:
            raise KeyboardInterrupt
        trained.append(role)
        tok = build_char_tokenizer()
        return world.new_model(cfg, role, tok), tok

    monkeypatch.setattr(world, "train_role", teacher_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        build_world(cfg, tmp_path)
    assert trained == ["teacher"]  # the teacher was written (into the temporary folder) before the interrupt
    assert list(tmp_path.iterdir()) == []  # no temporary folder, no partial world
