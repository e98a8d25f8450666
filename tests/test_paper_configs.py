"""The paper's recipe as shipped in ``configs/paper/``: every config validates (no model is downloaded), what
a run of it does is the paper's recipe (a table written here from the paper, never read back from the
files), ``objective=opd`` gives the OPD baseline, the lines the paper does not fix are marked ``# ours``, and
the non-thinking chat template reaches the prompts."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from eopd.config import TrainConfig, load_config, to_dict
from eopd.models.math_tokenizer import EMPTY_THINK_BLOCK, train_math_bpe
from eopd.prompting import encode_prompts
from eopd.tasks import build_task
from eopd.tasks.benchmarks import PROMPT_SUFFIX
from eopd.tasks.sources import HubSource
from eopd.training.optim import lr_curve

from .conftest import REPO

PAPER = REPO / "configs" / "paper"
STUDENTS = {"qwen3-0.6b-base.yaml": "Qwen/Qwen3-0.6B-Base", "qwen3-1.7b-base.yaml": "Qwen/Qwen3-1.7B-Base",
            "qwen3-4b-base.yaml": "Qwen/Qwen3-4B-Base"}
RECIPES = [PAPER / name for name in STUDENTS]
#: EOPD's recipe as the paper states it (Jin et al., ICML 2026, arXiv 2603.07079, experimental set-up),
#: written from the paper: the test compares what a run of each recipe file does with this table.
PAPER_RECIPE: dict[str, Any] = {
    "teacher": "Qwen/Qwen3-8B",
    "teacher thinking": False,  # non-thinking mode: the chat template's enable_thinking=False
    "train problems": ("MATH", "train"),  # the MATH training set
    "learning rate": 3e-6,
    "learning-rate schedule": "cosine",  # from the peak down to 0 over the run
    "prompts per step": 128,
    "minibatch": 32,  # sequences per optimizer update (prompts: one sample each)
    "samples per prompt": 1,
    "max new tokens": 4096,
    "sampling temperature": 1.0,
    "sampling top-p": 1.0,
    "eval benchmarks": {"MATH500", "AMC23", "Minerva", "OlympiadBench", "AIME24", "AIME25"},
    "eval temperature": 1.0,
    "eval top-p": 0.8,
    "eval samples per problem": 8,
    "tau": 0.8,
    "alpha": 1.0,
    "top-k": 16,
}
#: Problems in each benchmark (their published sizes), to check that an evaluation reads all of them.
BENCHMARK_SIZES = {"MATH500": 500, "AMC23": 40, "Minerva": 272, "OlympiadBench": 675, "AIME24": 30, "AIME25": 30}
#: The Hub dataset that is MATH (Hendrycks et al.'s 7,500 training problems with their solutions).
MATH_ON_THE_HUB = "hf:DigitalLearningGmbH/MATH-lighteval"
# the settings the paper leaves open, each marked "# ours" on its line in the recipe files
OURS = {"output_dir", "seed", "max_steps", "save_every", "models.tokenizer", "models.dtype",
        "optim.micro_batch_size", "optim.ppo_epochs", "optim.grad_clip", "optim.weight_decay", "eval.every",
        "eval.problems"}


def test_every_shipped_config_validates() -> None:
    shipped = sorted(PAPER.glob("*.yaml"))
    assert [p.name for p in shipped] == sorted([*STUDENTS, "rehearsal.yaml"])
    for path in shipped:
        cfg = load_config(path)
        assert isinstance(cfg, TrainConfig) and cfg.objective_config().name == "eopd"


def lr_schedule(cfg: TrainConfig) -> str:
    """``cosine`` when the run's learning-rate multiplier before update ``u`` of ``U`` is
    ``(1 + cos(pi u / U)) / 2`` (no warmup, down to 0), else a description of the difference."""
    total = cfg.max_steps * cfg.optim.ppo_epochs * cfg.rollout.batch_size // cfg.optim.minibatch_size
    got = lr_curve(total, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
    cosine = [(1 + math.cos(math.pi * u / total)) / 2 for u in range(total)]
    worst = max(abs(a - b) for a, b in zip(got, cosine, strict=True))
    return "cosine" if worst < 1e-9 else f"not cosine to 0 (off by up to {worst:.3g})"


def recipe_as_run(cfg: TrainConfig) -> dict[str, Any]:
    """What a run of ``cfg`` does, in ``PAPER_RECIPE``'s terms."""
    d, r, e, obj = cfg.data, cfg.rollout, cfg.eval, cfg.objective_config()
    task = build_task(d)
    by_name = {b.casefold(): b for b in BENCHMARK_SIZES}  # the registered names are the paper's, lower-cased
    return {
        "teacher": cfg.models.teacher,
        "teacher thinking": d.chat_template_kwargs.get("enable_thinking", True) if d.chat_template else None,
        "train problems": ("MATH" if task.sources[d.split] == [MATH_ON_THE_HUB] else task.sources[d.split], d.split),
        "learning rate": cfg.optim.lr,
        "learning-rate schedule": lr_schedule(cfg),
        "prompts per step": r.prompts_per_step,
        "minibatch": cfg.optim.minibatch_size,
        "samples per prompt": r.n,
        "max new tokens": r.max_new_tokens,
        "sampling temperature": r.temperature,
        "sampling top-p": r.top_p,
        "eval benchmarks": {by_name.get(source, source) for source in task.sources[e.split]},
        "eval temperature": e.temperature,
        "eval top-p": e.top_p,
        "eval samples per problem": e.n,
        "tau": obj.tau,
        "alpha": obj.alpha,
        "top-k": obj.top_k,
    }


