"""Collecting one on-policy batch: the student samples, the teacher scores, the objective weighs tokens.

    prompts --sample--> Rollout --teacher.score--> TeacherScores --> TokenBatch --prepare_weights--> TokenWeights

Everything here runs without gradient and is decided once per rollout, before any update: the PPO epochs
that follow see fixed teacher scores and fixed token weights (entropy gate, adaptive tau, random placement).

With ``loss.official_alignment`` (the public code's pipeline, ``eopd.losses.alignment``) the forward-KL term of
each token sits one position later, so the teacher also scores each row's position after its last token and
the loss's forward reads it: the rollout gets one more column (``with_room_after``), the teacher scores it with
that position added to its mask (``with_position_after``), and ``Batch.trimmed`` hands the update the same view.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from eopd.losses import (
    AdaptiveTau,
    ObjectiveConfig,
    TokenBatch,
    TokenWeights,
    fkl_mask_of,
    loss_positions,
    prepare_weights,
)
from eopd.sampling import Rollout, sample
from eopd.teachers import Teacher, TeacherScores, TeacherSet, TeacherUnavailableError, teacher_token_sums

Tensor = torch.Tensor
T = TypeVar("T")


@dataclass
class Batch:
    """One step's rollout with everything the loss needs, rows ``[B]`` leading."""

    rollout: Rollout
    scores: TeacherScores
    tokens: TokenBatch
    weights: TokenWeights
    seconds: dict[str, float] = field(default_factory=dict)
    token_sums: dict[str, float] = field(default_factory=dict)  # per-token diagnostics summed over valid tokens
    role_ids_BT: Tensor | None = None  # index into role_names per completion token, -1 where masked
    role_names: tuple[str, ...] = ()
    teacher_ids_BT: Tensor | None = None  # several teachers: index into teacher_names per token, -1 where masked
    teacher_names: tuple[str, ...] = ()
    # official_alignment: ``trimmed`` adds each row's position after its last token to the rollout's mask (the
    # loss's view; the trimmed batch has it, and this False). ``rollout`` itself keeps the real tokens' mask.
    position_after: bool = False

    def rows(self, r: Tensor) -> Batch:
        """The sub-batch of rows ``r`` (minibatches and micro-batches)."""
        return self._derived(self.rollout.select(r), self.scores.select(r), lambda x: x[r])

    def trimmed(self) -> Batch:
        """The same rows at their own width (``Rollout.trimmed``): every ``[B, T, ...]`` field cut to the
        longest valid completion of these rows (with ``position_after``: to the position after it, which the
        trimmed rollout's mask then holds too)."""
        rollout = (with_position_after(self.rollout) if self.position_after else self.rollout).trimmed()
        T = rollout.completion_ids_BT.shape[1]
        trimmed = self._derived(rollout, self.scores.select((slice(None), slice(0, T))), lambda x: x[:, :T])
        return dataclasses.replace(trimmed, position_after=False)

    def _derived(self, rollout: Rollout, scores: TeacherScores, pick: Callable[[Tensor], Tensor]) -> Batch:
        """A batch of ``rollout`` and ``scores`` whose per-token fields are ``pick`` of this one's."""
        return Batch(rollout, scores, self.tokens.map(pick), self.weights.map(pick), self.seconds,
                     role_ids_BT=None if self.role_ids_BT is None else pick(self.role_ids_BT),
                     role_names=self.role_names,
                     teacher_ids_BT=None if self.teacher_ids_BT is None else pick(self.teacher_ids_BT),
                     teacher_names=self.teacher_names, position_after=self.position_after)

    @property
    def num_rows(self) -> int:
        """Sequences in the batch."""
        return int(self.rollout.completion_ids_BT.shape[0])


def with_room_after(rollout: Rollout, pad_id: int) -> Rollout:
    """``rollout`` with one more completion column (``pad_id``, attention 0, old log-prob 0, mask 0): room for the
    position after a row whose tokens fill every column, whose input is that row's last token."""
    def grown(x: Tensor, value: float) -> Tensor:
        return torch.cat([x, torch.full_like(x[:, :1], value)], dim=1)

    return dataclasses.replace(
        rollout, sequences_BL=grown(rollout.sequences_BL, pad_id),
        attention_mask_BL=grown(rollout.attention_mask_BL, 0),
        completion_ids_BT=grown(rollout.completion_ids_BT, pad_id),
        completion_mask_BT=grown(rollout.completion_mask_BT, 0), logp_old_BT=grown(rollout.logp_old_BT, 0))


def with_position_after(rollout: Rollout) -> Rollout:
    """``rollout`` whose completion mask also holds each row's position after its last token (``with_room_after``
    made room for it): what the teacher scores and the loss's forward reads under ``official_alignment``."""
    mask_BT = rollout.completion_mask_BT
    return dataclasses.replace(rollout, completion_mask_BT=loss_positions(mask_BT).to(mask_BT.dtype))


