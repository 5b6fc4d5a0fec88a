"""Random RWKV-7 weights in the official RWKV-LM layout, for tests, benchmarks and the demo.

Values are drawn in the ranges trained models show (decays spread over the whole allowed range,
non-trivial in-context learning rates and value residuals), so numerics are exercised; the output
is a plain state dict that ``torch.save`` turns into an official-looking ``.pth``.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor


def suggested_ranks(n_embd: int) -> tuple[int, int, int, int]:
    """LoRA ranks (w, a, v, g) by RWKV-LM's Dec-2024 size rule: multiples of 32, at least 32."""
    def rank(scale: float, power: float) -> int:
        return max(32, int(round(scale * n_embd ** power / 32)) * 32)
    return rank(1.8, 0.5), rank(1.8, 0.5), rank(1.3, 0.5), rank(0.6, 0.8)


def random_state_dict(n_layer: int, n_embd: int, vocab_size: int, *, head_size: int = 64,
                      ranks: tuple[int, int, int, int] | None = None, layer0_v: bool = True,
                      seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A random x070 state dict; ``layer0_v=False`` omits the unused ``blocks.0.att.v0/v1/v2``."""
    g = torch.Generator().manual_seed(seed)
    C, H, N = n_embd, n_embd // head_size, head_size
    d_w, d_a, d_v, d_g = ranks or suggested_ranks(C)

    def normal(*shape: int, std: float = 1.0, mean: float = 0.0) -> Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    def uniform(*shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    sd: dict[str, Tensor] = {"emb.weight": normal(vocab_size, C, std=0.3)}
    for i in range(n_layer):
        p = f"blocks.{i}."
        norms = ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2")
        for ln in norms:
            sd[p + ln + ".weight"] = normal(C, std=0.1, mean=1.0)
            sd[p + ln + ".bias"] = normal(C, std=0.05)
        a = p + "att."
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[a + name] = uniform(1, 1, C)
        sd[a + "w0"] = uniform(1, 1, C, lo=-7.0, hi=1.0)
        sd[a + "w1"], sd[a + "w2"] = normal(C, d_w, std=0.1), normal(d_w, C, std=0.1)
        sd[a + "a0"] = normal(1, 1, C, std=0.5)
        sd[a + "a1"], sd[a + "a2"] = normal(C, d_a, std=0.1), normal(d_a, C, std=0.1)
        if i > 0 or layer0_v:
            sd[a + "v0"] = normal(1, 1, C, std=0.5, mean=1.0)
            sd[a + "v1"], sd[a + "v2"] = normal(C, d_v, std=0.1), normal(d_v, C, std=0.1)
        sd[a + "g1"], sd[a + "g2"] = normal(C, d_g, std=0.1), normal(d_g, C, std=0.1)
        sd[a + "k_k"] = normal(1, 1, C, std=0.1, mean=0.8)
        sd[a + "k_a"] = normal(1, 1, C, std=0.1, mean=1.0)
        sd[a + "r_k"] = normal(H, N, std=0.2)
        for name in ("receptance", "key", "value", "output"):
            sd[a + name + ".weight"] = normal(C, C, std=1 / math.sqrt(C))
        sd[a + "ln_x.weight"] = normal(C, std=0.1, mean=1.0)
        sd[a + "ln_x.bias"] = normal(C, std=0.05)
        f = p + "ffn."
        sd[f + "x_k"] = uniform(1, 1, C)
        sd[f + "key.weight"] = normal(4 * C, C, std=1 / math.sqrt(C))
        sd[f + "value.weight"] = normal(C, 4 * C, std=0.5 / math.sqrt(4 * C))
    sd["ln_out.weight"] = normal(C, std=0.1, mean=1.0)
    sd["ln_out.bias"] = normal(C, std=0.05)
    sd["head.weight"] = normal(vocab_size, C, std=1 / math.sqrt(C))
    return {k: t.to(dtype).contiguous() for k, t in sd.items()}


def write_random_checkpoint(path: str | Path, n_layer: int, n_embd: int, vocab_size: int,
                            **kwargs) -> Path:
    """``random_state_dict`` saved with ``torch.save`` (``.pth``) or safetensors (``.safetensors``)."""
    path = Path(path)
    sd = random_state_dict(n_layer, n_embd, vocab_size, **kwargs)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path
