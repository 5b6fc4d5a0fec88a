"""RWKV-7 "Goose" (x070) as a plain nn.Module: the definition of the model's math.

Parameter names and shapes are exactly those of official RWKV-LM checkpoints, so an official
``.pth`` loads with ``strict=True``. One forward serves every use: decoding is T == 1, prefill and
training are T > 1 through the chunked WKV kernel; all paths share this code. The one exception is a
fast path: on CPU in fp32 without autograd, a decode step runs in one native call (``ops/fused.py``: the
projections on goose's kernels, the LayerNorms, token shifts and time-mix fused), which tests/test_decode.py
holds to this code.

    x = LN0(emb[tokens])
    for each block:  x += TimeMix(LN1(x));  x += ChannelMix(LN2(x))
    logits = head(LN_out(x))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import Linear, fused, matmul, wkv
from .state import State, starting_state

OFFICIAL_LOG_DECAY_FLOOR = -math.exp(-0.5)  # decay = exp(-e^{-1/2} sigmoid(w)) lies in (0.545, 1)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture only; everything here is implied by a checkpoint's tensor shapes."""

    n_layer: int
    n_embd: int
    vocab_size: int
    head_size: int = 64
    ffn_dim: int = 0          # 0 -> 4 * n_embd
    rank_w: int = 64          # decay LoRA
    rank_a: int = 64          # in-context learning-rate LoRA
    rank_v: int = 32          # value-residual LoRA
    rank_g: int = 128         # output-gate LoRA
    # Ablations for experiments; official checkpoints always use the defaults.
    iclr: bool = True         # False: no in-context learning term (a = 0), diagonal decay only (RWKV-6-like)
    log_decay_floor: float = OFFICIAL_LOG_DECAY_FLOOR  # lower it to let decays approach 0 (eigenvalues to -1)

    def __post_init__(self) -> None:
        if self.n_embd % self.head_size:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of head_size ({self.head_size})")
        if self.ffn_dim == 0:
            object.__setattr__(self, "ffn_dim", 4 * self.n_embd)
        if not self.log_decay_floor < 0:
            raise ValueError(f"log_decay_floor must be negative, got {self.log_decay_floor}")

    @property
    def wkv_chunk_len(self) -> int:
        """Chunk length of the parallel WKV: 32, shorter when decays may go below RWKV-7's clamp so
        that the within-chunk decay factors e^{-L} stay below ~e^{40} in fp32 (see ops/README.md)."""
        chunk = 32
        while chunk > 2 and chunk * -self.log_decay_floor > 40:
            chunk //= 2
        return chunk

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> ModelConfig:
        """Infer every hyper-parameter from official x070 tensor shapes (as the official loaders do)."""
        layers = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
        n_head, head_size = sd["blocks.0.att.r_k"].shape
        vocab_size, n_embd = sd["emb.weight"].shape
        rank_v = next((sd[f"blocks.{i}.att.v1"].shape[1] for i in sorted(layers) if f"blocks.{i}.att.v1" in sd), 32)
        return cls(n_layer=max(layers) + 1, n_embd=n_embd, vocab_size=vocab_size, head_size=head_size,
                   ffn_dim=sd["blocks.0.ffn.key.weight"].shape[0], rank_w=sd["blocks.0.att.w1"].shape[1],
                   rank_a=sd["blocks.0.att.a1"].shape[1], rank_v=rank_v, rank_g=sd["blocks.0.att.g1"].shape[1])


def _vector(C: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(1, 1, C))


def _token_shift(x: Tensor, shift: Tensor) -> Tensor:
    """``x_{t-1} - x_t`` with ``shift`` ``[B, C]`` as the token before ``x`` ``[B, T, C]``."""
    if x.shape[1] == 1:                                                      # decoding: no concatenation
        return shift.unsqueeze(1) - x
    return torch.cat([shift.unsqueeze(1), x[:, :-1]], dim=1) - x


