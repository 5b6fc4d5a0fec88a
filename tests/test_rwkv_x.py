"""RWKV-X: the sparse-attention kernel against its reference, the hybrid model's invariants, loading,
and parity with the official ``rwkv-x`` package (0.1.3, the sparse-attention release) on random weights."""
from importlib import metadata

import pytest
import torch

from goose import rwkv_x as X
from goose.checkpoint import CheckpointError
from goose.model import RWKV7
from goose.ops.sparse_attention import (chunk_attention, dense_causal_attention, select_chunks, sparse_attention,
                                        sparse_attention_ref)
from goose.random_weights import random_state_dict as random_rwkv7_state_dict
from goose.train.init import model_config, new_model

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4   # fp32 parity: max |Δlogit| <= TOL * std(reference logits), as tests/test_parity.py

# (B, T, S, H, D, chunk_size, n_select, shared): S > T means T queries after a cache of S - T keys
CASES = {
    "train": (2, 37, 37, 3, 8, 5, 2, False),
    "train_shared": (2, 37, 37, 3, 8, 5, 2, True),
    "select_none": (2, 30, 30, 2, 4, 4, 0, False),
    "prefill_after_cache": (2, 23, 50, 2, 4, 4, 2, False),
    "decode": (1, 1, 41, 2, 4, 4, 3, True),
    "decode_chunk_boundary": (3, 1, 40, 2, 4, 4, 1, False),
}


def qkv(B, T, S, H, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, S, H, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_sparse_attention_matches_reference(case):
    B, T, S, H, D, chunk, n_select, shared = case
    q, k, v = qkv(B, T, S, H, D)
    out, ref = sparse_attention(q, k, v, chunk, n_select, shared), sparse_attention_ref(q, k, v, chunk, n_select, shared)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    for g_out, g_ref in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g_out, g_ref, rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(sparse_attention(q, k, v, chunk, n_select, shared), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_sparse_equals_dense_causal_when_topk_covers_all_chunks(case):
    B, T, S, H, D, chunk, _, shared = case
    q, k, v = qkv(B, T, S, H, D, seed=1)
    dense = dense_causal_attention(q, k, v)
    everything = select_chunks(q, k, chunk, n_select=S, shared=shared)
    torch.testing.assert_close(chunk_attention(q, k, v, chunk, everything), dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(sparse_attention_ref(q, k, v, chunk, S, shared), dense, rtol=0, atol=1e-12)
    assert torch.equal(sparse_attention(q, k, v, chunk, S, shared), dense)   # the fast path's fallback


def test_sparse_attention_rejects_bad_shapes():
    q, k, v = qkv(1, 8, 4, 2, 4)
    with pytest.raises(ValueError, match="S >= T"):
        sparse_attention(q, k, v, 2, 1)
    q, k, v = qkv(1, 4, 8, 2, 4)
    with pytest.raises(ValueError, match=r"k, v \[B, S, H, D\]"):
        sparse_attention(q, k[..., :2], v, 2, 1)


def random_model(n_rwkv=2, n_attn=2, sparse=X.SparseConfig(4, 2), policy=None, seed=3) -> X.RWKVX:
    sd = X.random_state_dict(n_rwkv, n_attn, 128, 300, seed=seed)
    model = X.RWKVX(X.config_from_checkpoint(sd), sparse, policy)
    model.load_state_dict(sd)
    return model.double().eval()


def test_prefill_equals_token_by_token_decode():
    model = random_model()
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, state = model(tokens)
        state_by_token, steps = None, []
        for t in range(tokens.shape[1]):
            logits, state_by_token = model(tokens[:, t:t + 1], state_by_token, last=True)
            steps.append(logits)
        first, split = model(tokens[:, :13])
        rest, _ = model(tokens[:, 13:], split)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=0, atol=1e-10)
    for a, b in zip(state.keys + state.values, state_by_token.keys + state_by_token.values):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.testing.assert_close(state.rwkv.wkv, state_by_token.rwkv.wkv, rtol=0, atol=1e-10)


def test_cache_policy_is_bounded_and_exact_under_the_cap():
    policy = X.CachePolicy(max_size=24, window=4, min_size=16)
    bounded, unbounded = random_model(policy=policy), random_model()
    tokens = torch.randint(0, 300, (1, 60), generator=torch.Generator().manual_seed(1))
    s_bounded = s_unbounded = None
    lengths = [0]
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            a, s_bounded = bounded(tokens[:, t:t + 1], s_bounded, last=True)
            b, s_unbounded = unbounded(tokens[:, t:t + 1], s_unbounded, last=True)
            lengths.append(s_bounded.cache_len)
            if max(lengths[:-1]) <= policy.max_size:   # the cache never went past the cap so far
                assert torch.equal(a, b), f"step {t}: the policy acted under the cap"
            elif lengths[-1] < lengths[-2]:            # just compressed: the recent window is kept as is
                recent = policy.window + 1
                assert torch.equal(s_bounded.keys[0][:, -recent:], s_unbounded.keys[0][:, -recent:])
    assert max(lengths) == policy.max_size + 1
    assert lengths.count(policy.min_size + 1) >= 2   # compressed to min_size (+ the new token) more than once
    assert not torch.equal(a, b)                      # and it changed the output afterwards


def test_freshly_expanded_model_computes_its_rwkv7():
    rwkv = new_model(model_config(2, 128, 300), seed=0)
    tokens = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, _ = rwkv(tokens)
        model = X.expand(rwkv, n_attn_layer=2, sparse=X.SparseConfig(4, 2))
        logits, state = model(tokens)
    assert [kind for kind, _ in model.config.order] == ["rwkv", "attn", "rwkv", "attn"]
    assert torch.equal(model.moba[1].att.key.weight, rwkv.blocks[1].att.key.weight)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)   # zero output projections: blocks start as identity
    assert state.cache_len == 24


def test_save_load_round_trip(tmp_path):
    sd = X.random_state_dict(2, 1, 128, 300, seed=5)
    torch.save(sd, tmp_path / "x.pth")
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / "x.safetensors"))
    tokens = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        a, _ = X.load(tmp_path / "x.pth")(tokens)
        b, _ = X.load(tmp_path / "x.safetensors")(tokens)
    assert torch.equal(a, b)


