"""Parity with the official ``rwkv`` pip package (0.8.32, RWKV_V7_ON=1, ``cpu fp32``).

Random checkpoints in the official layout, several shapes and storage dtypes. Tolerance for fp32:
max |Δlogit| <= 1e-4 * std(reference logits), at every position of a 300-token prompt and for 20
tokens decoded on from the returned state, for every WKV mode and on each of goose.ops.matmul's fp32 kernel
paths (the fast CPU libraries for every product, and plain torch, the fallback) and in the inference format
(fp32 weights in the native kernels' panels layout).
"""
import copy

import pytest
import torch

from goose.checkpoint import load
from goose.ops import gemm
from goose import quant
from goose.quant import quantize
from goose.state import State

TOL = 1e-4
CASES = {
    # name: (n_layer, n_embd, vocab, ranks (w, a, v, g), storage dtype, layer-0 v0/v1/v2 present)
    "fp32_h2": (2, 128, 1000, (32, 32, 32, 64), torch.float32, True),
    "bf16_odd_ranks_no_v0": (3, 192, 777, (16, 48, 8, 40), torch.bfloat16, False),
    "fp16_h4": (2, 256, 1500, None, torch.float16, True),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, ckpt_factory, official_rwkv):
    """(official reference run, goose model, vocab): the reference runs once per checkpoint."""
    L, C, V, ranks, dtype, layer0_v = CASES[request.param]
    path = ckpt_factory(f"parity_{request.param}.pth", n_layer=L, n_embd=C, vocab_size=V, ranks=ranks,
                        dtype=dtype, layer0_v=layer0_v, seed=len(request.param))
    ref = official_rwkv(str(path)[:-4], "cpu fp32")
    prompt = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    prompt_logits, ref_state = ref.forward(prompt, None, full_output=True)
    state_shapes = [t.shape for t in ref_state]
    decoded, decoded_logits, logits = [], [], prompt_logits[-1]
    for _ in range(20):  # greedy decode on from the returned state (the official API mutates it in place)
        decoded.append(int(logits.argmax()))
        logits, ref_state = ref.forward([decoded[-1]], ref_state)
        decoded_logits.append(logits.clone())
    run = dict(prompt=prompt, prompt_logits=prompt_logits, state_shapes=state_shapes, decoded=decoded,
               decoded_logits=torch.stack(decoded_logits), final_state=State.from_official(ref_state))
    return run, load(path, dtype=torch.float32), V


def max_err(x, ref):
    return ((x.float() - ref.float()).abs().max() / ref.float().std()).item()


@pytest.fixture(params=["fast_kernels", "plain_torch", "panels"])
def matmul_path(request, monkeypatch):
    """Route every fp32 product through goose's native kernels (up to 4 rows) / oneDNN (more rows), whatever
    its size (these models are below oneDNN's size threshold), or through torch's default kernels; or convert
    the big matrices to the inference format (``quantize(model, "fp32")``: the panels kernel at every row count
    on AVX-512 CPUs), as ``goose generate`` runs them."""
    if request.param == "plain_torch":
        monkeypatch.setattr(gemm, "_ENABLED", False)
    else:
        monkeypatch.setattr(gemm, "ONEDNN_MIN_MACS", 0)
    return request.param


@pytest.mark.parametrize("mode", ["chunked", "scan"])
def test_prompt_and_decode_match_official(pair, mode, matmul_path):
    ref, model, _ = pair
    if matmul_path == "panels":
        model = quantize(copy.deepcopy(model), "fp32")
        assert model.head.arranged == quant.native_can("fp32_panels")   # the kernel runs wherever it exists
    with torch.no_grad():
        logits, state = model(torch.tensor([ref["prompt"]]), mode=mode)
        assert max_err(logits[0], ref["prompt_logits"]) <= TOL
        assert [t.shape for t in state.to_official()] == ref["state_shapes"]
        for step, tok in enumerate(ref["decoded"]):
            logits, state = model(torch.tensor([[tok]]), state, last=True)
            assert max_err(logits[0], ref["decoded_logits"][step]) <= TOL, f"decode step {step}"
    off = ref["final_state"]
    assert ((state.wkv - off.wkv).abs().max() / off.wkv.abs().max()).item() < 1e-4


def test_prefill_split_anywhere_equals_one_prefill(pair):
    _, model, V = pair
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (2, 120), generator=g)
    with torch.no_grad():
        full, s_full = model(tokens)
        parts, state = [], None
        for lo, hi in [(0, 1), (1, 17), (17, 18), (18, 64), (64, 120)]:
            out, state = model(tokens[:, lo:hi], state)
            parts.append(out)
    assert max_err(torch.cat(parts, 1), full) <= TOL
    assert (state.wkv - s_full.wkv).abs().max() <= 1e-4 * s_full.wkv.abs().max()


def test_recurrent_equals_parallel(pair):
    _, model, V = pair
    tokens = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(tokens, mode="chunked")
        state, steps = None, []
        for t in range(tokens.shape[1]):
            out, state = model(tokens[:, t:t + 1], state)
            steps.append(out)
    assert max_err(torch.cat(steps, 1), full) <= TOL


def test_batch_rows_are_independent(pair):
    _, model, V = pair
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, V, (1, 50), generator=g), torch.randint(0, V, (1, 50), generator=g)
    with torch.no_grad():
        both, s_both = model(torch.cat([a, b]))
        only_b, s_b = model(b)
    assert max_err(both[1:], only_b) <= TOL
    assert torch.allclose(s_both.select(1).wkv, s_b.wkv, rtol=1e-4, atol=1e-5)
