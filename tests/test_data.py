"""Tests for goose.train.data: binidx layout, reader validation, window sampling, dataset building."""

import argparse
import json
import math
import os
import struct
import sys
import types

import numpy as np
import pytest
import torch

from goose.train import data
from goose.train.data import BinidxWriter, TokenDataset, build_dataset, magic_prime, rwkv_window_start


class ByteTokenizer:
    """id = byte + 1, so 0 stays free for end of text (the World vocab's convention)."""

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]


def byte_ids(text: str) -> list[int]:
    return ByteTokenizer().encode(text)


def write(prefix, docs) -> str:
    with BinidxWriter(prefix) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


def write_raw(prefix, tokens, sizes, doc_idx, code=8, magic=b"MMIDIDX\x00\x00", version=1):
    """Build a binidx pair by hand, the way Megatron / RWKV-LM's writer lays it out."""
    itemsize = data.DTYPES[code].itemsize
    pointers = np.concatenate([[0], np.cumsum(sizes)[:-1]]) * itemsize if len(sizes) else []
    with open(f"{prefix}.bin", "wb") as f:
        f.write(np.asarray(tokens, dtype=data.DTYPES[code]).tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(magic + struct.pack("<Q", version) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx)))
        f.write(np.asarray(sizes, dtype="<i4").tobytes())
        f.write(np.asarray(pointers, dtype="<i8").tobytes())
        f.write(np.asarray(doc_idx, dtype="<i8").tobytes())
    return str(prefix)


def test_idx_layout_is_byte_exact(tmp_path):
    docs = [[5, 6, 7], [], [65535]]
    prefix = write(tmp_path / "d", docs)
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n_items, n_doc_idx = struct.unpack_from("<QBQQ", raw, 9)
    assert (version, code, n_items, n_doc_idx) == (1, 8, 3, 4)
    assert len(raw) == 34 + 4 * 3 + 8 * 3 + 8 * 4
    sizes = struct.unpack_from("<3i", raw, 34)
    pointers = struct.unpack_from("<3q", raw, 34 + 12)
    doc_idx = struct.unpack_from("<4q", raw, 34 + 12 + 24)
    assert sizes == (4, 1, 2)
    assert pointers == (0, 8, 10)  # byte offsets of uint16 items
    assert doc_idx == (0, 1, 2, 3)
    assert (tmp_path / "d.bin").read_bytes() == struct.pack("<7H", 5, 6, 7, 0, 0, 65535, 0)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert TokenDataset(prefix).num_documents == 3


def test_round_trip(tmp_path):
    docs = [byte_ids("hello"), byte_ids("wörld\n"), byte_ids("x")]
    ds = TokenDataset(write(tmp_path / "rt", docs))
    assert len(ds) == sum(len(d) + 1 for d in docs)
    assert ds.num_documents == 3
    for i, d in enumerate(docs):
        assert ds.document(i).tolist() == d + [0]
    assert ds.document(-1).tolist() == docs[-1] + [0]
    assert ds.tokens.tolist() == sum((d + [0] for d in docs), [])
    with pytest.raises(IndexError):
        ds.document(3)
    assert TokenDataset(tmp_path / "rt.bin").num_documents == 3  # .bin / .idx suffixes name the same dataset


def test_empty_dataset(tmp_path):
    ds = TokenDataset(write(tmp_path / "e", []))
    assert len(ds) == 0 and ds.num_documents == 0
    with pytest.raises(ValueError, match="train split"):
        ds.get_batch(1, 4, torch.Generator())


@pytest.mark.parametrize("code", [1, 2, 3, 4, 5, 6, 7, 8])
def test_reads_hand_built_rwkv_lm_idx(tmp_path, code):
    # Megatron allows several items per document: here document 0 = items 0 and 1.
    tokens = [3, 4, 5, 0, 9, 0, 7, 0]
    prefix = write_raw(tmp_path / "m", tokens, sizes=[2, 2, 2, 2], doc_idx=[0, 2, 3, 4], code=code)
    ds = TokenDataset(prefix, val_fraction=0)
    assert ds.dtype == data.DTYPES[code]
    assert ds.tokens.tolist() == tokens
    assert ds.num_documents == 3
    assert ds.document(0).tolist() == [3, 4, 5, 0]
    assert ds.document(2).tolist() == [7, 0]
    x, y = ds.get_batch(2, 3, torch.Generator().manual_seed(0))
    assert x.dtype == y.dtype == torch.int64


