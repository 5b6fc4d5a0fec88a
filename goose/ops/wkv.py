"""The RWKV-7 WKV recurrence (generalised delta rule) in three equivalent forms.

Per head, with state S (N x N, row i = value index, column j = key index):

    S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T,      y_t = S_t r_t

RWKV-7 passes a = -kk (normalised removal key) and b = kk * iclr. ``w`` is the log-decay (<= 0).
All tensors are ``[B, T, H, N]``; the state is ``[B, H, N, N]`` in the official orientation.
Every form computes in fp32 whatever the input dtype and returns ``(y [B, T, H, N] fp32, final state)``.
See ``goose/ops/README.md`` for the derivation of the chunked form.

- ``wkv_step``: one token, for decoding.
- ``wkv_scan``: the plain sequential reference (differentiable, slow).
- ``wkv_chunked``: chunks of ``chunk_len`` tokens as matrix products, for prefill and training. Without
  autograd on CPU it runs the native kernel ``csrc/wkv.cpp`` (the same chunked form, see ops/README.md);
  the torch code below is the differentiable path and the fallback.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import native

CHUNK_LEN = 32
NATIVE_CHUNK_LEN = 16   # the native kernel's chunk: the fastest of 8, 16, 24, 32, 64 (ops/README.md)
SEGMENT_ELEMENTS = 1 << 18   # ~1 MB per fp32 tensor: measured faster than 1 << 20, forward and backward
MODES = ("auto", "scan", "chunked")


def _fp32(*xs: Tensor) -> list[Tensor]:
    """Upcast to fp32 (fp64 inputs stay fp64, so tests can compare against an fp64 reference)."""
    dtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    return [x if x.dtype == dtype else x.to(dtype) for x in xs]   # skipping no-op casts matters when decoding


def _zero_state(r: Tensor) -> Tensor:
    B, _, H, N = r.shape
    return r.new_zeros(B, H, N, N, dtype=torch.float64 if r.dtype == torch.float64 else torch.float32)


def wkv_step(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
             state: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One recurrence step. Inputs ``[B, H, N]``, state ``[B, H, N, N]``; returns ``(y [B, H, N], state)``.

    ``out`` (fp32, not differentiable) receives the new state instead of a new tensor; it may be ``state``
    itself, which then is updated in place.
    """
    r, w, k, v, a, b, state = _fp32(r, w, k, v, a, b, state)
    # S a as the row-vector product a^T S^T: the same numbers, but CPU batched GEMM runs a [1, N] x [N, N]
    # product ~4x faster than the [N, N] x [N, 1] one (measured at N = 64)
    sa = (a.unsqueeze(-2) @ state.mT).squeeze(-2)                   # [B, H, N], from the old state
    decay = w.exp().unsqueeze(-2)
    if out is None:
        out = state * decay                                         # a new tensor: safe to update in place
    else:
        torch.mul(state, decay, out=out)
    out.addcmul_(sa.unsqueeze(-1), b.unsqueeze(-2)).addcmul_(v.unsqueeze(-1), k.unsqueeze(-2))
    y = (r.unsqueeze(-2) @ out.mT).squeeze(-2)                      # S r
    return y, out


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


def chunked_backend(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                    state: Tensor | None = None) -> str:
    """Which implementation ``wkv_chunked`` runs on these inputs: ``"native"`` (the C++ forward kernel: no
    autograd needed, CPU tensors, not fp64, and the kernel builds) or ``"torch"``."""
    xs = (r, w, k, v, a, b) + (() if state is None else (state,))
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        return "torch"
    if r.dtype == torch.float64 or any(x.device.type != "cpu" for x in xs):
        return "torch"
    return "native" if native.load("wkv") else "torch"


def wkv_chunked(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                state: Tensor | None = None, chunk_len: int = CHUNK_LEN,
                allow_native: bool = True) -> tuple[Tensor, Tensor]:
    """Chunked parallel form: exact (to fp32 rounding) for any T, differentiable by autograd.

    Runs the native kernel when ``chunked_backend`` says so and ``allow_native``; it uses chunks of
    ``min(chunk_len, NATIVE_CHUNK_LEN)`` tokens (shorter chunks are always at least as accurate).

    Within a chunk, cumulative log-decays L turn the recurrence into a decay-free delta rule solved by
    one unit-lower-triangular system; chunks are then chained through the state with three
    [C, N] x [N, N]-sized products each.
    Decays must be >= exp(-exp(-0.5)) (RWKV-7's clamp) for ``chunk_len`` <= 64 to stay far from
    fp32 overflow; see ops/README.md. Long inputs are processed in segments of about
    ``SEGMENT_ELEMENTS`` values per tensor, which bounds the working memory whatever T is (and keeps
    CPU allocations small enough to be reused instead of page-faulted in afresh).
    """
    B, T, H, N = r.shape
    if state is None:
        state = _zero_state(r)
    if allow_native and chunked_backend(r, w, k, v, a, b, state) == "native":
        r, w, k, v, a, b, state = (x.contiguous() for x in _fp32(r, w, k, v, a, b, state))
        return native.ops("wkv").chunked_forward(r, w, k, v, a, b, state, min(chunk_len, NATIVE_CHUNK_LEN))
    seg = max(chunk_len, SEGMENT_ELEMENTS // (B * H * N) // chunk_len * chunk_len)
    ys = []
    for lo in range(0, T, seg):
        y, state = _chunked_segment(*(x[:, lo:lo + seg] for x in (r, w, k, v, a, b)), state, chunk_len)
        ys.append(y)
    return (ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)), state


