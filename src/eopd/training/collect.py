"""Collecting one on-policy batch: the student samples, the teacher scores, the objective weighs tokens.

    prompts --sample--> Rollout --teacher.score--> TeacherScores --> TokenBatch --prepare_weights--> TokenWeights

Everything here runs without gradient and is decided once per rollout, before any update: the PPO epochs
that follow see fixed teacher scores and fixed token weights (entropy gate, adaptive tau, random placement).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from eopd.losses import AdaptiveTau, ObjectiveConfig, TokenBatch, TokenWeights, prepare_weights
from eopd.sampling import Rollout, sample
from eopd.teachers import Teacher, TeacherScores, TeacherUnavailableError, teacher_token_sums

Tensor = torch.Tensor


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

    def rows(self, r: Tensor) -> Batch:
        """The sub-batch of rows ``r`` (minibatches and micro-batches)."""
        return self._derived(self.rollout.select(r), self.scores.select(r), lambda x: x[r])

    def trimmed(self) -> Batch:
        """The same rows at their own width (``Rollout.trimmed``): every ``[B, T, ...]`` field cut to the
        longest valid completion of these rows."""
        rollout = self.rollout.trimmed()
        T = rollout.completion_ids_BT.shape[1]
        return self._derived(rollout, self.scores.select((slice(None), slice(0, T))), lambda x: x[:, :T])

    def _derived(self, rollout: Rollout, scores: TeacherScores, pick: Callable[[Tensor], Tensor]) -> Batch:
        """A batch of ``rollout`` and ``scores`` whose per-token fields are ``pick`` of this one's."""
        return Batch(rollout, scores, self.tokens.map(pick), self.weights.map(pick), self.seconds,
                     role_ids_BT=None if self.role_ids_BT is None else pick(self.role_ids_BT),
                     role_names=self.role_names)

    @property
    def num_rows(self) -> int:
        """Sequences in the batch."""
        return int(self.rollout.completion_ids_BT.shape[0])


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


def score_together(
    teacher: Teacher, rollout: Rollout, *, top_k: int, want_logits: bool, want_hidden: bool,
    agree: Callable[[str | None], str | None],
) -> TeacherScores:
    """``teacher.score(rollout)``; a ``TeacherUnavailableError`` on any process is raised on every process,
    with the message of the first that failed (``agree``: ``first_failure`` over the processes)."""
    try:
        scores, message = teacher.score(rollout, top_k=top_k, want_logits=want_logits, want_hidden=want_hidden), None
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
    teacher: Teacher,
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
    agree_failure: Callable[[str | None], str | None] = lambda message: message,
) -> Batch:
    """Sample ``n`` completions per prompt with the student, score them with the teacher and weigh tokens.

    Exact full-vocabulary objectives also get the teacher's final hidden states (``fused``; the loss
    recomputes its logits chunk by chunk) or its ``[B, T, V]`` logits (plain path). With ``token_roles`` (a
    row's valid ids -> a role name per id) every token also gets its role (``token_role_ids``; its time is
    ``seconds["roles"]``). ``max_batch_size`` bounds the rows generated at once (``rollout.sample``).
    ``agree_failure`` (``first_failure`` over the processes) runs right after the teacher's scoring, before
    the adaptive tau's gather over processes: a teacher that fails on one process raises on all of them.
    """
    t0 = time.perf_counter()
    was_training = student.training
    student.eval()
    try:
        rollout = sample(student, prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, eos_token_ids=eos_ids, pad_token_id=pad_id, generator=sample_generator,
                         vocab_size=vocab_size, max_batch_size=max_batch_size)
    finally:
        student.train(was_training)
    t1 = time.perf_counter()
    exact = obj.needs_teacher_logits
    scores = score_together(teacher, rollout, top_k=min(obj.top_k, vocab_size), want_logits=exact and not fused,
                            want_hidden=exact and fused, agree=agree_failure)
    tokens = make_token_batch(rollout, scores)
    weights = token_weights(obj, tokens, adaptive=adaptive, generator=loss_generator,
                            gather_over_processes=gather_over_processes)
    seconds = {"sample": t1 - t0, "teacher": time.perf_counter() - t1}
    role_ids_BT, role_names = None, ()
    if token_roles is not None:
        t2 = time.perf_counter()
        role_ids_BT, role_names = token_role_ids(token_roles, rollout.completion_ids_BT, rollout.completion_mask_BT)
        seconds["roles"] = time.perf_counter() - t2
    return Batch(rollout, scores, tokens, weights, seconds,
                 teacher_token_sums(scores, rollout.completion_mask_BT, weights.tau), role_ids_BT, role_names)

