"""Fused one-token kernels (``csrc/decode.cpp``): a decode step of RWKV-7 in one native call.

A decode step at batch 1 spends as much time launching ~80 tiny torch operations per layer (LayerNorms,
lerps, LoRAs, activations, the WKV update, GroupNorm) as reading weights. ``token_mix`` (with the LayerNorm
before it and the shift-state update) and ``time_mix_step`` do that work in one pass each. Even then, calling
those and the projections one by one from Python costs ~75 us a layer; ``Decoder`` runs the whole step
(embedding to logits) in one call, each projection on the native kernel its module names
(``native_product()``: every weight format of goose.quant and the model's own fp32 ``Linear``). The model uses
these only where they apply (``available``): fp32 on CPU, no autograd, kernels built. The torch code in
``goose/model.py`` stays the definition; tests/test_decode.py checks the two agree.
"""
from __future__ import annotations

import weakref
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from . import gemm, native
from .gemm import NativeProduct


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


class Decoder:
    """A model's whole decode step as one native call (``DecodeStep`` in csrc/decode.cpp), holding the model's own
    tensors: ``layers`` are each block's ``(tensors, LayerNorm epsilons)`` in DecodeStep's order, ``products``
    each block's receptance, key, value, output, ffn key and ffn value products, then the head's, computed for the
    modules ``projections``."""

    def __init__(self, emb: Tensor, ln0: nn.LayerNorm, ln_out: nn.LayerNorm,
                 layers: Sequence[tuple[list[Tensor], list[float]]], projections: Sequence[nn.Module],
                 products: Sequence[NativeProduct], log_decay_floor: float, iclr: bool):
        self._step = torch.classes.goose_decode.DecodeStep(emb, ln0.weight, ln0.bias, ln0.eps, ln_out.weight,
                                                           ln_out.bias, ln_out.eps, log_decay_floor, iclr)
        for tensors, eps in layers:
            self._step.add_layer(tensors, eps)
        for p in products:
            self._step.add_product(p.op, list(p.operands), list(p.args))
        self.max_rows = min(p.max_rows for p in products)
        self._projections = list(projections)

    def takes(self, rows: int) -> bool:
        """Whether a step of ``rows`` sequences runs here: every kernel takes that many rows, and no forward hook
        is registered on a projection (or globally), since the step calls no module."""
        if rows > self.max_rows or _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in self._projections)

    def __call__(self, tokens: Tensor, state, new_state) -> Tensor | None:
        """Logits ``[B, V]`` of ``tokens [B, 1]`` after ``state``, the new state written to ``new_state`` (may be
        ``state``); None, with nothing written, if a tensor of the model changed dtype, shape or memory."""
        return self._step.step(tokens, state.att_shift, state.wkv, state.ffn_shift, new_state.att_shift,
                               new_state.wkv, new_state.ffn_shift)


# Decoders hold a model's tensors as they were: they are dropped (and the tensors they held let go, e.g. the
# weights quantize() replaces) whenever any module anywhere registers a parameter, buffer or submodule
# (assigning one, quantize(), load_state_dict(assign=True), rearranging a weight layout)
_decoders: weakref.WeakKeyDictionary[nn.Module, tuple[Decoder | None]] = weakref.WeakKeyDictionary()


def _forget_decoders(*_args) -> None:
    _decoders.clear()


for _register in (_module.register_module_parameter_registration_hook,
                  _module.register_module_buffer_registration_hook, _module.register_module_module_registration_hook):
    _register(_forget_decoders)


def decoder(model: nn.Module, build: Callable[[], Decoder | None], rebuild: bool = False) -> Decoder | None:
    """``model``'s Decoder as ``build`` makes it (None: the model has no native step), made again after modules
    changed, or if ``rebuild``."""
    kept = _decoders.get(model)
    if rebuild or kept is None:
        kept = _decoders[model] = (build(),)
    return kept[0]
