"""RWKV-X (arXiv 2504.21463): RWKV-7 blocks interleaved with top-k chunk sparse-attention blocks.

    x = LN0(emb[tokens])
    for each block in order:   an RWKV-7 Block of goose.model, or an attention block:
                               x += SparseAttention(LN1(x));  x += ChannelMix(LN2(x))
    logits = head(LN_out(x))

One attention block follows every ``n_rwkv // n_attn`` RWKV blocks (RWKV-X's ``get_block_exe_order``;
a single attention block goes last). The attention block has ``receptance``/``key``/``value``/``output``
projections, heads of 64 and no positional encoding, then an RWKV-7 ChannelMix with its token shift.

Checkpoints use the layout of RWKV-X's training code and of its ``rwkv-x`` package: ``rwkv.<an RWKV-7
x070 state dict>`` plus ``moba.<i>.{ln1,ln2,att,ffn}.*``. ``RWKVX.state_dict()`` is that layout, so
official files load with ``strict=True`` and goose's saves load in the package.

The sparse attention (goose/ops/sparse_attention.py) comes in two flavours, because RWKV-X's code has two:

- ``"moba"`` (default): a query sees its own chunk plus the top ``topk - 1`` earlier chunks, chosen per
  head. This is what RWKV-X trains with (``moba_efficient.py``) and what its passkey evaluation runs
  (the training model, re-run on the whole prompt). A prefill equals token-by-token decoding.
- ``"package"``: what ``rwkv-x==0.1.3`` does at inference, for parity. Decoding takes the top ``topk``
  complete chunks, scored with all heads summed, plus the query's partial chunk. A prefill that with
  the cache exceeds ``chunk_size * topk`` tokens attends only inside chunks counted from its own
  first token and ignores the cache.

The KV cache policy (:class:`CachePolicy`) is the package's ``update_kv_cache``: before a call whose
cache holds more than ``max_size`` entries, keep the last ``window`` entries and, per head, the
``min_size - window`` earlier ones with the largest summed softmax attention from this call's
queries, most-attended first (the package's order). A cache then never holds more than
``max_size + T`` entries, which is what keeps the per-token decoding cost flat.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import (LAYER0_UNUSED, CheckpointError, config_from_tensors, detect_version, layout_problems, own_copy,
                         read_tensors)
from .model import ChannelMix, ModelConfig, RWKV7
from .ops import Linear
from .ops.sparse_attention import dense_causal_attention, sparse_attention
from .random_weights import random_state_dict as random_rwkv7_state_dict
from .state import State, starting_state

FLAVOURS = ("moba", "package")


@dataclass(frozen=True)
class RWKVXConfig:
    """Architecture only, inferred from checkpoint shapes (``attn_head_size`` is rwkv-x's fixed 64)."""

    rwkv: ModelConfig
    n_attn_layer: int
    attn_head_size: int = 64

    def __post_init__(self) -> None:
        L, A, C = self.rwkv.n_layer, self.n_attn_layer, self.rwkv.n_embd
        if A < 0 or (A and L % A):
            raise ValueError(f"the RWKV blocks ({L}) must split evenly between the attention blocks ({A})")
        if C % self.attn_head_size:
            raise ValueError(f"n_embd ({C}) must be a multiple of attn_head_size ({self.attn_head_size})")

    @property
    def order(self) -> list[tuple[str, int]]:
        """Execution order as ("rwkv", layer) and ("attn", index) pairs."""
        if self.n_attn_layer == 0:
            return [("rwkv", i) for i in range(self.rwkv.n_layer)]
        interval = self.rwkv.n_layer // self.n_attn_layer
        return [pair for a in range(self.n_attn_layer)
                for pair in [("rwkv", i) for i in range(a * interval, (a + 1) * interval)] + [("attn", a)]]


@dataclass(frozen=True)
class SparseConfig:
    """How attention blocks pick keys: a runtime choice, not stored in checkpoints (the paper: 2048, 3).

    ``topk`` counts the chunks a query attends to including its own, as RWKV-X's ``moba_topk`` does;
    a ``topk`` of at least (context / chunk_size) + 1 makes attention dense.
    """

    chunk_size: int = 2048
    topk: int = 3
    flavour: str = "moba"

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.topk < 1:
            raise ValueError(f"need chunk_size >= 1 and topk >= 1, got {self.chunk_size} and {self.topk}")
        if self.flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {FLAVOURS}, got {self.flavour!r}")


@dataclass(frozen=True)
class CachePolicy:
    """Bounded KV cache (rwkv-x defaults): past ``max_size`` entries, shrink to ``min_size`` keeping ``window``."""

    max_size: int = 20000
    window: int = 2000
    min_size: int = 16000

    def __post_init__(self) -> None:
        if not 0 < self.window < self.min_size <= self.max_size:
            raise ValueError(f"need 0 < window < min_size <= max_size, got {self.window}, {self.min_size}, "
                             f"{self.max_size}")


def compress_kv(q: Tensor, keys: Tensor, values: Tensor, policy: CachePolicy) -> tuple[Tensor, Tensor]:
    """Keep the last ``window`` cache entries and, per head, the earlier ones ``q`` attends to most.

    ``q [B, T, H, D]``, ``keys``/``values [B, S, H, D]``; votes are softmax(q k^T / sqrt(D)) over the
    entries before the window, summed over the T queries.
    """
    B, S, H, D = keys.shape
    past = S - policy.window
    keep = min(policy.min_size - policy.window, past)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), keys[:, :past].float()) / math.sqrt(D)
    chosen = scores.softmax(dim=-1).sum(dim=2).topk(keep, dim=-1).indices                 # [B, H, keep]
    index = chosen.transpose(1, 2).unsqueeze(-1).expand(B, keep, H, D)
    return (torch.cat([x[:, :past].gather(1, index), x[:, past:]], dim=1) for x in (keys, values))


