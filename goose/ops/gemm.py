"""``x @ w`` on the fastest exact fp32 kernel this machine has.

torch's default CPU matrix products call MKL, which on AMD CPUs runs well below the hardware (measured on the
2-core AVX-512 EPYC this project is developed on, docs/PERFORMANCE.md): its fp32 GEMM reaches ~200 GFLOP/s where
oneDNN's reaches ~440, and its matrix-vector product reads weights at ~17-27 GB/s where OpenBLAS (numpy's BLAS)
reads ~40-55. Decoding one token is nothing but matrix-vector products, prefill and training mostly GEMMs, so
``matmul`` sends each fp32 CPU product to the better library and everything else (other devices, other dtypes)
to plain torch:

- one row, no autograd, inside ``blas_matvec()``: OpenBLAS through numpy (zero-copy views of the same memory);
- several rows, or autograd: oneDNN's fp32 GEMM (``torch.ops.mkldnn._linear_pointwise``), with a backward
  made of the same GEMM.

Small products stay on torch: each oneDNN call costs ~12 us and each numpy call a few, more than MKL needs for
a LoRA-sized product (measured: a 768x64 weight times 16 rows takes 13 us on MKL, 18 on oneDNN); the
thresholds below are where the measured times cross.

All three compute the same fp32 dot products (summation order differs, as between any two BLAS libraries).
Set ``GOOSE_PLAIN_MATMUL=1`` to turn both off and use torch's default everywhere.

Threads: numpy's BLAS has its own thread pool. When torch's OpenMP threads busy-wait after a parallel op while
OpenBLAS works, the two pools fight for the cores (measured: decoding 5x slower), so OpenBLAS serves single
rows only inside ``blas_matvec()``, which runs torch single-threaded meanwhile (its ops on one token's
vectors gain nothing from threads). The models enter it for one-token steps with fp32 weights on CPU
(``one_token_step``). When other processes keep the cores busy, every spinning thread pool slows down badly
(torch's default included); ``OMP_NUM_THREADS=1`` then helps, and OpenBLAS obeys it too.
"""
from __future__ import annotations

import os
import threading
from contextlib import AbstractContextManager, contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

_ENABLED = os.environ.get("GOOSE_PLAIN_MATMUL", "") in ("", "0")
_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

ONEDNN_MIN_MACS = 1 << 20         # rows x weight elements: below, MKL's fixed cost is lower
BLAS_MIN_WEIGHT = 1 << 17         # weight elements for OpenBLAS's matrix-vector product

_local = threading.local()


@contextmanager
def blas_matvec(enabled: bool = True) -> Iterator[None]:
    """Within: single-row fp32 CPU products run on OpenBLAS, torch on one thread (see the module doc)."""
    if not (enabled and _ENABLED) or getattr(_local, "active", False):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _local.active = True
    try:
        yield
    finally:
        _local.active = False
        torch.set_num_threads(threads)


def one_token_step(tokens: Tensor, head_weight: Tensor) -> AbstractContextManager[None]:
    """``blas_matvec()`` for a model step over ``tokens`` if it is one token with fp32 weights on CPU (what
    the models wrap their forward in; quantized heads keep torch's threads for their own kernels)."""
    return blas_matvec(tokens.numel() == 1 and head_weight.device.type == "cpu"
                       and head_weight.dtype == torch.float32)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and keys) whose product runs on ``matmul``'s fast CPU kernels."""

    def forward(self, x: Tensor) -> Tensor:
        return matmul(x, self.weight.t()) if self.bias is None else super().forward(x)


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


def matmul(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w`` for ``x [..., in]`` and a 2-D ``w [in, out]`` (for a ``nn.Linear`` weight, pass ``weight.t()``)."""
    if not _fp32_cpu(x, w):
        return x @ w
    rows = x.numel() // max(1, x.shape[-1])
    out_shape = (*x.shape[:-1], w.shape[1])
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    if rows == 1 and not needs_grad and getattr(_local, "active", False) and w.numel() >= BLAS_MIN_WEIGHT:
        return torch.from_numpy(np.matmul(x.detach().reshape(1, -1).numpy(), w.detach().numpy())).view(out_shape)
    if not _HAS_ONEDNN or rows * w.numel() < ONEDNN_MIN_MACS:
        return x @ w
    x2d = x.reshape(rows, x.shape[-1])
    if needs_grad:
        return _OneDNNMatmul.apply(x2d, w).view(out_shape)
    return _onednn(x2d, w.t()).view(out_shape)
