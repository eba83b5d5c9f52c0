"""Processes and model placement: torchrun's environment, the collectives the trainer uses, and one strategy object
per way of spreading the model over processes (one process, DDP, FSDP2).

A :class:`Strategy` is the only place that knows how the model is wrapped: it places and wraps it, turns the
gradient all-reduce off for all but the last micro-batch of a step, gathers the full model and optimizer states
for checkpoints (optimizer states keyed by parameter names, so they load under any strategy and world size) and
loads optimizer states back. :func:`make_strategy` picks one from ``train.strategy`` and the world size.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import InputError


@dataclass
class DistEnv:
    """This process's place in the job, and the collectives over all of them (no-ops in a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over all processes, in place; returns it."""
        if self.distributed:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        """Destroy the process group if :func:`setup_distributed` started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK, pick the device and start the process group (nccl on CUDA,
    gloo on CPU) when there is more than one process."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    elif world > 1:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistEnv(rank, world, local, dev, owns)


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """``train.device`` (auto, cpu, cuda, cuda:N) → this process's device; a device this machine does not have is
    an :class:`InputError`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise InputError(f"config key 'train.device': {device!r} is not auto, cpu, cuda or cuda:N")
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise InputError(f"train.device={device} but this machine has no usable CUDA device; use train.device=cpu "
                         "or auto")
    dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
    if dev.index >= torch.cuda.device_count():
        raise InputError(f"train.device: there is no {dev} (this machine has {torch.cuda.device_count()} GPU(s))")
    return dev


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


class Strategy:
    """One process: the model is used as it is. Subclasses spread it over processes."""

    name = "single"

    def __init__(self, env: DistEnv):
        self.env = env
        self.model: nn.Module | None = None  # the plain model
        self.wrapped: nn.Module | None = None  # what the forward pass calls

    def place(self, model: nn.Module) -> nn.Module:
        """Move a freshly loaded model to this process's device."""
        return model.to(self.env.device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """Wrap the placed model for this strategy; returns the module to call."""
        self.model, self.wrapped = model, model
        return model

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """A context for one micro-batch's backward pass: gradients are all-reduced only when ``enabled`` (the
        last micro-batch of a step)."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Clip the global gradient norm of ``params`` to ``max_norm``; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def model_state_dict(self) -> dict[str, Tensor]:
        """The whole model state on CPU (rank 0; empty on other ranks under FSDP)."""
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        """Optimizer state keyed by parameter names (portable across strategies and world sizes)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.wrapped, optimizer, options=_full_options())

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a state of :meth:`optimizer_state_dict` (written under any strategy)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.wrapped, optimizer, state, options=StateDictOptions(full_state_dict=True))


class DDPStrategy(Strategy):
    """DistributedDataParallel: a full copy of the model per process, gradients averaged over processes."""

    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        env = self.env
        ids = [env.device.index] if env.device.type == "cuda" else None
        self.model, self.wrapped = model, DistributedDataParallel(model, device_ids=ids)
        return self.wrapped

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if enabled else self.wrapped.no_sync()


class FSDPStrategy(Strategy):
    """FSDP2 (``fully_shard``): every encoder and decoder layer, the encoder, the projector and the whole model are
    sharded units; parameters, gradients and optimizer states are split over processes."""

    name = "fsdp"

    def place(self, model: nn.Module) -> nn.Module:
        return model  # fully_shard moves each unit to the device as it shards it: no full copy per GPU

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        for layer in [*model.audio_tower.layers, *model.language_model.model.layers]:
            fully_shard(layer, mesh=mesh)
        fully_shard(model.audio_tower, mesh=mesh)
        fully_shard(model.multi_modal_projector, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model, self.wrapped = model, model
        return model

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        self.wrapped.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor of the shards

    def model_state_dict(self) -> dict[str, Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.wrapped, options=_full_options())


def make_strategy(env: DistEnv, name: str) -> Strategy:
    """The strategy for ``train.strategy`` (``ddp`` or ``fsdp``); a single process always uses the model as is."""
    if not env.distributed:
        return Strategy(env)
    return {"ddp": DDPStrategy, "fsdp": FSDPStrategy}[name](env)