def test_writer_rejects_bad_ids(tmp_path):
    with pytest.raises(ValueError, match="65536"):
        write(tmp_path / "big", [[1, 65536]])
    with pytest.raises(ValueError, match=">= 0"):
        write(tmp_path / "neg", [[-1]])
    with pytest.raises(ValueError, match="token 0"):
        write(tmp_path / "zero", [[5, 0]])
    with pytest.raises(TypeError, match="integers"):
        write(tmp_path / "float", [[1.5]])
    assert os.listdir(tmp_path) == []  # no final files and no temp files left behind


def test_failed_write_keeps_old_dataset(tmp_path):
    prefix = write(tmp_path / "d", [[1, 2, 3]])
    with pytest.raises(OSError):
        with BinidxWriter(prefix) as w:
            w.add_document([4, 5])
            raise OSError(28, "No space left on device")
    assert TokenDataset(prefix).tokens.tolist() == [1, 2, 3, 0]
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_crash_between_renames_never_looks_valid(tmp_path, monkeypatch):
    prefix = write(tmp_path / "d", [[1, 2, 3]])
    real_replace = os.replace

    def replace_then_die(src, dst):
        if dst.endswith(".idx"):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(data.os, "replace", replace_then_die)
    with pytest.raises(OSError, match="simulated"):
        write(prefix, [[7, 8, 9, 10, 11]])
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match=r"d\.idx"):
        TokenDataset(prefix)  # the new .bin must not pair with the old .idx
    assert sorted(os.listdir(tmp_path)) == ["d.bin"]


def test_corrupt_files_give_clear_errors(tmp_path):
    good = write(tmp_path / "g", [[1, 2, 3], [4]])
    idx, bin_ = (tmp_path / "g.idx").read_bytes(), (tmp_path / "g.bin").read_bytes()

    def variant(name, idx_bytes=idx, bin_bytes=bin_):
        (tmp_path / f"{name}.idx").write_bytes(idx_bytes)
        (tmp_path / f"{name}.bin").write_bytes(bin_bytes)
        return str(tmp_path / name)

    cases = {
        "magic": (variant("magic", b"XXIDIDX\x00\x00" + idx[9:]), "not a binidx index"),
        "version": (variant("version", idx[:9] + struct.pack("<Q", 2) + idx[17:]), "version 2"),
        "dtype": (variant("dtype", idx[:17] + b"\x09" + idx[18:]), "dtype code 9"),
        "header": (variant("header", idx[:20]), "truncated index"),
        "idxcut": (variant("idxcut", idx[:-5]), "truncated index"),
        "idxlong": (variant("idxlong", idx + b"\0" * 8), "corrupt index"),
        "bincut": (variant("bincut", bin_bytes=bin_[:-2]), "truncated"),
        "binlong": (variant("binlong", bin_bytes=bin_ + b"\0\0"), "size mismatch"),
        "pointers": (variant("pointers", idx[:34 + 8 + 8] + struct.pack("<q", 6) + idx[34 + 8 + 16:]),
                     "pointers"),
        "docidx": (variant("docidx", idx[:-8] + struct.pack("<q", 9)), "doc_idx"),
    }
    for name, (prefix, message) in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            TokenDataset(prefix)
        assert name in str(err.value), f"error for {name} should name the file: {err.value}"
    os.remove(tmp_path / "g.bin")
    with pytest.raises(FileNotFoundError, match=r"g\.bin"):
        TokenDataset(good)


def positional_dataset(tmp_path, n):
    """One document whose token at stream position i is i + 1, so a window tells where it came from."""
    return write(tmp_path / "pos", [list(range(1, n))])  # n - 1 ids + the trailing 0 = n tokens


