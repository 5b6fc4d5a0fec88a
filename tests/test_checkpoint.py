"""Checkpoint loading: every layout variant loads; every bad file fails clearly and loads nothing."""
import os
import pickle

import pytest
import torch

import goose
from goose.checkpoint import CheckpointError, config_from_tensors, describe, detect_version, load, save
from goose.random_weights import random_state_dict


def test_hyperparameters_inferred_from_shapes(ckpt_factory):
    path = ckpt_factory("odd.pth", n_layer=3, n_embd=192, vocab_size=333, ranks=(16, 48, 8, 40), seed=3)
    cfg = load(path).config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size, cfg.ffn_dim) == (3, 192, 3, 64, 333, 768)
    assert (cfg.rank_w, cfg.rank_a, cfg.rank_v, cfg.rank_g) == (16, 48, 8, 40)


def test_state_dict_keys_are_exactly_official(ckpt_factory):
    path = ckpt_factory("keys.pth", n_layer=2, n_embd=128, vocab_size=100)
    official = torch.load(path, weights_only=True)
    sd = load(path).state_dict()
    assert sd.keys() == official.keys()
    assert all(sd[k].shape == official[k].shape for k in sd)


def test_missing_layer0_v_is_accepted(tmp_path):
    sd = random_state_dict(2, 128, 512, seed=4)
    torch.save(sd, tmp_path / "with.pth")
    torch.save({k: t for k, t in sd.items() if k not in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")}, tmp_path / "without.pth")
    with_v, without = load(tmp_path / "with.pth"), load(tmp_path / "without.pth")
    assert with_v.state_dict().keys() == without.state_dict().keys()
    tokens = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert torch.equal(with_v(tokens)[0], without(tokens)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_load_dtype_and_safetensors(tmp_path, dtype):
    sd = random_state_dict(2, 128, 100, seed=5, dtype=torch.bfloat16)
    torch.save(sd, tmp_path / "m.pth")
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / "m.safetensors"))
    a, b = load(tmp_path / "m.pth", dtype=dtype), load(tmp_path / "m.safetensors", dtype=dtype)
    assert a.dtype == dtype and all(p.dtype == dtype for p in a.parameters())
    tokens = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        la, sa = a(tokens)
        lb, _ = b(tokens)
    assert torch.equal(la, lb)
    assert sa.wkv.dtype == torch.float32 and sa.att_shift.dtype == dtype


def test_save_round_trip(tmp_path, ckpt_factory):
    model = load(ckpt_factory("rt.pth"))
    for name in ("out.pth", "out.safetensors"):
        save(model, tmp_path / name)
        again = load(tmp_path / name)
        assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), again.state_dict().values()))
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loaded_weights_do_not_follow_later_writes_to_the_file(tmp_path, suffix, overwrite_in_place):
    """The model must own its weights, or rewriting the file in place would silently change a loaded model."""
    from safetensors.torch import save_file

    sd = random_state_dict(2, 128, 100, seed=6)
    path = tmp_path / f"m{suffix}"
    torch.save(sd, path) if suffix == ".pth" else save_file(sd, str(path))
    model = load(path)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    overwrite_in_place(path)
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


@pytest.mark.parametrize("numel", [100, 3 << 20])       # small, and large enough for the huge-page path
def test_own_copy_is_new_memory_with_the_same_values(numel):
    from goose.checkpoint import own_copy

    t = torch.randn(numel, generator=torch.Generator().manual_seed(0)).view(-1, 4)
    for dtype in (torch.float32, torch.bfloat16):
        c = own_copy(t, "cpu", dtype)
        assert c.dtype == dtype and c.shape == t.shape and c.data_ptr() != t.data_ptr()
        assert torch.equal(c, t.to(dtype))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load(tmp_path / "nope.pth")


