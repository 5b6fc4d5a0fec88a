"""Long-run numerics: 100K tokens through the recurrence (prefilled in chunks, or generated one at a time) stay
finite with bounded state norms (fp32 and bf16), and reduced-precision decode logits stay within stated
tolerances of fp32.

Stated tolerances, decode logits vs the fp32 model on a random 2-layer model, 32 steps:
  relative RMS error  bf16 weights 0.03, whole model in bf16 0.06, int8 weights 0.06
  mean KL(fp32 || x)  bf16 weights 1e-3, whole model in bf16 5e-3, int8 weights 5e-3   (nats)
(measured here: about a third of each).
"""
import copy

import pytest
import torch

from goose import quant
from goose.bench.quant import compare
from goose.checkpoint import load

TOLERANCE = {"bf16 weights": (0.03, 1e-3), "bf16 model": (0.06, 5e-3), "int8 weights": (0.06, 5e-3)}
LONG = 100_000


@pytest.fixture(scope="module")
def path(ckpt_factory):
    return ckpt_factory("numerics.pth", n_layer=2, n_embd=128, vocab_size=512, seed=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_100k_tokens_stay_finite_and_bounded(path, dtype):
    """100K tokens in chunks (the chunked WKV, as prefill runs them), then greedy decoding from that state
    (the one-token step); after every chunk the logits are finite and the state norm has not grown
    beyond twice its value after the first 10K tokens."""
    model = load(path, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    state, norms = None, []
    with torch.inference_mode():
        for lo in range(0, LONG, 4096):
            tokens = torch.randint(0, 512, (1, min(4096, LONG - lo)), generator=g)
            logits, state = model(tokens, state, last=True, inplace=state is not None)
            assert torch.isfinite(logits).all() and torch.isfinite(state.wkv).all(), f"after {lo} tokens"
            norms.append(state.wkv.norm().item())
        token = logits.argmax(-1, keepdim=True)
        for _ in range(200):
            logits, state = model(token, state, last=True, inplace=True)
            token = logits.argmax(-1, keepdim=True)
        assert torch.isfinite(logits).all() and torch.isfinite(state.wkv).all()
    reference = norms[2]
    assert max(norms[3:]) <= 2 * reference and state.wkv.norm().item() <= 2 * reference
    assert all(torch.isfinite(t).all() for t in (state.att_shift, state.ffn_shift))


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_100k_token_generation_stays_finite_and_bounded(path, fmt):
    """100K tokens generated one at a time, each sampled from the last step's logits, through the decode step
    generate/chat/serve run (fp32 activations; fp32 or bf16 weights): the logits stay finite and the state norm
    within twice its value after the first 10K tokens."""
    model = quant.quantize(load(path), fmt)
    g = torch.Generator().manual_seed(1)
    state, token, norms = model.new_state(1), torch.zeros(1, 1, dtype=torch.long), []
    with torch.inference_mode():
        for step in range(1, LONG + 1):
            logits, state = model(token, state, last=True, inplace=True)
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
            if step % 10_000 == 0:
                assert torch.isfinite(logits).all() and torch.isfinite(state.wkv).all(), f"after {step} tokens"
                norms.append(state.wkv.norm().item())
    assert max(norms[1:]) <= 2 * norms[0], norms
    assert all(torch.isfinite(t).all() for t in (state.att_shift, state.ffn_shift))


def test_reduced_precision_decode_logits(path):
    fp32 = load(path)
    variants = {"bf16 weights": quant.quantize(copy.deepcopy(fp32), "bf16"),
                "bf16 model": load(path, dtype=torch.bfloat16),
                "int8 weights": quant.quantize(copy.deepcopy(fp32), "int8")}
    tokens = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    outs = {}
    with torch.inference_mode():
        for name, model in {"fp32": fp32, **variants}.items():
            state, steps = None, []
            for t in range(tokens.shape[1]):
                logits, state = model(tokens[:, t:t + 1], state, last=True)
                steps.append(logits.float())
            outs[name] = torch.stack(steps, 1)
    for name, (rms, kl) in TOLERANCE.items():
        m = compare(outs["fp32"], outs[name])
        assert m["rel_rms"] <= rms and m["kl_mean"] <= kl, (name, m)
