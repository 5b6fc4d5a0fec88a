"""goose.ops.matmul / linear pick the native matrix-vector kernels / oneDNN / torch per call; every choice
must equal torch's ``x @ w``, forward and backward, whatever the shapes and memory layouts."""
import pytest
import torch

import goose.ops.gemm as gemm
from goose import quant
from goose.ops import linear, matmul, native

# fp32 products of length <= 3072 from different BLAS libraries differ only in summation order
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def _kernels_built():
    """Tests that call the ops directly need them registered, whichever test runs first."""
    if native.ENABLED:
        native.load("decode")


@pytest.fixture(autouse=True)
def _fast_kernels_for_every_size(monkeypatch):
    """The kernels' size thresholds would send these small test products to torch."""
    monkeypatch.setattr(gemm, "ONEDNN_MIN_MACS", 0)


def _operands(rows: int, lead: tuple[int, ...], transposed_weight: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, rows, 96, generator=g)
    w = torch.randn(80, 96, generator=g).t() if transposed_weight else torch.randn(96, 80, generator=g)
    return x, w


# skipped only when turned off on purpose: where they are on, a failed build must fail the suite, not skip it
needs_native = pytest.mark.skipif(not native.ENABLED, reason="native kernels turned off (GOOSE_NATIVE=0)")


@needs_native
def test_native_kernels_build_here():
    """The machine the suite runs on has a C++ compiler: the fast path must not silently fall back."""
    assert native.load("decode")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 17])
@pytest.mark.parametrize("lead", [(), (1,), (3,)])
@pytest.mark.parametrize("transposed_weight", [False, True])
def test_every_kernel_equals_torch(rows, lead, transposed_weight):
    """1-4 rows (x the leading dims) reach the native kernels, up to 16 the many-rows ``linear`` one, more go
    to oneDNN."""
    x, w = _operands(rows, lead, transposed_weight)
    with torch.no_grad():
        plain = x @ w
        torch.testing.assert_close(matmul(x, w), plain, **TOL)
        if transposed_weight:
            torch.testing.assert_close(linear(x, w.t()), plain, **TOL)
    assert matmul(x, w).shape == plain.shape


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 14, 16, 33])
@pytest.mark.parametrize("in_features, out_features", [(768, 3072), (17, 5), (100, 1002), (64, 768), (3072, 64),
                                                       (2001, 37), (512, 2999)])
def test_native_kernels_against_fp64(rows, in_features, out_features):
    """Every native op (both weight layouts, int8 weights in both layouts) at shapes with and without vector-width
    tails; 1-4 rows run the streaming kernels, more the many-rows one (``linear``/``linear_int8`` only): full and
    partial 4 x 4 tiles, and output counts that are not a multiple of 4 (512 x 2999: each thread's share of
    rows ends in a partial block). The pairs and panels layouts: partial blocks of 16-row groups, passes of 8
    activation rows and fewer, inputs in several chunks (of 256 pairs, 3072; of 512 panels, 2001 and 3072) or
    exactly one (512)."""
    g = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, in_features, generator=g), torch.randn(out_features, in_features, generator=g)
    q = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=g)
    scale = (torch.rand(out_features, generator=g) + 0.5).bfloat16()
    ops = native.ops("decode")
    exact = x.double() @ weight.double().T
    dequantized = q.double() * scale.double()[:, None]
    cases = [(ops.linear(x, weight), exact), (ops.linear_int8(x, q, scale), x.double() @ dequantized.T)]
    if ops.int16_dot() and in_features % 2 == 0:          # Int8Linear's layout on such CPUs
        cases.append((ops.linear_int8_pairs(x, quant.to_panels(q, 2), scale), _int16(x).double() @ dequantized.T))
    if ops.fp32_panels():                                 # an fp32 or fp16 DenseLinear's layout on such CPUs
        cases.append((ops.linear_panels(x, quant.to_panels(weight, 1), out_features), exact))
        w16 = weight.half()
        cases.append((ops.linear_panels(x, quant.to_panels(w16, 1), out_features), x.double() @ w16.double().T))
    if ops.bf16_dot() and in_features % 2 == 0:           # a bf16 one's: bf16 pairs, the activations rounded
        w16 = weight.bfloat16()
        cases.append((ops.linear_panels(x, quant.to_panels(w16, 2), out_features),
                      x.bfloat16().double() @ w16.double().T))
    if rows <= gemm.NATIVE_MAX_ROWS:
        cases.append((ops.matmul(x, weight.T.contiguous()), exact))
    for got, want in cases:
        assert got.shape == want.shape and got.dtype == torch.float32
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5   # fp32 sums of <= 3072 terms


