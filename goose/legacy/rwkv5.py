"""RWKV-5 "Eagle": per head an N x N state (row = key index, column = value index) with a fixed decay.

    y_t = r_t (S_{t-1} + diag(u) k_t^T v_t)       u: ``time_faaaa`` (or e^``time_first``)
    S_t = diag(w) S_{t-1} + k_t^T v_t             w = exp(-e^``time_decay``), in (0, 1)
    out = output(GroupNorm_heads(y) * silu(gate(x_g)))

5.0 has no gate; in 5.0/5.1 w and u are one number per head, in 5.2 (the released World models) one
per channel. The channel mix is RWKV-4's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import Linear

from .base import LegacyConfig, LegacyRWKV, mix, previous, vector
from .rwkv4 import ChannelMix


def wkv5(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """The RWKV-5/6 recurrence, token by token: r, w, k, v ``[B, T, H, N]``, u ``[H, N]``, state ``[B, H, N, N]``
    (all fp32); returns y ``[B, T, H, N]`` and the new state."""
    ys = []
    for t in range(r.shape[1]):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]                         # k_t^T v_t  [B, H, N, N]
        ys.append((r[:, t, :, None, :] @ (u[..., None] * kv + state)).squeeze(-2))
        state = kv + w[:, t, :, :, None] * state
    return torch.stack(ys, dim=1), state


class TimeMix(nn.Module):
    def __init__(self, cfg: LegacyConfig, layer_id: int):
        super().__init__()
        C, A, H = cfg.n_embd, cfg.dim_att, cfg.n_head
        self.n_head, self.head_size, self.gated = H, cfg.head_size, cfg.version != "x050"
        per = (H, cfg.head_size) if cfg.version == "x052" else (H,)
        self.time_decay = nn.Parameter(torch.empty(per))
        self.bonus_name = "time_faaaa" if cfg.time_faaaa else "time_first"
        self.register_parameter(self.bonus_name, nn.Parameter(torch.empty(per)))
        self.time_mix_k, self.time_mix_v, self.time_mix_r = vector(C), vector(C), vector(C)
        self.receptance = Linear(C, A, bias=False)
        self.key = Linear(C, A, bias=False)
        self.value = Linear(C, A, bias=False)
        if self.gated:
            self.time_mix_g = vector(C)
            self.gate = Linear(C, A, bias=False)
        self.output = Linear(A, C, bias=False)
        self.ln_x = nn.GroupNorm(H, A, eps=64e-5)

    def forward(self, x: Tensor, shift: Tensor, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        heads = (B, T, self.n_head, self.head_size)
        prev = previous(x, shift)
        r, k, v = (lin(mix(x, prev, m)).float().view(heads) for lin, m in
                   ((self.receptance, self.time_mix_r), (self.key, self.time_mix_k), (self.value, self.time_mix_v)))
        w = torch.exp(-torch.exp(self.time_decay.float())).view(self.n_head, -1).expand(heads)
        u = getattr(self, self.bonus_name).float()
        u = (u if self.bonus_name == "time_faaaa" else torch.exp(u)).view(self.n_head, -1).expand(heads[2:])
        y, state = wkv5(r, w, k, v, u, state)
        y = self.ln_x(y.to(x.dtype).view(B * T, -1)).view(B, T, -1)
        if self.gated:
            y = y * F.silu(self.gate(mix(x, prev, self.time_mix_g)))
        return self.output(y), x[:, -1], state


class RWKV5(LegacyRWKV):
    TimeMix, ChannelMix = TimeMix, ChannelMix