def test_truncated_file(tmp_path, ckpt_factory):
    data = ckpt_factory("whole.pth").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 100):
        (tmp_path / "cut.pth").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load(tmp_path / "cut.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load(tmp_path / "empty.pth")


def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file
    save_file(random_state_dict(1, 64, 50), str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load(tmp_path / "cut.safetensors")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "text.pth").write_text("hello, I am not a model\n" * 100)
    with pytest.raises(CheckpointError):
        load(tmp_path / "text.pth")
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load(tmp_path / "list.pth")
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not an RWKV checkpoint"):
        load(tmp_path / "other.pth")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = {"emb.weight": torch.zeros(2, 2), "evil": _Exploit(marker)}
    with open(tmp_path / "evil.pth", "wb") as f:
        torch.save(payload, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load(tmp_path / "evil.pth")
    assert not marker.exists()
    with open(tmp_path / "evil_legacy.pth", "wb") as f:  # plain pickle stream, no zip container
        pickle.dump(_Exploit(marker), f)
    with pytest.raises(CheckpointError):
        load(tmp_path / "evil_legacy.pth")
    assert not marker.exists()


OLD_VERSIONS = {  # version: the tensors (name -> shape) that tell it apart, as the official rwkv package does
    "v4": {"blocks.0.att.time_decay": (8,), "blocks.0.att.time_first": (8,), "blocks.0.att.time_mix_k": (1, 1, 8)},
    "x050": {"blocks.0.att.time_decay": (2,), "blocks.0.att.time_first": (2,), "blocks.0.att.ln_x.weight": (8,)},
    "x051": {"blocks.0.att.time_decay": (2,), "blocks.0.att.time_first": (2,), "blocks.0.att.ln_x.weight": (8,),
             "blocks.0.att.gate.weight": (8, 8)},
    "x052": {"blocks.0.att.time_decay": (2, 4), "blocks.0.att.time_faaaa": (2, 4), "blocks.0.att.gate.weight": (8, 8)},
    "x060": {"blocks.0.att.time_maa_x": (1, 1, 8), "blocks.0.att.time_maa_w1": (8, 160),
             "blocks.0.att.time_decay_w1": (8, 64), "blocks.0.att.time_faaaa": (2, 4)},
}


@pytest.mark.parametrize("version", list(OLD_VERSIONS))
def test_older_rwkv_versions_are_detected_and_named_when_incomplete(tmp_path, version):
    """RWKV-4/5/6 files load (tests/test_legacy.py); a file with only a version's marker tensors is named."""
    sd = {"emb.weight": torch.zeros(10, 8), "head.weight": torch.zeros(10, 8)}
    sd.update({k: torch.zeros(shape) for k, shape in OLD_VERSIONS[version].items()})
    torch.save(sd, tmp_path / "old.pth")
    assert detect_version(sd) == version
    name = {"v4": "RWKV-4", "x050": "RWKV-5.0", "x051": "RWKV-5.1", "x052": "RWKV-5.2", "x060": "RWKV-6"}[version]
    with pytest.raises(CheckpointError, match=f"incomplete {name}"):
        load(tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match=f"{name}.*not RWKV-7"):
        config_from_tensors(sd, "old.pth")


def test_wrong_shapes_and_missing_keys(tmp_path):
    sd = random_state_dict(2, 128, 100)
    bad = dict(sd)
    bad["blocks.1.att.key.weight"] = torch.zeros(128, 64)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load(tmp_path / "shape.pth")
    bad = dict(sd)
    del bad["blocks.1.ffn.value.weight"]
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing"):
        load(tmp_path / "missing.pth")


def test_describe(ckpt_factory):
    info = describe(ckpt_factory("info.pth", n_layer=2, n_embd=128, vocab_size=512, ranks=(32, 32, 32, 64)))
    assert info["version"] == "x070" and info["n_layer"] == 2 and info["lora_ranks"] == {"w": 32, "a": 32, "v": 32, "g": 64}
    assert info["parameters"] == sum(p.numel() for p in load(ckpt_factory("info.pth")).parameters())


def test_tokenizer_vocab_mismatch():
    assert goose.tokenizer_for_vocab(65536).name == "world"
    assert goose.tokenizer_for_vocab(257).name == "byte"
    with pytest.raises(ValueError, match="mismatch"):
        goose.tokenizer_for_vocab(1000, "world")
    with pytest.raises(ValueError, match="50304"):
        goose.tokenizer_for_vocab(50304)
