"""LoRA fine-tuning: low-rank adapters on the model's nn.Linear matrices, merged back for export.

``add_lora`` freezes the model and wraps the target Linear layers; after training, ``merge_lora``
folds ``W + (alpha / rank) B A`` into plain Linear layers again, so the result has exactly the
official parameter names and saves with :func:`goose.checkpoint.save`. (RWKV-7's own low-rank
``w1/w2``, ``a1/a2``... projections are model parameters, not adapters: the word LoRA here means
fine-tuning adapters only.)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from ..ops import Linear, matmul

DEFAULT_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T`` with the base frozen; B starts at zero (an exact no-op)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + matmul(matmul(x, self.lora_A.t()), self.lora_B.t()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear with the adapter folded into its weight."""
        linear = Linear(self.base.in_features, self.base.out_features, bias=False,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            linear.weight.copy_((self.base.weight.float() + delta).to(linear.weight.dtype))
        return linear


def _targets(model: nn.Module, targets: Sequence[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and any(full.endswith(t) for t in targets):
                found.append((module, child_name, child))
    return found


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
             targets: Sequence[str] = DEFAULT_TARGETS) -> list[nn.Parameter]:
    """Freeze ``model``, wrap every Linear whose name ends with one of ``targets``; return the adapters."""
    found = _targets(model, targets)
    if not found:
        raise ValueError(f"no nn.Linear matches the LoRA targets {list(targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for parent, name, linear in found:
        wrapped = LoRALinear(linear, rank, alpha)
        setattr(parent, name, wrapped)
        params += [wrapped.lora_A, wrapped.lora_B]
    return params


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged Linear, in place; the official layout is restored."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors (``...lora_A`` / ``...lora_B``), for saving a small adapter file."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if ".lora_A" in k or ".lora_B" in k}


def save_adapters(model: nn.Module, path: str | Path, rank: int, alpha: float) -> None:
    """Write the adapters to a safetensors file with their rank and alpha."""
    from safetensors.torch import save_file

    save_file(lora_state_dict(model), str(path), metadata={"lora_rank": str(rank), "lora_alpha": str(alpha)})


def load_adapters(model: nn.Module, path: str | Path, targets: Sequence[str] = DEFAULT_TARGETS) -> nn.Module:
    """Wrap ``model`` as :func:`add_lora` would and fill the adapters from a file written by save_adapters."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "lora_rank" not in meta:
        raise ValueError(f"{path} is not a goose LoRA adapter file (no lora_rank metadata)")
    add_lora(model, int(meta["lora_rank"]), float(meta["lora_alpha"]), targets)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if ".lora_" in k]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model