def test_windows_stay_inside_their_split(tmp_path):
    ds = TokenDataset(positional_dataset(tmp_path, 40), val_fraction=0.25, min_val_tokens=0)
    assert ds.split_range("train") == (0, 30) and ds.split_range("val") == (30, 40)
    g = torch.Generator().manual_seed(0)
    for split, (lo, hi) in (("train", (0, 30)), ("val", (30, 40))):
        x, y = ds.get_batch(2000, 8, g, split)
        assert x.shape == y.shape == (2000, 8) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        starts = x[:, 0] - 1  # token value - 1 = position
        ends = torch.where(y[:, -1] == 0, torch.tensor(39), y[:, -1] - 1) + 1  # the last token is the 0
        assert starts.min() == lo and ends.max() == hi  # every start from lo up to the boundary is reachable
        assert set(starts.tolist()) == set(range(lo, hi - 8))
    with pytest.raises(ValueError, match="val split"):
        ds.get_batch(1, 10, g, "val")
    with pytest.raises(ValueError, match="split must be"):
        ds.get_batch(1, 4, g, "test")


def test_default_val_split(tmp_path):
    ds = TokenDataset(positional_dataset(tmp_path, 10_000))
    assert len(ds) - ds.n_train == data.DEFAULT_MIN_VAL_TOKENS  # 0.5% of 10k is smaller than the floor
    assert TokenDataset(tmp_path / "pos", val_fraction=0).n_train == 10_000


def test_sampling_is_deterministic_given_generator_state(tmp_path):
    ds = TokenDataset(positional_dataset(tmp_path, 5000), val_fraction=0.1, min_val_tokens=0)
    g = torch.Generator().manual_seed(1234)
    ds.get_batch(4, 16, g)
    state = g.get_state()
    expected = [ds.get_batch(4, 16, g), ds.random_window(g, 16), ds.get_batch(2, 16, g, "val")]
    g2 = torch.Generator()
    g2.set_state(state)
    got = [ds.get_batch(4, 16, g2), ds.random_window(g2, 16), ds.get_batch(2, 16, g2, "val")]
    for (ex, ey), (gx, gy) in zip(expected, got):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)
    x, y = expected[1]
    assert x.shape == y.shape == (16,) and torch.equal(x[1:], y[:-1])


def brute_is_prime(n):
    return n >= 2 and all(n % d for d in range(2, n))


