"""The baselines: a small causal Transformer (GPT with rotary positions) in plain torch, the attention
baseline, and Hugging Face's Mamba (``HFMamba``), the optional selective-state-space one.

It is written here rather than taken from Hugging Face (``LlamaForCausalLM``) so that the experiments
need no extra dependency, the baseline shares the RWKV runs' exact training loop, optimiser groups and
width/head-size knobs, and its few lines can be read beside goose's model. The architecture is
Llama-like where it matters for these tasks: pre-LayerNorm, RoPE on queries and keys (no learned
positions, so any test length is valid), causal softmax attention, a 4x MLP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import Linear


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_embd: int
    vocab_size: int
    head_size: int = 32
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.n_embd % self.head_size or self.head_size % 2:
            raise ValueError(f"head_size ({self.head_size}) must be even and divide n_embd ({self.n_embd})")


def rope(x: Tensor, base: float) -> Tensor:
    """Rotate channel pairs (i, i + N/2) of ``x [B, H, T, N]`` by angle ``t * base^(-2i/N)``."""
    T, N = x.shape[-2], x.shape[-1]
    freqs = base ** (-torch.arange(0, N, 2, dtype=torch.float32, device=x.device) / N)
    angles = torch.arange(T, dtype=torch.float32, device=x.device)[:, None] * freqs   # [T, N/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : N // 2], x[..., N // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.rope_base = cfg.n_embd // cfg.head_size, cfg.rope_base
        self.qkv = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # [B, H, T, N]
        y = F.scaled_dot_product_attention(rope(q, self.rope_base), rope(k, self.rope_base), v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False), nn.GELU(),
                                 Linear(4 * cfg.n_embd, cfg.n_embd, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``logits = model(tokens [B, T])`` with logits ``[B, T, V]``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:   # GPT-2 style: N(0, 0.02), residual projections scaled down with depth
                std = 0.02 / (2 * cfg.n_layer) ** 0.5 if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.emb(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_out(x))


class HFMamba(nn.Module):
    """Hugging Face's ``MambaForCausalLM`` as ``logits = model(tokens [B, T])``, the optional diagonal-SSM
    baseline. Without the ``mamba_ssm`` kernels (CPU) transformers runs its pure-torch selective scan.
    Mamba-1's defaults: state size 16, expansion 2, convolution width 4. Needs ``transformers``."""

    def __init__(self, n_layer: int, n_embd: int, vocab_size: int):
        super().__init__()
        from transformers import MambaConfig, MambaForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()   # it warns at every call that the fused CUDA kernels are missing
        self.model = MambaForCausalLM(MambaConfig(vocab_size=vocab_size, hidden_size=n_embd,
                                                  num_hidden_layers=n_layer, state_size=16, expand=2,
                                                  conv_kernel=4, use_cache=False))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(input_ids=tokens).logits