def test_load_errors_are_clear(tmp_path):
    torch.save(random_rwkv7_state_dict(2, 128, 300), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="plain RWKV-7 checkpoint.*goose.load"):
        X.load(tmp_path / "plain.pth")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "foo.pth")
    with pytest.raises(CheckpointError, match="not an RWKV-X checkpoint"):
        X.load(tmp_path / "foo.pth")
    torch.save(X.random_state_dict(3, 2, 128, 300), tmp_path / "uneven.pth")
    with pytest.raises(CheckpointError, match="split evenly"):
        X.load(tmp_path / "uneven.pth")
    sd = X.random_state_dict(2, 1, 128, 300)
    del sd["moba.0.att.value.weight"]
    sd["moba.0.ffn.key.weight"] = torch.zeros(256, 128)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing 1 tensors.*moba.0.att.value.weight.*wrong shapes"):
        X.load(tmp_path / "broken.pth")
    with pytest.raises(FileNotFoundError):
        X.load(tmp_path / "absent.pth")


@pytest.fixture(scope="module")
def official_rwkv_x():
    """``rwkv_x.model`` of rwkv-x 0.1.x: 0.2.x replaced the sparse attention with another design."""
    module = pytest.importorskip("rwkv_x.model")
    version = metadata.version("rwkv-x")
    if not version.startswith("0.1."):
        pytest.skip(f"parity needs rwkv-x==0.1.3 (installed: {version}, whose attention is a different design)")
    return module


