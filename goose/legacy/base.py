"""What RWKV-4, -5 and -6 share: the config, the block stack, the state and the forward.

All versions are ``x = LN0(emb[tokens])``, then per block ``x += TimeMix(LN1(x)); x += ChannelMix(LN2(x))``,
then ``head(LN_out(x))``; only TimeMix/ChannelMix and the shape of the WKV state differ. The state is a
:class:`goose.state.State` like RWKV-7's: ``att_shift``/``ffn_shift`` ``[L, B, C]`` (last token's LN1/LN2
output) and ``wkv`` in fp32, ``[L, B, H, N, N]`` for RWKV-5/6 (official orientation: row = key index,
column = value index, the transpose of RWKV-7's) and ``[L, B, 3, A]`` for RWKV-4 (the numerator ``aa``,
denominator ``bb`` and running max exponent ``pp`` of its per-channel weighted average). So batching,
saving, the engine and the server handle every version alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from ..ops import Linear
from ..state import State, starting_state

VERSIONS = ("v4", "x050", "x051", "x052", "x060")
NAMES = {"v4": "RWKV-4", "x050": "RWKV-5.0 (x050)", "x051": "RWKV-5.1 (x051)", "x052": "RWKV-5.2 (x052)",
         "x060": "RWKV-6 (x060)"}


@dataclass(frozen=True)
class LegacyConfig:
    """Architecture of an RWKV-4/5/6 checkpoint, every field implied by its tensor shapes."""

    version: str          # one of VERSIONS
    n_layer: int
    n_embd: int           # C: residual width
    vocab_size: int
    dim_att: int          # A: width of r/k/v (= C in released models)
    ffn_dim: int
    n_head: int = 1       # RWKV-5/6; RWKV-4 has no heads
    rank_mix: int = 0     # RWKV-6 token-shift LoRA (per each of the 5 mixes)
    rank_decay: int = 0   # RWKV-6 decay LoRA
    time_faaaa: bool = True  # RWKV-5: the bonus is stored as u (time_faaaa) rather than ln u (time_first)

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {self.version!r}")
        if self.dim_att % self.n_head:
            raise ValueError(f"dim_att ({self.dim_att}) must be a multiple of n_head ({self.n_head})")

    @property
    def head_size(self) -> int:
        return self.dim_att // self.n_head

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], version: str) -> LegacyConfig:
        """Infer every hyper-parameter from official tensor shapes (as the official ``rwkv`` package does)."""
        att = "blocks.0.att."
        vocab_size, n_embd = sd["emb.weight"].shape
        common = dict(version=version, n_layer=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
                      n_embd=n_embd, vocab_size=vocab_size, dim_att=sd[att + "key.weight"].shape[0],
                      ffn_dim=sd["blocks.0.ffn.key.weight"].shape[0])
        if version == "v4":
            return cls(**common)
        if version == "x060":
            return cls(**common, n_head=sd[att + "time_faaaa"].shape[0], rank_mix=sd[att + "time_maa_w1"].shape[1] // 5,
                       rank_decay=sd[att + "time_decay_w1"].shape[1])
        return cls(**common, n_head=sd[att + "time_decay"].shape[0], time_faaaa=att + "time_faaaa" in sd)


def vector(n: int) -> nn.Parameter:
    """A per-channel parameter in the official ``[1, 1, n]`` shape."""
    return nn.Parameter(torch.empty(1, 1, n))


def mix(x: Tensor, prev: Tensor, m: Tensor) -> Tensor:
    """RWKV-4/5 token mixing: the share ``m`` of the current token, ``1 - m`` of the previous one."""
    return x * m + prev * (1 - m)


def previous(x: Tensor, shift: Tensor) -> Tensor:
    """The token shift: ``x`` ``[B, T, C]`` moved one step later, ``shift`` ``[B, C]`` filling position 0."""
    if x.shape[1] == 1:
        return shift.unsqueeze(1)
    return torch.cat([shift.unsqueeze(1), x[:, :-1]], dim=1)


class Block(nn.Module):
    def __init__(self, cfg: LegacyConfig, layer_id: int, att: nn.Module, ffn: nn.Module):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.att = att
        self.ffn = ffn


class LegacyRWKV(nn.Module):
    """``logits, state = model(tokens [B, T], state)``, the calling convention of :class:`goose.RWKV7`.

    Subclasses set ``TimeMix`` (built as ``(cfg, layer_id)``), ``ChannelMix`` (built as ``(cfg)``) and,
    for a WKV state that is not ``(H, N, N)`` per row, ``wkv_shape``/``initial_wkv``.
    A TimeMix maps (LN1 output, shift ``[B, C]``, wkv ``[B, ...]``) to (out, new shift, new wkv).
    """

    TimeMix: type[nn.Module]
    ChannelMix: type[nn.Module]

    def __init__(self, cfg: LegacyConfig):
        super().__init__()
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i, self.TimeMix(cfg, i), self.ChannelMix(cfg))
                                    for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.emb.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.emb.weight.device

    def wkv_shape(self) -> tuple[int, ...]:
        """One layer's WKV state per batch row (RWKV-5/6: ``(H, N, N)``)."""
        return (self.config.n_head, self.config.head_size, self.config.head_size)

    def initial_wkv(self, batch_size: int) -> Tensor:
        """``[L, B, *wkv_shape]`` fp32: the WKV state before any token."""
        return torch.zeros(self.config.n_layer, batch_size, *self.wkv_shape(), device=self.device)

    def new_state(self, batch_size: int = 1) -> State:
        """The state before any token, on the model's device; token shifts in the model dtype, WKV in fp32."""
        c = self.config
        shift = torch.zeros(c.n_layer, batch_size, c.n_embd, device=self.device, dtype=self.dtype)
        return State(shift, self.initial_wkv(batch_size), shift.clone())

    def forward(self, tokens: Tensor, state: State | None = None, *, last: bool = False,
                mode: str = "auto", inplace: bool = False) -> tuple[Tensor, State]:
        """Run ``tokens [B, T]`` from ``state``, token by token (the recurrent form).

        Returns logits ``[B, T, V]`` (``[B, V]`` with ``last=True``) and a new State; the caller's state
        is untouched unless ``inplace=True``. ``mode`` exists for RWKV7 compatibility: "auto" or "scan".
        """
        if mode not in ("auto", "scan"):
            raise ValueError(f"{NAMES[self.config.version]} runs the recurrent scan only; mode must be 'auto' "
                             f"or 'scan', got {mode!r}")
        state = starting_state(tokens, state, self.new_state)
        if tuple(state.wkv.shape[2:]) != self.wkv_shape() or state.n_layer != self.config.n_layer:
            raise ValueError(f"state does not fit this {NAMES[self.config.version]} model: WKV "
                             f"{tuple(state.wkv.shape)}, expected [{self.config.n_layer}, B, "
                             f"{', '.join(map(str, self.wkv_shape()))}]")

        return self._forward(tokens, state, last, inplace)

    def _forward(self, tokens: Tensor, state: State, last: bool, inplace: bool) -> tuple[Tensor, State]:
        new_state = state if inplace else State(*(torch.empty_like(t) for t in state.tensors().values()))
        x = self.blocks[0].ln0(self.emb(tokens))
        for i, block in enumerate(self.blocks):
            out, att_shift, wkv = block.att(block.ln1(x), state.att_shift[i], state.wkv[i])
            x = x + out
            out, ffn_shift = block.ffn(block.ln2(x), state.ffn_shift[i])
            x = x + out
            new_state.att_shift[i].copy_(att_shift)
            new_state.wkv[i].copy_(wkv)
            new_state.ffn_shift[i].copy_(ffn_shift)
        if last:
            x = x[:, -1]
        return self.head(self.ln_out(x)), new_state