class TimeMix(nn.Module):
    """The attention replacement: token shift, r/w/k/v/a/g projections, WKV, GroupNorm, bonus, gate."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        self.iclr, self.log_decay_floor, self.chunk_len = cfg.iclr, cfg.log_decay_floor, cfg.wkv_chunk_len
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (_vector(C) for _ in range(6))
        self.w0, self.a0, self.v0 = _vector(C), _vector(C), _vector(C)
        self.w1, self.w2 = nn.Parameter(torch.empty(C, cfg.rank_w)), nn.Parameter(torch.empty(cfg.rank_w, C))
        self.a1, self.a2 = nn.Parameter(torch.empty(C, cfg.rank_a)), nn.Parameter(torch.empty(cfg.rank_a, C))
        # layer 0 never uses v0/v1/v2, but RWKV-LM creates (and saves) them for every layer
        self.v1, self.v2 = nn.Parameter(torch.empty(C, cfg.rank_v)), nn.Parameter(torch.empty(cfg.rank_v, C))
        self.g1, self.g2 = nn.Parameter(torch.empty(C, cfg.rank_g)), nn.Parameter(torch.empty(cfg.rank_g, C))
        self.k_k, self.k_a = _vector(C), _vector(C)
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = Linear(C, C, bias=False)
        self.key = Linear(C, C, bias=False)
        self.value = Linear(C, C, bias=False)
        self.output = Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    def forward(self, x: Tensor, shift: Tensor, wkv_state: Tensor, v_first: Tensor | None, mode: str,
                wkv_out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x: ln1 output ``[B, T, C]``; shift: previous token's ``[B, C]``; returns (out, shift, wkv, v_first).

        ``wkv_out`` receives the new WKV state (it may be ``wkv_state`` itself; see ops.wkv)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        if T == 1 and mode == "auto" and fused.available(x, self):
            return self._fused_step(x, shift, wkv_state, v_first, wkv_out)
        dx = _token_shift(x, shift)
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, dx, m) for m in (self.x_r, self.x_w, self.x_k, self.x_v,
                                                                     self.x_a, self.x_g))

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        log_decay = self.log_decay_floor * torch.sigmoid((self.w0 + matmul(torch.tanh(matmul(xw, self.w1)),
                                                                          self.w2)).float())
        g = matmul(torch.sigmoid(matmul(xg, self.g1)), self.g2)              # output gate

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1)            # removal key, unit per head
        if self.iclr:
            a = torch.sigmoid(self.a0 + matmul(matmul(xa, self.a1), self.a2))  # in-context learning rate
            k = k * (1 + (a - 1) * self.k_a)
        else:
            a = torch.zeros_like(k)
        if self.layer_id == 0:
            v_first = v
        else:                                                                # value residual to layer 0
            v = torch.lerp(v, v_first, torch.sigmoid(self.v0 + matmul(matmul(xv, self.v1), self.v2)).to(v.dtype))

        heads = (B, T, H, N)
        y, wkv_state = wkv(r.view(heads), log_decay.view(heads), k.view(heads), v.view(heads),
                           -kk, kk * a.view(heads), wkv_state, mode=mode, chunk_len=self.chunk_len, out=wkv_out)
        y = self.ln_x(y.to(x.dtype).reshape(B * T, C)).view(B, T, C)
        bonus = ((r * k).view(heads) * self.r_k).sum(dim=-1, keepdim=True) * v.view(heads)
        y = y + bonus.view(B, T, C)
        return self.output(y * g), x[:, -1], wkv_state, v_first

    # read from the parameter dicts directly: nn.Module attribute lookup costs ~0.4 us per name, which over
    # the 22 names of a decode step was ~10 us per layer (measured)
    _FUSED_PARAMS = ("w0", "w1", "w2", "a0", "a1", "a2", "v0", "v1", "v2", "g1", "g2", "k_k", "k_a", "r_k")
    _MIX_COEFS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")

    def _fused_params(self) -> list[Tensor]:
        own, norm = self._parameters, self.ln_x._parameters
        return [own[name] for name in self._FUSED_PARAMS] + [norm["weight"], norm["bias"]]

    def mix_coefs(self) -> list[Tensor]:
        """The token-shift coefficients in ``fused.token_mix``'s order (r, w, k, v, a, g)."""
        own = self._parameters
        return [own[name] for name in self._MIX_COEFS]

    def _fused_step(self, x: Tensor, shift: Tensor, wkv_state: Tensor, v_first: Tensor | None,
                    wkv_out: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``forward`` for one token through the fused CPU kernels (ops/fused.py): the same math."""
        B, _, C = x.shape
        out_state = torch.empty_like(wkv_state) if wkv_out is None else wkv_out
        mixed = fused.token_mix(x.view(B, C), shift, self.mix_coefs())
        r, k, v = self.receptance(mixed[0]), self.key(mixed[2]), self.value(mixed[3])
        y, v = fused.time_mix_step(r, k, v, mixed, self._fused_params(), wkv_state, out_state,
                                   None if self.layer_id == 0 else v_first, self.log_decay_floor, self.iclr,
                                   self.ln_x.eps)
        return self.output(y).view(B, 1, C), x[:, -1], out_state, v if self.layer_id == 0 else v_first


class ChannelMix(nn.Module):
    """The FFN: token shift, squared ReLU, no receptance gate in x070."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.x_k = _vector(cfg.n_embd)
        self.key = Linear(cfg.n_embd, cfg.ffn_dim, bias=False)
        self.value = Linear(cfg.ffn_dim, cfg.n_embd, bias=False)

    def forward(self, x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
        xk = torch.addcmul(x, _token_shift(x, shift), self.x_k)
        return self.value(torch.relu(self.key(xk)) ** 2), x[:, -1]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)   # normalises the embedding; layer 0 only
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg)

    def decoder_layer(self) -> tuple[list[Tensor], list[float]]:
        """This block's tensors and LayerNorm epsilons for ``fused.Decoder`` (csrc/decode.cpp DecodeStep's
        order: ln1, the time-mix's token-shift coefficients and fused parameters, ln2, the FFN's coefficient)."""
        ln1, ln2 = self.ln1, self.ln2
        tensors = [ln1.weight, ln1.bias, *self.att.mix_coefs(), *self.att._fused_params(), ln2.weight, ln2.bias,
                   self.ffn.x_k]
        return tensors, [ln1.eps, ln2.eps, self.att.ln_x.eps]

    def projections(self) -> list[nn.Module]:
        """The block's matrix products in ``fused.Decoder``'s order."""
        att, ffn = self.att, self.ffn
        return [att.receptance, att.key, att.value, att.output, ffn.key, ffn.value]