def _score_mask(C: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Mask of the [2C, 2C] score matrix, rows (a; r), columns (b; k): the a-rows feed the state *before*
    step t (strictly earlier s), the r-rows read it *after* (s <= t). The a.b block is negated, so the
    masked block is -M_b, the strict lower part of the unit-triangular matrix I - M_b."""
    strict = torch.ones(C, C, dtype=dtype, device=device).tril(-1)
    incl = torch.ones(C, C, dtype=dtype, device=device).tril()
    return torch.cat([torch.cat([-strict, strict], 1), torch.cat([incl, incl], 1)], 0)


def _chunked_segment(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                     state: Tensor, chunk_len: int) -> tuple[Tensor, Tensor]:
    B, T, H, N = r.shape
    r, w, k, v, a, b, state = _fp32(r, w, k, v, a, b, state)
    C = chunk_len
    pad = (-T) % C
    n = (T + pad) // C
    G = n * B * H                                                   # one C x N block per chunk and head
    if pad:   # padded steps have decay 1 and zero inputs, so they leave the state unchanged
        r, w, k, v, a, b = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (r, w, k, v, a, b))
    r, w, k, v, a, b = (x.view(B, n, C, H, N) for x in (r, w, k, v, a, b))

    def blocks(*xs: Tensor) -> Tensor:
        """[B, n, C', H, N] parts -> [G, sum C', N] chunk-major blocks, parts stacked along rows (one copy)."""
        return torch.cat([x.permute(1, 0, 3, 2, 4) for x in xs], dim=-2).view(G, -1, N)

    # elementwise work stays in the input layout; the only layout copies are these blocks
    e_l = w.cumsum(dim=2).exp_()                                    # e^{L_t}, inclusive cumulative decay
    q = blocks(a[:, :, :1], a[:, :, 1:] * e_l[:, :, :-1], r * e_l)  # rows Qa (a_t e^{L_{t-1}}); Qr
    kx = blocks(b / e_l, k / e_l)                                   # rows Kb; Kk  (b_s, k_s times e^{-L_s})
    vc, e_end = blocks(v), blocks(e_l[:, :, -1:])                   # V; e^{L_C}, decay over the whole chunk
    scores = (q @ kx.mT).mul_(_score_mask(C, q.dtype, q.device))   # one GEMM: [[-M_b, M_k], [A_rb, A_rk]]
    q_r, k_b, k_k = q[:, C:], kx[:, :C], kx[:, C:]

    # (I - M_b) Z = Qa S0^T + M_k V  ->  Z = U S0^T + Zv, with the inverse formed once per chunk (batched
    # triangular solves against many right-hand sides are slow on CPU; two small GEMMs are not)
    eye = torch.eye(C, dtype=q.dtype, device=q.device).expand(G, C, C)
    inv = torch.linalg.solve_triangular(scores[:, :C, :C], eye, upper=False, unitriangular=True)
    u = inv @ q[:, :C]
    z_v = (inv @ scores[:, :C, C:]) @ vc
    k_b_end = k_b * e_end                                           # b_s e^{L_C - L_s}
    h_v = (vc.mT @ k_k).mul_(e_end)                                 # V^T (Kk e^{L_C})

    # chain the chunks: per chunk and head three [C, N] x [N, N]-sized products
    #   Y_state = Qr S^T,  Z = U S^T + Zv,  S <- S diag(e^{L_C}) + Z^T (Kb e^{L_C}) + V^T (Kk e^{L_C})
    BH = B * H
    u, z_v, k_b_end, h_v, e_end, q_r = (x.reshape(n, BH, *x.shape[1:]) for x in (u, z_v, k_b_end, h_v, e_end, q_r))
    s = state.reshape(BH, N, N)
    ys, zs = [], []
    for c in range(n):
        s_t = s.mT
        ys.append(q_r[c] @ s_t)
        zs.append(torch.baddbmm(z_v[c], u[c], s_t))
        s = torch.baddbmm(h_v[c], zs[-1].mT, k_b_end[c]).addcmul_(s, e_end[c])
    # Y = Qr S^T + A_rb Z + A_rk V
    y = torch.stack(ys).view(G, C, N)
    y = y.baddbmm_(scores[:, C:, :C], torch.stack(zs).view(G, C, N)).baddbmm_(scores[:, C:, C:], vc)
    y = y.view(n, B, H, C, N).permute(1, 0, 3, 2, 4).reshape(B, n * C, H, N)[:, :T]
    return y, s.view(B, H, N, N)


def wkv(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
        state: Tensor | None = None, mode: str = "auto", chunk_len: int = CHUNK_LEN,
        out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dispatch to one of the equivalent forms. ``auto``: the recurrent step for T == 1, chunked otherwise.

    ``out``: a tensor that receives the final state (and is returned); it may be ``state`` itself. Without
    autograd the one-token step writes it directly, so decoding in place allocates no state temporaries.
    """
    if mode not in MODES:
        raise ValueError(f"wkv mode must be one of {MODES}, got {mode!r}")
    if state is None:
        state = _zero_state(r)
    with torch.autocast(r.device.type, enabled=False):     # the recurrence is defined in fp32 (see _fp32)
        return _dispatch(r, w, k, v, a, b, state, mode, chunk_len, out)


def _dispatch(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor, mode: str,
              chunk_len: int, out: Tensor | None) -> tuple[Tensor, Tensor]:
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (r, w, k, v, a, b, state))
    if mode == "auto" and r.shape[1] == 1:
        direct = out is not None and not differentiable and out.dtype == state.dtype == torch.float32
        y, new = wkv_step(r[:, 0], w[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], state, out if direct else None)
        y = y.unsqueeze(1)
    elif mode == "scan":
        y, new = wkv_scan(r, w, k, v, a, b, state)
    else:
        y, new = wkv_chunked(r, w, k, v, a, b, state, chunk_len)
    if out is not None and new is not out:
        out.copy_(new)
        new = out
    return y, new
