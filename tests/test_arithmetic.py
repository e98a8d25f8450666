"""The multi-path arithmetic task: traces, path keys, token roles, grading, the fixed split, config validation."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from eopd.models.char_tokenizer import build_char_tokenizer
from eopd.tasks.arithmetic import (
    STYLES,
    ArithmeticConfig,
    ArithmeticTask,
    aligned_text,
    format_prompt,
    make_trace,
    order_choice_mask,
    parse_chain,
    parse_prompt,
    sample_traces,
    trace_for_order,
)
from eopd.tasks.base import Problem, Task


def _problem(terms: list[int]) -> Problem:
    """The problem ``ArithmeticTask`` writes for ``terms``."""
    return Problem(format_prompt(terms), format_prompt(terms), str(sum(terms)), {"terms": list(terms)})


def _check_trace(terms: list[int], trace: str) -> list[int]:
    """Assert ``trace`` is a correct chain over exactly ``terms``; return the consumed values."""
    values = parse_chain(trace)
    assert values is not None, trace
    assert sorted(values) == sorted(terms), (terms, trace)
    assert trace.endswith(f";{sum(terms)}")
    return values


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("rng_kind", ["random", "numpy"])
def test_every_style_writes_correct_arithmetic(style: str, rng_kind: str) -> None:
    rng = random.Random(0) if rng_kind == "random" else np.random.default_rng(0)
    sampler = random.Random(1)
    for num_terms in (2, 3, 4, 5):
        for _ in range(50):
            terms = [sampler.randint(0, 12) for _ in range(num_terms)]
            _check_trace(terms, make_trace(terms, style, rng))


def test_styles_follow_their_orders() -> None:
    terms = [7, 3, 9, 2]
    rng = random.Random(0)
    assert make_trace(terms, "as_written", rng) == "7+3=10,10+9=19,19+2=21;21"
    assert make_trace(terms, "right_to_left", rng) == "2+9=11,11+3=14,14+7=21;21"
    assert make_trace(terms, "largest_first", rng) == "9+7=16,16+3=19,19+2=21;21"
    assert make_trace(terms, "smallest_first", rng) == "2+3=5,5+7=12,12+9=21;21"


def test_random_style_covers_all_orders() -> None:
    rng = np.random.default_rng(0)
    problem = _problem([1, 2, 3, 4])
    keys = {ArithmeticTask().path_key(make_trace([1, 2, 3, 4], "random", rng), problem) for _ in range(2000)}
    assert len(keys) == 24


def test_path_key_distinguishes_orders_and_identifies_equal_ones() -> None:
    task = ArithmeticTask()
    terms = [7, 3, 5, 2]
    keys = {task.path_key(trace_for_order(terms, list(o)), _problem(terms)) for o in itertools.permutations(range(4))}
    assert len(keys) == 24
    assert task.path_key("7+3=10,10+5=15,15+2=17;17", _problem(terms)) == "7,3,5,2"
    assert task.reference_path(_problem(terms)) == "7,3,5,2"
    # swapping two equal terms is the same path
    twins = _problem([3, 3, 5, 2])
    assert task.path_key(trace_for_order([3, 3, 5, 2], [0, 1, 2, 3]), twins) == task.path_key(
        trace_for_order([3, 3, 5, 2], [1, 0, 2, 3]), twins
    )


def test_path_key_needs_a_faithful_solution_of_this_problem() -> None:
    task = ArithmeticTask()
    problem = _problem([7, 3, 5, 2])
    lucky = "7+4=11,11+4=15,15+2=17;17"  # a right chain and the right total, but two terms miscopied
    assert task.grade(lucky, problem.answer) and task.path_key(lucky, problem) is None
    assert task.path_key("7+3=10,10+7=17;17", problem) is None  # skips terms (and repeats one)
    other = "6+4=10,10+5=15,15+2=17;17"  # a faithful solution of 6+4+5+2, same total
    assert task.path_key(other, _problem([6, 4, 5, 2])) == "6,4,5,2" and task.path_key(other, problem) is None


def test_token_roles_mark_order_choices_and_keep_positions() -> None:
    task, tok = ArithmeticTask(), build_char_tokenizer()
    text = "7+3=10,10+5=15,15+2=17;17"
    ids = [*tok.encode(text, add_special_tokens=False), tok.eos_token_id]
    roles = task.token_roles(tok, ids)
    assert [i for i, r in enumerate(roles) if r == "choice"] == [0, 2, 10]  # '7', '3', '5'; '2' is forced
    assert len(roles) == len(ids) and roles[-1] == "arithmetic"  # EOS is arithmetic
    # a special token mid-way keeps its slot, so later roles stay aligned with their tokens
    with_pad = [*ids[:4], tok.pad_token_id, *ids[4:]]
    assert aligned_text(tok, with_pad)[:6] == "7+3=?1"
    assert [i for i, r in enumerate(task.token_roles(tok, with_pad)) if r == "choice"] == [0, 2, 11]


def test_token_roles_need_a_character_tokenizer() -> None:
    class WordPieces:
        all_special_ids = (0,)

        def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
            return ["7+", "3="][: len(ids)]

    with pytest.raises(ValueError, match="one token per character"):
        ArithmeticTask().token_roles(WordPieces(), [5, 6])


@pytest.mark.parametrize(
    "bad",
    [
        "7+3=11,11+5=16,16+2=18;18",  # wrong sum
        "7+3=10,11+5=16,16+2=18;18",  # restates the wrong running sum
        "7+3=10,10+5=15,15+2=17;18",  # answer differs from the chain
        "7+3=10,10+5=15,15+2=17",  # no answer
        "7+3=10,10+5=15,15+2=17;",  # empty answer
        "7+3=10,,15+2=17;17",
        "hello",
        "",
    ],
)
def test_path_key_is_none_for_malformed_chains(bad: str) -> None:
    assert ArithmeticTask().path_key(bad, _problem([7, 3, 5, 2])) is None


def test_grader_checks_the_final_answer() -> None:
    task = ArithmeticTask()
    assert task.grade("7+3=10,10+5=15,15+2=17;17", "17")
    assert task.grade("2+5=7,7+3=10,10+7=17;17", "17")
    assert not task.grade("7+3=10,10+5=15,15+2=17;18", "17")
    assert not task.grade("7+3=10,10+5=15,15+2=17", "17")
    assert not task.grade("7+3=10;1x", "17")
    assert not task.grade("", "17")


def test_order_choice_mask_marks_term_names_except_the_forced_last() -> None:
    text = "7+3=10,10+5=15,15+2=17;17"
    mask = order_choice_mask(text)
    assert len(mask) == len(text)
    marked = [i for i, m in enumerate(mask) if m]
    # '7' (first term), '3' (second term), '5' (third term); '2' is forced
    assert marked == [0, 2, 10]
    # before ';' is written the last term cannot be known to be last
    assert [i for i, m in enumerate(order_choice_mask("7+3=10,10+5")) if m] == [0, 2, 10]
    two_terms = order_choice_mask("7+3=10;10")
    assert [i for i, m in enumerate(two_terms) if m] == [0]


def test_split_is_fixed_disjoint_and_covers_all_prompts() -> None:
    cfg = ArithmeticConfig()
    train, test = ArithmeticTask(cfg).problems("train"), ArithmeticTask(cfg).problems("test")
    assert len(test) == cfg.test_size
    assert len(train) + len(test) == 9**4 == 6561
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    again = ArithmeticTask(ArithmeticConfig()).problems("test")
    assert [p.prompt for p in again] == [p.prompt for p in test]
    other = ArithmeticTask(ArithmeticConfig(split_seed=1)).problems("test")
    assert {p.prompt for p in other} != {p.prompt for p in test}
    for p in test[:20]:
        assert p.answer == str(sum(parse_prompt(p.prompt)))
        assert p.prompt == format_prompt(p.meta["terms"])


def test_task_satisfies_protocol_and_rejects_unknown_split() -> None:
    task = ArithmeticTask()
    assert isinstance(task, Task)
    with pytest.raises(ValueError, match="unknown split"):
        task.problems("validation")


def test_sample_traces_uses_train_only_and_follows_the_mixture() -> None:
    cfg = ArithmeticConfig()
    test_prompts = {p.prompt for p in ArithmeticTask(cfg).problems("test")}
    pairs = sample_traces(cfg, {"as_written": 1.0}, 500, seed=3)
    assert len(pairs) == 500
    for prompt, completion in pairs:
        assert prompt not in test_prompts
        terms = parse_prompt(prompt)
        assert _check_trace(terms, completion) == terms  # as written
    assert sample_traces(cfg, cfg.teacher_styles, 50, seed=4) == sample_traces(cfg, cfg.teacher_styles, 50, seed=4)
    mixed = sample_traces(cfg, {"as_written": 0.5, "right_to_left": 0.5}, 2000, seed=5)
    n_written = sum(ArithmeticTask(cfg).path_key(c, _problem(parse_prompt(p))) == ",".join(map(str, parse_prompt(p)))
                    for p, c in mixed)
    assert 800 < n_written < 1200


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_terms": 1}, "num_terms"),
        ({"min_digit": -1}, "min_digit"),
        ({"min_digit": 5, "max_digit": 4}, "max_digit"),
        ({"test_size": 0}, "test_size"),
        ({"test_size": 6561}, "test_size"),
        ({"teacher_styles": {}}, "teacher_styles is empty"),
        ({"teacher_styles": {"zigzag": 1.0}}, "unknown order style"),
        ({"student_styles": {"as_written": -1.0}}, "negative"),
        ({"student_styles": {"as_written": 0.0}}, "sum to 0"),
    ],
)
def test_config_validation_names_the_problem(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ArithmeticConfig(**kwargs)


def test_other_variants_need_no_code_change() -> None:
    cfg = ArithmeticConfig(num_terms=3, min_digit=10, max_digit=20, test_size=100)
    task = ArithmeticTask(cfg)
    assert len(task.problems("train")) + len(task.problems("test")) == 11**3
    prompt, completion = sample_traces(cfg, {"random": 1.0}, 1, seed=0)[0]
    terms = parse_prompt(prompt)
    assert len(terms) == 3 and all(10 <= t <= 20 for t in terms)
    _check_trace(terms, completion)
    assert task.grade(completion, str(sum(terms)))