class RWKV7(nn.Module):
    """``logits, state = model(tokens [B, T], state)``; ``state=None`` starts from zeros."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.emb.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.emb.weight.device

    def new_state(self, batch_size: int = 1) -> State:
        """A zero state on the model's device; token shifts in the model dtype, WKV in fp32."""
        c = self.config
        return State.zeros(c.n_layer, c.n_embd, c.n_head, c.head_size, batch_size, self.device, self.dtype)

    def forward(self, tokens: Tensor, state: State | None = None, *, last: bool = False,
                mode: str = "auto", inplace: bool = False) -> tuple[Tensor, State]:
        """Run ``tokens [B, T]`` from ``state``.

        Returns logits ``[B, T, V]`` (``[B, V]`` for the last position only with ``last=True``) and a
        new State; the caller's state is left untouched unless ``inplace=True``. ``mode`` picks the
        WKV form ("auto", "scan" or "chunked"); all give the same result.
        """
        state = starting_state(tokens, state, self.new_state)
        return self._forward(tokens, state, last, mode, inplace)

    def _forward(self, tokens: Tensor, state: State, last: bool, mode: str, inplace: bool) -> tuple[Tensor, State]:
        # each layer's new state is written straight into its slot (of the caller's state if inplace), so
        # decoding allocates no state-sized temporaries; a layer reads its old slot before it is written
        new_state = state if inplace else State(*(torch.empty_like(t) for t in state.tensors().values()))
        if tokens.shape[1] == 1 and mode == "auto":
            logits = self._native_step(tokens, state, new_state)
            if logits is not None:
                return (logits if last else logits[:, None]), new_state
        x = self.emb(tokens)
        v_first = None
        for i, block in enumerate(self.blocks):
            if i == 0:
                x = block.ln0(x)
            # without autograd the WKV writes its new state straight into the slot; with autograd (and in
            # FSDP-wrapped blocks, whose inputs must not be written in place) the copy happens out here
            wkv_out = None if torch.is_grad_enabled() else new_state.wkv[i]
            out, s_att, s_wkv, v_first = block.att(block.ln1(x), state.att_shift[i], state.wkv[i], v_first, mode,
                                                   wkv_out=wkv_out)
            x = x + out
            out, s_ffn = block.ffn(block.ln2(x), state.ffn_shift[i])
            x = x + out
            new_state.att_shift[i].copy_(s_att)
            if wkv_out is None:
                new_state.wkv[i].copy_(s_wkv)
            new_state.ffn_shift[i].copy_(s_ffn)

        if last:
            x = x[:, -1]
        return self.head(self.ln_out(x)), new_state

    def _native_step(self, tokens: Tensor, state: State, new_state: State) -> Tensor | None:
        """The logits ``[B, V]`` of a decode step run in one native call (``fused.Decoder``), or None where that
        does not apply: not fp32 on the CPU, autograd, a projection with no native kernel (an unmerged LoRA, say)
        or a forward hook, more rows than a kernel takes."""
        if not fused.available(state.att_shift, self):
            return None
        for rebuild in (False, True):         # built again once if one of the model's tensors changed under it
            decoder = fused.decoder(self, self._decoder, rebuild)
            if decoder is None or not decoder.takes(tokens.shape[0]):
                return None
            logits = decoder(tokens, state, new_state)
            if logits is not None:
                return logits
        return None

    def _decoder(self) -> fused.Decoder | None:
        """A ``fused.Decoder`` of this model, or None if a projection has no native kernel."""
        projections = [*(p for block in self.blocks for p in block.projections()), self.head]
        products = [getattr(m, "native_product", lambda: None)() for m in projections]
        if any(p is None for p in products):
            return None
        return fused.Decoder(self.emb.weight, self.blocks[0].ln0, self.ln_out,
                             [block.decoder_layer() for block in self.blocks], projections, products,
                             self.config.log_decay_floor, self.config.iclr)
