"""The embedded world: a tiny real teacher/student pair, the cache, the measurements, the config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from eopd.commands.world import main as world_cli
from eopd.config import ConfigError
from eopd.evaluation.results import pass_at_k
from eopd.folders import FolderExistsError
from eopd.models.char_tokenizer import build_char_tokenizer
from eopd.models.loading import load_causal_lm, load_tokenizer
from eopd.tasks.arithmetic import ArithmeticConfig, ArithmeticTask
from eopd.world import build as world
from eopd.world.build import (
    ModelSpec,
    WorldConfig,
    build_world,
    config_hash,
    default_cache_dir,
    measure,
    world_config_from_dict,
)
from eopd.world.sft import SFTConfig

# A three-term world small enough to train inside the test suite (~18 s on one thread), yet real: the
# teacher learns four order styles; it measured pass@1 0.805, 1.86 distinct correct paths out of 4 samples
# and entropy 0.72 vs 0.02 nats at choice vs arithmetic tokens (100 test prompts), so the bounds below
# leave room for platform differences in float rounding. The 60-step student measured pass@1 0.03.
TINY_TEACHER_PASS1 = 0.7


def _tiny_world() -> WorldConfig:
    return WorldConfig(
        task=ArithmeticConfig(num_terms=3, test_size=100),
        teacher=ModelSpec(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=128,
                          sft=SFTConfig(steps=800, batch_size=32, lr=5e-3, warmup_steps=20, num_threads=1,
                                        log_every=0)),
        student=ModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                          init_seed=10, data_seed=11,
                          sft=SFTConfig(steps=60, batch_size=32, lr=1e-2, warmup_steps=5, num_threads=1,
                                        log_every=0)),
        max_position_embeddings=64,
    )


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Sampling a tiny model is all small ops: one thread avoids OpenMP stalls on a busy 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built_world(tmp_path_factory) -> tuple[Path, tuple[Path, Path, Path], list[str]]:
    cache = tmp_path_factory.mktemp("world-cache")
    logs: list[str] = []
    paths = build_world(_tiny_world(), cache, log=logs.append)
    return cache, paths, logs


def test_build_writes_hf_folders_under_the_config_hash(built_world) -> None:
    cache, (teacher, student, tokenizer), logs = built_world
    cfg = _tiny_world()
    assert teacher.parent == student.parent == tokenizer.parent == cache / cfg.key()
    for folder in (teacher, student):
        assert {"config.json", "model.safetensors", "tokenizer.json", "eopd_world.json"} <= {
            p.name for p in folder.iterdir()}
        info = json.loads((folder / "eopd_world.json").read_text())
        assert info["hash"] == cfg.key() and "eopd world --role" in info["reproduce"]
        assert world_config_from_dict(info["world"]) == cfg  # the file reproduces the model's config
    assert AutoTokenizer.from_pretrained(tokenizer).encode("1+2=", add_special_tokens=False) == [4, 13, 5, 14]
    assert any("training the teacher" in line for line in logs)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    assert sum(p.numel() for p in load_causal_lm(student).parameters()) < sum(
        p.numel() for p in load_causal_lm(teacher).parameters())


def test_second_build_skips_training(built_world, monkeypatch) -> None:
    cache, paths, _ = built_world
    stamp = paths[0].joinpath("model.safetensors").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("build_world retrained a cached world")

    monkeypatch.setattr(world, "train_role", no_training)
    logs: list[str] = []
    assert build_world(_tiny_world(), cache, log=logs.append) == paths
    assert any("cached" in line for line in logs)
    assert paths[0].joinpath("model.safetensors").stat().st_mtime_ns == stamp
    # a different config is a different world: it would train (and here hits the patched trainer)
    other = _tiny_world()
    other.student.sft = SFTConfig(steps=61, batch_size=32, lr=1e-2, warmup_steps=5)
    with pytest.raises(AssertionError, match="retrained"):
        build_world(other, cache)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # the failed build cleaned up


def test_tiny_teacher_is_accurate_and_multi_path(built_world) -> None:
    _, (teacher_path, student_path, tok_path), _ = built_world
    task = ArithmeticTask(_tiny_world().task)
    tok = load_tokenizer(tok_path)
    stats = measure(load_causal_lm(teacher_path), tok, task, n_problems=100, n_samples=4,
                    generator=torch.Generator().manual_seed(0))
    assert set(stats) == {"pass@1", "pass@4", "faithful@1", "distinct_correct_paths", "reference_path_share",
                          "entropy_choice", "entropy_arithmetic", "n_problems", "n_samples"}
    assert stats["pass@1"] >= TINY_TEACHER_PASS1, stats
    assert stats["faithful@1"] <= stats["pass@1"], stats  # a path needs a correct answer
    assert stats["distinct_correct_paths"] > 1.5, stats  # several orders, not one
    # the teacher's traces are 40% as written (plus orders that coincide with it): about half, never all
    assert 0.25 < stats["reference_path_share"] < 0.75, stats
    assert stats["entropy_choice"] > 5 * stats["entropy_arithmetic"], stats
    base = measure(load_causal_lm(student_path), tok, task, n_problems=50, n_samples=4,
                   generator=torch.Generator().manual_seed(0))
    assert base["pass@1"] < stats["pass@1"], (base, stats)


def test_same_config_trains_the_same_weights() -> None:
    cfg = _tiny_world()
    cfg.student.sft = SFTConfig(steps=5, batch_size=8, warmup_steps=1, num_threads=1)
    torch.manual_seed(123)
    a, _ = world.train_role(cfg, "student")
    torch.manual_seed(456)  # the global RNG must not matter
    b, _ = world.train_role(cfg, "student")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_config_hash_ignores_threads_but_not_budgets() -> None:
    a, b, c = WorldConfig(), WorldConfig(), WorldConfig()
    b.teacher.sft.num_threads = 2
    c.teacher.sft.steps += 1
    assert config_hash(a) == config_hash(b) == a.key()
    assert config_hash(a) != config_hash(c)
    d = WorldConfig(task=ArithmeticConfig(teacher_styles={"random": 1.0}))
    assert config_hash(a) != config_hash(d)


def test_world_config_from_dict_overrides_only_named_keys() -> None:
    cfg = world_config_from_dict({"task": {"num_terms": 3, "test_size": 50},
                                  "teacher": {"sft": {"steps": 7, "warmup_steps": 1}}})
    default = WorldConfig()
    assert cfg.task.num_terms == 3 and cfg.task.teacher_styles == default.task.teacher_styles
    assert cfg.teacher.sft.steps == 7 and cfg.teacher.sft.batch_size == default.teacher.sft.batch_size
    assert cfg.teacher.hidden_size == default.teacher.hidden_size
    assert cfg.student == default.student
    assert world_config_from_dict(None) == default
    assert cfg.teacher.sft.beta2 == 0.98  # the world's own AdamW choice survives a partial sft section


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"teacher": {"hidden": 3}}, "unknown key 'world.teacher.hidden'; allowed under world.teacher: hidden_size"),
        ({"student": {"sft": {"epochs": 3}}}, "unknown key 'world.student.sft.epochs'"),
        ({"teacher": {"sft": {"steps": "many"}}}, "world.teacher.sft.steps: must be an integer, got 'many'"),
        ({"teacher": {"sft": {"steps": 0}}}, "world.teacher.sft.steps: must be >= 1, got 0"),
        ({"teacher": {"hidden_size": 90}}, "world.teacher.hidden_size: must be divisible by num_heads (4)"),
        ({"student": 5}, "world.student: must be a mapping of ModelSpec fields"),
        ({"task": {"num_terms": 1}}, "world.task: num_terms must be >= 2"),
        ({"max_position_embeddings": 16}, "world.max_position_embeddings: must hold the longest"),
    ],
)
def test_world_config_errors_are_one_config_error_line_naming_the_key(section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        world_config_from_dict(section)
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


def test_a_given_order_mixture_replaces_the_default_one() -> None:
    cfg = world_config_from_dict({"task": {"teacher_styles": {"random": 1.0}}})
    assert cfg.task.teacher_styles == {"random": 1.0}
    assert cfg.task.student_styles == WorldConfig().task.student_styles


def test_max_positions_must_fit_the_longest_sequence() -> None:
    with pytest.raises(ValueError, match="max_position_embeddings"):
        WorldConfig(max_position_embeddings=16)


def test_default_cache_dir_honours_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EOPD_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EOPD_CACHE")
    assert default_cache_dir() == Path("~/.cache/eopd/world").expanduser()


def test_pass_at_k_matches_the_definition() -> None:
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(8, 4, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - (2 / 4) * (1 / 3))


def test_default_sizes_match_the_documented_parameter_counts() -> None:
    cfg, tok = WorldConfig(), build_char_tokenizer()
    n_teacher = sum(p.numel() for p in world.new_model(cfg, "teacher", tok).parameters())
    n_student = sum(p.numel() for p in world.new_model(cfg, "student", tok).parameters())
    assert (n_teacher, n_student) == (334_224, 99_776)


def test_an_incomplete_world_folder_is_reported_not_trusted_or_overwritten(tmp_path: Path, monkeypatch) -> None:
    cfg = _tiny_world()
    folder = world.world_paths(cfg, tmp_path)[0].parent
    (folder / "teacher").mkdir(parents=True)
    monkeypatch.setattr(world, "train_role", lambda *a, **k: pytest.fail("trained over an incomplete world"))
    with pytest.raises(FolderExistsError, match="not a complete world"):
        build_world(cfg, tmp_path)
    assert [p.name for p in folder.iterdir()] == ["teacher"]


# ---------------------------------------------------------------------------------------------------------
# eopd world


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
    code = world_cli(["--role", "student", "--config", str(_tiny_world_yaml(tmp_path)), "--output-dir", str(out),
                      "--steps", "3", "--threads", "1", "--eval-problems", "3"])
    assert code == 0
    info = json.loads((out / "eopd_world.json").read_text())
    assert info["role"] == "student" and info["world"]["task"]["num_terms"] == 3
    assert info["world"]["student"]["hidden_size"] == 16
    assert load_causal_lm(out).config.hidden_size == 16
    printed = capsys.readouterr().out
    assert '"pass@1"' in printed and '"n_problems": 3' in printed


def test_cli_builds_both_into_the_cache_and_rejects_shared_budgets(tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    assert world_cli(["--config", str(_tiny_world_yaml(tmp_path)), "--cache-dir", str(cache), "--threads", "1",
                      "--eval-problems", "0"]) == 0
    paths = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(paths["teacher"]).parent.parent == cache
    assert (Path(paths["student"]) / "model.safetensors").exists()
    with pytest.raises(SystemExit):
        world_cli(["--steps", "10", "--cache-dir", str(cache)])
    assert "not --steps" in capsys.readouterr().err


def _fails_in_one_line(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("eopd world: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_cli_never_overwrites_an_existing_output_dir(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(world, "train_role", lambda *a, **k: pytest.fail("trained although the folder exists"))
    code = world_cli(["--role", "teacher", "--output-dir", str(out), "--eval-problems", "0"])
    _fails_in_one_line(capsys, code, str(out), "exists already")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("content", "needle"),
    [(None, "not found"), ("world: [1, 2", "not valid YAML"),
     ("world: {teacher: {hidden: 3}}", "world.teacher.hidden")],
)
def test_cli_reports_a_bad_config_in_one_line(tmp_path: Path, capsys, content: str | None, needle: str) -> None:
    path = tmp_path / "w.yaml"
    if content is not None:
        path.write_text(content)
    _fails_in_one_line(capsys, world_cli(["--config", str(path), "--cache-dir", str(tmp_path / "c")]), needle)
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------------------
# The registry of named worlds (configs/worlds/*.yaml)


def test_every_registered_world_is_a_valid_config_and_the_default_is_worldconfig() -> None:
    names = world.world_names()
    assert {"capability-gap", "multi-path"} <= set(names) and world.DEFAULT_WORLD in names
    for name in names:
        doc = world.world_document(name)
        assert doc["description"], name  # says what the world tests
        assert isinstance(world.named_world_config(name), WorldConfig)
    assert world.named_world_config("capability-gap") == WorldConfig()  # its cache key never moved


def test_multi_path_world_has_a_multi_path_base_student() -> None:
    cfg = world.named_world_config("multi-path")
    for styles in (cfg.task.teacher_styles, cfg.task.student_styles):
        assert sum(1 for w in styles.values() if w > 0) >= 2, styles  # several order styles, not one
    assert sum(1 for w in WorldConfig().task.student_styles.values() if w > 0) == 1  # the other world's has one
    assert cfg.key() != WorldConfig().key()


def test_an_unknown_world_is_one_line_naming_the_known_ones(capsys) -> None:
    with pytest.raises(ConfigError) as info:
        world.named_world_config("multipath")
    msg = str(info.value)
    assert "unknown world 'multipath'" in msg and "\n" not in msg
    assert all(name in msg for name in world.world_names())
    _fails_in_one_line(capsys, world_cli(["--world", "multipath"]), "unknown world 'multipath'", "multi-path")


def test_a_world_file_of_ones_own_is_checked_like_a_registered_one(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("description: three terms\nworld: {task: {num_terms: 3, test_size: 20}}\n")
    assert world.named_world_config(str(path)).task.num_terms == 3
    for content, message in [
        ("world: {}\nrecipe: {}\n", "mine.yaml: unknown key 'recipe'; a world file holds description"),
        ("world: {teacher: {hidden: 3}}\n", "mine.yaml: unknown key 'world.teacher.hidden'"),
        ("world: {}\ntrain: [1]\n", "mine.yaml: train: must be a mapping"),
    ]:
        path.write_text(content)
        with pytest.raises(ConfigError) as info:
            world.world_document(str(path))
        assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


def test_world_config_from_dict_changes_a_given_base() -> None:
    base = world.named_world_config("multi-path")
    cfg = world_config_from_dict({"teacher": {"hidden_size": 48}}, base=base)
    assert cfg.teacher.hidden_size == 48 and cfg.task == base.task and cfg.student == base.student
    assert world_config_from_dict({"task": {"student_styles": {"random": 1.0}}}, base=base).task.student_styles == {
        "random": 1.0}  # a mixture is still replaced whole, not merged into the base's


def test_cli_world_flag_picks_a_registered_world(tmp_path: Path, capsys, monkeypatch) -> None:
    built: list[WorldConfig] = []

    def fake_build(cfg: WorldConfig, cache_dir, log=None) -> tuple[Path, Path, Path]:
        built.append(cfg)
        return tmp_path / "t", tmp_path / "s", tmp_path / "k"

    monkeypatch.setattr(world, "build_world", fake_build)
    assert world_cli(["--world", "multi-path", "--eval-problems", "0", "--cache-dir", str(tmp_path)]) == 0
    assert built == [world.named_world_config("multi-path")]
    assert world_cli(["--world", "capability-gap", "--eval-problems", "0", "--cache-dir", str(tmp_path)]) == 0
    assert built[-1] == WorldConfig()
    assert world_cli(["--eval-problems", "0", "--cache-dir", str(tmp_path)]) == 0  # the default: the demo's
    assert built[-1] == world.named_world_config(world.DEFAULT_WORLD) == world.named_world_config("multi-path")
    # the demo config names its default world; --config reads that name too
    from eopd.world.demo import DEMO_CONFIG

    assert world_cli(["--config", str(DEMO_CONFIG), "--eval-problems", "0", "--cache-dir", str(tmp_path)]) == 0
    assert built[-1] == world.named_world_config("multi-path")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        world_cli(["--world", "multi-path", "--config", str(DEMO_CONFIG)])
    assert "not both" in capsys.readouterr().err
