"""RWKV-4: per-channel exponential decay, the WKV a weighted average of past values.

    y_t = (sum_{i<t} e^{-(t-1-i)e^d + k_i} v_i + e^{u + k_t} v_t) / (the same sums without v)
    out = output(sigmoid(r_t) * y_t)

with d = ``time_decay``, u = ``time_first`` per channel. The state keeps numerator and denominator
scaled by e^{-p}, p their running max exponent, so nothing overflows: ``wkv`` rows are (aa, bb, pp).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import Linear

from .base import LegacyConfig, LegacyRWKV, mix, previous, vector

NO_PAST = -1e30  # pp before any token: e^{pp} = 0, so the empty sums contribute nothing


def wkv4(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence, token by token: w = -e^d, u ``[A]``; k, v ``[B, T, A]``; state ``[B, 3, A]``, all fp32."""
    aa, bb, pp = state.unbind(1)
    ys = []
    for kt, vt in zip(k.unbind(1), v.unbind(1)):
        ww = u + kt                                   # this token, with its bonus u
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        ys.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        ww = w + pp                                   # decay the past once, then add this token
        p = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
        aa, bb, pp = e1 * aa + e2 * vt, e1 * bb + e2, p
    return torch.stack(ys, dim=1), torch.stack([aa, bb, pp], dim=1)


class TimeMix(nn.Module):
    def __init__(self, cfg: LegacyConfig, layer_id: int):
        super().__init__()
        C, A = cfg.n_embd, cfg.dim_att
        self.time_decay, self.time_first = nn.Parameter(torch.empty(A)), nn.Parameter(torch.empty(A))
        self.time_mix_k, self.time_mix_v, self.time_mix_r = vector(C), vector(C), vector(C)
        self.key = Linear(C, A, bias=False)
        self.value = Linear(C, A, bias=False)
        self.receptance = Linear(C, A, bias=False)
        self.output = Linear(A, C, bias=False)

    def forward(self, x: Tensor, shift: Tensor, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        prev = previous(x, shift)
        r = torch.sigmoid(self.receptance(mix(x, prev, self.time_mix_r)))
        k = self.key(mix(x, prev, self.time_mix_k)).float()
        v = self.value(mix(x, prev, self.time_mix_v)).float()
        y, state = wkv4(-torch.exp(self.time_decay.float()), self.time_first.float(), k, v, state)
        return self.output(r * y.to(x.dtype)), x[:, -1], state


class ChannelMix(nn.Module):
    """The FFN of RWKV-4 and -5: token shift, squared ReLU, sigmoid receptance gate."""

    def __init__(self, cfg: LegacyConfig):
        super().__init__()
        C = cfg.n_embd
        self.time_mix_k, self.time_mix_r = vector(C), vector(C)
        self.key = Linear(C, cfg.ffn_dim, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.value = Linear(cfg.ffn_dim, C, bias=False)

    def forward(self, x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
        prev = previous(x, shift)
        k = torch.relu(self.key(mix(x, prev, self.time_mix_k))) ** 2
        return torch.sigmoid(self.receptance(mix(x, prev, self.time_mix_r))) * self.value(k), x[:, -1]


class RWKV4(LegacyRWKV):
    TimeMix, ChannelMix = TimeMix, ChannelMix

    def wkv_shape(self) -> tuple[int, ...]:
        return (3, self.config.dim_att)

    def initial_wkv(self, batch_size: int) -> Tensor:
        state = torch.zeros(self.config.n_layer, batch_size, 3, self.config.dim_att, device=self.device)
        state[:, :, 2] = NO_PAST
        return state
