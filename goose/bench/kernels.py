"""``goose bench kernels``: what the matmul kernels (torch's and goose's own) deliver on this CPU per weight format.

The weights of one L12-D768-V65536 model (12 blocks of r/k/v/o, ffn key/value, plus the head: 135M weights,
too big for any cache) are multiplied by ``rows`` activation rows, as a decode step of that many sequences
(or a prefill chunk) does. Reported: billions of weights per second (G w/s; for fp32, 4 GB/s each), median
of repeats. This is the table gemm.py's and quant.py's kernel choices were made from: fp32 and bf16 weights
(and fp16) in the panels layout (``DenseLinear`` on AVX-512 CPUs; one kernel at every row count) and in ``nn.Linear``'s
``[out, in]`` one (``goose.ops.linear``: goose's matrix-vector kernels up to 4 rows, the many-rows one up to
``NATIVE_LINEAR_MAX_ROWS``, oneDNN above); int8 and int4 on goose's kernels up to ``NATIVE_QUANT_MAX_ROWS``
(their pairs layouts, on CPUs with AVX512-VNNI; torch's packed kernels elsewhere), the dequantize + bf16 GEMM
fallback above; the "raw" rows are torch's kernels alone, for comparison.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch import nn

from goose.bench.common import print_table, timed
from goose.ops import Linear
from goose.quant import DenseLinear, Int4Linear, Int8Linear


def _layers(C: int = 768, L: int = 12, V: int = 65536) -> list[nn.Linear]:
    shapes = [(C, C)] * 4 + [(4 * C, C), (C, 4 * C)]
    g = torch.Generator().manual_seed(0)
    layers = []
    for out, inp in [s for _ in range(L) for s in shapes] + [(V, C)]:
        lin = nn.Linear(inp, out, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out, inp, generator=g) / inp ** 0.5)
        layers.append(lin)
    return layers


def _model_linear(weight: torch.Tensor) -> Linear:
    """The model's own ``nn.Linear`` (``goose.ops.Linear``: ``[out, in]``, multiplied by ``goose.ops.linear``)
    around ``weight``."""
    lin = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return lin


def _int4_args(m: Int4Linear) -> tuple:
    packed, scales_zeros = m._cpu_kernel_args()
    return packed, m.group_size, scales_zeros


def run(rows=(1, 4, 16, 64, 1024), repeats: int = 5) -> dict:
    layers = _layers()
    n = sum(lin.weight.numel() for lin in layers)
    variants = {
        "fp32 torch F.linear (MKL)": layers,
        "fp32 [out, in] (goose.ops.linear)": [_model_linear(m.weight) for m in layers],
        "fp32 weights (DenseLinear: panels)": [DenseLinear.from_linear(m, torch.float32) for m in layers],
        "bf16 weights (DenseLinear: panels)": [DenseLinear.from_linear(m, torch.bfloat16) for m in layers],
        "fp16 weights (DenseLinear: panels)": [DenseLinear.from_linear(m, torch.float16) for m in layers],
        "int8 (native <= 64 rows, then fallback)": [Int8Linear.from_linear(m) for m in layers],
        "int4 (group 64; native <= 64 rows, then fallback)": [Int4Linear.from_linear(m) for m in layers],
    }
    raw = {  # torch's kernels called directly at every row count, bypassing goose's choice of path
        "fp16 F.linear, raw": ([_model_linear(m.weight.half()) for m in layers],
                               lambda x, m: F.linear(x.half(), m.weight)),
        "_weight_int8pack_mm, raw": (variants["int8 (native <= 64 rows, then fallback)"],
                                     lambda x, m: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), m.rows(), m.scale)),
        "_weight_int4pack_mm_for_cpu, raw": (variants["int4 (group 64; native <= 64 rows, then fallback)"],
                                             lambda x, m: torch.ops.aten.
                                             _weight_int4pack_mm_for_cpu(x.bfloat16(), *_int4_args(m))),
    }
    res: dict[str, dict[int, float]] = {}
    with torch.inference_mode():
        for R in rows:
            xs = {d: torch.randn(R, d) for d in {m.in_features for m in layers}}
            fns = {name: (lambda mods=mods: [m(xs[m.in_features]) for m in mods]) for name, mods in variants.items()}
            if R <= 64:                                  # beyond, these take minutes
                fns.update({name: (lambda mods=mods, f=f: [f(xs[m.in_features], m) for m in mods])
                            for name, (mods, f) in raw.items()})
            for fn in fns.values():
                fn()
            times = {name: [] for name in fns}
            for _ in range(repeats):
                for name, fn in fns.items():
                    times[name].append(timed(fn))
            for name, t in times.items():
                res.setdefault(name, {})[R] = n / statistics.median(t) / 1e9
    print_table(f"matmul throughput, G weights/s ({n / 1e6:.0f}M weights of an L12-D768 model times `rows` "
                f"activation rows; {torch.get_num_threads()} threads; median of {repeats})",
                ["kernel"] + [f"rows={R}" for R in rows],
                [[name] + [r.get(R, "-") for R in rows] for name, r in res.items()])
    return res
