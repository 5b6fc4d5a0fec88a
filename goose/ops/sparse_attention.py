"""Top-k chunk sparse attention (RWKV-X, after MoBA) in plain torch, with its dense reference.

Keys are cut into chunks of ``chunk_size`` positions, counted from the first key. The query at key
position p attends causally to its own chunk (positions ``p // chunk_size * chunk_size .. p``) plus
the ``n_select`` complete earlier chunks whose mean key scores highest against it,

    score(q, c) = q . mean_{j in chunk c} k_j        (per head; summed over heads if ``shared``)

and one softmax of ``q k^T / sqrt(D)`` runs over the union, with no positional encoding. When every
query may select all of its earlier chunks the rule is dense causal attention, and the fast path
falls back to it. The selection itself is not differentiable: gradients reach q and k through the
attention over the chosen chunks only, as in MoBA.

Tensors are ``[B, T, H, D]``. ``q`` holds the queries of the *last* T positions of ``k``/``v``
(``[B, S, H, D]``, S >= T), so one function serves training (S == T), a prefill that continues a KV
cache, and decoding (T == 1).

- ``sparse_attention`` = ``select_chunks`` (the top-k rule) + ``chunk_attention`` (attention over the
  chosen chunks, gathering only those), or dense attention when the selection would cover everything.
- ``sparse_attention_ref``: the specification: an explicit [T, S] mask built one query at a time.
- ``dense_causal_attention``: what both equal when ``n_select`` covers every earlier chunk.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

QUERY_BLOCK = 1024         # queries per block in chunk_attention, at most
MASK_ELEMENTS = 1 << 24    # and fewer when the batch, heads and keys would make a block's mask bigger


def _check(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, n_select: int) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"expected q [B, T, H, D] and k, v [B, S, H, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] < q.shape[1]:
        raise ValueError(f"q holds the last T positions of k: need S >= T, got S={k.shape[1]}, T={q.shape[1]}")
    if chunk_size < 1 or n_select < 0:
        raise ValueError(f"need chunk_size >= 1 and n_select >= 0, got {chunk_size} and {n_select}")


def dense_causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention where the query at position ``S - T + t`` sees keys ``0 .. S - T + t``."""
    T, S = q.shape[1], k.shape[1]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))                    # [B, H, *, D]
    if T == 1:
        y = F.scaled_dot_product_attention(q, k, v)
    else:
        mask = torch.arange(S, device=q.device) <= torch.arange(S - T, S, device=q.device)[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.transpose(1, 2)


def select_chunks(q: Tensor, k: Tensor, chunk_size: int, n_select: int, shared: bool = False) -> Tensor:
    """Indices ``[B, T, H, n]`` (n = min(n_select, complete chunks)) of the chunks each query picks; -1 = none.

    Only complete chunks that end before the query's own chunk starts are candidates. Scores are
    computed in fp32 (fp64 for fp64 inputs); with ``shared`` all heads pick the chunks of the summed score.
    """
    B, T, H, D = q.shape
    S = k.shape[1]
    n_full = S // chunk_size
    n = min(n_select, n_full)
    if n == 0:
        return torch.full((B, T, H, 0), -1, dtype=torch.long, device=q.device)
    dtype = torch.promote_types(q.dtype, torch.float32)     # fp64 stays fp64, for tests against a reference
    q, k = q.detach().to(dtype), k[:, :n_full * chunk_size].detach().to(dtype)
    means = k.view(B, n_full, chunk_size, H, D).mean(dim=2)                                   # [B, n_full, H, D]
    scores = torch.einsum("bthd,bnhd->bthn", q, means)
    if shared:
        scores = scores.sum(dim=2, keepdim=True)
    own = torch.arange(S - T, S, device=q.device) // chunk_size                                # [T]
    later = torch.arange(n_full, device=q.device) >= own[:, None]                             # [T, n_full]
    top = scores.masked_fill(later[:, None, :], -math.inf).topk(n, dim=-1)
    chosen = top.indices.masked_fill(top.values == -math.inf, -1)
    return chosen.expand(B, T, H, n)


def chunk_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, chosen: Tensor) -> Tensor:
    """Attention of each query over its own chunk (causally) plus the chunks ``chosen [B, T, H, n]`` names.

    Entries of -1 in ``chosen`` are ignored. Queries go in blocks of up to ``QUERY_BLOCK``; each block
    gathers only the chunks that some query of the block uses (a decoding step: at most ``H * n + 1``
    chunks), and a mask keeps every query to its own choice. Over a long block that union is most
    earlier chunks, so in plain torch a prefill costs about what dense attention does; the saving is
    in decoding. (Smaller blocks do not help on CPU: per-block overhead, and autograd allocates a
    cache-sized gradient for every gather.) Returns ``[B, T, H, D]``.
    """
    B, T, H, D = q.shape
    S = k.shape[1]
    pad = (-S) % chunk_size
    kc, vc = (F.pad(x, (0, 0, 0, 0, 0, pad)).view(B, -1, chunk_size, H, D) for x in (k, v))  # [B, chunks, chunk, H, D]
    offsets = torch.arange(chunk_size, device=q.device)
    block = chunk_size * max(1, min(QUERY_BLOCK, MASK_ELEMENTS // (B * H * S)) // chunk_size)
    first = min(T, block - (S - T) % block)          # block boundaries fall on chunk boundaries
    out = []
    for lo, hi in zip([0, *range(first, T, block)], [*range(first, T, block), T]):
        pos = torch.arange(S - T + lo, S - T + hi, device=q.device)                      # [t]
        own = pos // chunk_size
        picks = chosen[:, lo:hi]                                                          # [B, t, H, n]
        ids = torch.unique(torch.cat([picks[picks >= 0], own]))                          # sorted chunk ids [u]
        use = (picks.unsqueeze(-1) == ids).any(dim=-2) | (ids == own.view(1, -1, 1, 1))   # [B, t, H, u]
        key_pos = (ids.unsqueeze(-1) * chunk_size + offsets).flatten()                    # [u * chunk]
        mask = use.repeat_interleave(chunk_size, dim=-1) & (key_pos <= pos.view(-1, 1, 1))
        keys, values = (x[:, ids].flatten(1, 2).transpose(1, 2) for x in (kc, vc))       # [B, H, u * chunk, D]
        y = F.scaled_dot_product_attention(q[:, lo:hi].transpose(1, 2), keys, values, attn_mask=mask.transpose(1, 2))
        out.append(y.transpose(1, 2))
    return torch.cat(out, dim=1)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, n_select: int,
                     shared: bool = False) -> Tensor:
    """Top-k chunk attention (module docstring); returns ``[B, T, H, D]`` in q's dtype."""
    _check(q, k, v, chunk_size, n_select)
    if n_select >= (k.shape[1] - 1) // chunk_size:      # even the last query may take every earlier chunk
        return dense_causal_attention(q, k, v)
    return chunk_attention(q, k, v, chunk_size, select_chunks(q, k, chunk_size, n_select, shared))


def sparse_attention_ref(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, n_select: int,
                         shared: bool = False) -> Tensor:
    """The specification, one query at a time: build the allowed-key mask, then masked softmax attention."""
    _check(q, k, v, chunk_size, n_select)
    B, T, H, D = q.shape
    S = k.shape[1]
    allowed = torch.zeros(B, H, T, S, dtype=torch.bool, device=q.device)
    for b in range(B):
        for t in range(T):
            p = S - T + t
            start = p // chunk_size * chunk_size
            allowed[b, :, t, start:p + 1] = True
            earlier = range(start // chunk_size)
            score = torch.stack([(q[b, t] * k[b, c * chunk_size:(c + 1) * chunk_size].mean(dim=0)).sum(dim=-1)
                                 for c in earlier], dim=-1) if start else torch.zeros(H, 0)   # [H, chunks]
            if shared:
                score = score.sum(dim=0, keepdim=True).expand(H, -1)
            for h in range(H):
                for c in score[h].argsort(descending=True)[:n_select].tolist():
                    allowed[b, h, t, c * chunk_size:(c + 1) * chunk_size] = True
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed)
    return y.transpose(1, 2)
