"""Random RWKV weights in the official RWKV-LM layouts (RWKV-7; RWKV-4/5/6 for goose.legacy), for tests,
benchmarks and the demo.

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


def random_legacy_state_dict(version: str, n_layer: int, n_embd: int, vocab_size: int, *, head_size: int = 64,
                             dim_att: int | None = None, ranks: tuple[int, int] = (32, 64), time_first: bool = False,
                             seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Random RWKV-4 ('v4'), -5 ('x050', 'x051', 'x052') or -6 ('x060') weights, official key names and shapes.

    Decays span short to near-1 memories, bonuses are of either sign, RWKV-4's keys are scaled up (gain 3) so
    its e^k weights span many orders of magnitude. ``dim_att``: width of r/k/v (default ``n_embd``); ``ranks``: RWKV-6's
    mix and decay LoRA ranks; ``time_first``: store an RWKV-5.2 bonus as ln u (``time_first``) instead of u.
    """
    g = torch.Generator().manual_seed(seed)
    C, A = n_embd, dim_att or n_embd
    H = A // head_size
    F = int(C * 3.5) // 32 * 32 if version == "x060" else 4 * C

    def normal(*shape: int, std: float = 1.0, mean: float = 0.0) -> Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    def uniform(*shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    def linear(n_out: int, n_in: int, gain: float = 1.0) -> Tensor:
        return normal(n_out, n_in, std=gain / math.sqrt(n_in))

    sd: dict[str, Tensor] = {"emb.weight": normal(vocab_size, C, std=0.3)}
    for i in range(n_layer):
        p = f"blocks.{i}."
        for ln in ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = normal(C, std=0.1, mean=1.0), normal(C, std=0.05)
        a, f = p + "att.", p + "ffn."
        if version == "v4":
            sd[a + "time_decay"], sd[a + "time_first"] = uniform(A, lo=-6.0, hi=2.0), uniform(A, lo=-3.0, hi=2.0)
        elif version == "x052":
            sd[a + "time_decay"] = uniform(H, head_size, lo=-7.0, hi=1.5)
            u = normal(H, head_size, std=0.5, mean=0.5)
            sd[a + ("time_first" if time_first else "time_faaaa")] = torch.log(u.abs() + 0.05) if time_first else u
        elif version in ("x050", "x051"):
            sd[a + "time_decay"], sd[a + "time_first"] = uniform(H, lo=-5.0, hi=0.5), normal(H, std=0.5, mean=-1.0)
        elif version == "x060":
            for name in ("x", "w", "k", "v", "r", "g"):
                sd[a + "time_maa_" + name] = uniform(1, 1, C)
            sd[a + "time_maa_w1"] = normal(C, 5 * ranks[0], std=0.1)
            sd[a + "time_maa_w2"] = normal(5, ranks[0], C, std=0.1)
            sd[a + "time_decay"] = uniform(1, 1, A, lo=-7.0, hi=1.0)
            sd[a + "time_decay_w1"] = normal(C, ranks[1], std=0.1)
            sd[a + "time_decay_w2"] = normal(ranks[1], A, std=0.1)
            sd[a + "time_faaaa"] = normal(H, head_size, std=0.5, mean=0.5)
        else:
            raise ValueError(f"version must be one of v4, x050, x051, x052, x060, got {version!r}")
        if version != "x060":
            mixes = ("k", "v", "r") if version in ("v4", "x050") else ("k", "v", "r", "g")
            for name in mixes:
                sd[a + "time_mix_" + name] = uniform(1, 1, C)
        names = ("receptance", "key", "value") + (("gate",) if version not in ("v4", "x050") else ())
        for name in names:
            sd[a + name + ".weight"] = linear(A, C, gain=3.0 if version == "v4" and name == "key" else 1.0)
        sd[a + "output.weight"] = linear(C, A)
        if version != "v4":
            sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = normal(A, std=0.1, mean=1.0), normal(A, std=0.05)
        for name in ("k", "r"):
            sd[f + ("time_maa_" if version == "x060" else "time_mix_") + name] = uniform(1, 1, C)
        sd[f + "key.weight"], sd[f + "receptance.weight"] = linear(F, C), linear(C, C)
        sd[f + "value.weight"] = linear(C, F, gain=0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = normal(C, std=0.1, mean=1.0), normal(C, std=0.05)
    sd["head.weight"] = linear(vocab_size, C)
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
