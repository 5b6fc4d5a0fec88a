"""Shared fixtures: random checkpoints in the official RWKV-LM layout, and the official package."""
from __future__ import annotations

import os

import pytest
import torch

from goose.checkpoint import load
from goose.random_weights import write_random_checkpoint

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    """``make(name, n_layer, n_embd, vocab_size, **kwargs) -> Path`` of a random official-layout file."""
    root = tmp_path_factory.mktemp("ckpt")
    made = {}

    def make(name: str, n_layer: int = 2, n_embd: int = 128, vocab_size: int = 512, **kwargs):
        if name not in made:
            made[name] = write_random_checkpoint(root / name, n_layer, n_embd, vocab_size, **kwargs)
        return made[name]

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for the rest of the module: the models of these tests are tiny, and a second
    intra-op thread only adds contention (deterministic, and up to 10x faster on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(ckpt_factory):
    """A small fp32 model with the World vocabulary size (65536), 2 layers, 2 heads."""
    path = ckpt_factory("tiny_world.pth", n_layer=2, n_embd=128, vocab_size=65536, seed=7)
    return load(path)


@pytest.fixture(scope="session")
def tiny_byte_model(ckpt_factory):
    """A small fp32 model sized for the byte tokenizer (vocab 257)."""
    path = ckpt_factory("tiny_byte.pth", n_layer=2, n_embd=128, vocab_size=257, seed=8)
    return load(path)


@pytest.fixture(scope="session")
def official_rwkv():
    """The official ``rwkv`` pip package's RWKV-7 class (needs RWKV_V7_ON=1 before import)."""
    os.environ["RWKV_V7_ON"] = "1"
    model_mod = pytest.importorskip("rwkv.model")
    if not hasattr(model_mod, "RWKV_x070"):
        pytest.fail("rwkv.model was imported before RWKV_V7_ON=1 was set; RWKV-7 is unavailable")
    return model_mod.RWKV


@pytest.fixture
def overwrite_in_place():
    """``overwrite(path)``: rewrite the body of a file in place (same inode), as an interrupted copy would;
    whatever was loaded from it must not change (loaders read files memory-mapped)."""

    def overwrite(path) -> None:
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.seek(size // 4)
            f.write(b"\x7f" * (size - size // 4))

    return overwrite

