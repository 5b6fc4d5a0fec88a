"""goose.ops.matmul picks OpenBLAS / oneDNN / torch per call; every choice must equal torch's ``x @ w``,
forward and backward, whatever the shapes and memory layouts."""
import pytest
import torch

import goose.ops.gemm as gemm
from goose.ops import blas_matvec, matmul

# fp32 products of length <= 3072 from different BLAS libraries differ only in summation order
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _fast_kernels_for_every_size(monkeypatch):
    """The kernels' size thresholds would send these small test products to torch."""
    monkeypatch.setattr(gemm, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(gemm, "BLAS_MIN_WEIGHT", 0)


def _operands(rows: int, lead: tuple[int, ...], transposed_weight: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, rows, 96, generator=g)
    w = torch.randn(80, 96, generator=g).t() if transposed_weight else torch.randn(96, 80, generator=g)
    return x, w


@pytest.mark.parametrize("rows", [1, 2, 17])
@pytest.mark.parametrize("lead", [(), (1,), (3,)])
@pytest.mark.parametrize("transposed_weight", [False, True])
def test_every_kernel_equals_torch(rows, lead, transposed_weight):
    x, w = _operands(rows, lead, transposed_weight)
    with torch.no_grad():
        plain = x @ w
        torch.testing.assert_close(matmul(x, w), plain, **TOL)            # oneDNN (or torch for 1 row)
        with blas_matvec():
            torch.testing.assert_close(matmul(x, w), plain, **TOL)        # OpenBLAS for a single row
    assert matmul(x, w).shape == plain.shape


def test_blas_matvec_runs_torch_single_threaded_and_restores():
    threads = torch.get_num_threads()
    with blas_matvec():
        assert torch.get_num_threads() == 1
        with blas_matvec():                                               # nesting is harmless
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads
    with blas_matvec(enabled=False):
        assert torch.get_num_threads() == threads


@pytest.mark.parametrize("rows", [1, 7])
def test_gradients_equal_torch(rows):
    x, w = _operands(rows, (2,), True)
    grads = []
    for enabled in (True, False):
        gemm._ENABLED = enabled
        try:
            xg, wg = x.clone().requires_grad_(), w.detach().clone().requires_grad_()
            out = matmul(xg, wg)
            (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
            grads.append((out.detach(), xg.grad, wg.grad))
        finally:
            gemm._ENABLED = True
    for fast, plain in zip(*grads):
        torch.testing.assert_close(fast, plain, **TOL)


def test_other_dtypes_use_torch():
    x, w = _operands(3, (), False)
    out = matmul(x.bfloat16(), w.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, x.bfloat16() @ w.bfloat16())


def test_autocast_still_lowers_precision():
    """Under bf16 autocast the product must be autocast's bf16 one, not an fp32 kernel."""
    x, w = _operands(64, (), False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = matmul(x, w)
    assert out.dtype == torch.bfloat16
