"""Generation backends for the evaluation: Hugging Face (our KV-cache sampler) and vLLM (optional).

Both turn prompt texts into ``n`` ``Generation`` records per prompt (text, length in tokens, whether it
ended with EOS, the model's mean token entropy on it and, when the task names token roles, the entropy
summed per role), so the grading and metrics never know which backend ran. Prompts are formatted and
tokenised identically for both (``eopd.prompting.encode_prompts``). Per-token values never leave a backend:
a completion carries only its per-role sums and counts.

Entropy: the HF backend computes the exact entropy of the temperature-scaled full-vocabulary
distribution at every completion position (an extra no-grad forward over the sampled sequences). vLLM
only returns the top-``k`` log-probs per position, so its entropy is the top-``k`` estimate that lumps the
remaining mass into one outcome: a lower bound on the true entropy, exact when the tail is negligible.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any, Protocol

import torch

from eopd.errors import UserError
from eopd.prompting import encode_prompts, eos_token_ids
from eopd.sampling import Rollout, completion_entropy_BT, decode_completions, sample

logger = logging.getLogger(__name__)

TokenRoles = Callable[[Sequence[int]], Sequence[str]]
"""The role of each token of a completion, ``[T]`` ids -> ``[T]`` role names (e.g. ``"choice"``)."""

RoleEntropy = dict[str, dict[str, float]]
"""Per role: ``{"sum": entropy summed over its tokens (nats), "tokens": how many}``."""


class BackendUnavailableError(UserError, RuntimeError):
    """A generation backend cannot run here (missing package or GPU); the message says what to install."""


@dataclass
class Generation:
    """One sampled completion.

    Attributes:
        text: The decoded completion (special tokens removed).
        num_tokens: Tokens generated, the final EOS included when there is one.
        finished: True when it ended with EOS, False when it hit ``max_new_tokens``.
        mean_entropy: Mean over its tokens of the model's next-token entropy (nats), None if unknown.
        role_entropy: Entropy summed per token role (see ``role_entropy``), None when no roles were asked.
    """

    text: str
    num_tokens: int
    finished: bool
    mean_entropy: float | None
    role_entropy: RoleEntropy | None = None


def role_entropy(roles: Sequence[str], entropies: Sequence[float]) -> RoleEntropy:
    """Entropy summed per token role.

    Args:
        roles: The role of each completion token, ``[T]``.
        entropies: The model's entropy (nats) at each of those tokens, ``[T]``.

    Returns:
        ``{role: {"sum": nats summed over the role's tokens, "tokens": their count}}`` (roles seen only).

    Raises:
        ValueError: the two sequences differ in length.
    """
    if len(roles) != len(entropies):
        raise ValueError(f"token_roles gave {len(roles)} roles for {len(entropies)} tokens; give one role per token")
    out: RoleEntropy = {}
    for role, h in zip(roles, entropies, strict=True):
        acc = out.setdefault(role, {"sum": 0.0, "tokens": 0})
        acc["sum"] += float(h)
        acc["tokens"] += 1
    return out


class GenerationBackend(Protocol):
    """What the evaluation needs from a backend."""

    name: str
    entropy_kind: str

    def generate(
        self, prompts: Sequence[str], n: int, token_roles: TokenRoles | None = None,
        indices: Sequence[int] | None = None,
    ) -> list[list[Generation]]:
        """``n`` completions for each prompt text, in prompt order; with ``token_roles``, each carries its
        entropy per role. ``indices``: each prompt's index in the whole evaluation (default its position),
        for a backend whose samples follow it (``HFBackend``)."""
        ...


def sampling_block(batch_size: int, n: int) -> int:
    """Prompts per block of ``HFBackend`` (``batch_size`` sequences, ``n`` per prompt): fixed blocks of this many
    consecutive prompt indices, the unit of the entropy forwards and of the work split over processes."""
    return max(1, batch_size // n)


#: Blocks sampled per ``sample`` call of ``HFBackend`` (continuous batching refills slots across their rows;
#: one progress line per call).
BLOCKS_PER_CALL = 8


def problem_uniforms(
    root: int, indices: Sequence[int], n: int, max_new_tokens: int, device: torch.device
) -> torch.Tensor:
    """Each problem's sampling uniforms, ``[len(indices) * n, max_new_tokens]``: problem ``i``'s ``n`` rows come
    from a generator of its own seeded ``root + i``, so its samples are a function of (seed, index) alone."""
    rows = [torch.rand((n, max_new_tokens), generator=torch.Generator(device=device).manual_seed(root + i),
                       device=device) for i in indices]
    return torch.cat(rows)


class HFBackend:
    """Sampling with ``eopd.sampling.sample`` (the training sampler's engine) on CPU or GPU.

    A prompt's samples must not depend on which other prompts a process evaluates (the trainer spreads its
    evaluation over processes), nor on the batch size. So problem ``i`` draws its uniforms from a generator of
    its own seeded by (a seed drawn from ``generator``, ``i``) (``problem_uniforms``), and the engine's draw is
    a function of a row's uniforms and its own logits: a problem's samples are a function of the seed and its
    index alone (up to the last bits of float arithmetic, which move a token only when a uniform falls within
    ~1e-7 of a cumulative-probability boundary). Rows are sampled ``BLOCKS_PER_CALL`` blocks of
    ``sampling_block`` prompts per call, ``batch_size`` rows at once with finished rows refilled; each block's
    entropy forward runs over that block's rows alone (trimmed to their width), so a process that evaluates
    whole blocks (``evaluation.evaluate_across_processes``) computes exactly what one process computes.

    Args:
        model: A causal LM (put in eval mode while generating, its mode restored afterwards).
        tokenizer: Its tokenizer (pad token set).
        temperature: Sampling temperature.
        top_p: Nucleus mass.
        max_new_tokens: Completion budget.
        batch_size: Sequences decoded at once (the engine's ``max_batch_size``; prompts per block =
            ``sampling_block(batch_size, n)``).
        generator: Randomness, on the model's device: each ``generate`` draws one seed from it, the root of
            its problems' generators.
        use_chat_template: Whether prompts go through the tokenizer's chat template.
        chat_template_kwargs: Extra arguments of the chat template (``{"enable_thinking": False}``).
        compile: Decode with the compiled step (``eopd.sampling.compiled``).
    """

    name = "hf"
    entropy_kind = "exact"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        batch_size: int,
        generator: torch.Generator,
        use_chat_template: bool,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.compile = compile
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.generator = generator
        self.use_chat_template = use_chat_template
        self.chat_template_kwargs = chat_template_kwargs
        self.eos_ids = eos_token_ids(tokenizer, model)

    def _sample_blocks(
        self, ids: list[list[int]], uniform_BT: torch.Tensor, n: int, blocks: list[list[int]],
        token_roles: TokenRoles | None,
    ) -> list[list[Generation]]:
        """Sample ``n`` completions for each prompt of some blocks (lists of positions in ``ids``) in one call
        and measure them block by block; one list of ``n`` per prompt, in the order of the blocks."""
        rollout = sample(
            self.model,
            [ids[i] for block in blocks for i in block],
            n=n,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            eos_token_ids=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            vocab_size=len(self.tokenizer),
            max_batch_size=self.batch_size,
            compile=self.compile,
            uniform_BT=uniform_BT,
        )
        out, first = [], 0
        for block in blocks:
            rows = slice(first * n, (first + len(block)) * n)
            out += self._measure(rollout.select(rows).trimmed(), n, token_roles)
            first += len(block)
        return out

    def _measure(self, rollout: Rollout, n: int, token_roles: TokenRoles | None) -> list[list[Generation]]:
        """One block's rollout as ``Generation`` records (text, length, EOS, entropy), ``n`` per prompt."""
        texts = decode_completions(self.tokenizer, rollout)
        entropy_BT = completion_entropy_BT(
            self.model, rollout, temperature=self.temperature, vocab_size=len(self.tokenizer)
        )
        lengths_B = rollout.lengths_B()
        mean_entropy_B = (entropy_BT.sum(1) / lengths_B.clamp(min=1)).tolist()
        is_eos_BT = torch.isin(rollout.completion_ids_BT, torch.tensor(self.eos_ids, device=lengths_B.device))
        finished_B = (is_eos_BT & (rollout.completion_mask_BT > 0)).any(1).tolist()
        lengths = [int(x) for x in lengths_B.tolist()]
        roles_B: list[RoleEntropy | None] = [None] * len(texts)
        if token_roles is not None:  # valid completion tokens are a prefix of each row
            ids_BT, ent_BT = rollout.completion_ids_BT.tolist(), entropy_BT.tolist()
            roles_B = [role_entropy(token_roles(ids_BT[b][:L]), ent_BT[b][:L]) for b, L in enumerate(lengths)]
        gens = [
            Generation(text=t, num_tokens=n_tok, finished=bool(f), mean_entropy=float(h), role_entropy=r)
            for t, n_tok, f, h, r in zip(texts, lengths, finished_B, mean_entropy_B, roles_B, strict=True)
        ]
        return [gens[i * n : (i + 1) * n] for i in range(len(texts) // n)]

    def generate(
        self, prompts: Sequence[str], n: int, token_roles: TokenRoles | None = None,
        indices: Sequence[int] | None = None,
    ) -> list[list[Generation]]:
        """``n`` completions per prompt, each prompt's from its own seeded stream (see the class docstring).

        Args:
            prompts: Prompt texts.
            n: Completions per prompt.
            token_roles: A completion's ids -> a role per id (entropy per role), or None.
            indices: Each prompt's index in the whole evaluation (default: its position here): the seed of
                its stream and its block.
        """
        ids = encode_prompts(self.tokenizer, prompts, chat_template=self.use_chat_template,
                             template_kwargs=self.chat_template_kwargs)
        indices = list(range(len(ids))) if indices is None else list(indices)
        if len(indices) != len(ids) or len(set(indices)) != len(indices):
            raise ValueError(f"indices must name each of the {len(ids)} prompts once, got {len(indices)} "
                             f"({len(set(indices))} distinct)")
        block = sampling_block(self.batch_size, n)
        blocks: dict[int, list[int]] = {}  # block number -> positions of its prompts, in index order
        for pos in sorted(range(len(ids)), key=indices.__getitem__):
            blocks.setdefault(indices[pos] // block, []).append(pos)
        ordered = [chunk for _, chunk in sorted(blocks.items())]
        device = self.generator.device
        root = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=device))
        out: list[list[Generation]] = [[] for _ in ids]
        was_training = self.model.training
        self.model.eval()
        try:
            for first in range(0, len(ordered), BLOCKS_PER_CALL):
                call = ordered[first : first + BLOCKS_PER_CALL]
                positions = [i for chunk in call for i in chunk]
                uniform_BT = problem_uniforms(root, [indices[i] for i in positions], n, self.max_new_tokens, device)
                for i, gens in zip(positions, self._sample_blocks(ids, uniform_BT, n, call, token_roles), strict=True):
                    out[i] = gens
                logger.info("generated %d/%d blocks of prompts", first + len(call), len(ordered))
        finally:
            self.model.train(was_training)
        return out


def topk_entropy(position_logprobs: Sequence[float]) -> float:
    """Entropy estimate from the top-k log-probs of one position: the missing mass counts as one outcome.

    A lower bound on the full-distribution entropy.
    """
    probs = [math.exp(lp) for lp in position_logprobs if lp > -math.inf]
    rest = max(0.0, 1.0 - sum(probs))
    return -sum(p * math.log(p) for p in probs if p > 0) - (rest * math.log(rest) if rest > 0 else 0.0)


def import_vllm() -> Any:
    """The ``vllm`` module, or a ``BackendUnavailableError`` saying what is missing."""
    try:
        import vllm
    except ImportError as err:
        raise BackendUnavailableError(
            "the vLLM backend needs vLLM and a CUDA GPU: pip install 'eopd[vllm]' on a GPU machine, or use --backend hf"
        ) from err
    if not torch.cuda.is_available():
        raise BackendUnavailableError("the vLLM backend needs a CUDA GPU (none is visible); use --backend hf")
    return vllm


class VLLMBackend:
    """Sampling with vLLM (``LLM.generate``) from a checkpoint path or Hub id; needs ``eopd[vllm]`` and a GPU.

    Args:
        model_path: What ``vllm.LLM(model=...)`` loads.
        tokenizer: The checkpoint's HF tokenizer (prompts are tokenised here, exactly as the HF backend does).
        temperature: Sampling temperature.
        top_p: Nucleus mass.
        max_new_tokens: Completion budget (``max_tokens``).
        seed: Engine seed.
        use_chat_template: Whether prompts go through the tokenizer's chat template.
        chat_template_kwargs: Extra arguments of the chat template (``{"enable_thinking": False}``).
        dtype: vLLM dtype (``"auto"``, ``"bfloat16"``, ...).
        top_logprobs: Log-probs returned per position for the entropy estimate.
        **llm_kwargs: Passed to ``vllm.LLM`` (``gpu_memory_utilization``, ``tensor_parallel_size``, ...).
    """

    name = "vllm"
    entropy_kind = "top20-lower-bound"

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        use_chat_template: bool,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        dtype: str = "auto",
        top_logprobs: int = 20,
        **llm_kwargs: Any,
    ) -> None:
        self.vllm = import_vllm()
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.use_chat_template = use_chat_template
        self.chat_template_kwargs = chat_template_kwargs
        self.top_logprobs = top_logprobs
        self.entropy_kind = f"top{top_logprobs}-lower-bound"
        self.llm = self.vllm.LLM(model=str(model_path), dtype=dtype, seed=seed, **llm_kwargs)

    def generate(
        self, prompts: Sequence[str], n: int, token_roles: TokenRoles | None = None,
        indices: Sequence[int] | None = None,
    ) -> list[list[Generation]]:
        """``n`` completions per prompt (vLLM schedules and batches internally, from its engine seed;
        ``indices`` are not used)."""
        params = self.vllm.SamplingParams(
            n=n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_new_tokens,
            logprobs=self.top_logprobs,
        )
        ids = encode_prompts(self.tokenizer, prompts, chat_template=self.use_chat_template,
                             template_kwargs=self.chat_template_kwargs)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params)
        return [[self._record(c, token_roles) for c in request.outputs] for request in outputs]

    @staticmethod
    def _record(completion: Any, token_roles: TokenRoles | None) -> Generation:
        """A vLLM ``CompletionOutput`` as a ``Generation`` (roles only when every token has its log-probs)."""
        positions = completion.logprobs or []
        entropies = [topk_entropy([lp.logprob for lp in pos.values()]) for pos in positions if pos]
        token_ids = list(completion.token_ids)
        roles = None
        if token_roles is not None and len(entropies) == len(token_ids):
            roles = role_entropy(token_roles(token_ids), entropies)
        return Generation(
            text=completion.text,
            num_tokens=len(token_ids),
            finished=completion.finish_reason == "stop",
            mean_entropy=sum(entropies) / len(entropies) if entropies else None,
            role_entropy=roles,
        )


def make_backend(
    kind: str,
    model: torch.nn.Module | str,
    tokenizer: Any,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    generator: torch.Generator | None,
    seed: int,
    use_chat_template: bool,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    compile: bool = False,
) -> GenerationBackend:
    """Build the ``"hf"`` backend (a loaded model; generator default: seeded on the model's device; ``compile``:
    its compiled decode step) or the ``"vllm"`` one (a checkpoint path or Hub id)."""
    if kind == "hf":
        if not isinstance(model, torch.nn.Module):
            raise TypeError("the hf backend needs a loaded model (eopd.models.loading.load_causal_lm), not a path")
        if generator is None:
            generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        return HFBackend(
            model,
            tokenizer,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            generator=generator,
            use_chat_template=use_chat_template,
            chat_template_kwargs=chat_template_kwargs,
            compile=compile,
        )
    if kind == "vllm":
        if not isinstance(model, (str, PathLike)):
            raise TypeError("the vllm backend loads the checkpoint itself: pass its path or Hub id, not a model")
        return VLLMBackend(
            str(model),
            tokenizer,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            use_chat_template=use_chat_template,
            chat_template_kwargs=chat_template_kwargs,
        )
    raise ValueError(f"backend must be 'hf' or 'vllm', got {kind!r}")
