"""The three WKV forms are one function: chunked == scan == repeated step, outputs, states, gradients.

Reference: ``wkv_scan`` in fp64. Tolerance: relative max error (max|Δ| / max|ref|) <= 1e-5 in fp32
for outputs, final states and gradients of every input (measured ~3e-7).
"""
import math

import pytest
import torch

from goose.ops import wkv, wkv_chunked, wkv_scan, wkv_step

TOL = 1e-5


def make_inputs(B, T, H=2, N=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, H, N, generator=g, dtype=torch.float64) * 0.5
    v = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    # log-decays over RWKV-7's whole range (decay in (0.545, 1)), a third of channels at the fastest decay
    w = -math.exp(-0.5) * torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    w[..., ::3] = -math.exp(-0.5) * 0.99999
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g, dtype=torch.float64), dim=-1)
    iclr = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, N, N, generator=g, dtype=torch.float64) * 0.3
    return [r, w, k, v, -kk, kk * iclr, s0]


def rel(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def repeated_step(r, w, k, v, a, b, s):
    ys = []
    for t in range(r.shape[1]):
        y, s = wkv_step(r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], s)
        ys.append(y)
    return torch.stack(ys, 1), s


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 100, 1000])
def test_forward_modes_agree(T, B):
    x64 = make_inputs(B, T, seed=T + B)
    y_ref, s_ref = wkv_scan(*x64)
    x32 = [t.float() for t in x64]
    for name, fn in [("chunked", wkv_chunked), ("scan", wkv_scan), ("step", repeated_step)]:
        y, s = fn(*x32)
        assert y.dtype == torch.float32 and s.dtype == torch.float32
        assert rel(y, y_ref) < TOL, name
        assert rel(s, s_ref) < TOL, name


@pytest.mark.parametrize("chunk_len", [16, 32, 64])
def test_chunk_lengths(chunk_len):
    x64 = make_inputs(2, 333, seed=5)
    y_ref, s_ref = wkv_scan(*x64)
    y, s = wkv_chunked(*[t.float() for t in x64], chunk_len=chunk_len)
    assert rel(y, y_ref) < TOL and rel(s, s_ref) < TOL


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 100, 1000])
def test_gradients_agree(T, B):
    x64 = make_inputs(B, T, seed=100 + T + B)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(x64[0].shape, generator=g, dtype=torch.float64)
    gs = torch.randn(x64[-1].shape, generator=g, dtype=torch.float64)

    def grads(fn, dtype):
        xs = [t.to(dtype).clone().requires_grad_() for t in x64]
        y, s = fn(*xs)
        ((y * gy.to(dtype)).sum() + (s * gs.to(dtype)).sum()).backward()
        return [t.grad for t in xs]

    ref = grads(wkv_scan, torch.float64)
    got = grads(wkv_chunked, torch.float32)
    for name, gr, gc in zip("r w k v a b state".split(), ref, got):
        assert rel(gc, gr) < TOL, name


def test_low_precision_inputs_compute_in_fp32():
    x = make_inputs(1, 40, seed=3)
    y_ref, s_ref = wkv_scan(*x)
    y, s = wkv_chunked(*[t.bfloat16() for t in x[:-1]], x[-1].float())
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel(y, y_ref) < 3e-2  # bf16 inputs: error is the inputs' rounding, not the kernel's


def test_state_chaining_split_anywhere():
    x = [t.float() for t in make_inputs(2, 90, seed=9)]
    y_all, s_all = wkv_chunked(*x)
    s = x[-1]
    ys = []
    for lo, hi in [(0, 7), (7, 40), (40, 41), (41, 90)]:
        y, s = wkv(*[t[:, lo:hi] for t in x[:-1]], s)
        ys.append(y)
    assert rel(torch.cat(ys, 1), y_all.double()) < TOL and rel(s, s_all.double()) < TOL


def test_long_sequence_stays_finite():
    x = [t.float() for t in make_inputs(1, 4000, H=1, seed=11)]
    y, s = wkv_chunked(*x)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()


def test_bad_mode():
    x = [t.float() for t in make_inputs(1, 4)]
    with pytest.raises(ValueError, match="mode"):
        wkv(*x, mode="fast")


def test_wide_decay_range_with_short_chunks():
    """Decays near 0 (an ablation, not RWKV-7's clamp) stay exact when the chunk is short enough."""
    from goose.model import ModelConfig

    floor = -4.6  # decay down to 0.01
    chunk = ModelConfig(n_layer=1, n_embd=64, vocab_size=10, log_decay_floor=floor).wkv_chunk_len
    x64 = make_inputs(2, 100, seed=21)
    x64[1] = floor * torch.rand(x64[1].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y_ref, s_ref = wkv_scan(*x64)
    y, s = wkv_chunked(*[t.float() for t in x64], chunk_len=chunk)
    assert chunk == 8 and rel(y, y_ref) < TOL and rel(s, s_ref) < TOL