def _int16(x: torch.Tensor) -> torch.Tensor:
    """What linear_int8_pairs multiplies the int8 weights with: the rows of x quantized to int16 (step = max |row|
    / 32767, rounded to nearest even)."""
    step = x.abs().amax(dim=1, keepdim=True) / 32767
    step = torch.where(step > 0, step, torch.ones_like(step))
    return torch.round(x / step) * step


@needs_native
@pytest.mark.parametrize("rows", [3, 9])
def test_int8_activations_are_quantized_per_row_to_int16(rows):
    """Where the products are integer ones (the pairs layout), an int8 weight sees each activation row at 16-bit
    precision: relative to the row's largest value, every activation is off by at most 1 / 65534 (streaming
    kernel: 3 rows; many-rows kernel: 9)."""
    if not native.ops("decode").int16_dot():
        pytest.skip("no int16 dot products on this CPU: int8 weights meet fp32 activations")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, 300, generator=g) * torch.tensor([1.0, 1e-3, 50.0]).repeat(3)[:rows, None]
    x[1, 7] = 0.0
    q, scale = torch.eye(300, dtype=torch.int8), torch.ones(300, dtype=torch.bfloat16)
    got = native.ops("decode").linear_int8_pairs(x.contiguous(), quant.to_panels(q, 2), scale)   # x @ I: x as seen
    assert ((got - x).abs() / x.abs().amax(dim=1, keepdim=True)).max() <= 1 / 65534 + 1e-7
    torch.testing.assert_close(got, _int16(x), rtol=1e-6, atol=0)


@needs_native
@pytest.mark.parametrize("rows", [1, 4, 9, 16, 33])
@pytest.mark.parametrize("in_features, out_features, group", [(256, 96, 64), (384, 37, 128), (192, 20, 4)])
def test_int4_on_the_native_kernel(rows, in_features, out_features, group):
    """Up to NATIVE_QUANT_MAX_ROWS rows an Int4Linear runs on goose's pairs kernel where the CPU has int16 dot
    products: exact against the dequantized weight with the activations as int16 (1-4 rows in one pass, more in
    passes of 8; several quantization groups; a padded group of 16 output rows). Elsewhere on torch's packed
    kernel: within bf16 rounding."""
    g = torch.Generator().manual_seed(rows + group)
    lin = torch.nn.Linear(in_features, out_features, bias=False)
    torch.nn.init.normal_(lin.weight, generator=g)
    q = quant.Int4Linear.from_linear(lin, group)
    x = torch.randn(rows, in_features, generator=g)
    with torch.no_grad():
        got = q(x)
    if native.ops("decode").int16_dot():
        assert q.arranged
        exact = _int16(x).double() @ q.dequantize().double().T
        assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5
    else:
        exact = x.bfloat16().double() @ q.dequantize().bfloat16().double().T
        assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < 5e-3


