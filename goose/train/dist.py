"""Process groups for data-parallel training: DDP, or FSDP2 sharding for models that don't fit a device.

``torchrun`` sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; :func:`setup` reads them
and starts a gloo (CPU) or nccl (CUDA) process group when WORLD_SIZE > 1. A plain ``python`` run is a
world of one and touches nothing in torch.distributed.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass(frozen=True)
class Dist:
    """Where this process sits: its global rank, the world size, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and prints."""
        return self.rank == 0


def setup(device: str = "auto") -> Dist:
    """Start the process group if launched by torchrun with more than one process.

    ``device``: "auto" (CUDA when available), "cpu", "cuda" or e.g. "cuda:1". With several processes,
    CUDA means this process's ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=
                                dev if dev.type == "cuda" else None)
    return Dist(rank=rank, world_size=world_size, device=dev)


def teardown() -> None:
    """Destroy the process group, if one was started."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, fsdp: bool) -> nn.Module:
    """The module to call in the training loop: ``model`` itself, DDP around it, or FSDP2-sharded in place.

    FSDP2 shards each TimeMix and ChannelMix (the modules the forward calls; ``Block`` has no forward
    of its own) and puts the rest (embedding, norms, head) in one root group.
    """
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block.att)
            fully_shard(block.ffn)
        return fully_shard(model)
    if d.world_size == 1:
        return model
    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The RWKV7 inside a DDP wrapper (FSDP2 shards in place, so it has none)."""
    return model.module if isinstance(model, DDP) else model


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """While ``skip``, accumulate gradients locally instead of all-reducing them (DDP / FSDP2)."""
    if skip and isinstance(model, DDP):
        with model.no_sync():
            yield
        return
    sharded = skip and hasattr(model, "set_requires_gradient_sync")
    if sharded:
        model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        if sharded:
            model.set_requires_gradient_sync(True)


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over all processes (``x`` itself in a world of one)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer,
                     sharded: bool) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Unsharded CPU state dicts of model and optimizer, for saving from rank 0.

    Sharded (FSDP2) models gather through torch.distributed.checkpoint, which every rank must call;
    only rank 0 gets the full dicts back. Otherwise these are the plain ``state_dict()`` s.
    """
    if not sharded:
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict[str, Tensor],
                          optim_sd: dict[str, Any], sharded: bool) -> None:
    """Load what :func:`full_state_dicts` returned (every rank passes the full dicts)."""
    if not sharded:
        unwrap(model).load_state_dict(model_sd)
        optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))
