"""``goose bench quant``: how much each weight format changes the model's predictions.

Against the fp32 model on the same tokens: KL(fp32 || format) of the next-token distributions (mean and
max over positions), top-1 agreement, and the relative RMS error of the logits. Both paths are measured:
prefill (many rows: the dequantize + GEMM fallback) and decode (one row per step: the packed CPU
kernels). With ``--model`` and ``--text``, the perplexity of a trained checkpoint on that text, per format.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from goose.bench.common import DEFAULT_CACHE, checkpoint, converted, print_table
from goose.checkpoint import load

FORMATS = ("bf16", "fp16", "int8", "int4")


def compare(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """KL(ref || out) per position (nats), top-1 agreement and relative RMS error of logits ``[..., V]``."""
    ref, out = ref.float().reshape(-1, ref.shape[-1]), out.float().reshape(-1, ref.shape[-1])
    kl = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    centred = ref - ref.mean(-1, keepdim=True)
    return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "top1": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "rel_rms": ((out - ref).norm() / centred.norm()).item()}


def _decode_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    state, outs = None, []
    for t in range(tokens.shape[1]):
        logits, state = model(tokens[:, t:t + 1], state, last=True, inplace=state is not None)
        outs.append(logits)
    return torch.stack(outs, 1)


@torch.inference_mode()
def quality(model, formats=FORMATS, prefill_tokens: int = 512, decode_tokens: int = 64, seed: int = 0,
            group_size: int = 64) -> dict[str, dict[str, dict[str, float]]]:
    """{format: {"prefill": metrics, "decode": metrics}} against ``model`` (fp32) on random tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (1, prefill_tokens), generator=g)
    ref_prefill, _ = model(tokens)
    ref_decode = _decode_logits(model, tokens[:, :decode_tokens])
    res = {}
    for fmt in formats:
        q = converted(model, fmt, group_size)
        res[fmt] = {"prefill": compare(ref_prefill, q(tokens)[0]),
                    "decode": compare(ref_decode, _decode_logits(q, tokens[:, :decode_tokens]))}
        del q
    return res


@torch.inference_mode()
def perplexity(model, tokens: list[int], chunk: int = 1024) -> float:
    """exp(mean next-token NLL) over ``tokens``, carrying the state across chunks."""
    ids = torch.tensor([tokens])
    state, nll, n = None, 0.0, 0
    for lo in range(0, ids.shape[1] - 1, chunk):
        x = ids[:, lo:lo + chunk]
        y = ids[:, lo + 1:lo + 1 + chunk]
        logits, state = model(x, state, inplace=state is not None)
        logits = logits[:, :y.shape[1]]
        nll += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        n += y.numel()
    return math.exp(nll / n)


def run(sizes=("L12-D768",), formats=FORMATS, prefill_tokens: int = 512, decode_tokens: int = 64,
        group_size: int = 64, model_path: str | None = None, text_path: str | None = None,
        max_text_tokens: int = 16384, cache_dir: Path = DEFAULT_CACHE) -> dict:
    """Print the agreement tables for random checkpoints (and the perplexity table for a trained model)."""
    results: dict = {"random": {}, "perplexity": None}
    for size in sizes:
        model = load(checkpoint(size, cache_dir))
        res = quality(model, formats, prefill_tokens, decode_tokens, group_size=group_size)
        results["random"][size] = res
        rows = [[fmt, path, m["kl_mean"], m["kl_max"], f"{100 * m['top1']:.1f}%", m["rel_rms"]]
                for fmt, r in res.items() for path, m in r.items()]
        print_table(f"{size} (random weights): agreement with fp32 ({prefill_tokens} prefill positions, "
                    f"{decode_tokens} decode steps; int4 group {group_size})",
                    ["format", "path", "KL mean (nats)", "KL max", "top-1 agree", "logit rel. RMS"],
                    [[r[0], r[1], f"{r[2]:.2e}", f"{r[3]:.2e}", r[4], f"{r[5]:.3f}"] for r in rows])
    if model_path:
        results["perplexity"] = _perplexity_table(model_path, text_path, formats, max_text_tokens, group_size)
    return results


def _perplexity_table(model_path: str, text_path: str | None, formats, max_tokens: int, group_size: int) -> dict:
    from goose.tokenizer import tokenizer_for_vocab

    if not text_path:
        raise ValueError("--text FILE is needed with --model (the text to measure perplexity on)")
    model = load(model_path)
    tok = tokenizer_for_vocab(model.config.vocab_size)
    tokens = tok.encode(Path(text_path).read_text(encoding="utf-8"))[:max_tokens]
    base = perplexity(model, tokens)
    ppl = {"fp32": base}
    for fmt in formats:
        q = converted(model, fmt, group_size)
        ppl[fmt] = perplexity(q, tokens)
        del q
    print_table(f"{model_path}: perplexity on {text_path} ({len(tokens)} tokens)",
                ["format", "perplexity", "change vs fp32"],
                [[fmt, f"{p:.4f}", f"{100 * (p / base - 1):+.2f}%"] for fmt, p in ppl.items()])
    return ppl
