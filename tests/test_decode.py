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
import gc
import weakref

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


@pytest.fixture
def native_step_calls(monkeypatch):
    """The number of decode steps the whole-step decoder (fused.Decoder) has run so far: ``calls()``."""
    count = [0]
    real = fused.Decoder.__call__

    def counted(self, *args):
        out = real(self, *args)
        count[0] += out is not None
        return out

    monkeypatch.setattr(fused.Decoder, "__call__", counted)
    return lambda: count[0]


@pytest.fixture
def per_op(monkeypatch):
    """A context in which decode steps skip the whole-step decoder: model.py's loop over the blocks runs, its
    time-mix on the fused kernels, its projections called module by module."""
    class _PerOp:
        def __enter__(self):
            monkeypatch.setattr(model_module.RWKV7, "_native_step", lambda *args: None)

        def __exit__(self, *exc):
            monkeypatch.undo()
    return _PerOp()


@pytest.mark.parametrize("fmt", [None, "fp32", "bf16", "fp16", "int8", "int4"])
def test_native_step_runs_every_format(ckpt_factory, native_step_calls, per_op, fmt):
    """Every weight format decodes in one native call (fp16 needs AVX-512's panels, int4 AVX512-VNNI's pairs: without
    them their products run on torch), and that call computes what the module-by-module step does
    (same kernels; only the LayerNorms run on other code, so fp32 rounding apart; where the kernels round the
    activations, such a difference can move one by a rounding step: a step of int8/int4's int16 activations is
    1/65534 of the row's range (1e-3), of bf16's 2^-8 of the value (1e-2; measured 4.5e-3))."""
    model = load(ckpt_factory("decode_formats.pth", n_layer=2, n_embd=128, vocab_size=300, seed=5))
    if fmt is not None:
        model = quantize(model, fmt)
    tokens = torch.randint(0, 300, (3, 4), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        state = model.new_state(3)
        fast = torch.stack([model(tokens[:, t:t + 1], state, last=True, inplace=True)[0] for t in range(4)], dim=1)
    decode = native.ops("decode")
    native_kernels = {"fp16": decode.fp32_panels(), "int4": decode.int16_dot()}.get(fmt, True)
    assert native_step_calls() == (4 if native_kernels else 0)
    with per_op:
        slow, slow_state = _decode(model, tokens)
    tol = {"int8": 1e-3 if decode.int16_dot() else TOL, "int4": 1e-3 if decode.int16_dot() else TOL,
           "bf16": 1e-2 if decode.bf16_dot() else TOL}.get(fmt, TOL)
    assert _err(fast, slow) <= tol
    for name, a in state.tensors().items():
        b = slow_state.tensors()[name]
        assert ((a - b).abs().max() / b.abs().max()).item() <= tol, name


def test_native_step_follows_changes_to_the_model(ckpt_factory, native_step_calls, per_op):
    """The decoder holds the model's tensors: a replaced module (quantize) or a parameter given new memory
    (``.data =``) is seen at the next step, which builds the decoder again."""
    path = ckpt_factory("decode_changes.pth", n_layer=2, n_embd=128, vocab_size=300, seed=6)
    model, token = load(path), torch.tensor([[7]])
    with torch.inference_mode():
        before = model(token)[0]
        quantize(model, "int8")
        after = model(token)[0]
        assert torch.equal(after, quantize(load(path), "int8")(token)[0])
        assert not torch.equal(after, before)
        ln = model.blocks[1].ln1.weight
        ln.data = ln.data * 2                      # new memory under the same Parameter
        doubled = model(token)[0]
    assert native_step_calls() == 4
    with per_op, torch.inference_mode():
        assert _err(doubled, model(token)[0]) <= 1e-3
    assert _err(doubled, after) > 1e-2


def test_native_step_rejects_bad_tokens_writing_nothing(ckpt_factory):
    model = load(ckpt_factory("decode_changes.pth", n_layer=2, n_embd=128, vocab_size=300, seed=6))
    with torch.inference_mode():
        state = model.new_state(2)
        model(torch.tensor([[1], [2]]), state, inplace=True)
        kept = state.clone()
        with pytest.raises(IndexError):
            model(torch.tensor([[1], [300]]), state, inplace=True)
    for name, t in state.tensors().items():
        assert torch.equal(t, kept.tensors()[name]), name


def test_native_step_falls_back_where_it_does_not_apply(ckpt_factory, native_step_calls, torch_only):
    """More rows than a projection's kernel takes (17 > 16 for the model's own fp32 Linear), a forward hook on a
    projection (it must see the step), or a projection with no native kernel, run the per-module path: same
    results."""
    model = load(ckpt_factory("decode_formats.pth", n_layer=2, n_embd=128, vocab_size=300, seed=5))
    tokens = torch.randint(0, 300, (17, 2), generator=torch.Generator().manual_seed(3))
    wide, _ = _decode(model, tokens)
    seen = []
    hook = model.blocks[1].att.value.register_forward_hook(lambda module, args, out: seen.append(out))
    hooked, _ = _decode(model, tokens[:2])
    hook.remove()
    assert len(seen) == 2
    plain_head = torch.nn.Linear(128, 300, bias=False)
    plain_head.weight = model.head.weight
    model.head = plain_head
    narrow, _ = _decode(model, tokens[:2])
    assert native_step_calls() == 0
    with torch_only:
        plain, _ = _decode(model, tokens)
    assert _err(wide, plain) <= TOL and _err(narrow, plain[:2]) <= TOL and _err(hooked, plain[:2]) <= TOL


def test_native_step_lets_replaced_weights_go(ckpt_factory):
    """Replacing the projections (quantize()) drops the step built on them at once, so their old weights are
    freed then, not at the next step (quantize() converts one matrix at a time to keep memory flat)."""
    model = load(ckpt_factory("decode_changes.pth", n_layer=2, n_embd=128, vocab_size=300, seed=6))
    with torch.inference_mode():
        model(torch.tensor([[7]]))
    old = weakref.ref(model.head.weight)
    quantize(model, "int8")
    gc.collect()
    assert old() is None
