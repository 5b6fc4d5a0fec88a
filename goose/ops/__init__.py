"""Numeric kernels. ``wkv`` is the only place the RWKV-7 state recurrence is written."""
from .gemm import Linear, blas_matvec, matmul, one_token_step
from .wkv import CHUNK_LEN, MODES, wkv, wkv_chunked, wkv_scan, wkv_step

__all__ = ["CHUNK_LEN", "Linear", "MODES", "blas_matvec", "matmul", "one_token_step", "wkv", "wkv_chunked", "wkv_scan", "wkv_step"]
