"""``x @ w`` and ``x @ weight.T`` on the fastest exact fp32 kernel this machine has.

torch's default CPU matrix products call MKL, which on AMD CPUs runs well below the hardware (measured on the
2-core AVX-512 EPYC this project is developed on, docs/PERFORMANCE.md): its fp32 GEMM reaches ~200 GFLOP/s where
oneDNN's reaches ~440, and its matrix-vector product reads weights at ~17-27 GB/s where a plain streaming
kernel reads ~40-50. Decoding one token is nothing but matrix-vector products, prefill and training mostly
GEMMs, so each fp32 CPU product goes to the better kernel and everything else (other devices, other dtypes)
to plain torch:

- up to ``NATIVE_MAX_ROWS`` rows without autograd: goose's own matrix-vector kernels (``csrc/decode.cpp``,
  built on first use by ``native.load``), which read each weight once for all rows on torch's threads;
- ``linear`` up to ``NATIVE_LINEAR_MAX_ROWS`` rows (batched decoding): goose's many-rows kernel, which keeps
  each block of 4 weight rows in L1 while every group of 4 activation rows passes over it (measured at 16
  rows on the model's weights: ~20.5 ms per L12-D768 step against oneDNN's ~25; oneDNN wins from ~32 rows).
  A bf16 weight is multiplied in bf16 on both kernels where the CPU has bf16 dot products (AVX512-BF16), the
  activations rounded to bf16 as in torch's bf16 GEMM (one row: ~20% faster than widening the weight to
  fp32, measured on L12-D768's matrices);
- more rows, or autograd: oneDNN's fp32 GEMM (``torch.ops.mkldnn._linear_pointwise``), with a backward
  made of the same GEMM.

Small GEMMs stay on torch: each oneDNN call costs ~12 us, more than MKL needs for a LoRA-sized product
(measured: a 768x64 weight times 16 rows takes 13 us on MKL, 18 on oneDNN); the threshold below is where the
measured times cross.

All compute the same fp32 dot products (summation order differs, as between any two BLAS libraries).
Set ``GOOSE_PLAIN_MATMUL=1`` to send every product to torch's default kernels (it also turns off the fused
decode step, ``ops/fused.py``); ``GOOSE_NATIVE=0`` turns off every native kernel.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import native

_ENABLED = os.environ.get("GOOSE_PLAIN_MATMUL", "") in ("", "0")
_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

ONEDNN_MIN_MACS = 1 << 20         # rows x weight elements: below, MKL's fixed cost is lower
NATIVE_MAX_ROWS = 4               # the matrix-vector kernels' limit (memory-bound up to a few rows)
NATIVE_LINEAR_MAX_ROWS = 16       # `linear`'s many-rows kernel: faster than oneDNN up to here (measured)


class NativeProduct(NamedTuple):
    """How a native kernel of ``csrc/decode.cpp`` computes a module's ``x @ W.T`` for up to ``max_rows`` fp32 rows
    without autograd: ``op(x, *operands, *args)``, ``op`` the kernel's name (the whole-step decoder of
    ``ops/fused.py`` calls the same kernels from C++)."""

    op: str
    operands: tuple[Tensor, ...]
    args: tuple[int, ...] = ()
    max_rows: int = NATIVE_LINEAR_MAX_ROWS


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and keys) whose product runs on ``matmul``'s fast CPU kernels."""

    def forward(self, x: Tensor) -> Tensor:
        params = self._parameters       # not self.weight: module attribute lookup costs ~0.4 us, per decode op
        return linear(x, params["weight"]) if params["bias"] is None else super().forward(x)

    def native_product(self) -> NativeProduct | None:
        """The native kernel ``linear`` runs this product on when decoding (``NativeProduct``), if any."""
        return weight_product(self._parameters["weight"]) if self._parameters["bias"] is None else None


def weight_product(weight: Tensor) -> NativeProduct | None:
    """``NativeProduct`` of ``linear``'s decoding kernel for an ``[out, in]`` fp32 or bf16 CPU ``weight``, else None."""
    if weight.is_cpu and weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous():
        return NativeProduct("linear", (weight,))
    return None


