"""WKV kernel speed: the chunked parallel form against the sequential scan, forward and forward+backward.

The scan is the plain torch ``wkv_scan``. The chunked forward is timed as ``wkv_chunked`` runs it without
autograd (the native kernel where it builds, else torch; the table says which) and, beside it, as the torch
code alone; forward+backward always runs the torch code (autograd). All run in the same process on the same
inputs; numbers are medians over repeats, and every chunked output is checked against the scan before any
time is reported.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch

from goose.bench import median_seconds
from goose.ops import wkv_chunked, wkv_scan
from goose.ops.wkv import chunked_backend


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


def _torch_chunked(*xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return wkv_chunked(*xs, allow_native=False)


def run(seq_len: int = 4096, batch_size: int = 1, n_head: int = 12, repeats: int = 3) -> dict[str, float]:
    """Print and return seconds and speed-ups of chunked vs scan at ``[B, T, H, 64]``."""
    xs = _inputs(batch_size, seq_len, n_head)
    backend = chunked_backend(*xs)          # builds the native kernel on first use
    warm = [x[:, :64] for x in xs]
    _torch_chunked(*warm)                   # first solve_triangular call pays a one-time library start-up
    wkv_chunked(*warm)
    _forward_backward(wkv_chunked, warm)()

    y_s, s_s = wkv_scan(*xs)
    errors = {}
    for name, fn in (("chunked", wkv_chunked), ("torch chunked", _torch_chunked)):
        y_c, s_c = fn(*xs)
        errors[name] = max(((y_c - y_s).abs().max() / y_s.abs().max()).item(),
                           ((s_c - s_s).abs().max() / s_s.abs().max()).item())
        if errors[name] > 1e-4:
            raise RuntimeError(f"{name} WKV disagrees with the scan (relative error {errors[name]:.2e}); not timing it")

    res = {
        "fwd_scan": median_seconds(lambda: wkv_scan(*xs), repeats),
        "fwd_chunked": median_seconds(lambda: wkv_chunked(*xs), repeats),
        "fwd_torch_chunked": median_seconds(lambda: _torch_chunked(*xs), repeats),
        "fwdbwd_scan": median_seconds(_forward_backward(wkv_scan, xs), max(1, repeats // 2)),
        "fwdbwd_chunked": median_seconds(_forward_backward(wkv_chunked, xs), repeats),
    }
    tokens = batch_size * seq_len
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"WKV7 at B={batch_size} T={seq_len} H={n_head} N=64, {torch.get_num_threads()} threads{load}; "
          f"median of {repeats}")
    print(f"chunked forward runs: {backend}; max rel. error vs scan: chunked {errors['chunked']:.1e}, "
          f"torch chunked {errors['torch chunked']:.1e}")
    print(f"{'pass':<18}{'chunked by':>11}{'scan s':>10}{'chunked s':>12}{'speed-up':>10}{'chunked tok/s':>15}")
    rows = (("fwd", "forward", "fwd_chunked", backend), ("fwd", "forward", "fwd_torch_chunked", "torch"),
            ("fwdbwd", "forward+backward", "fwdbwd_chunked", "torch"))
    for name, label, key, by in rows:
        scan, chunked = res[f"{name}_scan"], res[key]
        res[key.replace("chunked", "speedup")] = scan / chunked
        print(f"{label:<18}{by:>11}{scan:>10.3f}{chunked:>12.4f}{scan / chunked:>9.1f}x{tokens / chunked:>15,.0f}")
    return res