@needs_native
@pytest.mark.parametrize("rows", [64, 100, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_panels_take_any_row_count(rows, dtype):
    """The panels kernel also serves prefill: many passes of 8 rows (the last partial) over each block of groups,
    the next block fetched over all of them; inputs in 3 chunks (2 of 512 steps and a partial one)."""
    ops = native.ops("decode")
    bf16 = dtype == torch.bfloat16
    if not (ops.bf16_dot() if bf16 else ops.fp32_panels()):
        pytest.skip("no panels kernel for this dtype on this CPU")
    g = torch.Generator().manual_seed(rows)
    K = 2200 if bf16 else 1100                            # 1100 steps either way (bf16 steps are pairs)
    x, w = torch.randn(rows, K, generator=g), torch.randn(200, K, generator=g).to(dtype)
    got = ops.linear_panels(x, quant.to_panels(w, 2 if bf16 else 1), 200)
    want = (x.bfloat16() if bf16 else x).double() @ w.double().T     # bf16: the activations rounded too
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5


@needs_native
@pytest.mark.parametrize("rows", [1, 6])
def test_non_finite_activations_give_non_finite_outputs(rows):
    """A NaN or inf in an activation row must not vanish in any kernel (the int16 quantization of int8
    products included): that row's outputs are NaN, the others stay finite."""
    ops = native.ops("decode")
    x = torch.randn(rows, 40)
    x[0, 3] = float("nan")
    if rows > 1:
        x[1, 5] = float("inf")
    w, q, scale = torch.randn(24, 40), torch.randint(-127, 128, (24, 40), dtype=torch.int8), torch.ones(24).bfloat16()
    outs = [ops.linear(x, w), ops.linear(x, w.bfloat16()), ops.linear_int8(x, q, scale)]
    if ops.int16_dot():
        outs.append(ops.linear_int8_pairs(x, quant.to_panels(q, 2), scale))
    if ops.fp32_panels():
        outs.append(ops.linear_panels(x, quant.to_panels(w, 1), 24))
    for out in outs:
        assert out[0].isnan().all()
        if rows > 1:
            assert not out[1].isfinite().any()
            assert out[2:].isfinite().all()


@needs_native
@pytest.mark.parametrize("rows", [1, 16])
def test_int8_pairs_sums_do_not_overflow(rows):
    """The pairs layout sums a whole dot product in one int32 lane: at the extremes (every activation at its
    row's largest value, every weight at 127) 3072 inputs would overflow it without the kernel's chunks."""
    ops = native.ops("decode")
    if not ops.int16_dot():
        pytest.skip("no int16 dot products on this CPU: no pairs layout")
    x, q = torch.ones(rows, 3072), torch.full((20, 3072), 127, dtype=torch.int8)
    out = ops.linear_int8_pairs(x, quant.to_panels(q, 2), torch.ones(20).bfloat16())
    assert torch.equal(out, torch.full((rows, 20), 127.0 * 3072))


@needs_native
def test_native_kernels_refuse_bad_operands():
    ops = native.ops("decode")
    with pytest.raises(RuntimeError, match="rows"):
        ops.matmul(torch.randn(5, 8), torch.randn(8, 3))                  # more rows than the kernels take
    with pytest.raises(RuntimeError, match="rows"):
        ops.linear(torch.randn(65, 8), torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="columns"):
        ops.linear(torch.randn(1, 8), torch.randn(3, 9))
    with pytest.raises(RuntimeError, match="fp32"):
        ops.matmul(torch.randn(1, 8).double(), torch.randn(8, 3))
    if ops.int16_dot():
        pairs = quant.to_panels(torch.zeros(20, 64, dtype=torch.int8), 2)
        with pytest.raises(RuntimeError, match="groups"):
            ops.linear_int8_pairs(torch.randn(1, 64), pairs, torch.ones(40).bfloat16())
        with pytest.raises(RuntimeError, match="columns"):
            ops.linear_int8_pairs(torch.randn(1, 66), pairs, torch.ones(20).bfloat16())
        with pytest.raises(RuntimeError, match="groups"):
            ops.int8_pairs_rows(pairs, 1, 3)                                # 2 groups of 16 rows
    if ops.fp32_panels():
        panels = quant.to_panels(torch.zeros(20, 64), 1)
        with pytest.raises(RuntimeError, match="groups"):
            ops.linear_panels(torch.randn(1, 64), panels, 40)
        with pytest.raises(RuntimeError, match="columns"):
            ops.linear_panels(torch.randn(1, 66), panels, 20)
        with pytest.raises(RuntimeError, match="fp32"):
            ops.linear_panels(torch.randn(1, 64), panels.double(), 20)
        if ops.bf16_dot():
            with pytest.raises(RuntimeError, match="K even"):                # bf16 steps are pairs of inputs
                ops.linear_panels(torch.randn(1, 63), torch.zeros(2, 16 * 63).bfloat16(), 20)


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


@needs_native
@pytest.mark.parametrize("rows", [1, 3, 9, 16])
def test_native_linear_reads_bf16_weights(rows):
    """The product is exact against the bf16 weight widened to fp32, with the activations rounded to bf16
    where the CPU has bf16 dot products (there the kernels multiply bf16 pairs), else in fp32."""
    g = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, 200, generator=g), torch.randn(70, 200, generator=g).bfloat16()
    in_bf16 = native.ops("decode").bf16_dot()      # then the activations are rounded to bf16 too
    exact = (x.bfloat16() if in_bf16 else x).double() @ weight.double().T
    with torch.no_grad():
        got = linear(x, weight)
    assert got.dtype == torch.float32
    assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5
