"""Answer extraction and grading for math: the last ``\\boxed{}`` of a completion against a gold answer.

Grading (``grade``) takes the last ``\\boxed{...}`` of a completion (nested braces, ``\\boxed 5``,
``\\fbox``) and compares it with the gold answer: plain numbers with a relative tolerance
(``numeric_literal``), everything else through math-verify's ``parse``/``verify`` under a timeout:
math-verify's own ``signal.alarm`` timeouts in the main thread, a wall-clock deadline on a helper thread in
any other thread (signals only reach the main thread). Kept apart from the benchmark loaders
(``tasks.benchmarks``) so graders and data can change independently.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
from collections.abc import Callable
from typing import Any

MAX_ANSWER_CHARS = 1000  # longer "answers" are graded wrong without parsing (regexes are not interruptible)
NUMERIC_REL_TOL = 1e-6  # plain-number answers: equal within this relative tolerance

logger = logging.getLogger(__name__)


def _balanced_group(text: str, open_at: int) -> str | None:
    """The contents of the ``{...}`` group whose ``{`` is at ``open_at`` (None when it never closes)."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif text[i] == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\framebox{...}``) in ``text``.

    Handles nested braces (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``) and the brace-less form
    ``\\boxed 5`` (the token up to the next whitespace or ``$``). A last box that never closes (a
    truncated completion) gives None rather than an earlier box: the model did not finish its answer.

    Args:
        text: A completion (or a reference solution).

    Returns:
        The stripped box content, or None when there is no (complete) box.
    """
    matches = list(re.finditer(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])", text))
    if not matches:
        return None
    end = matches[-1].end()
    rest = text[end:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        content = _balanced_group(text, end + len(rest) - len(stripped))
        return None if content is None else content.strip()
    if rest[:1].isspace() and stripped:
        token = re.match(r"[^\s$]+", stripped)
        return token.group(0).rstrip(".") if token else None
    return None


def _normalise_answer(answer: str) -> str:
    """Light normalisation before math-verify: dollars, ``1,000``-style thousands, ``4.5e33`` notation."""
    answer = answer.strip().replace("\\$", "").replace("$", "").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", answer):
        answer = answer.replace(",", "")
    sci = re.fullmatch(r"(-?\d+(?:\.\d*)?)[eE]([+-]?\d+)", answer)
    if sci:
        answer = f"{sci.group(1)} \\times 10^{{{int(sci.group(2))}}}"
    return answer


def numeric_literal(answer: str) -> float | None:
    """The value of a plain number answer (``-1.5``, ``2.88e-19``, ``4.5 \\times 10^{33}``, ``10^{-3}``).

    Such answers are compared with a relative tolerance instead of math-verify, whose fixed 6-decimal
    rounding would equate any two numbers below 5e-7 (Minerva's physical constants).
    """
    text = _normalise_answer(answer).replace(" ", "")
    num = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
    times = r"(?:\\times|\\cdot|\*)"
    if re.fullmatch(num, text):
        return float(text)
    m = re.fullmatch(rf"({num}){times}10\^\{{?([-+]?\d+)\}}?", text)
    if m:
        return float(m.group(1)) * 10.0 ** int(m.group(2))
    m = re.fullmatch(r"10\^\{?([-+]?\d+)\}?", text)
    return 10.0 ** int(m.group(1)) if m else None


@functools.lru_cache(maxsize=1)
def _extraction_config() -> tuple:
    """math-verify extraction targets: a LaTeX box first, then a plain expression."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def _parse(answer: str, timeout_s: int | None) -> list:
    """math-verify ``parse`` of one bare answer (wrapped in a box so the LaTeX extractor takes all of it)."""
    from math_verify import parse

    return parse(
        "\\boxed{" + _normalise_answer(answer) + "}",
        extraction_config=list(_extraction_config()),
        parsing_timeout=timeout_s,
    )


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout_s: int | None) -> tuple:
    """Parsed gold answers are cached: each gold is compared with ``n`` samples."""
    return tuple(_parse(gold, timeout_s))


def answers_match_unguarded(pred: str, gold: str, timeout_s: int | None = 5) -> bool:
    """Whether two bare answers are equivalent per math-verify (``timeout_s=None`` disables its alarms).

    Must run in a process's main thread unless ``timeout_s`` is None (math-verify uses ``signal.alarm``).
    """
    from math_verify import verify

    if len(pred) > MAX_ANSWER_CHARS:
        return False
    timeout_s = None if timeout_s is None else max(1, int(timeout_s))  # signal.alarm takes whole seconds
    gold_value, pred_value = numeric_literal(gold), numeric_literal(pred)
    if gold_value is not None and pred_value is not None:
        return math.isclose(gold_value, pred_value, rel_tol=NUMERIC_REL_TOL)
    gold_parsed = list(_parse_gold(gold, timeout_s))
    pred_parsed = _parse(pred, timeout_s)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))


def call_with_deadline(fn: Callable[..., Any], args: tuple, deadline_s: float, default: Any) -> Any:
    """Run ``fn(*args)`` in a daemon thread; ``default`` if it has not returned after ``deadline_s`` seconds.

    Used where signal-based timeouts cannot work (any thread but the main one). A call that overruns is
    abandoned, not killed: it finishes in the background (daemon threads never block interpreter exit),
    so one pathological answer costs CPU but cannot stall the run. Exceptions from ``fn`` propagate.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as err:  # handed to the caller below
            box["error"] = err

    worker = threading.Thread(target=target, name="eopd-grade", daemon=True)
    worker.start()
    worker.join(timeout=deadline_s)
    if worker.is_alive():
        logger.warning("grading took longer than %.1f s; counted as wrong: %.200r", deadline_s, args)
        return default
    if "error" in box:
        raise box["error"]
    return box["value"]


def answers_match(pred: str, gold: str, *, timeout_s: int = 5) -> bool:
    """Whether a predicted final answer equals the gold one, never taking much longer than the timeout.

    In the main thread math-verify's own per-parse / per-comparison alarms apply. In any other thread (where
    signals cannot be used) the check runs with math-verify's alarms off under a wall-clock deadline of
    ``4 * timeout_s`` seconds (two parses and a comparison), see ``call_with_deadline``.

    Args:
        pred: The model's bare final answer (e.g. a box's content).
        gold: The gold answer.
        timeout_s: Seconds allowed per math-verify step (>= 1).
    """
    if threading.current_thread() is threading.main_thread():
        return answers_match_unguarded(pred, gold, timeout_s)
    return bool(call_with_deadline(answers_match_unguarded, (pred, gold, None), 4.0 * timeout_s, False))


def grade(completion: str, gold: str, *, timeout_s: int = 5) -> bool:
    """Whether a completion's last ``\\boxed{}`` answer is mathematically equal to ``gold``.

    Args:
        completion: The model's full response text.
        gold: The gold answer (a bare LaTeX / number / text answer, e.g. ``"\\frac{1}{2}"``).
        timeout_s: Per-step math-verify timeout in seconds; a pathological answer is graded wrong.

    Returns:
        True when a box exists and math-verify finds it equivalent to the gold answer.
    """
    pred = extract_boxed(completion)
    if pred is None or not pred.strip():
        return False
    return answers_match(pred, gold, timeout_s=timeout_s)
