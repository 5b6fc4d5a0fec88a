"""Numeric kernels. ``wkv`` is where the RWKV-7 state recurrence is defined (the C++ kernels in ``csrc/`` are
fast paths of it and of model.py's time-mix step, tested against them); ``gemm`` routes the products."""
from . import fused
from .gemm import Linear, linear, matmul, native_rows
from .wkv import CHUNK_LEN, MODES, wkv, wkv_chunked, wkv_scan, wkv_step

__all__ = ["CHUNK_LEN", "fused", "Linear", "MODES", "linear", "matmul", "native_rows",
           "wkv", "wkv_chunked", "wkv_scan", "wkv_step"]
