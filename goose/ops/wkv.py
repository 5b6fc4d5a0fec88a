"""The RWKV-7 WKV recurrence (generalised delta rule) in three equivalent forms.

Per head, with state S (N x N, row i = value index, column j = key index):

    S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T,      y_t = S_t r_t

RWKV-7 passes a = -kk (normalised removal key) and b = kk * iclr. ``w`` is the log-decay (<= 0).
All tensors are ``[B, T, H, N]``; the state is ``[B, H, N, N]`` in the official orientation.
Every form computes in fp32 whatever the input dtype and returns ``(y [B, T, H, N] fp32, final state)``.
See ``goose/ops/README.md`` for the derivation of the chunked form.

- ``wkv_step``: one token, for decoding.
- ``wkv_scan``: the plain sequential reference (differentiable, slow).
- ``wkv_chunked``: chunks of ``chunk_len`` tokens as matrix products, for prefill and training.
"""
from __future__ import annotations

import torch
from torch import Tensor

CHUNK_LEN = 32
SEGMENT_ELEMENTS = 1 << 20
MODES = ("auto", "scan", "chunked")


def _fp32(*xs: Tensor) -> list[Tensor]:
    """Upcast to fp32 (fp64 inputs stay fp64, so tests can compare against an fp64 reference)."""
    dtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    return [x if x.dtype == dtype else x.to(dtype) for x in xs]   # skipping no-op casts matters when decoding


def _zero_state(r: Tensor) -> Tensor:
    B, _, H, N = r.shape
    return r.new_zeros(B, H, N, N, dtype=torch.float64 if r.dtype == torch.float64 else torch.float32)


def wkv_step(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
             state: Tensor) -> tuple[Tensor, Tensor]:
    """One recurrence step. Inputs ``[B, H, N]``, state ``[B, H, N, N]``; returns ``(y [B, H, N], state)``."""
    r, w, k, v, a, b, state = _fp32(r, w, k, v, a, b, state)
    sa = state @ a.unsqueeze(-1)                                    # [B, H, N, 1]
    state = state * w.exp().unsqueeze(-2)                           # a new tensor: safe to update in place
    state.addcmul_(sa, b.unsqueeze(-2)).addcmul_(v.unsqueeze(-1), k.unsqueeze(-2))
    y = (state @ r.unsqueeze(-1)).squeeze(-1)
    return y, state