@dataclass
class RWKVXState:
    """The RWKV blocks' :class:`State`, plus per attention block its ChannelMix token shift
    (``attn_ffn_shift [A, B, C]``) and KV cache (``keys``/``values``: A tensors ``[B, S, H, D]``)."""

    rwkv: State
    attn_ffn_shift: Tensor
    keys: list[Tensor]
    values: list[Tensor]

    @property
    def batch_size(self) -> int:
        return self.rwkv.batch_size

    @property
    def cache_len(self) -> int:
        """Entries in the longest KV cache (0 without attention blocks)."""
        return max((k.shape[1] for k in self.keys), default=0)

    @property
    def nbytes(self) -> int:
        """Memory held by the state: RWKV state, token shifts and KV caches."""
        tensors = [*self.rwkv.tensors().values(), self.attn_ffn_shift, *self.keys, *self.values]
        return sum(t.numel() * t.element_size() for t in tensors)

    def clone(self) -> RWKVXState:
        return RWKVXState(self.rwkv.clone(), self.attn_ffn_shift.clone(), [k.clone() for k in self.keys],
                          [v.clone() for v in self.values])


class SparseAttention(nn.Module):
    """Causal multi-head attention over a KV cache, sparse by :class:`SparseConfig`, bounded by :class:`CachePolicy`."""

    def __init__(self, n_embd: int, head_size: int):
        super().__init__()
        self.n_head, self.head_size = n_embd // head_size, head_size
        self.receptance = Linear(n_embd, n_embd, bias=False)
        self.key = Linear(n_embd, n_embd, bias=False)
        self.value = Linear(n_embd, n_embd, bias=False)
        self.output = Linear(n_embd, n_embd, bias=False)

    def forward(self, x: Tensor, keys: Tensor, values: Tensor, sparse: SparseConfig,
                policy: CachePolicy | None) -> tuple[Tensor, Tensor, Tensor]:
        """x: ln1 output ``[B, T, C]``; keys/values: the cache ``[B, S, H, D]``; returns (out, keys, values)."""
        B, T, C = x.shape
        heads = (B, T, self.n_head, self.head_size)
        q, k, v = self.receptance(x).view(heads), self.key(x).view(heads), self.value(x).view(heads)
        if policy is not None and keys.shape[1] > policy.max_size:
            keys, values = compress_kv(q, keys, values, policy)
        cached = keys.shape[1]
        keys, values = torch.cat([keys, k], dim=1), torch.cat([values, v], dim=1)
        chunk, topk = sparse.chunk_size, sparse.topk
        if sparse.flavour == "moba":
            y = sparse_attention(q, keys, values, chunk, topk - 1)
        elif T == 1:
            y = sparse_attention(q, keys, values, chunk, topk, shared=True)
        elif cached + T <= chunk * topk:
            y = dense_causal_attention(q, keys, values)
        else:
            y = sparse_attention(q, k, v, chunk, 0)
        return self.output(y.reshape(B, T, C)), keys, values


class AttentionBlock(nn.Module):
    def __init__(self, cfg: RWKVXConfig):
        super().__init__()
        C = cfg.rwkv.n_embd
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = SparseAttention(C, cfg.attn_head_size)
        self.ffn = ChannelMix(cfg.rwkv)


