"""WKV kernel speed: the chunked parallel form against the sequential scan, forward and forward+backward.

Both forms run in the same process on the same inputs; numbers are medians over repeats, and the
chunked output is checked against the scan before any time is reported.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch

from goose.bench import median_seconds
from goose.ops import wkv_chunked, wkv_scan


def _inputs(batch_size: int, seq_len: int, n_head: int, head_size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, seq_len, n_head, head_size)
    r, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    w = -math.exp(-0.5) * torch.rand(shape, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1)
    iclr = torch.rand(shape, generator=g)
    return [r, w, k * 0.5, v, -kk, kk * iclr]


def _forward_backward(fn, xs: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        leaves = [x.clone().requires_grad_() for x in xs]
        y, s = fn(*leaves)
        (y.sum() + s.sum()).backward()
    return run


def run(seq_len: int = 4096, batch_size: int = 1, n_head: int = 12, repeats: int = 3) -> dict[str, float]:
    """Print and return seconds and speed-ups of chunked vs scan at ``[B, T, H, 64]``."""
    xs = _inputs(batch_size, seq_len, n_head)
    warm = [x[:, :64] for x in xs]
    wkv_chunked(*warm)                      # first solve_triangular call pays a one-time library start-up
    _forward_backward(wkv_chunked, warm)()

    y_c, s_c = wkv_chunked(*xs)
    y_s, s_s = wkv_scan(*xs)
    err = max(((y_c - y_s).abs().max() / y_s.abs().max()).item(), ((s_c - s_s).abs().max() / s_s.abs().max()).item())
    if err > 1e-4:
        raise RuntimeError(f"chunked WKV disagrees with the scan (relative error {err:.2e}); not timing it")

    res = {
        "fwd_scan": median_seconds(lambda: wkv_scan(*xs), repeats),
        "fwd_chunked": median_seconds(lambda: wkv_chunked(*xs), repeats),
        "fwdbwd_scan": median_seconds(_forward_backward(wkv_scan, xs), max(1, repeats // 2)),
        "fwdbwd_chunked": median_seconds(_forward_backward(wkv_chunked, xs), repeats),
    }
    tokens = batch_size * seq_len
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"WKV7 at B={batch_size} T={seq_len} H={n_head} N=64, {torch.get_num_threads()} threads{load} "
          f"(chunked vs scan max rel. error {err:.1e}); median of {repeats}")
    print(f"{'pass':<18}{'scan s':>10}{'chunked s':>12}{'speed-up':>10}{'chunked tok/s':>15}")
    for name, label in (("fwd", "forward"), ("fwdbwd", "forward+backward")):
        scan, chunked = res[f"{name}_scan"], res[f"{name}_chunked"]
        res[f"{name}_speedup"] = scan / chunked
        print(f"{label:<18}{scan:>10.3f}{chunked:>12.3f}{scan / chunked:>9.1f}x{tokens / chunked:>15,.0f}")
    return res
