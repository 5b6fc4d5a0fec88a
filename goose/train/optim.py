"""RWKV-LM's optimiser recipe: three parameter groups, AdamW, warmup then cosine (RWKV7_SPEC.md §3.2).

* ``lr_2x``: the decay biases (``att.w0``) learn at twice the rate, without weight decay.
* ``lr_decay``: the big matrices (emb, head, r/k/v/o and FFN weights) get weight decay; RWKV-LM's
  README: "Only apply weight decay to large matrix parameters ... THIS IS VERY IMPORTANT".
* ``lr_1x``: everything else (norms, token-shift mixes, LoRAs, k_k, k_a, r_k), no weight decay.

Each group carries ``lr_scale``; the trainer sets ``group["lr"] = lr_at(step, ...) * group["lr_scale"]``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """RWKV-LM's groups over the parameters that require grad; empty groups are left out.

    Each group is ``{"name", "params", "param_names", "weight_decay", "lr_scale"}``. Only trainable
    parameters are included, so the same call serves LoRA or partial fine-tuning.
    """
    groups = {"lr_1x": ([], [], 0.0, 1.0), "lr_2x": ([], [], 0.0, 2.0), "lr_decay": ([], [], weight_decay, 1.0)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "att.w0" in name:
            group = "lr_2x"
        elif weight_decay > 0 and sum(n > 1 for n in p.shape) >= 2 and ".weight" in name:  # 2-D after squeeze
            group = "lr_decay"
        else:
            group = "lr_1x"
        groups[group][0].append(p)
        groups[group][1].append(name)
    return [{"name": group, "params": params, "param_names": names, "weight_decay": wd, "lr_scale": scale}
            for group, (params, names, wd, scale) in groups.items() if params]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.99),
                   eps: float = 1e-18) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with RWKV-LM's defaults (betas 0.9/0.99, eps 1e-18).

    ``lr`` is only the starting value; the training loop sets each group's rate every step.
    """
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no parameters that require grad: nothing to optimise")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_at(step: int, lr_init: float, lr_final: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for 0-based optimiser step ``step``, exactly RWKV-LM's ``train_callback`` formula.

    Cosine from ``lr_init`` to ``lr_final`` over steps ``warmup_steps .. total_steps``, and during the
    first ``warmup_steps`` steps ``lr_init * (0.01 + 0.99 * step / warmup_steps)``.
    """
    if lr_init <= 0 or lr_final < 0:
        raise ValueError(f"need lr_init > 0 and lr_final >= 0, got {lr_init} and {lr_final}")
    final_factor = lr_final / lr_init
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    progress = min(max(progress, 0.0), 1.0)
    lr = lr_init * ((0.5 + final_factor / 2) + (0.5 - final_factor / 2) * math.cos(math.pi * progress))
    if step < warmup_steps:
        lr *= 0.01 + 0.99 * step / warmup_steps
    return lr
