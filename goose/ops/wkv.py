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

    def chunks(x: Tensor) -> Tensor:
        """[B, T, H, N] -> chunk-major [B, H, n, C, N] (one copy); padded steps have decay 1 and zero
        inputs, so they leave the state unchanged."""
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, n, C, H, N).permute(0, 3, 1, 2, 4).contiguous()

    r, w, k, v, a, b = (chunks(x) for x in (r, w, k, v, a, b))
    L = w.cumsum(dim=-2)                                            # inclusive cumulative log-decay
    e_l = L.exp()
    e_l_end = e_l[..., -1:, :]                                      # decay over the whole chunk
    qa, qr = a * (L - w).exp(), r * e_l                             # a_t e^{L_{t-1}},  r_t e^{L_t}
    kb, kk = b / e_l, k / e_l                                       # b_s e^{-L_s},     k_s e^{-L_s}
    m_b = (qa @ kb.mT).tril_(-1)                                    # a-rows see strictly earlier s,
    m_k = (qa @ kk.mT).tril_(-1)
    a_rb = (qr @ kb.mT).tril_()                                     # r-rows see s <= t
    a_rk = (qr @ kk.mT).tril_()

    # (I - M_b) Z = Qa S0^T + M_k V   ->   Z = U S0^T + Zv  (unitriangular: the diagonal is not read)
    u_zv = torch.linalg.solve_triangular(m_b.neg_(), torch.cat([qa, m_k @ v], dim=-1), upper=False,
                                         unitriangular=True)
    u, z_v = u_zv[..., :N], u_zv[..., N:]
    # Y = (Qr + A_rb U) S0^T + (A_rb Zv + A_rk V)
    rb = a_rb @ u_zv
    q_state = qr + rb[..., :N]
    y_local = rb[..., N:] + a_rk @ v
    # S_end = S0 diag(e^{L_end}) + Z^T (Kb e^{L_end}) + V^T (Kk e^{L_end})  =  S0 A_c + H_c
    kb_end, kk_end = kb * e_l_end, kk * e_l_end
    trans = u.mT @ kb_end
    trans.diagonal(dim1=-2, dim2=-1).add_(e_l_end.squeeze(-2))
    drive = z_v.mT @ kb_end + v.mT @ kk_end

    starts = []
    for c in range(n):
        starts.append(state)
        state = torch.baddbmm(drive[:, :, c].reshape(B * H, N, N), state.reshape(B * H, N, N),
                              trans[:, :, c].reshape(B * H, N, N)).view(B, H, N, N)
    s0 = torch.stack(starts, dim=2)                                 # state entering each chunk
    y = q_state @ s0.mT + y_local                                   # [B, H, n, C, N]
    y = y.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, N)[:, :T]
    return y, state


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
