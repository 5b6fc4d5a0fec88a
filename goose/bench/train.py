"""Training throughput: forward+backward tokens/s of a whole model, chunked WKV against the sequential
scan, in fp32 and under bf16 autocast, with the model FLOP utilisation (MFU) each one reaches.

MFU = model FLOP/s / the GEMM FLOP/s of this machine, measured in the same run (a square fp32 and bf16
matmul), so it says how close training gets to what the matrix units can do here. Model FLOPs are
counted analytically (:func:`flops_per_token`), not from what the chunked kernel executes:

* matmuls: 6 FLOPs per weight per token (2 forward, 4 backward) for every weight used as a matrix:
  r/k/v/output, the FFN, the LoRAs the model evaluates (w, a, g in every layer; v from layer 1; a not at
  all without the in-context learning term) and the head. The embedding is a lookup and is not counted.
* WKV: the recurrence's own arithmetic, 9 N^2 FLOPs per head and token forward (decay N^2, S a 2N^2,
  (S a) b^T N^2, v k^T N^2, two additions 2N^2, S r 2N^2), times 3 for forward+backward.

Elementwise work (norms, token shift, activations, softmax) is not counted, as usual for MFU.
"""
from __future__ import annotations

import functools

import torch

from goose.bench import median_seconds
from goose.model import ModelConfig
from goose.ops import matmul
from goose.train.init import model_config, new_model
from goose.train.trainer import lm_loss

WKV_FORWARD_FLOPS_PER_HEAD = 9  # times N^2, per token (see the module docstring)
GEMM_SIZE = 2048


def flops_per_token(cfg: ModelConfig) -> dict[str, int]:
    """Training FLOPs per token (forward + backward): ``{"matmul", "wkv", "total"}``."""
    C, F, V = cfg.n_embd, cfg.ffn_dim, cfg.vocab_size
    lora = cfg.rank_w + cfg.rank_g + (cfg.rank_a if cfg.iclr else 0)
    weights = cfg.n_layer * (4 * C * C + 2 * C * F + 2 * C * lora) + (cfg.n_layer - 1) * 2 * C * cfg.rank_v + C * V
    matmul = 6 * weights
    wkv = 3 * WKV_FORWARD_FLOPS_PER_HEAD * cfg.head_size ** 2 * cfg.n_head * cfg.n_layer
    return {"matmul": matmul, "wkv": wkv, "total": matmul + wkv}


def gemm_flops_per_second(dtype: torch.dtype, size: int = GEMM_SIZE, repeats: int = 5) -> float:
    """FLOP/s of a ``size``^3 matmul in ``dtype`` (median of ``repeats``): the better of torch's default
    kernel and goose's ``ops.matmul`` (oneDNN for fp32 on CPU), the fastest this machine offers."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(dtype) for _ in range(2))
    best = 0.0
    for product in (lambda: a @ b, lambda: matmul(a, b)):
        product()  # warm-up
        best = max(best, 2 * size ** 3 / median_seconds(product, repeats))
    return best


def run(n_layer: int = 6, n_embd: int = 512, vocab_size: int = 65536, ctx_len: int = 512, micro_batch: int = 4,
        repeats: int = 3, scan_repeats: int = 1) -> dict[str, float]:
    """Print and return tokens/s and MFU of forward+backward for chunked and scan, fp32 and bf16 autocast.

    The model is a fresh RWKV-LM initialisation (head size 64); the loss is the trainer's ``lm_loss``
    (cross-entropy + L2Wrap) on random tokens. The scan is slow, so it is timed ``scan_repeats`` times.
    """
    cfg = model_config(n_layer, n_embd, vocab_size)
    model = new_model(cfg).train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (micro_batch, ctx_len + 1), generator=g)
    batch = (tokens[:, :-1], tokens[:, 1:])

    def step(mode: str, bf16: bool, batch: tuple[torch.Tensor, torch.Tensor] = batch) -> float:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = lm_loss(functools.partial(model, mode=mode), batch)
        loss.backward()
        return loss.item()

    short = tuple(x[:, :32] for x in batch)
    for mode in ("chunked", "scan"):             # pay first-call costs (allocator, kernel set-up) cheaply
        step(mode, False, short)
        step(mode, True, short)
    losses = {mode: step(mode, False) for mode in ("chunked", "scan")}
    err = abs(losses["chunked"] - losses["scan"]) / abs(losses["scan"])
    if err > 1e-4:
        raise RuntimeError(f"chunked and scan losses differ (relative {err:.1e}); not timing them")

    peak = {"fp32": gemm_flops_per_second(torch.float32), "bf16": gemm_flops_per_second(torch.bfloat16)}
    seconds = {}
    for precision in ("fp32", "bf16"):
        for mode, n in (("chunked", repeats), ("scan", scan_repeats)):
            seconds[mode, precision] = median_seconds(lambda: step(mode, precision == "bf16"), n)

    flops = flops_per_token(cfg)
    n_tokens = micro_batch * ctx_len
    params = sum(p.numel() for p in model.parameters())
    print(f"training forward+backward, L{n_layer}-D{n_embd} V{vocab_size} ({params / 1e6:.1f}M params), "
          f"{micro_batch} x {ctx_len} tokens, {torch.get_num_threads()} threads; chunked median of {repeats}, "
          f"scan median of {scan_repeats}")
    print(f"measured GEMM {GEMM_SIZE}^3: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"model FLOPs per token: {flops['total'] / 1e6:.1f}M = 6 x matmul weights ({flops['matmul'] / 1e6:.1f}M) "
          f"+ WKV recurrence ({flops['wkv'] / 1e6:.2f}M)")
    print(f"{'precision':<10}{'WKV':<9}{'s/step':>9}{'tok/s':>9}{'GFLOP/s':>9}{'MFU':>7}{'vs scan':>9}")
    res: dict[str, float] = {"gemm_fp32": peak["fp32"], "gemm_bf16": peak["bf16"], "flops_per_token": flops["total"]}
    for precision in ("fp32", "bf16"):
        for mode in ("chunked", "scan"):
            s = seconds[mode, precision]
            rate = n_tokens * flops["total"] / s
            key = f"{mode}_{precision}"
            res.update({f"{key}_seconds": s, f"{key}_tok_s": n_tokens / s, f"{key}_mfu": rate / peak[precision]})
            speedup = seconds["scan", precision] / s
            print(f"{precision:<10}{mode:<9}{s:>9.2f}{n_tokens / s:>9,.0f}{rate / 1e9:>9.1f}"
                  f"{rate / peak[precision]:>7.1%}{speedup:>8.1f}x")
        res[f"speedup_{precision}"] = seconds["scan", precision] / seconds["chunked", precision]
    return res