class RWKVX(nn.Module):
    """``logits, state = model(tokens [B, T], state)``; ``state=None`` starts from zeros and empty caches.

    ``sparse`` and ``policy`` (None: unbounded cache) are runtime settings and may be reassigned.
    """

    def __init__(self, cfg: RWKVXConfig, sparse: SparseConfig = SparseConfig(), policy: CachePolicy | None = None):
        super().__init__()
        self.config, self.sparse, self.policy = cfg, sparse, policy
        self.rwkv = RWKV7(cfg.rwkv)
        self.moba = nn.ModuleList(AttentionBlock(cfg) for _ in range(cfg.n_attn_layer))

    @property
    def dtype(self) -> torch.dtype:
        return self.rwkv.dtype

    @property
    def device(self) -> torch.device:
        return self.rwkv.device

    def new_state(self, batch_size: int = 1) -> RWKVXState:
        c = self.config
        A, C, H, D = c.n_attn_layer, c.rwkv.n_embd, c.rwkv.n_embd // c.attn_head_size, c.attn_head_size
        empty = torch.zeros(batch_size, 0, H, D, device=self.device, dtype=self.dtype)
        return RWKVXState(self.rwkv.new_state(batch_size),
                          torch.zeros(A, batch_size, C, device=self.device, dtype=self.dtype),
                          [empty] * A, [empty] * A)

    def forward(self, tokens: Tensor, state: RWKVXState | None = None, *, last: bool = False,
                mode: str = "auto") -> tuple[Tensor, RWKVXState]:
        """Run ``tokens [B, T]`` from ``state``; logits ``[B, T, V]`` (``[B, V]`` with ``last``) and a new state.

        ``mode`` is the WKV form of the RWKV blocks (see :meth:`goose.model.RWKV7.forward`).
        """
        state = starting_state(tokens, state, self.new_state)

        s = state.rwkv
        att_shift, wkv, ffn_shift = list(s.att_shift), list(s.wkv), list(s.ffn_shift)
        attn_ffn_shift, keys, values = list(state.attn_ffn_shift), list(state.keys), list(state.values)
        x = self.rwkv.blocks[0].ln0(self.rwkv.emb(tokens))
        v_first = None
        for kind, i in self.config.order:
            if kind == "rwkv":
                block = self.rwkv.blocks[i]
                out, att_shift[i], wkv[i], v_first = block.att(block.ln1(x), att_shift[i], wkv[i], v_first, mode)
                x = x + out
                out, ffn_shift[i] = block.ffn(block.ln2(x), ffn_shift[i])
            else:
                block = self.moba[i]
                out, keys[i], values[i] = block.att(block.ln1(x), keys[i], values[i], self.sparse, self.policy)
                x = x + out
                out, attn_ffn_shift[i] = block.ffn(block.ln2(x), attn_ffn_shift[i])
            x = x + out

        if last:
            x = x[:, -1]
        logits = self.rwkv.head(self.rwkv.ln_out(x))
        rwkv_state = State(torch.stack(att_shift), torch.stack(wkv), torch.stack(ffn_shift))
        attn_ffn_state = torch.stack(attn_ffn_shift) if attn_ffn_shift else state.attn_ffn_shift
        return logits, RWKVXState(rwkv_state, attn_ffn_state, keys, values)