def test_parity_with_official_rwkv_x_package(tmp_path, official_rwkv_x):
    """Prefill, sparse decoding past chunk_size * topk, and cache compression, as the package does them."""
    chunk, topk, policy = 8, 2, X.CachePolicy(max_size=40, window=10, min_size=30)
    path = tmp_path / "rwkvx.pth"
    torch.save(X.random_state_dict(4, 2, 128, 300, seed=11), path)
    ref = official_rwkv_x.RWKV_X(str(path), "cpu fp32", official_rwkv_x.RWKV_X_Config(
        moba_chunk_size=chunk, moba_topk=topk, max_kv_cache_size=policy.max_size))
    for block in ref.moba:   # the package's config passes max_kv_cache_size only
        block.att.kv_cache_window_size, block.att.min_kv_cache_size = policy.window, policy.min_size
    model = X.load(path, sparse=X.SparseConfig(chunk, topk, "package"), policy=policy)
    prompts = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(0)).tolist()

    with torch.no_grad():
        ref_logits, _ = ref.forward(prompts[0], None, full_output=True)   # longer than chunk * topk
        logits, _ = model(torch.tensor([prompts[0]]))
        assert (logits[0] - ref_logits).abs().max() <= TOL * ref_logits.std()

        ref_logits, ref_state = ref.forward(prompts[1][:12], None, full_output=True)
        logits, state = model(torch.tensor([prompts[1][:12]]))
        assert (logits[0] - ref_logits).abs().max() <= TOL * ref_logits.std()
        token, lengths = int(ref_logits[-1].argmax()), []
        for step in range(45):
            ref_logits, ref_state = ref.forward([token], ref_state)
            logits, state = model(torch.tensor([[token]]), state, last=True)
            assert (logits[0] - ref_logits).abs().max() <= TOL * ref_logits.std(), f"decode step {step}"
            assert state.cache_len == ref_state["moba"][0]["k_cache"].shape[1]
            lengths.append(state.cache_len)
            token = int(ref_logits.argmax())
    assert policy.min_size + 1 in lengths   # the cache was compressed on the way


def test_passkey_prompt_is_rwkv_x_template_at_exact_length():
    from goose.experiments.passkey import TOKENIZER, make_prompt

    text = TOKENIZER.decode(make_prompt(1000, 0.4, 4242))
    assert len(make_prompt(1000, 0.4, 4242)) == 1000
    assert text.startswith("There is an important info hidden inside a lot of irrelevant text.")
    assert "\nThe pass key is 4242. Remember it. 4242 is the pass key.\n" in text
    assert text.endswith("\nWhat is the pass key? The pass key is")
    with pytest.raises(ValueError, match="at least"):
        make_prompt(100, 0.0, 1)


def test_passkey_experiment_runs_end_to_end(tmp_path):
    import dataclasses

    from goose.experiments import passkey

    quick = passkey.PRESETS["quick"]
    micro = dataclasses.replace(quick, train_lengths=(300,), eval_lengths=(300,), depths=2, tests=1, workers=1,
                                train=dataclasses.replace(quick.train, steps=2, eval_every=2, warmup_steps=1),
                                decode_contexts=(300,), decode_steps=1, policy=X.CachePolicy(256, 32, 128))
    results = passkey.run(micro, tmp_path, docs=None)
    assert set(results["passkey"]) == {"RWKV-X", "RWKV-X + cache policy", "RWKV-X, dense attention",
                                       "RWKV-X, attention off", "RWKV-7"}
    assert {r["model"] for r in results["decode"]} == {"RWKV-X, unbounded cache", "RWKV-X, cache policy",
                                                        "RWKV-X, dense attention", "RWKV-7"}
    for name in ("results.json", "results.md", "passkey_heatmap.png", "decode_vs_context.png", "rwkv7.pth"):
        assert (tmp_path / name).stat().st_size > 0
    assert X.load(tmp_path / "rwkv_x.pth").config.n_attn_layer == 1   # the rwkv-x layout
