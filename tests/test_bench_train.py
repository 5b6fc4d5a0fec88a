"""The analytic FLOP count behind `goose bench train`'s MFU, checked against torch's own counter."""
import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import goose.model
import goose.ops.gemm
from goose.bench.train import flops_per_token
from goose.train.init import model_config, new_model


def _no_wkv(r, w, k, v, a, b, state, mode, chunk_len, out=None):
    """Stands in for the WKV so that only the model's weight matmuls are left for the counter; it uses
    every input, so that backward reaches every weight."""
    return (r * w + k * v + a * b).float(), state


@pytest.mark.parametrize("iclr", [True, False])
def test_matmul_flops_are_six_per_weight_and_token(monkeypatch, iclr):
    cfg = dataclasses.replace(model_config(3, 128, 257), iclr=iclr)
    model = new_model(cfg)
    monkeypatch.setattr(goose.model, "wkv", _no_wkv)
    monkeypatch.setattr(goose.ops.gemm, "_ENABLED", False)   # torch's counter sees only torch's own matmuls
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with FlopCounterMode(display=False) as counter:
        logits, _ = model(tokens)
        logits.sum().backward()
    assert counter.get_total_flops() == flops_per_token(cfg)["matmul"] * tokens.numel()


def test_wkv_flops_scale_with_heads_and_layers():
    small, wide = flops_per_token(model_config(2, 128, 257)), flops_per_token(model_config(4, 256, 257))
    assert small["wkv"] == 3 * 9 * 64 * 64 * 2 * 2
    assert wide["wkv"] == 4 * small["wkv"]
    assert small["total"] == small["matmul"] + small["wkv"]
