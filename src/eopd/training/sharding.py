"""How the student is spread over processes: DDP (each process holds it whole) or FSDP2 (each holds a shard).

Why one module: the loop asks the same few things whatever the strategy — run a function inside the model's
forward, accumulate gradients over micro-batches, clip on the global norm, hand the sampler a whole model, gather a
full state dict for the Hugging Face folder, save and load the optimizer — so collect, update and checkpoint
hold no ``if fsdp`` of their own: they call a ``Strategy``.

FSDP2 (``torch.distributed.fsdp.fully_shard``) is called directly rather than through accelerate's FSDP plugin,
which silently falls back to DDP on CPU and so could never be tested there; accelerate (or ``torchrun``) still
launches the processes. Each decoder layer is sharded, then the root (embeddings, final norm, lm_head); the
parameters stay float32 (the master weights the optimizer steps) and compute runs in ``models.dtype`` through
``MixedPrecisionPolicy`` (bfloat16 on GPU by default) with float32 gradient reduction. What FSDP2 needs that DDP
does not, each done here once:

- whatever reads the lm_head weight (the fused loss, the learner's log-probs) runs inside the root module's
  forward (``register_fsdp_forward_method``): outside it the weight is a shard, and a plain ``full_tensor()``
  would skip the gradient's cross-rank average;
- the root casts no forward input (``cast_forward_inputs=False``), so the teacher's float32 log-probs reach the
  loss as float32 under a bfloat16 policy;
- sampling unshards the student once (``whole``) and reshards after: no all-gather per layer per token, and no
  collective that a rank whose rows end earlier would leave the others waiting in;
- every rank runs the same number of forwards (each one all-gathers): ``same_count`` pads a rank's micro-batches to
  the longest rank's with zero-weight repeats;
- gradients accumulate unsharded over a minibatch's micro-batches and are reduce-scattered once, after the last
  (``parallel.reduce_every_micro_batch`` trades that memory for a reduce-scatter per micro-batch);
- checkpoints: the full student gathered to rank 0 as an ordinary HF folder (``final/`` and ``eopd eval`` need
  nothing new) and the sharded optimizer through ``torch.distributed.checkpoint`` (DCP), which reshards on load,
  so a run resumes at another process count.

HSDP (``parallel.shard_size`` < the process count): a 2-D mesh ``(replicas, shard_size)`` shards within each group of
``shard_size`` processes (a node) and replicates across groups, so parameters are gathered over the fast links only.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch

from eopd.config import ConfigError, TrainConfig
from eopd.training.trainer_state import check_sharded_folder, safe_sharded_reader

Tensor = torch.Tensor
#: The method registered on the FSDP root: ``model.eopd_run(fn, *args)`` calls ``fn(model, *args)`` inside its forward.
RUN_METHOD = "eopd_run"
#: A checkpoint's sharded optimizer folder (DCP files), beside ``model/`` and ``trainer.pt``.
OPTIMIZER_DIR = "optimizer"


class Strategy(Protocol):
    """What the loop asks of a way of spreading the student over processes (``DataParallel``, ``FullyShard``)."""

    name: str
    world: int

    def learner(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module itself (without a DDP wrapper): its train/eval mode, gradient checkpointing."""
        ...

    def reduce_sum(self, x: Tensor) -> Tensor:
        """Sum over processes (identity on one)."""
        ...

    def prepare(self, student: torch.nn.Module, optimizer_for: Callable[[torch.nn.Module], torch.optim.Optimizer]
                ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The model the loss runs through and its optimizer (built on the parameters it will step)."""
        ...

    def in_forward(self, model: torch.nn.Module, fn: Callable[..., Any], *args: Any, grad: bool = True,
                   **kwargs: Any) -> Any:
        """``fn(module, *args, **kwargs)`` inside ``model``'s forward (where the lm_head weight is whole)."""
        ...

    def accumulating(self, model: torch.nn.Module, last: bool) -> Any:
        """A context for one micro-batch's forward and backward; gradients are reduced after the ``last`` one."""
        ...

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()`` as the launcher wants it."""
        ...

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        """Clip the gradients to ``max_norm`` on their global norm; returns the norm before clipping."""
        ...

    def whole(self, model: torch.nn.Module) -> Any:
        """A context in which ``model`` holds whole weights (sampling, evaluation)."""
        ...

    def same_count(self, count: int) -> int:
        """The number of forwards every process runs when this one has ``count`` (a collective under FSDP)."""
        ...

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, Tensor] | None:
        """The whole student's state dict on the main process (all must call); None: the model's own."""
        ...

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The optimizer state ``trainer.pt`` holds, or None when it is saved apart (``save_optimizer``)."""
        ...

    def save_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        """Write the optimizer apart from ``trainer.pt`` into ``folder`` (all processes call; no-op for DDP)."""
        ...

    def load_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path,
                       state: dict[str, Any]) -> None:
        """Load the optimizer state of ``checkpoint`` (``trainer.pt``'s ``state`` or the folder beside it)."""
        ...

    def check_checkpoint(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Refuse a checkpoint this strategy cannot resume (``CheckpointMismatchError``, left where it is) or whose
        optimizer files are damaged (``CheckpointDamagedError``, set aside), before any model is touched."""
        ...


class DataParallel:
    """Every process holds the whole student; accelerate's DDP averages the gradients (the default).

    Args:
        accelerator: The run's ``accelerate.Accelerator`` (it launched the processes and wraps the model).
    """

    name = "ddp"

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.world = accelerator.num_processes

    def learner(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    def reduce_sum(self, x: Tensor) -> Tensor:
        return self.accelerator.reduce(x, reduction="sum") if self.world > 1 else x

    def prepare(self, student: torch.nn.Module, optimizer_for: Callable[[torch.nn.Module], torch.optim.Optimizer]
                ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        return self.accelerator.prepare(student, optimizer_for(student))

    def in_forward(self, model: torch.nn.Module, fn: Callable[..., Any], *args: Any, grad: bool = True,
                   **kwargs: Any) -> Any:
        """``fn(model)`` through the DDP wrapper when gradients flow (DDP's hooks see the forward), on the plain
        model without (no wrapper forward, which would keep every layer's hidden states)."""
        return fn(model if grad else self.accelerator.unwrap_model(model), *args, **kwargs)

    def accumulating(self, model: torch.nn.Module, last: bool) -> Any:
        return nullcontext() if last or self.accelerator.num_processes == 1 else self.accelerator.no_sync(model)

    def backward(self, loss: Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        return float(self.accelerator.clip_grad_norm_(model.parameters(), max_norm))

    def whole(self, model: torch.nn.Module) -> Any:
        return nullcontext()

    def same_count(self, count: int) -> int:
        return count  # DDP communicates once per minibatch, after the last backward, whatever the count

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, Tensor] | None:
        return None

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        return optimizer.state_dict()

    def save_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        return None

    def load_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path,
                       state: dict[str, Any]) -> None:
        self.check_checkpoint(checkpoint, state)
        optimizer.load_state_dict(state["optimizer"])

    def check_checkpoint(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """A checkpoint this strategy can resume: its optimizer in ``trainer.pt`` (written by DDP)."""
        from eopd.training.checkpoint import CheckpointMismatchError

        if state.get("optimizer") is None:
            raise CheckpointMismatchError(
                f"checkpoint {checkpoint.name} was written with parallel.strategy=fsdp (its optimizer is sharded in "
                f"{OPTIMIZER_DIR}/); resume it with parallel.strategy=fsdp")


class FullyShard:
    """FSDP2: each process holds a shard of the student's parameters, gradients and AdamW state (module docstring).

    Args:
        mesh: The device mesh: 1-D ``(world,)`` for FSDP, 2-D ``(replicas, shard_size)`` for HSDP.
        compute_dtype: The dtype forwards run in (``MixedPrecisionPolicy.param_dtype``); float32 turns mixed
            precision off.
        reduce_every_micro_batch: Reduce-scatter after every micro-batch instead of once per minibatch.
    """

    name = "fsdp"

    def __init__(self, mesh: Any, compute_dtype: torch.dtype, reduce_every_micro_batch: bool = False) -> None:
        self.mesh = mesh
        self.world = mesh.size()
        self.compute_dtype = compute_dtype
        self.reduce_every_micro_batch = reduce_every_micro_batch

    def learner(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def reduce_sum(self, x: Tensor) -> Tensor:
        import torch.distributed as dist

        if self.world == 1:
            return x
        y = x.to(_collective_device())
        dist.all_reduce(y)
        return y.to(x.device)

    def prepare(self, student: torch.nn.Module, optimizer_for: Callable[[torch.nn.Module], torch.optim.Optimizer]
                ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Shard every decoder layer, then the root; the optimizer is built on the sharded parameters."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mixed = self.compute_dtype != torch.float32
        policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype if mixed else None,
                                      reduce_dtype=torch.float32 if mixed else None)
        for layer in decoder_layers(student):
            fully_shard(layer, mesh=self.mesh, mp_policy=policy)
        root_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype,
                                           cast_forward_inputs=False)  # float32 loss inputs stay float32
        fully_shard(student, mesh=self.mesh, mp_policy=root_policy)
        student.eopd_run = types.MethodType(_run, student)  # type: ignore[attr-defined]
        register_fsdp_forward_method(student, RUN_METHOD)
        return student, optimizer_for(student)

    def in_forward(self, model: torch.nn.Module, fn: Callable[..., Any], *args: Any, grad: bool = True,
                   **kwargs: Any) -> Any:
        return getattr(model, RUN_METHOD)(fn, *args, **kwargs)

    @contextmanager
    def accumulating(self, model: torch.nn.Module, last: bool) -> Iterator[None]:
        model.set_requires_gradient_sync(last or self.reduce_every_micro_batch)  # type: ignore[operator]
        yield

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    @contextmanager
    def whole(self, model: torch.nn.Module) -> Iterator[None]:
        """Every FSDP module unsharded (one all-gather each) and kept so through any number of forwards."""
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        # each group's own setting, put back after (the root's is "keep", FSDP's heuristic; the layers' "reshard")
        groups = [m._get_fsdp_state()._fsdp_param_group for m in modules]
        kept = [g.post_forward_mesh_info if g is not None else None for g in groups]
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m, g, info in zip(modules, groups, kept, strict=True):
                m.reshard()
                if g is not None:
                    g.post_forward_mesh_info = info

    def same_count(self, count: int) -> int:
        import torch.distributed as dist

        n = torch.tensor([count], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        return int(n.item())

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        return None

    def save_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(folder))

    def load_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path,
                       state: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict


        self.check_checkpoint(checkpoint, state)
        template = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the sharded layout to fill
        dcp.load(template, storage_reader=safe_sharded_reader(checkpoint / OPTIMIZER_DIR))
        set_optimizer_state_dict(model, optimizer, template["optimizer"])

    def check_checkpoint(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """A checkpoint this strategy can resume: written by FSDP, its shards whole (``check_sharded_folder``)."""
        from eopd.training.checkpoint import CheckpointMismatchError

        folder = checkpoint / OPTIMIZER_DIR
        if state.get("optimizer") is not None or not folder.is_dir():
            raise CheckpointMismatchError(
                f"checkpoint {checkpoint.name} was written with parallel.strategy=ddp (no sharded {OPTIMIZER_DIR}/); "
                "resume it with parallel.strategy=ddp")
        check_sharded_folder(folder)


def _run(self: torch.nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Registered as the FSDP root's forward method ``RUN_METHOD``: FSDP's pre/post-forward hooks run around it."""
    return fn(self, *args, **kwargs)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a Hugging Face causal LM (its ``_no_split_modules`` classes: e.g. ``Qwen3DecoderLayer``).

    Raises:
        ConfigError: the model names none (FSDP would then shard it as one unit, saving nothing).
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"parallel.strategy=fsdp: {type(model).__name__} names no decoder layer class "
                          "(_no_split_modules) to shard; use parallel.strategy=ddp")
    return layers


def _collective_device() -> torch.device:
    """Where collective tensors live: the current GPU under NCCL, the CPU under gloo."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def check_strategy(cfg: TrainConfig, world: int) -> None:
    """Refuse, in one line each, what a strategy cannot honour with ``world`` processes.

    Raises:
        ConfigError: FSDP with a LoRA student, or a shard size that does not divide the process count.
    """
    p = cfg.parallel
    if p.strategy != "fsdp":
        return
    if cfg.models.lora is not None:
        raise ConfigError("parallel.strategy=fsdp: LoRA students (models.lora) are not sharded: their frozen base is "
                          "only read, so the memory FSDP saves is the base's alone, which a bfloat16 base saves more "
                          "simply; use parallel.strategy=ddp with models.lora, or full fine-tuning with fsdp")
    shard = p.shard_size or world
    if world % shard:
        raise ConfigError(f"parallel.shard_size: {shard} does not divide the number of processes ({world}); use a "
                          "divisor (the processes of one node, for HSDP) or leave it unset (shard over all)")


def build_strategy(cfg: TrainConfig, accelerator: Any, device: torch.device, compute_dtype: torch.dtype) -> Strategy:
    """The run's strategy (``parallel.strategy``); FSDP joins a process group of its own when run alone."""
    world = accelerator.num_processes
    check_strategy(cfg, world)
    if cfg.parallel.strategy == "ddp":
        return DataParallel(accelerator)
    from torch.distributed.device_mesh import init_device_mesh

    _ensure_process_group(device)
    shard = cfg.parallel.shard_size or world
    shape, names = ((world,), ("shard",)) if shard == world else ((world // shard, shard), ("replicate", "shard"))
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    return FullyShard(mesh, compute_dtype, cfg.parallel.reduce_every_micro_batch)


def close_process_group() -> None:
    """Close the process group, if any: what every program launched by ``torchrun`` does before it exits.

    Left to the interpreter's exit, gloo's threads can abort a process that finished its work ("terminate called
    without an active exception", SIGABRT), and ``torchrun`` then reports the whole run as failed.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _ensure_process_group(device: torch.device) -> None:
    """A one-process group when none was launched (FSDP2 needs one even alone; accelerate makes none then)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