def wkv_scan(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
             state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sequential reference: ``wkv_step`` applied token by token."""
    if state is None:
        state = _zero_state(r)
    ys = []
    for t in range(r.shape[1]):
        y, state = wkv_step(r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def _score_mask(C: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Causal mask of the [2C, 2C] score matrix: rows (a; r), columns (b; k).

    The a-rows feed the state *before* step t (strictly earlier s), the r-rows read it *after* (s <= t).
    """
    strict = torch.ones(C, C, dtype=dtype, device=device).tril(-1)
    incl = torch.ones(C, C, dtype=dtype, device=device).tril(0)
    return torch.cat([strict.repeat(1, 2), incl.repeat(1, 2)], dim=0)


def wkv_chunked(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                state: Tensor | None = None, chunk_len: int = CHUNK_LEN) -> tuple[Tensor, Tensor]:
    """Chunked parallel form: exact (to fp32 rounding) for any T, differentiable by autograd.

    Within a chunk, cumulative log-decays L turn the recurrence into a decay-free delta rule solved by
    one unit-lower-triangular system; chunks are then chained by the linear map S -> S A_c + H_c.
    Decays must be >= exp(-exp(-0.5)) (RWKV-7's clamp) for ``chunk_len`` <= 64 to stay far from
    fp32 overflow; see ops/README.md. Long inputs are processed in segments of about
    ``SEGMENT_ELEMENTS`` values per tensor, which bounds the working memory whatever T is (and keeps
    CPU allocations small enough to be reused instead of page-faulted in afresh).
    """
    B, T, H, N = r.shape
    if state is None:
        state = _zero_state(r)
    seg = max(chunk_len, SEGMENT_ELEMENTS // (B * H * N) // chunk_len * chunk_len)
    ys = []
    for lo in range(0, T, seg):
        y, state = _chunked_segment(*(x[:, lo:lo + seg] for x in (r, w, k, v, a, b)), state, chunk_len)
        ys.append(y)
    return (ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)), state


def _chunked_segment(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                     state: Tensor, chunk_len: int) -> tuple[Tensor, Tensor]:
    B, T, H, N = r.shape
    r, w, k, v, a, b, state = _fp32(r, w, k, v, a, b, state)
    C = chunk_len
    pad = (-T) % C
    n = (T + pad) // C
    # one copy into chunk-major layout [6, B, H, n, C, N]; padded steps have decay 1 and zero inputs,
    # so they leave the state unchanged
    x = torch.nn.functional.pad(torch.stack([r, w, k, v, a, b]), (0, 0, 0, 0, 0, pad))
    r, w, k, v, a, b = x.view(6, B, n, C, H, N).permute(0, 1, 4, 2, 3, 5).contiguous()

    L = w.cumsum(dim=-2)                                            # inclusive cumulative log-decay
    e_l = L.exp()
    e_l_prev = torch.cat([torch.ones_like(e_l[..., :1, :]), e_l[..., :-1, :]], dim=-2)
    e_l_end = e_l[..., -1:, :]                                      # decay over the whole chunk
    q = torch.cat([a * e_l_prev, r * e_l], dim=-2)                  # rows: a_t e^{L_{t-1}}, r_t e^{L_t}
    keys = torch.cat([b, k], dim=-2) / torch.cat([e_l, e_l], dim=-2)  # rows: b_s e^{-L_s}, k_s e^{-L_s}
    scores = (q @ keys.transpose(-1, -2)) * _score_mask(C, r.dtype, r.device)
    m_b, a_rb = scores[..., :C, :C], scores[..., C:, :C]            # a.b-terms: strict / inclusive lower
    with_v = scores[..., :, C:] @ v                                 # [M_k V ; A_rk V]

    # (I - M_b) Z = Qa S0^T + M_k V   ->   Z = U S0^T + Zv
    eye = torch.eye(C, dtype=r.dtype, device=r.device)
    u_zv = torch.linalg.solve_triangular(eye - m_b, torch.cat([q[..., :C, :], with_v[..., :C, :]], dim=-1),
                                         upper=False, unitriangular=True)
    u, z_v = u_zv[..., :N], u_zv[..., N:]
    # Y = (Qr + A_rb U) S0^T + (A_rb Zv + A_rk V)
    rb = a_rb @ u_zv
    q_state = q[..., C:, :] + rb[..., :N]
    y_local = rb[..., N:] + with_v[..., C:, :]
    # S_end = S0 diag(e^{L_end}) + Z^T (Kb e^{L_end}) + V^T (Kk e^{L_end})  =  S0 A_c + H_c
    keys_end = keys * e_l_end
    trans = torch.diag_embed(e_l_end.squeeze(-2)) + u.transpose(-1, -2) @ keys_end[..., :C, :]
    drive = torch.cat([z_v, v], dim=-2).transpose(-1, -2) @ keys_end

    starts = []
    for c in range(n):
        starts.append(state)
        state = state @ trans[:, :, c] + drive[:, :, c]
    s0 = torch.stack(starts, dim=2)                                 # state entering each chunk
    y = q_state @ s0.transpose(-1, -2) + y_local                    # [B, H, n, C, N]
    y = y.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, N)[:, :T]
    return y, state


def wkv(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
        state: Tensor | None = None, mode: str = "auto", chunk_len: int = CHUNK_LEN) -> tuple[Tensor, Tensor]:
    """Dispatch to one of the equivalent forms. ``auto``: the recurrent step for T == 1, chunked otherwise."""
    if mode not in MODES:
        raise ValueError(f"wkv mode must be one of {MODES}, got {mode!r}")
    if mode == "auto" and r.shape[1] == 1:
        y, state = wkv_step(r[:, 0], w[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0],
                            _zero_state(r) if state is None else state)
        return y.unsqueeze(1), state
    if mode == "scan":
        return wkv_scan(r, w, k, v, a, b, state)
    return wkv_chunked(r, w, k, v, a, b, state, chunk_len)
