"""State API: explicit, never mutated behind the caller's back, clone/save/load/stack/split."""
import pytest
import torch

from goose.state import State


def test_new_state_layout(tiny_model):
    s = tiny_model.new_state(batch_size=3)
    cfg = tiny_model.config
    assert s.wkv.shape == (cfg.n_layer, 3, cfg.n_head, cfg.head_size, cfg.head_size)
    assert s.wkv.dtype == torch.float32
    assert s.att_shift.shape == s.ffn_shift.shape == (cfg.n_layer, 3, cfg.n_embd)
    assert not s.wkv.any()


def test_forward_does_not_mutate_callers_state(tiny_model):
    tokens = torch.randint(0, 65530, (2, 7))
    with torch.no_grad():
        _, s = tiny_model(tokens)
        before = s.clone()
        _, s2 = tiny_model(tokens, s)
        assert all(torch.equal(a, b) for a, b in zip(s.tensors().values(), before.tensors().values()))
        _, s3 = tiny_model(tokens, s, inplace=True)
    assert s3 is s
    assert all(torch.equal(a, b) for a, b in zip(s.tensors().values(), s2.tensors().values()))


def test_save_load_round_trip(tmp_path, tiny_model, overwrite_in_place):
    with torch.no_grad():
        _, s = tiny_model(torch.randint(0, 65530, (2, 5)))
    s.save(tmp_path / "s.safetensors")
    t = State.load(tmp_path / "s.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(s.tensors().values(), t.tensors().values()))
    overwrite_in_place(tmp_path / "s.safetensors")   # the loaded state owns its tensors
    assert all(torch.equal(a, b) for a, b in zip(s.tensors().values(), t.tensors().values()))
    with torch.no_grad():
        x = torch.randint(0, 65530, (2, 3))
        assert torch.equal(tiny_model(x, s)[0], tiny_model(x, t)[0])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        State.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 10)
    with pytest.raises(ValueError, match="not a readable goose state"):
        State.load(tmp_path / "junk.safetensors")


def test_stack_select_split(tiny_model):
    a_tok, b_tok = torch.randint(0, 65530, (1, 6)), torch.randint(0, 65530, (1, 9))
    with torch.no_grad():
        _, a = tiny_model(a_tok)
        _, b = tiny_model(b_tok)
        both = State.stack([a, b])
        assert both.batch_size == 2
        x = torch.randint(0, 65530, (2, 4))
        batched, _ = tiny_model(x, both)
        alone, _ = tiny_model(x[1:], b)
    assert torch.allclose(batched[1:], alone, atol=1e-5, rtol=1e-5)
    parts = both.split()
    assert [p.batch_size for p in parts] == [1, 1]
    assert torch.equal(parts[1].wkv, b.wkv) and torch.equal(both.select([1, 0]).wkv[:, 1], a.wkv[:, 0])


def test_stack_rejects_mismatched_models(tiny_model, tiny_byte_model):
    s = tiny_model.new_state()
    other = State.zeros(3, 128, 2, 64)
    with pytest.raises(ValueError, match="different models"):
        State.stack([s, other])


def test_batch_mismatch_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="batch"):
        tiny_model(torch.zeros(2, 3, dtype=torch.long), tiny_model.new_state(3))


def test_official_state_conversion(tiny_model):
    with torch.no_grad():
        _, s = tiny_model(torch.randint(0, 65530, (1, 5)))
    off = s.to_official()
    assert len(off) == 3 * tiny_model.config.n_layer and off[1].shape == (2, 64, 64)
    back = State.from_official(off)
    assert all(torch.equal(x, y) for x, y in zip(s.tensors().values(), back.tensors().values()))
