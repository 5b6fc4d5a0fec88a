"""Process groups for data-parallel training: DDP, or FSDP2 sharding for models that don't fit a device.

``torchrun`` sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; :func:`setup` reads them
and starts a gloo (CPU) or nccl (CUDA) process group when WORLD_SIZE > 1. A plain ``python`` run is a
world of one and touches nothing in torch.distributed.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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
    owns_group: bool = False  # setup() started the process group, so teardown() ends it

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
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, device=dev, owns_group=owns_group)


def teardown(d: Dist) -> None:
    """Destroy the process group if :func:`setup` started it."""
    if d.owns_group:
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, fsdp: bool) -> nn.Module:
    """The module to call in the training loop: ``model`` itself, DDP around it, or FSDP2-sharded in place.

    FSDP2 shards each TimeMix and ChannelMix (the modules the forward calls; ``Block`` has no forward
    of its own) and puts the rest (embedding, norms, head) in one root group.
    """
    if fsdp:
        if d.world_size == 1:
            raise ValueError("--fsdp shards across processes: launch with torchrun --nproc-per-node N (N > 1)")
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:
            raise RuntimeError(f"--fsdp needs FSDP2 (torch >= 2.6); this is torch {torch.__version__}") from e

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


def full_value(x: Tensor) -> float:
    """A scalar as a float, gathering it first if it is a sharded DTensor (FSDP2's gradient norm)."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


def barrier() -> None:
    """Wait for every process (no-op in a world of one)."""
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
    from torch.distributed.checkpoint import state_dict as dcp

    options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (dcp.get_model_state_dict(model, options=options),
            dcp.get_optimizer_state_dict(model, optimizer, options=options))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, optim_sd: dict[str, Any],
                         sharded: bool) -> None:
    """Load an optimiser state saved by :func:`full_state_dicts` (every rank passes the full dict)."""
    if not sharded:
        optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint import state_dict as dcp

    dcp.set_optimizer_state_dict(model, optimizer, optim_sd, options=dcp.StateDictOptions(full_state_dict=True))
