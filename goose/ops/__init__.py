"""Numeric kernels. ``wkv`` is the only place the RWKV-7 state recurrence is written."""
from .gemm import blas_matvec, matmul
from .wkv import CHUNK_LEN, MODES, wkv, wkv_chunked, wkv_scan, wkv_step

__all__ = ["CHUNK_LEN", "MODES", "blas_matvec", "matmul", "wkv", "wkv_chunked", "wkv_scan", "wkv_step"]
