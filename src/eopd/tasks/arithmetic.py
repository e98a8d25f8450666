"""Multi-path arithmetic: the embedded default task, whose reasoning has several valid paths.

Format (character level, no spaces)::

    prompt      7+3+5+2=
    completion  7+3=10,10+5=15,15+2=17;17

The completion adds the terms one at a time in an order of its choosing: the first step names two terms
(``x+y=s``), every later step restates the running sum and adds one more remaining term (``s+z=s'``),
steps are joined by ``,`` and ``;`` introduces the final answer. Any order of the terms is a valid path,
so the digits that *name a term* are genuine choices (high entropy for a teacher that learned several
orders) while every other character (sums, separators, the answer) is determined by what came before.

Path key (``ArithmeticTask.path_key``): the values in the order the completion consumed them, comma-joined,
e.g. ``"7,3,5,2"`` for the completion above (``"2,5,3,7"`` for right to left). Values rather than prompt
positions because equal terms are interchangeable (``3+3+5+2``: either ``3`` first is the same path). The
first pair keeps its written order (``7+3`` and ``3+7`` are different token choices). ``None`` unless the
completion is a faithful solution of its problem: a well-formed, arithmetically right chain (``parse_chain``)
over exactly the prompt's terms, so a chain that miscopies a term and lands on the right total by luck
names no path.

Token roles (``ArithmeticTask.token_roles``): ``"choice"`` for the tokens that name a term while >= 2 remain
(``order_choice_mask``), ``"arithmetic"`` for every other token (sums, separators, the answer, EOS). The
evaluation reports the model's entropy per role.

Order styles (how training traces pick an order): ``as_written`` (left to right), ``right_to_left``,
``largest_first`` / ``smallest_first`` (by value, ties in prompt order) and ``random`` (a uniform
permutation). The teacher's data mixes several styles; the base student's data uses one.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eopd.tasks.base import Problem

STYLES: tuple[str, ...] = ("as_written", "right_to_left", "largest_first", "smallest_first", "random")
CHOICE, ARITHMETIC = "choice", "arithmetic"  # token roles
_STEP_RE = re.compile(r"^(\d+)\+(\d+)=(\d+)$")


def _default_teacher_styles() -> dict[str, float]:
    return {"as_written": 0.40, "largest_first": 0.20, "right_to_left": 0.15, "random": 0.25}


def _default_student_styles() -> dict[str, float]:
    return {"as_written": 1.0}


def _check_mixture(name: str, mixture: Mapping[str, float]) -> None:
    if not mixture:
        raise ValueError(f"{name} is empty; give at least one order style with a positive weight, "
                         f"e.g. {{'as_written': 1.0}} (styles: {', '.join(STYLES)})")
    unknown = sorted(set(mixture) - set(STYLES))
    if unknown:
        raise ValueError(f"{name} names unknown order style(s) {unknown}; choose from {', '.join(STYLES)}")
    negative = {k: v for k, v in mixture.items() if not v >= 0}
    if negative:
        raise ValueError(f"{name} has negative or NaN weights {negative}; weights must be >= 0")
    if sum(mixture.values()) <= 0:
        raise ValueError(f"{name} weights sum to 0; give at least one style a positive weight")


@dataclass
class ArithmeticConfig:
    """Everything that defines an arithmetic world's task, so variants need no code change.

    Attributes:
        num_terms: Terms per prompt (>= 2). With ``n`` terms there are ``n!`` orders per prompt.
        min_digit: Smallest term value (>= 0).
        max_digit: Largest term value (>= ``min_digit``); values above 9 are written with several digits.
        test_size: Prompts held out for evaluation, never used for training (< the number of prompts).
        split_seed: Seed of the fixed train/test split; the same seed gives the same split on any machine.
        teacher_styles: Order style -> weight of the teacher's training traces (normalised; need not
            sum to 1). Default 40% as written, 20% largest first, 15% right to left, 25% random.
        student_styles: Order style -> weight of the base student's traces (default: as written only).
    """

    num_terms: int = 4
    min_digit: int = 1
    max_digit: int = 9
    test_size: int = 500
    split_seed: int = 0
    teacher_styles: dict[str, float] = field(default_factory=_default_teacher_styles)
    student_styles: dict[str, float] = field(default_factory=_default_student_styles)

    def __post_init__(self) -> None:
        if self.num_terms < 2:
            raise ValueError(f"num_terms must be >= 2 (a sum needs two terms), got {self.num_terms}")
        if self.min_digit < 0:
            raise ValueError(f"min_digit must be >= 0 (terms are non-negative integers), got {self.min_digit}")
        if self.max_digit < self.min_digit:
            raise ValueError(f"max_digit ({self.max_digit}) must be >= min_digit ({self.min_digit})")
        if not 0 < self.test_size < self.num_prompts:
            raise ValueError(f"test_size must be in [1, {self.num_prompts - 1}] for {self.num_terms} terms "
                             f"in {self.min_digit}..{self.max_digit} ({self.num_prompts} prompts); "
                             f"got {self.test_size}")
        _check_mixture("teacher_styles", self.teacher_styles)
        _check_mixture("student_styles", self.student_styles)

    @property
    def num_prompts(self) -> int:
        """All distinct prompts: ``(max_digit - min_digit + 1) ** num_terms``."""
        return (self.max_digit - self.min_digit + 1) ** self.num_terms


def format_prompt(terms: Sequence[int]) -> str:
    """``[7, 3, 5, 2]`` -> ``"7+3+5+2="``."""
    return "+".join(str(t) for t in terms) + "="


def parse_prompt(prompt: str) -> list[int]:
    """``"7+3+5+2="`` -> ``[7, 3, 5, 2]``.

    Raises:
        ValueError: the prompt is not ``t1+t2+...+tn=`` with non-negative integer terms.
    """
    if not re.fullmatch(r"\d+(\+\d+)+=", prompt):
        raise ValueError(f"not an arithmetic prompt: {prompt!r}; expected e.g. '7+3+5+2='")
    return [int(t) for t in prompt[:-1].split("+")]


def order_for_style(terms: Sequence[int], style: str, rng: random.Random | np.random.Generator) -> list[int]:
    """The order (a permutation of prompt positions) in which ``style`` adds ``terms``.

    Args:
        terms: The prompt's term values.
        style: One of ``STYLES``.
        rng: Used by ``random`` only; either a ``random.Random`` or a ``numpy`` ``Generator``.
    """
    idx = list(range(len(terms)))
    if style == "as_written":
        return idx
    if style == "right_to_left":
        return idx[::-1]
    if style == "largest_first":
        return sorted(idx, key=lambda i: -terms[i])  # stable sort: ties stay in prompt order
    if style == "smallest_first":
        return sorted(idx, key=lambda i: terms[i])
    if style == "random":
        if isinstance(rng, np.random.Generator):
            return [int(i) for i in rng.permutation(len(terms))]
        return rng.sample(idx, len(idx))
    raise ValueError(f"unknown order style {style!r}; choose from {', '.join(STYLES)}")


def trace_for_order(terms: Sequence[int], order: Sequence[int]) -> str:
    """The completion that adds ``terms`` in ``order`` (prompt positions), e.g. ``7+3=10,10+5=15;15``."""
    if sorted(order) != list(range(len(terms))):
        raise ValueError(f"order {list(order)} is not a permutation of positions 0..{len(terms) - 1}")
    values = [terms[i] for i in order]
    total = values[0] + values[1]
    steps = [f"{values[0]}+{values[1]}={total}"]
    for v in values[2:]:
        steps.append(f"{total}+{v}={total + v}")
        total += v
    return ",".join(steps) + f";{total}"


def make_trace(terms: Sequence[int], style: str, rng: random.Random | np.random.Generator) -> str:
    """A correct completion for ``terms`` following the order ``style`` (see ``order_for_style``)."""
    if len(terms) < 2:
        raise ValueError(f"need at least two terms, got {list(terms)}")
    return trace_for_order(terms, order_for_style(terms, style, rng))


def parse_chain(completion: str) -> list[int] | None:
    """The term values a completion consumed, in order, or None when it is not a well-formed chain.

    Well-formed: ``x+y=s(,s+z=s')*;a`` where each step's sum is arithmetically right, each later step
    starts from the previous sum, and the answer ``a`` equals the last sum. (The grader is laxer: it
    checks only the answer; this is for path keys, where a wrong chain names no path.)
    """
    body, sep, answer = completion.partition(";")
    if not sep or not answer.isdigit():
        return None
    values: list[int] = []
    running: int | None = None
    for k, step in enumerate(body.split(",")):
        m = _STEP_RE.match(step)
        if m is None:
            return None
        x, y, s = (int(g) for g in m.groups())
        if x + y != s or (k > 0 and x != running):
            return None
        values.extend([x, y] if k == 0 else [y])
        running = s
    return values if running == int(answer) else None


def order_choice_mask(completion: str) -> list[bool]:
    """Per character: True where the completion names a term that is a real choice among >= 2 left.

    Those are the characters that start a term (the first character of the completion and the one after
    each ``+``), except the term of the final step, which is forced (only one term remains). Everything
    else (sums, separators, the answer) is arithmetic: determined by what precedes it. Best-effort on
    malformed text (the final-step exclusion applies only once ``;`` has been written).
    """
    mask = [False] * len(completion)
    starts = [0] if completion else []
    starts += [i + 1 for i, c in enumerate(completion[:-1]) if c == "+"]
    if ";" in completion and starts:
        body_end = completion.index(";")
        in_body = [s for s in starts if s < body_end]
        if in_body:
            starts.remove(in_body[-1])
    for s in starts:
        mask[s] = True
    return mask


def aligned_text(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """One character per token: the token's own character, ``"?"`` for a special token (EOS, pad, unk).

    Lets per-character roles (``order_choice_mask``) index per-token values even when a sample emits
    special tokens mid-way (which ``decode(skip_special_tokens=True)`` would drop, shifting positions).

    Raises:
        ValueError: a token is longer than one character (not a character-level tokenizer).
    """
    special = set(tokenizer.all_special_ids)
    chars = []
    for i, piece in zip(token_ids, tokenizer.convert_ids_to_tokens(list(token_ids)), strict=True):
        if i in special:
            chars.append("?")
        elif len(piece) != 1:
            raise ValueError(f"arithmetic token roles need one token per character (a character tokenizer such as "
                             f"the embedded one); token {piece!r} spans {len(piece)}")
        else:
            chars.append(piece)
    return "".join(chars)


def final_answer(completion: str) -> str | None:
    """The text after the last ``;`` (stripped), or None when there is no ``;``."""
    if ";" not in completion:
        return None
    return completion.rsplit(";", 1)[1].strip()


class ArithmeticTask:
    """``Task`` for multi-path arithmetic (see the module docstring for the format and path key).

    The split is fixed by ``config.split_seed``: ``test_size`` prompts drawn without replacement from all
    ``num_prompts`` are the test split, the rest are train; both lists are in lexicographic term order.
    """

    name = "arithmetic"

    def __init__(self, config: ArithmeticConfig | None = None) -> None:
        self.config = config or ArithmeticConfig()
        self._splits: dict[str, list[Problem]] | None = None

    def _all_terms(self) -> list[tuple[int, ...]]:
        c = self.config
        return list(itertools.product(range(c.min_digit, c.max_digit + 1), repeat=c.num_terms))

    def _build_splits(self) -> dict[str, list[Problem]]:
        all_terms = self._all_terms()
        rng = np.random.default_rng(self.config.split_seed)
        test_idx = set(rng.choice(len(all_terms), size=self.config.test_size, replace=False).tolist())
        splits: dict[str, list[Problem]] = {"train": [], "test": []}
        for i, terms in enumerate(all_terms):
            prompt = format_prompt(terms)
            problem = Problem(id=prompt, prompt=prompt, answer=str(sum(terms)), meta={"terms": list(terms)})
            splits["test" if i in test_idx else "train"].append(problem)
        return splits

    def describe(self) -> str:
        """Where the prompts come from, for the run log."""
        c = self.config
        return (f"train: {c.num_prompts - c.test_size:,} arithmetic prompts ({c.num_terms} terms, digits "
                f"{c.min_digit}-{c.max_digit}); eval: {c.test_size} held out (split seed {c.split_seed})")

    def problems(self, split: str) -> list[Problem]:
        """Problems of ``"train"`` or ``"test"`` (a fresh list; the split itself is cached)."""
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; the arithmetic task has 'train' and 'test'")
        if self._splits is None:
            self._splits = self._build_splits()
        return list(self._splits[split])

    def grade(self, completion: str, answer: str) -> bool:
        """True when the final answer (after the last ``;``) equals ``answer`` as an integer."""
        got = final_answer(completion)
        return got is not None and got.isdigit() and int(got) == int(answer)

    def answer_of(self, completion: str) -> str | None:
        """The stated final answer (after the last ``;``), for counting distinct answers."""
        return final_answer(completion)

    def reference_path(self, problem: Problem) -> str:
        """The base student's path: the terms as written (the key ``path_key`` gives that order)."""
        return ",".join(str(t) for t in parse_prompt(problem.prompt))

    def path_key(self, completion: str, problem: Problem) -> str | None:
        """The consumed term values, comma-joined (``"7,3,5,2"``), when the completion is a correct chain over
        exactly the problem's terms; None otherwise (malformed or wrong chain, a term missing or miscopied)."""
        values = parse_chain(completion)
        if values is None or sorted(values) != sorted(parse_prompt(problem.prompt)):
            return None
        return ",".join(str(v) for v in values)

    def token_roles(self, tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
        """The role of each completion token, ``[T]``: ``"choice"`` where it names a term while >= 2 remain,
        ``"arithmetic"`` elsewhere (special tokens such as EOS included). Needs a character tokenizer."""
        return [CHOICE if m else ARITHMETIC for m in order_choice_mask(aligned_text(tokenizer, token_ids))]


def _normalised(mixture: Mapping[str, float]) -> tuple[list[str], list[float]]:
    styles = [s for s, w in mixture.items() if w > 0]
    total = sum(mixture[s] for s in styles)
    return styles, [mixture[s] / total for s in styles]


def sample_traces(
    config: ArithmeticConfig, styles_mixture: Mapping[str, float], n: int, seed: int
) -> list[tuple[str, str]]:
    """``n`` (prompt, completion) training pairs from the *train* split, styles drawn from the mixture.

    Prompts are drawn uniformly with replacement; each gets a style drawn from ``styles_mixture``
    (weights normalised) and the trace that style writes. Deterministic in ``seed``.

    Args:
        config: The task (its train split is the only source of prompts: the test split is never seen).
        styles_mixture: Order style -> weight, e.g. ``config.teacher_styles``.
        n: Number of pairs.
        seed: Seed of a local ``numpy`` generator.
    """
    _check_mixture("styles_mixture", styles_mixture)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    train = ArithmeticTask(config).problems("train")
    rng = np.random.default_rng(seed)
    styles, probs = _normalised(styles_mixture)
    problem_idx = rng.integers(0, len(train), size=n)
    style_idx = rng.choice(len(styles), size=n, p=probs)
    pairs = []
    for p_i, s_i in zip(problem_idx.tolist(), style_idx.tolist(), strict=True):
        problem = train[p_i]
        pairs.append((problem.prompt, make_trace(problem.meta["terms"], styles[s_i], rng)))
    return pairs
