"""The paper's recipe as shipped in ``configs/paper/``: every config validates (no model is downloaded), the
recipe values are the paper's, ``objective=opd`` gives the OPD baseline, the lines the paper does not fix
are marked ``# ours``, and the non-thinking chat template reaches the prompts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from eopd.config import TrainConfig, load_config, to_dict
from eopd.math_tokenizer import EMPTY_THINK_BLOCK, train_math_bpe
from eopd.prompting import encode_prompts
from eopd.tasks import build_task
from eopd.tasks.benchmarks import PROMPT_SUFFIX
from eopd.tasks.sources import HubSource

from .conftest import REPO

PAPER = REPO / "configs" / "paper"
STUDENTS = {"qwen3-0.6b-base.yaml": "Qwen/Qwen3-0.6B-Base", "qwen3-1.7b-base.yaml": "Qwen/Qwen3-1.7B-Base",
            "qwen3-4b-base.yaml": "Qwen/Qwen3-4B-Base"}
RECIPES = [PAPER / name for name in STUDENTS]
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


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_the_papers(path: Path) -> None:
    cfg = load_config(path)
    m, d, r, o, e = cfg.models, cfg.data, cfg.rollout, cfg.optim, cfg.eval
    assert (m.teacher, m.student) == ("Qwen/Qwen3-8B", STUDENTS[path.name])
    assert m.build_teacher is None and m.build_student is None  # real models, never built
    assert (d.task, d.path, d.eval_path) == ("math", "hf:DigitalLearningGmbH/MATH-lighteval", None)
    assert d.chat_template and d.chat_template_kwargs == {"enable_thinking": False}
    assert build_task(d).sources["test"] == ["math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench"]
    assert (r.prompts_per_step, r.n, r.max_new_tokens, r.temperature, r.top_p) == (128, 1, 4096, 1.0, 1.0)
    assert (o.lr, o.warmup_steps, o.min_lr_ratio, o.minibatch_size) == (3e-6, 0, 0.0, 32)
    obj = cfg.objective_config()
    assert (obj.name, obj.rkl, obj.fkl, obj.weighting, obj.schedule, obj.placement) == (
        "eopd", "ppo", "topk", "additive", "step", "entropy")
    assert (obj.tau, obj.alpha, obj.top_k, obj.adaptive_share) == (0.8, 1.0, 16, None)
    assert (e.n, e.temperature, e.top_p, e.max_new_tokens, e.split) == (8, 1.0, 0.8, 4096, "test")
    assert e.every > 0 and e.problems >= 500 + 30 + 30 + 40 + 272 + 675  # every problem of the six


def test_recipes_differ_only_in_the_student() -> None:
    def setting(path: Path) -> dict[str, Any]:
        cfg = to_dict(load_config(path))
        cfg["models"].pop("student")
        cfg.pop("output_dir")
        return cfg

    first, *rest = RECIPES
    assert all(setting(p) == setting(first) for p in rest)


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
    assert {k for k, ours in marked.items() if ours} == OURS


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
