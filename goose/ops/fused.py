"""Fused one-token kernels (``csrc/decode.cpp``): RWKV-7's small per-layer operations in two calls.

A decode step at batch 1 spends as much time launching ~80 tiny torch operations per layer (LayerNorms,
lerps, LoRAs, activations, the WKV update, GroupNorm) as reading weights. ``token_mix`` (with the LayerNorm
before it and the shift-state update) and ``time_mix_step`` do that work in one pass each; the projections
between them stay ordinary modules (so every weight format works). The model uses them only where they
apply (``available``): fp32 on CPU, no autograd, kernels built. The torch code in ``goose/model.py`` stays
the definition; tests/test_decode.py checks the two agree.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from . import gemm, native


def available(x: Tensor, module: nn.Module) -> bool:
    """Whether the fused kernels serve a step of ``module`` on ``x`` (fp32 CPU inference, kernels built)."""
    if not (gemm._ENABLED and x.device.type == "cpu" and x.dtype == torch.float32):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
        return False
    return native.load("decode")


def token_mix(x: Tensor, shift: Tensor, coefs: list[Tensor], norm: nn.LayerNorm | None = None,
              new_shift: Tensor | None = None) -> Tensor:
    """``[x + (shift - x) * c for c in coefs]`` stacked: ``[len(coefs), B, C]`` for ``x``, ``shift`` ``[B, C]``.

    With ``norm``, ``x`` is first replaced by ``norm(x)``; ``new_shift`` (may be ``shift``) receives that
    ``x``, the next token's shift."""
    if norm is None:
        weight = bias = None
    else:
        params = norm._parameters    # not norm.weight: module attribute lookups cost ~0.4 us each
        weight, bias = params["weight"], params["bias"]
    return native.ops("decode").token_mix(x.contiguous(), shift.contiguous(), coefs, weight, bias,
                                          norm.eps if norm is not None else 0.0, new_shift)


def time_mix_step(r: Tensor, k: Tensor, v: Tensor, mixed: Tensor, params: Sequence[Tensor], state: Tensor,
                  out_state: Tensor, v_first: Tensor | None, log_decay_floor: float, iclr: bool,
                  eps: float) -> tuple[Tensor, Tensor]:
    """TimeMix between the r/k/v projections and the output projection, for one token (see csrc/decode.cpp).

    ``mixed`` is ``token_mix``'s output for (x_r, x_w, x_k, x_v, x_a, x_g); ``params`` are w0 w1 w2 a0 a1 a2
    v0 v1 v2 g1 g2 k_k k_a r_k and GroupNorm's weight and bias. The new WKV state goes to ``out_state`` (may
    be ``state``). Returns (the gated output ``[B, C]``, ``v`` after the value residual)."""
    return native.ops("decode").time_mix_step(r, k, v, mixed, list(params), state, out_state, v_first,
                                               log_decay_floor, iclr, eps)
