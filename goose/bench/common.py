"""Shared pieces of the inference benchmarks: checkpoints, contenders, timing, machine facts.

Timing rule: contenders run interleaved (one repeat of each, then the next repeat), so drift on a
shared, noisy machine hits all of them alike; reported numbers are medians over repeats.
"""
from __future__ import annotations

import copy
import functools
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from goose.checkpoint import own_copy
from goose.ops import linear
from goose.random_weights import write_random_checkpoint

SIZES = ("L12-D768", "L24-D1024")  # the sizes of the 0.19B and 0.45B releases, World vocabulary
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "goose" / "bench"


def parse_size(size: str) -> tuple[int, int, int]:
    """``"L12-D768"`` or ``"L2-D128-V1000"`` -> (n_layer, n_embd, vocab); the vocabulary defaults to 65536."""
    parts = dict((p[0], p[1:]) for p in size.upper().split("-") if p)
    try:
        return int(parts["L"]), int(parts["D"]), int(parts.get("V", 65536))
    except (KeyError, ValueError):
        raise ValueError(f"size must look like L12-D768 or L12-D768-V65536, got {size!r}") from None


def checkpoint(size: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """A random official-layout checkpoint of ``size`` (see parse_size), written once, then reused."""
    L, C, V = parse_size(size)
    path = Path(cache_dir) / f"rwkv7-random-L{L}-D{C}-V{V}.pth"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.pth")
        write_random_checkpoint(tmp, L, C, V, seed=0)
        tmp.replace(path)
    return path


def official(path: Path, strategy: str):
    """The official ``rwkv`` package's model for ``path``, or None (with a note) if it is not installed."""
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "1")
    try:
        from rwkv.model import RWKV
    except ImportError:
        print("[bench] the official package is not installed (pip install rwkv==0.8.32): its rows are skipped")
        return None
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):      # it prints a banner per load
        return RWKV(model=str(path)[: -len(".pth")], strategy=strategy)


def converted(model: torch.nn.Module, fmt: str, group_size: int = 64) -> torch.nn.Module:
    """A copy of ``model`` with its big matrices in ``fmt``; the other tensors are shared, not copied."""
    from goose.quant import quantize

    # every tensor is "already copied" (memo): the copy shares them, and quantize() only adds new ones
    shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return quantize(copy.deepcopy(model, memo=shared), fmt, group_size=group_size)


def race(contenders: dict[str, Callable[[], float]], repeats: int, desc: str = "",
         rounds: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Run each contender once per repeat, interleaved; each returns a rate. Returns the median rates; ``rounds``,
    if given, receives every contender's rate per repeat (for ratios taken within a round, see ``paired``).

    A progress bar on stderr (on a terminal only) names the contender running."""
    rates: dict[str, list[float]] = {} if rounds is None else rounds
    rates.update({name: [] for name in contenders})
    with tqdm(total=repeats * len(contenders), desc=desc, leave=False, disable=None) as bar:
        for _ in range(repeats):
            for name, fn in contenders.items():
                bar.set_postfix_str(name)
                rates[name].append(fn())
                bar.update()
    return {name: statistics.median(r) for name, r in rates.items()}


def paired(numerator: list[float], denominator: list[float]) -> float:
    """The median over repeats of numerator / denominator measured in the same round of a race: on a machine
    whose speed drifts (shared memory bandwidth), a ratio of two values taken seconds apart varies far less
    than the ratio of their medians, which may come from different moments."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@functools.lru_cache(maxsize=1)
def _big_matrix() -> torch.Tensor:
    """On huge pages where Linux offers them, like the weights of a loaded model (checkpoint.own_copy)."""
    return own_copy(torch.randn(16384, 8192, generator=torch.Generator().manual_seed(0)), "cpu", torch.float32)


@functools.lru_cache(maxsize=1)
def _big_inference_matrix() -> torch.nn.Module:
    """``_big_matrix`` in goose's fp32 inference format (``quant.DenseLinear``: the panels layout on AVX-512)."""
    from goose.quant import DenseLinear

    return DenseLinear.from_weight(_big_matrix(), torch.float32)


def matvec_bandwidth(repeats: int = 10) -> float:
    """GB/s of weights read by a large fp32 matrix-vector product (16384 x 8192, 512 MiB, far larger than any
    cache), the roofline's bandwidth: the best of torch's default kernel in both memory layouts (``W @ x``
    reads rows, ``x @ W`` sweeps columns), numpy's BLAS (OpenBLAS, on its own threads) and goose's own
    (``ops.linear`` on ``[out, in]``, and the inference format's, ``quant.DenseLinear``), median of repeats
    each. The vector changes every call."""
    import numpy as np

    w = _big_matrix()
    inference = _big_inference_matrix()
    best = 0.0

    def openblas(x: torch.Tensor) -> np.ndarray:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)          # torch's idle OpenMP threads would spin against OpenBLAS's
        try:
            return np.matmul(x.numpy(), w.numpy().T)
        finally:
            torch.set_num_threads(threads)

    for fn, n in ((lambda x: w @ x, w.shape[1]), (lambda x: x @ w, w.shape[0]),
                  (openblas, w.shape[1]), (lambda x: linear(x, w), w.shape[1]), (inference, w.shape[1])):
        xs = torch.randn(repeats + 2, n)
        times = [timed(functools.partial(fn, x)) for x in xs]
        best = max(best, w.numel() * 4 / statistics.median(times[2:]) / 1e9)
    return best


def read_bandwidth(repeats: int = 10) -> float:
    """GB/s of a plain streaming read (sum of 512 MiB), for comparison with the matvec figure."""
    x = own_copy(torch.ones(1 << 27), "cpu", torch.float32)
    times = [timed(x.sum) for _ in range(repeats + 2)]
    return x.numel() * 4 / statistics.median(times[2:]) / 1e9


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = float("nan")
    try:
        import rwkv
        rwkv_version = getattr(rwkv, "__version__", None) or _dist_version("rwkv")
    except ImportError:
        rwkv_version = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(mem, 1), "torch": torch.__version__, "rwkv": rwkv_version,
            "python": platform.python_version(), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """A plain fixed-width table (also valid Markdown)."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.2f}"
    return str(x)
