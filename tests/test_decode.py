"""The fused one-token kernels (goose/ops/fused.py, csrc/decode.cpp) against the model's torch code.

Decoding through ``model(tokens [B, 1], state)`` takes the fused path on CPU in fp32 without autograd; the
same call with the fused kernels switched off runs model.py's torch code, which the parity tests pin to the
official package. Both fp32 paths are measured against the torch code run in fp64: the fused one may differ
from it by fp32 rounding only, i.e. by no more than twice what the fp32 torch path itself does or 1e-5 x
std(logits), the level fp32 rounding reaches here (random models amplify it over layers and steps; the torch
path's own error can be smaller by chance: 1.3e-6 once, against 5.3e-6 for the portable kernels' summation
order), and by <= 1e-4 x std at most.
"""
import copy

import pytest
import torch

import goose.model as model_module
from goose.checkpoint import load
from goose.ops import fused, native
from goose.quant import quantize
from goose.state import State

TOL = 1e-5          # fused vs torch fp32 where both read the same rounded inputs (one step)
pytestmark = pytest.mark.skipif(not native.ENABLED, reason="native kernels turned off (GOOSE_NATIVE=0)")


@pytest.fixture
def torch_only(monkeypatch):
    """A context in which the model's fused path is off (model.py's torch code runs)."""
    class _Off:
        def __enter__(self):
            monkeypatch.setattr(model_module.fused, "available", lambda *args: False)

        def __exit__(self, *exc):
            monkeypatch.setattr(model_module.fused, "available", fused.available)
    return _Off()


def _decode(model, tokens, state=None):
    if state is None:     # in the model's dtype, so that an fp64 copy computes everything in fp64
        state = State(*(t.to(model.dtype) for t in model.new_state(tokens.shape[0]).tensors().values()))
    logits = []
    with torch.inference_mode():
        for t in range(tokens.shape[1]):
            out, state = model(tokens[:, t:t + 1], state)
            logits.append(out)
    return torch.cat(logits, dim=1), state


def _err(a, b):
    return ((a - b).abs().max() / b.std()).item()


def test_fused_kernels_build_here():
    with torch.inference_mode():
        assert fused.available(torch.zeros(1, 1, 8), torch.nn.Linear(8, 8))


@pytest.mark.parametrize("batch", [1, 3, 6])            # 6 > the kernels' 4-row blocks
@pytest.mark.parametrize("ranks, head_size", [(None, 64), ((24, 40, 8, 72), 64),
                                              (None, 24)])  # 24: not a multiple of 16, the heads' general path
def test_fused_decode_equals_torch(ckpt_factory, torch_only, batch, ranks, head_size):
    path = ckpt_factory(f"decode_{ranks}_{head_size}.pth", n_layer=3, n_embd=192, vocab_size=300, seed=3, ranks=ranks,
                        head_size=head_size)
    model = load(path)
    tokens = torch.randint(0, 300, (batch, 12), generator=torch.Generator().manual_seed(batch))
    fast, fast_state = _decode(model, tokens)
    with torch_only:
        plain, plain_state = _decode(model, tokens)
    exact, exact_state = _decode(copy.deepcopy(model).double(), tokens)
    assert _err(fast, exact) <= min(1e-4, max(2 * _err(plain, exact), 1e-5))
    for name, a in fast_state.tensors().items():
        b, ref = plain_state.tensors()[name], exact_state.tensors()[name]
        rel = lambda t: ((t.double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
        assert rel(a) <= min(1e-4, max(2 * rel(b), 1e-5)), name


def test_fused_decode_in_place_and_quantized(ckpt_factory, torch_only):
    """The in-place state update and int8 projections (native int8 product) take the fused path too."""
    model = quantize(load(ckpt_factory("decode_q.pth", n_layer=2, n_embd=128, vocab_size=300, seed=4)), "int8")
    tokens = torch.randint(0, 300, (2, 3), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        state = model.new_state(2)
        for t in range(3):
            fast, _ = model(tokens[:, t:t + 1], state, inplace=True)
    with torch_only:
        plain, plain_state = _decode(model, tokens)
    # with AVX512-VNNI the int8 products quantize their activations to int16 (step: max |x| / 32767), so the
    # two paths' fp32-level differences can move an activation by a step (measured: 1.4e-4 x std(logits))
    tol = 1e-3 if native.ops("decode").int16_dot() else TOL
    assert _err(fast[:, 0], plain[:, -1]) <= tol
    assert ((state.wkv - plain_state.wkv).abs().max() / plain_state.wkv.abs().max()).item() <= tol


def test_no_iclr_ablation(torch_only):
    """The a = 0 ablation (experiments) goes through the fused kernel's iclr=False branch."""
    cfg = model_module.ModelConfig(n_layer=2, n_embd=128, vocab_size=100, iclr=False)
    model = model_module.RWKV7(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    tokens = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(1))
    fast, _ = _decode(model, tokens)
    with torch_only:
        plain, _ = _decode(model, tokens)
    exact, _ = _decode(copy.deepcopy(model).double(), tokens)
    assert _err(fast, exact) <= min(1e-4, max(2 * _err(plain, exact), 1e-5))


def test_autograd_takes_the_torch_path():
    x, module = torch.zeros(1, 1, 8), torch.nn.Linear(8, 8)        # its parameters require grad
    assert not fused.available(x, module)
    assert not fused.available(x.requires_grad_(), module.requires_grad_(False))
    with torch.no_grad():
        assert fused.available(x, module.requires_grad_(True))