def step_prompt_indices(num_problems: int, position: int, count: int, seed: int, rank: int, world: int) -> list[int]:
    """Global indices of one step's ``count`` prompts from data position ``position``; this process keeps every
    ``world``-th. The order is a fresh seeded permutation per pass over the data (epoch)."""
    idx = [epoch_order(num_problems, seed * 7_919 + pos // num_problems)[pos % num_problems]
           for pos in range(position, position + count)]
    return idx[rank::world]


@functools.lru_cache(maxsize=4)
def epoch_order(num_problems: int, epoch_seed: int) -> tuple[int, ...]:
    """One pass's prompt order (cached: a step reads one or two passes, and a permutation per prompt cost
    68 ms a step at 100,000 prompts, docs/performance.md)."""
    return tuple(torch.randperm(num_problems, generator=torch.Generator().manual_seed(epoch_seed)).tolist())


#: The role of every token of a row whose roles the task cannot tell (its ``token_roles`` raised ValueError).
UNASSIGNED = "unassigned"


def _row_roles(token_roles: Callable[[list[int]], Sequence[str]], ids: list[int]) -> list[str]:
    """One row's roles; ``UNASSIGNED`` for all of them when the task cannot tell (a diagnostic never stops a run:
    e.g. the arithmetic roles need one character per token and a sample may hold a multi-character token)."""
    try:
        return list(token_roles(ids))
    except ValueError:
        return [UNASSIGNED] * len(ids)


def token_role_ids(
    token_roles: Callable[[list[int]], Sequence[str]], completion_ids_BT: Tensor, mask_BT: Tensor
) -> tuple[Tensor, tuple[str, ...]]:
    """Each valid completion token's role as an index into the sorted role names seen (``UNASSIGNED`` for the
    tokens of rows whose roles the task cannot tell).

    Args:
        token_roles: A row's valid completion ids -> one role name per id (``functools.partial(task.token_roles,
            tokenizer)``).
        completion_ids_BT: ``[B, T]`` sampled ids.
        mask_BT: ``[B, T]`` 1 on valid tokens (a prefix of each row: up to and including the first EOS).

    Returns:
        ``(role_ids_BT, names)``: ``[B, T]`` int64 on the ids' device, -1 where masked; names sorted.
    """
    valid_BT = mask_BT.bool().cpu()
    rows = [[i for i, v in zip(ids, valid, strict=True) if v]
            for ids, valid in zip(completion_ids_BT.tolist(), valid_BT.tolist(), strict=True)]
    roles = [_row_roles(token_roles, ids) for ids in rows]
    for row_roles, ids in zip(roles, rows, strict=True):
        if len(row_roles) != len(ids):
            raise ValueError(f"token_roles gave {len(row_roles)} roles for {len(ids)} tokens; give one role per token")
    names = tuple(sorted({name for row_roles in roles for name in row_roles}))
    index = {name: i for i, name in enumerate(names)}
    role_ids_BT = torch.full(valid_BT.shape, -1, dtype=torch.long)
    # the valid positions in row-major order are the rows' valid ids one row after another
    role_ids_BT[valid_BT] = torch.tensor([index[r] for row_roles in roles for r in row_roles], dtype=torch.long)
    return role_ids_BT.to(completion_ids_BT.device), names


def make_token_batch(rollout: Rollout, scores: TeacherScores) -> TokenBatch:
    """The objective's per-position inputs for a rollout and its teacher scores (``[B, T]`` leading)."""
    return TokenBatch(
        tokens=rollout.completion_ids_BT, mask=rollout.completion_mask_BT, logp_old=rollout.logp_old_BT,
        teacher_logp=scores.logp_BT, teacher_entropy=scores.entropy_BT, teacher_topk_ids=scores.topk_ids_BTK,
        teacher_topk_logprobs=scores.topk_logprobs_BTK, teacher_logits=scores.logits_BTV,
    )


def score_together(score: Callable[[], T], *, agree: Callable[[str | None], str | None]) -> T:
    """``score()`` (a teacher's scoring of the rollout); a ``TeacherUnavailableError`` on any process is raised on
    every process, with the message of the first that failed (``agree``: ``first_failure`` over the processes)."""
    try:
        scores, message = score(), None
    except TeacherUnavailableError as err:
        scores, message = None, str(err)
    failure = agree(message)
    if failure is not None:
        raise TeacherUnavailableError(failure)
    assert scores is not None
    return scores


def token_weights(
    obj: ObjectiveConfig,
    tokens: TokenBatch,
    *,
    adaptive: AdaptiveTau | None,
    generator: torch.Generator,
    gather_over_processes: Callable[[Tensor], Tensor] = lambda x: x,
) -> TokenWeights:
    """The per-token term weights. An adaptive tau is updated on the quantile of the whole step's teacher
    entropies: every process's valid ones, gathered (``gather_over_processes``: ``[n_r]`` -> ``[sum n_r]``
    in rank order), so it is the tau one process would compute on the same rows (a mean of per-process
    quantiles would not be) and every process gets the same."""
    tau = None
    if adaptive is not None:
        if tokens.teacher_entropy is None:
            raise ValueError("an adaptive tau needs the teacher's entropy")
        entropy_N = gather_over_processes(tokens.teacher_entropy[tokens.mask.bool()].float())
        tau = adaptive.update(entropy_N, torch.ones_like(entropy_N))
    return prepare_weights(obj, tokens, tau=tau, generator=generator)


def collect_batch(
    student: torch.nn.Module,
    teacher: Teacher | TeacherSet,
    prompt_ids: list[list[int]],
    *,
    obj: ObjectiveConfig,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: list[int],
    pad_id: int,
    vocab_size: int,
    sample_generator: torch.Generator,
    loss_generator: torch.Generator,
    adaptive: AdaptiveTau | None = None,
    fused: bool = True,
    gather_over_processes: Callable[[Tensor], Tensor] = lambda x: x,
    token_roles: Callable[[list[int]], Sequence[str]] | None = None,
    max_batch_size: int | None = None,
    whole_student: Callable[[], AbstractContextManager[None]] = nullcontext,
    compile: bool = False,
    agree_failure: Callable[[str | None], str | None] = lambda message: message,
    teacher_ids: list[int] | None = None,
) -> Batch:
    """Sample ``n`` completions per prompt with the student, score them with the teacher and weigh tokens.

    Exact full-vocabulary objectives also get the teacher's final hidden states (``fused``; the loss
    recomputes its logits chunk by chunk) or its ``[B, T, V]`` logits (plain path). With ``token_roles`` (a
    row's valid ids -> a role name per id) every token also gets its role (``token_role_ids``; its time is
    ``seconds["roles"]``). ``max_batch_size`` bounds the rows decoded at once and ``compile`` asks for the
    compiled decode step (``eopd.sampling.sample``).
    ``agree_failure`` (``first_failure`` over the processes) runs right after the teacher's scoring, before
    the adaptive tau's gather over processes: a teacher that fails on one process raises on all of them.
    With several teachers (a ``TeacherSet``) ``teacher_ids`` gives each prompt's teacher: each row is scored and
    gated by its own (``TeacherSet.score``, ``TeacherSet.weights``), and the batch carries every token's teacher.
    """
    t0 = time.perf_counter()
    was_training = student.training
    student.eval()
    try:
        with whole_student():  # FSDP: unsharded for the whole rollout, resharded before the teacher runs
            rollout = sample(student, prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, eos_token_ids=eos_ids, pad_token_id=pad_id, generator=sample_generator,
                             vocab_size=vocab_size, max_batch_size=max_batch_size, compile=compile)
    finally:
        student.train(was_training)
    t1 = time.perf_counter()
    if obj.official_alignment:  # the loss also reads each row's position after its last token
        rollout = with_room_after(rollout, pad_id)
    mask_BT = rollout.completion_mask_BT
    teacher_ids_BT, teacher_names = None, ()
    if isinstance(teacher, TeacherSet):  # several teachers: each row its own scores and gate
        if obj.official_alignment:
            raise ValueError("loss.official_alignment supports one teacher, not several")
        if teacher_ids is None or adaptive is not None:
            raise ValueError("several teachers need each prompt's teacher (teacher_ids) and a fixed tau")
        ids_B = torch.tensor(teacher_ids, device=rollout.prompt_index_B.device)[rollout.prompt_index_B]
        scores, per_teacher = score_together(lambda: teacher.score(rollout, ids_B), agree=agree_failure)
        tokens = make_token_batch(rollout, scores)
        weights = teacher.weights(tokens, ids_B, generator=loss_generator)
        token_sums = teacher.token_sums(scores, weights, mask_BT, ids_B, per_teacher)
        teacher_ids_BT = torch.where(mask_BT.bool(), ids_B.unsqueeze(1), -1)
        teacher_names = teacher.names
    else:
        exact = obj.needs_teacher_logits
        scored = with_position_after(rollout) if obj.official_alignment else rollout
        scores = score_together(lambda: teacher.score(scored, top_k=min(obj.top_k, vocab_size),
                                                      want_logits=exact and not fused, want_hidden=exact and fused),
                                agree=agree_failure)
        tokens = make_token_batch(rollout, scores)
        if obj.official_alignment:
            tokens = dataclasses.replace(tokens, fkl_mask=fkl_mask_of(tokens.mask))
        weights = token_weights(obj, tokens, adaptive=adaptive, generator=loss_generator,
                                gather_over_processes=gather_over_processes)
        token_sums = teacher_token_sums(scores, mask_BT, weights.tau)
    seconds = {"sample": t1 - t0, "teacher": time.perf_counter() - t1}
    role_ids_BT, role_names = None, ()
    if token_roles is not None:
        t2 = time.perf_counter()
        role_ids_BT, role_names = token_role_ids(token_roles, rollout.completion_ids_BT, rollout.completion_mask_BT)
        seconds["roles"] = time.perf_counter() - t2
    return Batch(rollout, scores, tokens, weights, seconds, token_sums, role_ids_BT, role_names, teacher_ids_BT,
                 teacher_names, position_after=obj.official_alignment)