def test_magic_prime_small_cases():
    for ctx_len in (1, 2, 3, 7, 16):
        for data_size in range(3 * ctx_len, 3 * ctx_len + 400, max(1, ctx_len // 3)):
            p = magic_prime(data_size, ctx_len)
            bound = data_size // ctx_len - 1
            assert brute_is_prime(p) and p % 3 == 2 and p <= bound
            assert not any(brute_is_prime(q) and q % 3 == 2 for q in range(p + 1, bound + 1))
            assert (p - 1) * ctx_len + ctx_len + 1 <= data_size  # the furthest window fits
    with pytest.raises(ValueError, match="too little data"):
        magic_prime(3 * 16 - 1, 16)


def test_magic_prime_matches_rwkv_lm_published_values():
    # RWKV-LM README / demo-training-*.sh: minipile at ctx 512 and 4096, the Pile at ctx 4096.
    assert magic_prime(1498226207, 512) == 2926181
    assert magic_prime(1498226207, 4096) == 365759
    assert magic_prime(332115325534, 4096) == 81082817


def test_rwkv_batch_follows_the_official_formula(tmp_path):
    n, ctx_len = 3000, 16
    ds = TokenDataset(positional_dataset(tmp_path, n), val_fraction=0.1, min_val_tokens=0)
    p = magic_prime(ds.n_train, ctx_len)
    factor = int(p * ((math.sqrt(5) - 1) / 2))
    batch_size, world_size = 4, 2
    steps_per_epoch = 40320 // (batch_size * world_size)
    for step in (0, 1, steps_per_epoch - 1, steps_per_epoch, 10**9):
        epoch, j = divmod(step, steps_per_epoch)
        for rank in range(world_size):
            x, y = ds.rwkv_batch(step, batch_size, ctx_len, world_size=world_size, rank=rank)
            for b in range(batch_size):
                ii = 1 + epoch * 40320 + (j * batch_size + b) * world_size + rank
                pos = (factor * ii**3 % p) * ctx_len
                assert pos == rwkv_window_start(p, ctx_len, epoch, j * batch_size + b, world_size, rank)
                assert pos + ctx_len + 1 <= ds.n_train
                assert x[b].tolist() == list(range(pos + 1, pos + ctx_len + 1))
                assert torch.equal(x[b, 1:], y[b, :-1])
    with pytest.raises(ValueError, match="must divide"):
        ds.rwkv_batch(0, 11, ctx_len)  # 40320 = 8!, so 11 does not divide it
    with pytest.raises(ValueError, match="magic prime"):
        ds.rwkv_batch(0, 4, ctx_len, prime=p + 3)


def test_build_dataset_from_jsonl(tmp_path):
    src = tmp_path / "chat.jsonl"
    lines = [json.dumps({"text": "ab"}), "", json.dumps({"text": ""}),
             json.dumps({"messages": [{"role": "user", "content": "hi"}]}), json.dumps({"text": "é"})]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def render(messages):
        return "".join(f"{m['role'].title()}: {m['content']}\n\n" for m in messages)

    s = build_dataset([src], tmp_path / "out", ByteTokenizer(), render_chat=render, progress=False)
    assert (s.documents, s.skipped, s.bytes) == (3, 2, src.stat().st_size)
    ds = TokenDataset(tmp_path / "out")
    texts = ["ab", "User: hi\n\n", "é"]
    assert [ds.document(i).tolist() for i in range(3)] == [byte_ids(t) + [0] for t in texts]
    assert s.tokens == len(ds)

    with pytest.raises(ValueError, match=r"chat\.jsonl:4: .*render_chat"):
        build_dataset([src], tmp_path / "fail", ByteTokenizer(), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        build_dataset([bad], tmp_path / "fail", ByteTokenizer(), progress=False)
    bad.write_text('{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r'bad\.jsonl:1: no "text" field'):
        build_dataset([bad], tmp_path / "fail", ByteTokenizer(), progress=False)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("fail")]


def test_build_dataset_from_directory(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bee", encoding="utf-8")
    (root / "sub" / "a.md").write_text("ay\r\n", encoding="utf-8")
    (root / "skip.py").write_text("print()", encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    single = tmp_path / "single.txt"
    single.write_text("one", encoding="utf-8")

    s = build_dataset([root, single], tmp_path / "out", ByteTokenizer(), progress=False)
    assert (s.documents, s.skipped) == (3, 1)
    ds = TokenDataset(tmp_path / "out")
    # Sorted paths inside the directory, then the next input; newlines normalised to "\n".
    assert [ds.document(i).tolist() for i in range(3)] == [byte_ids(t) + [0] for t in ("bee", "ay\n", "one")]

    s = build_dataset([root], tmp_path / "py", ByteTokenizer(), patterns=["*.py"], progress=False)
    assert s.documents == 1
    with pytest.raises(ValueError, match="no files match"):
        build_dataset([root], tmp_path / "none", ByteTokenizer(), patterns=["*.rst"], progress=False)
    with pytest.raises(FileNotFoundError):
        build_dataset([tmp_path / "missing"], tmp_path / "none", ByteTokenizer(), progress=False)


def test_cli(tmp_path, monkeypatch, capsys):
    fake = types.ModuleType("goose.tokenizer")
    fake.get_tokenizer = lambda name: ByteTokenizer()
    monkeypatch.setitem(sys.modules, "goose.tokenizer", fake)
    (tmp_path / "a.txt").write_text("x" * 200, encoding="utf-8")

    parser = argparse.ArgumentParser(prog="goose")
    data.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", str(tmp_path), "--out", str(tmp_path / "o"), "--tokenizer", "byte",
                              "--glob", "*.txt", "--ctx-len", "16"])
    args.func(args)
    out = capsys.readouterr().out
    assert "1 documents, 201 tokens" in out
    assert f"--magic_prime {magic_prime(201, 16)}" in out
    assert len(TokenDataset(tmp_path / "o")) == 201
