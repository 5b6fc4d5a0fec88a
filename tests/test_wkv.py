"""The three WKV forms are one function: chunked == scan == repeated step, outputs, states, gradients.

Reference: ``wkv_scan`` in fp64. Tolerance: relative max error (max|Δ| / max|ref|) <= 1e-5 in fp32
for outputs, final states and gradients of every input (measured ~3e-7). The chunked form has two
implementations, the native forward kernel (csrc/wkv.cpp, used without autograd) and the torch code (the
differentiable path and the fallback); both are checked against the reference.
"""
import functools
import importlib
import math

import pytest
import torch

from goose.ops import native, wkv, wkv_chunked, wkv_scan, wkv_step

wkv_module = importlib.import_module("goose.ops.wkv")   # the module, not the function goose.ops.wkv

TOL = 1e-5
torch_chunked = functools.partial(wkv_chunked, allow_native=False)
# skipped only when turned off on purpose: where they are on, a failed build must fail the suite, not skip it
needs_native = pytest.mark.skipif(not native.ENABLED, reason="native kernels turned off (GOOSE_NATIVE=0)")


@needs_native
def test_native_kernel_builds_here():
    assert native.load("wkv")


@pytest.fixture
def native_calls(monkeypatch):
    """The chunk lengths of the native kernel's calls made through ``wkv_chunked`` during the test."""
    calls = []
    real_ops = native.ops

    class Spy:
        @staticmethod
        def chunked_forward(*args):
            calls.append(args[-1])
            return real_ops("wkv").chunked_forward(*args)

    monkeypatch.setattr(wkv_module.native, "ops", lambda name: Spy if name == "wkv" else real_ops(name))
    return calls


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
    for name, fn in [("chunked", wkv_chunked), ("torch chunked", torch_chunked), ("scan", wkv_scan),
                     ("step", repeated_step)]:
        y, s = fn(*x32)
        assert y.dtype == torch.float32 and s.dtype == torch.float32
        assert rel(y, y_ref) < TOL, name
        assert rel(s, s_ref) < TOL, name


@pytest.mark.parametrize("chunk_len", [16, 32, 64])
def test_chunk_lengths(chunk_len):
    x64 = make_inputs(2, 333, seed=5)
    y_ref, s_ref = wkv_scan(*x64)
    y, s = torch_chunked(*[t.float() for t in x64], chunk_len=chunk_len)
    assert rel(y, y_ref) < TOL and rel(s, s_ref) < TOL


@needs_native
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 100, 1000])
def test_native_forward(T, B, native_calls):
    """Without autograd, ``wkv_chunked`` runs the native kernel, from a nonzero initial state."""
    x64 = make_inputs(B, T, seed=200 + T + B)
    y_ref, s_ref = wkv_scan(*x64)
    y, s = wkv_chunked(*[t.float() for t in x64])
    assert native_calls == [wkv_module.NATIVE_CHUNK_LEN]
    assert y.dtype == torch.float32 and s.dtype == torch.float32 and y.shape == y_ref.shape
    assert rel(y, y_ref) < TOL and rel(s, s_ref) < TOL


@needs_native
@pytest.mark.parametrize("chunk_len", [1, 3, 8, 16, 32, 64])
def test_native_chunk_lengths(chunk_len):
    """The kernel itself at chunk lengths other than the one ``wkv_chunked`` picks (T = 333: a partial chunk)."""
    x64 = make_inputs(2, 333, seed=6)
    y_ref, s_ref = wkv_scan(*x64)
    y, s = native.ops("wkv").chunked_forward(*[t.float() for t in x64], chunk_len)
    assert rel(y, y_ref) < TOL and rel(s, s_ref) < TOL


@needs_native
@pytest.mark.parametrize("N", [8, 40, 48, 128])
def test_native_other_head_sizes(N, native_calls):
    """Head sizes that are not 64: the portable loops (N = 8, 40) and other vector widths (48, 128)."""
    x64 = make_inputs(2, 70, H=3, N=N, seed=N)
    y_ref, s_ref = wkv_scan(*x64)
    y, s = wkv_chunked(*[t.float() for t in x64])
    assert native_calls and rel(y, y_ref) < TOL and rel(s, s_ref) < TOL


@needs_native
def test_native_state_chaining_split_anywhere(native_calls):
    x64 = make_inputs(2, 90, seed=10)
    y_ref, s_ref = wkv_scan(*x64)
    x = [t.float() for t in x64]
    s = x[-1]
    ys = []
    for lo, hi in [(0, 7), (7, 40), (40, 42), (42, 90)]:
        y, s = wkv_chunked(*[t[:, lo:hi] for t in x[:-1]], s)   # slices of B = 2: not contiguous
        ys.append(y)
    assert len(native_calls) == 4
    assert rel(torch.cat(ys, 1), y_ref) < TOL and rel(s, s_ref) < TOL


@needs_native
def test_native_low_precision_inputs(native_calls):
    x = make_inputs(1, 40, seed=3)
    y_ref, _ = wkv_scan(*[t.bfloat16().double() for t in x[:-1]], x[-1])
    y, s = wkv_chunked(*[t.bfloat16() for t in x[:-1]], x[-1].float())
    assert native_calls and y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel(y, y_ref) < TOL   # against the scan of the same rounded inputs


def test_autograd_runs_the_torch_path(native_calls):
    """Inputs that need gradients take the differentiable torch code; the same inputs under no_grad and
    fp64 inputs do not reach the native kernel's gradient-free path by mistake."""
    x = [t.float().requires_grad_() for t in make_inputs(1, 50, seed=4)]
    assert wkv_module.chunked_backend(*x) == "torch"
    y, s = wkv_chunked(*x)
    assert y.grad_fn is not None and s.grad_fn is not None and native_calls == []
    (y.sum() + s.sum()).backward()
    assert all(t.grad is not None for t in x)
    assert wkv_module.chunked_backend(*make_inputs(1, 5)) == "torch"   # fp64 stays in torch
    with torch.no_grad():
        y_ng, _ = wkv_chunked(*x)
    if native.ENABLED:
        assert native_calls == [wkv_module.NATIVE_CHUNK_LEN] and y_ng.grad_fn is None
        assert rel(y_ng, y.detach().double()) < TOL


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
