"""RWKV-6 "Finch": RWKV-5.2 with data-dependent token shift and decay (both through small LoRAs).

    dx = x_{t-1} - x_t;   m_w..m_g = LoRA_mix(x + dx * maa_x)            (5 mixes from one LoRA)
    x_* = x + dx * (maa_* + m_*)                                        for * in w, k, v, r, g
    w_t = exp(-exp(time_decay + LoRA_decay(x_w)))                       per token and channel
    then RWKV-5's recurrence with w_t; u = ``time_faaaa``; GroupNorm, SiLU gate, output.

The channel mix is RWKV-5's with the same ``x + dx * maa`` shift instead of a lerp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import Linear

from .base import LegacyConfig, LegacyRWKV, previous, vector
from .rwkv5 import wkv5


class TimeMix(nn.Module):
    def __init__(self, cfg: LegacyConfig, layer_id: int):
        super().__init__()
        C, A, H = cfg.n_embd, cfg.dim_att, cfg.n_head
        self.n_head, self.head_size = H, cfg.head_size
        self.time_maa_x, self.time_maa_w, self.time_maa_k = vector(C), vector(C), vector(C)
        self.time_maa_v, self.time_maa_r, self.time_maa_g = vector(C), vector(C), vector(C)
        self.time_maa_w1 = nn.Parameter(torch.empty(C, 5 * cfg.rank_mix))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, cfg.rank_mix, C))
        self.time_decay = vector(A)
        self.time_decay_w1 = nn.Parameter(torch.empty(C, cfg.rank_decay))
        self.time_decay_w2 = nn.Parameter(torch.empty(cfg.rank_decay, A))
        self.time_faaaa = nn.Parameter(torch.empty(H, cfg.head_size))
        self.receptance = Linear(C, A, bias=False)
        self.key = Linear(C, A, bias=False)
        self.value = Linear(C, A, bias=False)
        self.gate = Linear(C, A, bias=False)
        self.output = Linear(A, C, bias=False)
        self.ln_x = nn.GroupNorm(H, A, eps=64e-5)

    def forward(self, x: Tensor, shift: Tensor, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, C = x.shape
        heads = (B, T, self.n_head, self.head_size)
        dx = previous(x, shift) - x
        lora = torch.tanh((x + dx * self.time_maa_x) @ self.time_maa_w1).view(B * T, 5, -1).transpose(0, 1)
        m = torch.bmm(lora, self.time_maa_w2).view(5, B, T, C)                # m_w, m_k, m_v, m_r, m_g
        xw, xk, xv, xr, xg = (x + dx * (maa + mi) for maa, mi in zip(
            (self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g), m))
        r, k, v = (lin(xi).float().view(heads) for lin, xi in ((self.receptance, xr), (self.key, xk), (self.value, xv)))
        log_w = self.time_decay.float() + (torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2).float()
        y, state = wkv5(r, torch.exp(-torch.exp(log_w)).view(heads), k, v, self.time_faaaa.float(), state)
        y = self.ln_x(y.to(x.dtype).view(B * T, -1)).view(B, T, -1)
        return self.output(y * F.silu(self.gate(xg))), x[:, -1], state


class ChannelMix(nn.Module):
    def __init__(self, cfg: LegacyConfig):
        super().__init__()
        C = cfg.n_embd
        self.time_maa_k, self.time_maa_r = vector(C), vector(C)
        self.key = Linear(C, cfg.ffn_dim, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.value = Linear(cfg.ffn_dim, C, bias=False)

    def forward(self, x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
        dx = previous(x, shift) - x
        k = torch.relu(self.key(x + dx * self.time_maa_k)) ** 2
        return torch.sigmoid(self.receptance(x + dx * self.time_maa_r)) * self.value(k), x[:, -1]


class RWKV6(LegacyRWKV):
    TimeMix, ChannelMix = TimeMix, ChannelMix
