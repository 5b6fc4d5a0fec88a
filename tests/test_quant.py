"""Weight formats: each computes what it claims (kernel == plain-torch fallback == dequantized matmul), stays
close to fp32, round-trips through a file, and never touches anything but the big matrices."""
import copy

import pytest
import torch
from torch import nn

from goose import quant
from goose.bench.quant import compare
from goose.checkpoint import load
from goose.engine import Engine
from goose.generate import generate
from goose.sampling import SamplingParams
from goose.tokenizer import ByteTokenizer

# relative RMS error of the logits against fp32 on a random 2-layer model (measured: bf16 0.007,
# fp16 0.001, int8 0.02, int4 0.25 -- random weights amplify int4's ~9% per-weight error)
TOL = {"fp32": 1e-5, "bf16": 0.03, "fp16": 0.005, "int8": 0.06, "int4": 0.5}


@pytest.fixture(scope="module")
def model(ckpt_factory):
    return load(ckpt_factory("quant.pth", n_layer=2, n_embd=128, vocab_size=1000, seed=3))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))


def converted(model, fmt, **kw):
    return quant.quantize(copy.deepcopy(model), fmt, **kw)


def decode(model, tokens):
    state, out = None, []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits, state = model(tokens[:, t:t + 1], state, last=True)
            out.append(logits)
    return torch.stack(out, 1)


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_formats_stay_close_to_fp32_on_both_paths(model, tokens, fmt):
    q = converted(model, fmt)
    assert quant.weight_format(q) == fmt
    with torch.no_grad():
        ref, _ = model(tokens)
        prefill, _ = q(tokens)                      # 80 rows per matmul: the fallback
    step = decode(q, tokens)                        # 2 rows: the packed CPU kernels
    assert compare(ref, prefill)["rel_rms"] <= TOL[fmt]
    assert compare(ref, step)["rel_rms"] <= TOL[fmt]
    assert compare(prefill, step)["rel_rms"] <= TOL[fmt] / 2 + 0.01   # the two paths share their weights


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_batched_decode_stays_close_to_fp32(model, fmt):
    """A batch of 8 sequences decodes through the many-rows kernels (bf16 weights multiplied in bf16, int8 ones
    in int16 pairs, where the CPU can): the same tolerances as one sequence."""
    tokens = torch.randint(0, 1000, (8, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, _ = model(tokens)
    assert compare(ref, decode(converted(model, fmt), tokens))["rel_rms"] <= TOL[fmt]


def test_fp32_format_is_exact(model, tokens):
    """The fp32 format only changes the memory layout of the weights (the panels layout where the native kernels
    take it): the same weights, the same logits up to summation order, in a prefill and in a step."""
    q = converted(model, "fp32")
    new, old = q.blocks[0].att.key, model.blocks[0].att.key
    assert new.arranged == quant.native_can("fp32_panels")
    assert torch.equal(new.rows(), old.weight) and torch.equal(q.state_dict()["blocks.0.att.key.weight"], old.weight)
    with torch.no_grad():
        torch.testing.assert_close(q(tokens)[0], model(tokens)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q(tokens[:, :1])[0], model(tokens[:, :1])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_panels_layout_is_invisible_outside_the_kernels(dtype):
    """A DenseLinear in the panels layout (fp32, fp16; bf16 in pairs): state_dict, rows(), load_state_dict and module
    moves see the [out, in] weight; 1 to 100 rows and any activation dtype take the kernel, autograd the plain
    weight."""
    if not (quant.native_can("bf16_dot") if dtype == torch.bfloat16 else quant.native_can("fp32_panels")):
        pytest.skip("no panels kernel for this dtype on this CPU: the [out, in] layout stays")
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(40, 37, bias=False)                  # 37 outputs: the last group of 16 is padded
    nn.init.normal_(lin.weight, generator=g)
    q = quant.DenseLinear.from_linear(lin, dtype)
    w = lin.weight.detach().to(dtype)
    assert q.arranged and q.weight.shape == (3, 16 * 40) and torch.equal(q.rows(), w)
    sd = q.state_dict()
    assert torch.equal(sd["weight"], w)
    other = quant.DenseLinear(40, 37, dtype)
    other.load_state_dict(sd)
    assert other.arranged and torch.equal(other.weight, q.weight)
    q.to("cpu")
    assert q.arranged and torch.equal(q.rows(), w)
    for rows in (1, 3, 4, 5, 16, 100):
        x = torch.randn(rows, 40, generator=g)
        with torch.no_grad():
            seen = x.bfloat16() if dtype == torch.bfloat16 else x      # bf16 pairs round the activations
            torch.testing.assert_close(q(x), (seen.double() @ w.double().T).float(), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 5, 40, generator=g, requires_grad=True)
    q(x.to(dtype)).float().sum().backward()              # the plain weight, with autograd
    torch.testing.assert_close(x.grad, w.float().sum(0).expand_as(x), rtol=1e-2, atol=1e-2)
    half = x.detach()[0].bfloat16()                      # bf16 activations (a bf16 model's) take the kernel too
    with torch.no_grad():
        out = q(half)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), (half.double() @ w.double().T).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("cls,kw", [(quant.Int8Linear, {}), (quant.Int4Linear, {"group_size": 32})])
def test_kernel_equals_fallback_equals_dequantized(cls, kw):
    """A few rows take a kernel (goose's for int8, torch's packed one for int4 at this group size); more rows
    than any kernel takes, the plain-torch fallback; both must equal x @ W.T with the dequantized weight (up to
    the bf16 rounding of activations and outputs)."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 96, bias=False)
    nn.init.normal_(lin.weight, generator=g)
    q = cls.from_linear(lin, **kw)
    w = q.dequantize()
    assert (w - lin.weight).abs().max() <= (0.51 / 127 if cls is quant.Int8Linear else 0.6 / 15) * \
        lin.weight.abs().max() * 2
    x = torch.randn(max(q.packed_max_rows, quant.NATIVE_QUANT_MAX_ROWS) + 8, 256, generator=g)
    ref = x.bfloat16().float() @ w.T
    with torch.no_grad():
        few = torch.cat([q(x[i:i + 4]) for i in range(0, x.shape[0], 4)])    # a kernel
        many = q(x)                                                         # fallback
    for out in (few, many):
        assert ((out - ref).norm() / ref.norm()).item() < 5e-3


def test_int8_pairs_layout_is_invisible_outside_the_kernels():
    """Where the native kernels multiply int8 in int16 pairs, an Int8Linear keeps its weight in their pairs layout;
    state_dict, rows(), load_state_dict and module moves all see the [out, in] weight, and any activation dtype
    takes the kernel."""
    if not quant.native_can("int16_dot"):
        pytest.skip("no int16 dot products on this CPU: the [out, in] layout stays")
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(96, 37, bias=False)                  # 37 outputs: the last group of 16 is padded
    nn.init.normal_(lin.weight, generator=g)
    q = quant.Int8Linear.from_linear(lin)
    standard = (lin.weight.detach() / q.scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    assert q.arranged and q.weight.shape == (3, 16 * 96)
    assert torch.equal(q.rows(), standard) and torch.equal(q.rows(5, 30), standard[5:30])
    sd = q.state_dict()
    assert torch.equal(sd["weight"], standard)
    other = quant.Int8Linear(96, 37)
    other.load_state_dict(sd)
    assert other.arranged and torch.equal(other.weight, q.weight)
    q.to("cpu")                                          # a module move: back to [out, in] and arranged again
    assert q.arranged and torch.equal(q.rows(), standard)
    x = torch.randn(5, 96, generator=g)
    want = x.double() @ q.dequantize().double().T
    with torch.no_grad():
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
            out = q(x.to(dtype))
            assert out.dtype == dtype and ((out.double() - want).norm() / want.norm()).item() < tol


def test_int4_pairs_layout_is_invisible_outside_the_kernels():
    """The same for Int4Linear: weight, scale and zero in the pairs layout in memory, plain in state_dict (equal
    to a module taken back to the plain layout), through load_state_dict and module moves."""
    if not quant.native_can("int16_dot"):
        pytest.skip("no int16 dot products on this CPU: the [out, in / 2] layout stays")
    g = torch.Generator().manual_seed(4)
    lin = nn.Linear(128, 37, bias=False)
    nn.init.normal_(lin.weight, generator=g)
    q = quant.Int4Linear.from_linear(lin, 32)
    plain = copy.deepcopy(q)
    plain._standard()
    assert q.arranged and not plain.arranged and plain.weight.shape == (37, 64) and plain.scale.shape == (37, 4)
    sd = q.state_dict()
    assert sd.keys() == plain.state_dict().keys()
    assert all(torch.equal(sd[k], t) for k, t in plain.state_dict().items())
    other = quant.Int4Linear(128, 37, 32)
    other.load_state_dict(sd)
    assert other.arranged and all(torch.equal(getattr(other, k), getattr(q, k)) for k in ("weight", "scale", "zero"))
    q.to("cpu")
    assert q.arranged and torch.equal(q.dequantize(), plain.dequantize())
    x = torch.randn(3, 128, generator=g)
    with torch.no_grad():
        assert q(x.bfloat16()).dtype == torch.bfloat16
        torch.testing.assert_close(q(x), other(x), rtol=0, atol=0)


def test_fallback_under_autograd_and_blocked_dequantization(monkeypatch):
    """With grad enabled the packed kernels (no autograd formula) are skipped; a big matrix is
    dequantized block by block."""
    monkeypatch.setattr(quant, "DEQUANT_BLOCK_BYTES", 64 * 256)
    lin = nn.Linear(256, 200, bias=False)
    q = quant.Int8Linear.from_linear(lin)
    x = torch.randn(3, 256, requires_grad=True)
    out = q(x)
    out.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(out.detach(), x.detach().bfloat16().float() @ q.dequantize().T, rtol=2e-2, atol=2e-2)


def test_only_big_matrices_are_converted(model):
    q = converted(model, "int8")
    converted_names = {n for n, m in q.named_modules() if isinstance(m, quant.QUANTIZED)}
    assert converted_names == {n for n, m in model.named_modules()
                               if isinstance(m, nn.Linear)}        # the 6 per block + head
    assert all(n.endswith(quant.TARGETS) for n in converted_names)
    for name, p in q.named_parameters():                           # LoRAs, mixes, norms, emb untouched
        assert torch.equal(p, model.get_parameter(name))
    with pytest.raises(ValueError, match="already converted"):
        quant.quantize(q, "int4")
    with pytest.raises(ValueError, match="must be one of"):
        quant.quantize(copy.deepcopy(model), "int3")


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_save_and_load_round_trip(model, tokens, fmt, tmp_path, overwrite_in_place):
    """Files hold the plain layout; loading one arranges the weights again (panels, pairs) and computes the same
    logits, bit for bit."""
    q = converted(model, fmt)
    path = tmp_path / f"m-{fmt}.safetensors"
    quant.save_quantized(q, path)
    assert quant.is_quantized_file(path) and not quant.is_quantized_file(tmp_path / "missing.safetensors")
    back = quant.load_quantized(path)
    assert quant.weight_format(back) == fmt and back.config == model.config
    with torch.no_grad():
        assert torch.equal(back(tokens)[0], q(tokens)[0])
        assert torch.equal(decode(back, tokens[:, :3]), decode(q, tokens[:, :3]))
    size = path.stat().st_size
    with pytest.raises(ValueError, match="not converted"):
        quant.save_quantized(model, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a goose quantized"):
        quant.load_quantized(tmp_path / "nothing.safetensors")
    if fmt != "fp32":
        assert size < sum(t.numel() * 4 for t in model.state_dict().values())
    before = {k: t.clone() for k, t in back.state_dict().items()}
    overwrite_in_place(path)                         # the loaded model owns its weights
    assert all(torch.equal(t, before[k]) for k, t in back.state_dict().items())


def test_weight_bytes_per_token(model):
    fp32 = quant.weight_bytes_per_token(model)
    assert quant.weight_bytes_per_token(converted(model, "int8")) < fp32 / 2
    int8 = quant.weight_bytes_per_token(converted(model, "int8"))
    assert quant.weight_bytes_per_token(converted(model, "int4")) < int8


def test_engine_on_a_quantized_model_equals_generate(tiny_byte_model):
    q = converted(tiny_byte_model, "int8")
    tok = ByteTokenizer()
    prompts = ["abc", "hello there"]
    params = SamplingParams(temperature=0, max_tokens=6)
    for prompt, got in zip(prompts, Engine(q, tok).run(prompts, params)):
        assert got.tokens == generate(q, tok, prompt, params).run().tokens


# Genesis 1:1-5, King James Version (public domain), in the demo corpus's one-verse-a-line layout
KJV = """Ge1:1 In the beginning God created the heaven and the earth.
Ge1:2 And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.
Ge1:3 And God said, Let there be light: and there was light.
Ge1:4 And God saw the light, that it was good: and God divided the light from the darkness.
Ge1:5 And God called the light Day, and the darkness he called Night. And the evening and the morning were the first day.
"""


def test_demo_model_perplexity_per_format(tmp_path):
    """The issue's quality bar on a model goose trained (the built-in demo model): int8 perplexity within 1%
    of fp32, int4 within 5%, on both the prefill and the decode path; the text is Bible-like, so the
    perplexity is far below a byte model's 257."""
    from goose.bench.quant import perplexity_table
    from goose.demo import ASSETS, info

    text = tmp_path / "kjv.txt"
    text.write_text(KJV)
    res = perplexity_table(str(ASSETS / info()["file"]), str(text), formats=("int8", "int4"), decode_tokens=128)
    ppl = res["formats"]
    assert res["tokens"] == len(KJV.encode()) and ppl["fp32"]["prefill"] < 6
    for path in ("prefill", "decode"):
        assert ppl["int8"][path] / ppl["fp32"][path] - 1 < 0.01
        assert ppl["int4"][path] / ppl["fp32"][path] - 1 < 0.05