@torch.no_grad()
def expand(rwkv: RWKV7, n_attn_layer: int, sparse: SparseConfig = SparseConfig(),
           policy: CachePolicy | None = None) -> RWKVX:
    """RWKV-X's block expansion: add attention blocks to ``rwkv`` (which the result then owns).

    As RWKV-X's ``init_moba_from_rwkv`` does, each attention block copies the r/k/v/o projections and the
    FFN key/value of the RWKV block just before it. (The paper speaks of zero-initialising the new
    blocks; the released code copies. From a fresh RWKV-LM initialisation the two agree on the output
    projection, which is zero.) goose also copies the FFN token-shift mix ``x_k`` (RWKV-X re-derives
    it from its own init formula), and the LayerNorms start at weight 1, bias 0.
    """
    cfg = RWKVXConfig(rwkv.config, n_attn_layer)
    with torch.device("meta"):
        model = RWKVX(cfg, sparse, policy)
    model.rwkv = rwkv
    model.moba.to_empty(device=rwkv.device)
    for a, block in enumerate(model.moba):
        source = rwkv.blocks[(a + 1) * (cfg.rwkv.n_layer // n_attn_layer) - 1]
        for name in ("receptance", "key", "value", "output"):
            getattr(block.att, name).weight.copy_(getattr(source.att, name).weight)
        block.ffn.load_state_dict(source.ffn.state_dict())
        for ln in (block.ln1, block.ln2):
            nn.init.ones_(ln.weight)
            nn.init.zeros_(ln.bias)
    return model.to(dtype=rwkv.dtype)


def config_from_checkpoint(sd: dict[str, Tensor], source: str = "state dict") -> RWKVXConfig:
    """Check that ``sd`` is in the RWKV-X layout and infer its config from tensor names and shapes."""
    prefixes = {k.split(".", 1)[0] for k in sd}
    if "rwkv" not in prefixes:
        if detect_version(sd) == "x070":
            raise CheckpointError(f"{source} is a plain RWKV-7 checkpoint (no rwkv.*/moba.* tensors); "
                                  f"load it with goose.load")
        raise CheckpointError(f"{source} is not an RWKV-X checkpoint: expected tensors named rwkv.* and moba.*")
    if prefixes - {"rwkv", "moba"}:
        raise CheckpointError(f"{source} has tensors outside rwkv.* and moba.*: {sorted(prefixes - {'rwkv', 'moba'})}")
    rwkv_cfg = config_from_tensors({k[5:]: t for k, t in sd.items() if k.startswith("rwkv.")}, f"{source} (rwkv.*)")
    ids = {k.split(".")[1] for k in sd if k.startswith("moba.")}
    if ids != {str(i) for i in range(len(ids))}:
        raise CheckpointError(f"{source}: attention blocks must be numbered moba.0 .. moba.N-1, got {sorted(ids)}")
    try:
        return RWKVXConfig(rwkv_cfg, len(ids))
    except ValueError as e:
        raise CheckpointError(f"{source} is not a valid RWKV-X checkpoint: {e}") from e


def load(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
         sparse: SparseConfig = SparseConfig(), policy: CachePolicy | None = None) -> RWKVX:
    """Load an RWKV-X checkpoint (``.pth``/``.safetensors``, the rwkv-x layout) into :class:`RWKVX`.

    Files of ``rwkv-x`` 0.2.x have the same layout; this model runs them with 0.1.x's sparse attention.
    """
    sd = dict(read_tensors(path))
    cfg = config_from_checkpoint(sd, str(path))
    C, rank_v = cfg.rwkv.n_embd, cfg.rwkv.rank_v
    shapes = {"blocks.0.att.v0": (1, 1, C), "blocks.0.att.v1": (C, rank_v), "blocks.0.att.v2": (rank_v, C)}
    for key in LAYER0_UNUSED:   # layer 0 never reads them; fill so the module layout stays the official one
        sd.setdefault("rwkv." + key, torch.zeros(shapes[key]))
    with torch.device("meta"):
        model = RWKVX(cfg, sparse, policy)
    problems = layout_problems(sd, model)
    if problems:
        raise CheckpointError(f"{path} does not match the RWKV-X layout it implies ({cfg.rwkv.n_layer} RWKV "
                              f"blocks, {cfg.n_attn_layer} attention blocks): " + ", ".join(problems))
    model.load_state_dict({k: own_copy(t, device, dtype) for k, t in sd.items()}, strict=True, assign=True)
    return model.eval()


def random_state_dict(n_rwkv_layer: int, n_attn_layer: int, n_embd: int, vocab_size: int, *,
                      head_size: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Random weights in the rwkv-x checkpoint layout (the RWKV part from goose.random_weights)."""
    sd = {"rwkv." + k: t for k, t in random_rwkv7_state_dict(n_rwkv_layer, n_embd, vocab_size, head_size=head_size,
                                                             seed=seed, dtype=dtype).items()}
    g = torch.Generator().manual_seed(seed + 1)
    C = n_embd
    for a in range(n_attn_layer):
        p = f"moba.{a}."
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"] = 1 + 0.1 * torch.randn(C, generator=g)
            sd[p + ln + ".bias"] = 0.05 * torch.randn(C, generator=g)
        for name in ("receptance", "key", "value", "output"):
            sd[p + f"att.{name}.weight"] = torch.randn(C, C, generator=g) / math.sqrt(C)
        sd[p + "ffn.x_k"] = torch.rand(1, 1, C, generator=g)
        sd[p + "ffn.key.weight"] = torch.randn(4 * C, C, generator=g) / math.sqrt(C)
        sd[p + "ffn.value.weight"] = torch.randn(C, 4 * C, generator=g) * 0.5 / math.sqrt(4 * C)
    return {k: t.to(dtype).contiguous() for k, t in sd.items()}