def departures(cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``PAPER_RECIPE`` entries the run does not follow: name -> (the paper's, the run's)."""
    run = recipe_as_run(cfg)
    return {k: (v, run[k]) for k, v in PAPER_RECIPE.items() if run[k] != v}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_the_papers(path: Path) -> None:
    cfg = load_config(path)
    assert departures(cfg) == {}
    assert cfg.models.student == STUDENTS[path.name]
    assert cfg.models.build_teacher is None and cfg.models.build_student is None  # real models, never built
    obj = cfg.objective_config()  # EOPD: the sampled reverse KL of OPD + alpha 1[H_T >= tau] top-k forward KL
    assert (obj.name, obj.rkl, obj.fkl, obj.weighting, obj.schedule, obj.placement, obj.adaptive_share) == (
        "eopd", "ppo", "topk", "additive", "step", "entropy", None)
    assert cfg.eval.every > 0 and cfg.eval.problems >= sum(BENCHMARK_SIZES.values())  # every problem of the six


@pytest.mark.parametrize(("override", "entry"), [
    ("models.teacher=Qwen/Qwen3-4B", "teacher"),
    ("data.chat_template_kwargs={enable_thinking: true}", "teacher thinking"),
    ("optim.lr=3e-5", "learning rate"),
    ("optim.warmup_steps=20", "learning-rate schedule"),
    ("optim.min_lr_ratio=0.1", "learning-rate schedule"),
    ("rollout.prompts_per_step=64", "prompts per step"),
    ("optim.minibatch_size=64", "minibatch"),
    ("rollout.max_new_tokens=2048", "max new tokens"),
    ("rollout.temperature=0.7", "sampling temperature"),
    ("rollout.n=2", "samples per prompt"),
    ("eval.top_p=1.0", "eval top-p"),
    ("eval.n=4", "eval samples per problem"),
    ("data.eval_path=math500", "eval benchmarks"),
    ("loss.tau=1.0", "tau"),
    ("loss.top_k=8", "top-k"),
])
def test_a_departure_from_the_paper_is_caught(override: str, entry: str) -> None:
    """The comparison above can fail: one changed setting is reported as that entry, and only it."""
    assert set(departures(load_config(RECIPES[0], [override]))) == {entry}


#: How each recipe spreads its student over 8 x 80 GB GPUs: DDP where docs/scaling.md's estimate fits one GPU
#: a whole student (0.6B), FSDP where it does not (1.7B at micro-batch 2: 82 GB; 4B: 157 GB, and 76 GB even
#: sharded unless gradients are reduced every micro-batch at micro-batch 1).
SPREAD = {"qwen3-0.6b-base": ("ddp", False, 2), "qwen3-1.7b-base": ("fsdp", False, 2),
          "qwen3-4b-base": ("fsdp", True, 1)}


def test_recipes_differ_only_in_the_student_and_how_it_is_spread() -> None:
    """The same recipe for the three students; what differs (``parallel``, ``optim.micro_batch_size``) is memory
    only: it leaves the gradient unchanged (tests/test_fsdp.py, tests/test_microbatch.py)."""
    def setting(path: Path) -> dict[str, Any]:
        cfg = to_dict(load_config(path))
        cfg["models"].pop("student")
        cfg.pop("output_dir")
        cfg.pop("parallel")
        cfg["optim"].pop("micro_batch_size")
        return cfg

    first, *rest = RECIPES
    assert all(setting(p) == setting(first) for p in rest)
    for path in RECIPES:
        cfg = load_config(path)
        spread = (cfg.parallel.strategy, cfg.parallel.reduce_every_micro_batch, cfg.optim.micro_batch_size)
        assert spread == SPREAD[path.stem], path.stem


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_opd_baseline_is_the_same_file_with_objective_opd(path: Path) -> None:
    eopd, opd = load_config(path), load_config(path, ["objective=opd"])
    obj = opd.objective_config()
    assert (obj.name, obj.rkl, obj.fkl, obj.divergence) == ("opd", "ppo", "none", None)  # no forward KL at all
    assert dataclasses.replace(opd, objective="eopd") == eopd  # nothing else changes


def _marked_lines(path: Path) -> dict[str, bool]:
    """Dotted key -> whether its line carries ``# ours`` (two-level YAML as written in the recipes)."""
    out, section = {}, ""
    for line in path.read_text().splitlines():
        body = line.split("#", 1)[0]
        if not body.strip() or ":" not in body:
            continue
        key = body.split(":", 1)[0].strip()
        if not line.startswith(" "):
            section = key if not body.split(":", 1)[1].strip() else ""
            out[key] = "# ours" in line
        else:
            out[f"{section}.{key}"] = "# ours" in line
    return out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_settings_the_paper_leaves_open_are_marked_ours(path: Path) -> None:
    marked = _marked_lines(path)
    spread = {k for k in marked if k.startswith("parallel.")}  # how the student is spread: ours wherever set
    assert {k for k, ours in marked.items() if ours} == OURS | spread


def test_marked_lines_parser_sees_sections_and_marks(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("seed: 0   # ours\nloss: {tau: 0.8}\noptim:\n  lr: 1.0   # the paper\n  grad_clip: 1  # ours\n")
    assert _marked_lines(f) == {"seed": True, "loss": False, "optim": False, "optim.lr": False,
                                "optim.grad_clip": True}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_non_thinking_kwargs_reach_the_chat_template(path: Path) -> None:
    """With the rehearsal's Qwen3-style template, the recipe's prompt is the thinking-mode prompt followed by
    exactly the empty think block."""
    cfg = load_config(path)
    tok = train_math_bpe(["What is $1+1$? Please reason step by step."] * 3, 300)
    text = "What is $2+2$?"
    (thinking,) = encode_prompts(tok, [text], chat_template=True)
    (recipe,) = encode_prompts(tok, [text], chat_template=cfg.data.chat_template,
                               template_kwargs=cfg.data.chat_template_kwargs)
    assert recipe[: len(thinking)] == thinking
    assert tok.decode(recipe[len(thinking):]) == EMPTY_THINK_BLOCK


def test_math_lighteval_train_split_gives_problems_with_boxed_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe's ``data.path`` is read as the Hub dataset's train split, its rows (``problem``, ``level``,
    ``solution``, ``type``) graded against the solution's last box. The Hub is replaced by two such rows."""
    asked: list[HubSource] = []
    rows = [{"problem": "Compute $1/2 + 0$.", "level": "Level 1", "type": "Algebra",
             "solution": "First $\\boxed{1}$ was wrong; it is $\\boxed{\\frac{1}{2}}$."},
            {"problem": "What is $3 \\cdot 3$?", "level": "Level 1", "type": "Prealgebra",
             "solution": "$3 \\cdot 3 = \\boxed{9}$."}]

    def fake_hub_rows(source: HubSource) -> list[tuple[int, dict[str, Any]]]:
        asked.append(source)
        return list(enumerate(rows, start=1))

    monkeypatch.setattr("eopd.tasks.benchmarks.read_hub_rows", fake_hub_rows)
    problems = build_task(load_config(RECIPES[0]).data).problems("train")
    assert [(s.dataset_id, s.config, s.split) for s in asked] == [("DigitalLearningGmbH/MATH-lighteval", None, "train")]
    assert [p.answer for p in problems] == ["\\frac{1}{2}", "9"]
    assert problems[0].prompt == f"Compute $1/2 + 0$.\n{PROMPT_SUFFIX}"