def _fp32_cpu(x: Tensor, w: Tensor) -> bool:
    """An fp32 product on CPU that autocast would not turn into a lower-precision one."""
    return (_ENABLED and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


def _onednn(x2d: Tensor, weight: Tensor) -> Tensor:
    """``x2d @ weight.T`` by oneDNN (``weight`` is ``[out, in]``, any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x2d, weight, None, "none", [], "")


class _OneDNNMatmul(torch.autograd.Function):
    """``x2d @ w`` with forward and backward on oneDNN's GEMM (``w`` is ``[in, out]``)."""

    @staticmethod
    def forward(ctx, x2d: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x2d, w)
        return _onednn(x2d, w.t())

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x2d, w = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = _onednn(grad, w) if ctx.needs_input_grad[0] else None            # grad @ w.T
        grad_w = _onednn(x2d.t(), grad.t()) if ctx.needs_input_grad[1] else None  # x.T @ grad
        return grad_x, grad_w


def native_rows(x: Tensor, max_rows: int = NATIVE_MAX_ROWS) -> int:
    """The row count of ``x`` if the native kernels can take it (fp32 on CPU, at most ``max_rows`` rows, no
    autograd, not under autocast, kernels built), else 0."""
    rows = x.numel() // max(1, x.shape[-1])
    if not (_ENABLED and rows <= max_rows and x.is_cpu and x.dtype == torch.float32):
        return 0
    if (x.requires_grad and torch.is_grad_enabled()) or torch.is_autocast_enabled("cpu") or not native.load("decode"):
        return 0
    return rows


def _native_rows(x: Tensor, w: Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,),
                 max_rows: int = NATIVE_MAX_ROWS) -> int:
    """``native_rows(x, max_rows)`` for a product with a weight ``w`` of one of ``dtypes`` that needs no
    gradient."""
    if w.dtype not in dtypes or (w.requires_grad and torch.is_grad_enabled()):
        return 0
    return native_rows(x, max_rows)


def call_on_rows(op, x: Tensor, rows: int, *operands: Tensor) -> Tensor:
    """``op(x as [rows, in], *operands)`` reshaped back to ``x``'s leading dims (a 2-D contiguous ``x``, the
    decode step's, goes straight through: each reshape costs ~1 us, a small product's whole runtime)."""
    if x.dim() == 2 and x.is_contiguous():
        return op(x, *operands)
    out = op(x.reshape(rows, x.shape[-1]).contiguous(), *operands)
    return out.view(*x.shape[:-1], out.shape[-1])


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` for ``x [..., in]`` and an ``nn.Linear``-layout ``weight [out, in]``, in ``x``'s dtype.

    A weight of another dtype (a bf16 or fp16 weight under fp32 activations) is multiplied in the weight's
    dtype, ``x`` cast to it and the result back (on the native kernels when decoding a bf16 weight: in
    bf16 where the CPU has bf16 dot products, else with the weight widened to fp32 and ``x`` unrounded)."""
    rows = _native_rows(x, weight, (torch.float32, torch.bfloat16), NATIVE_LINEAR_MAX_ROWS)
    if rows and weight.is_contiguous():
        return call_on_rows(native.ops("decode").linear, x, rows, weight)
    if x.dtype != weight.dtype:
        return matmul(x.to(weight.dtype), weight.t()).to(x.dtype)
    return matmul(x, weight.t())


def matmul(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w`` for ``x [..., in]`` and a 2-D ``w [in, out]``."""
    rows = _native_rows(x, w)
    if rows and (w.is_contiguous() or w.t().is_contiguous()):
        x2d = x.reshape(rows, x.shape[-1]).contiguous()
        gemv = native.ops("decode")
        out = gemv.matmul(x2d, w) if w.is_contiguous() else gemv.linear(x2d, w.t())
        return out.view(*x.shape[:-1], w.shape[1])
    if not _fp32_cpu(x, w):
        return x @ w
    rows = x.numel() // max(1, x.shape[-1])
    out_shape = (*x.shape[:-1], w.shape[1])
    if not _HAS_ONEDNN or rows * w.numel() < ONEDNN_MIN_MACS:
        return x @ w
    x2d = x.reshape(rows, x.shape[-1])
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _OneDNNMatmul.apply(x2d, w).view(out_shape)
    return _onednn(x2d, w.t()).view(out_shape)
