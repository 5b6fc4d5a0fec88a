"""``goose bench quant``: how much each weight format changes the model's predictions.

Against the fp32 model on the same tokens: KL(fp32 || format) of the next-token distributions (mean and
max over positions), top-1 agreement, and the relative RMS error of the logits. Both paths are measured:
prefill (many rows: the dequantize + GEMM fallback) and decode (one row per step: the packed CPU
kernels).

Then the perplexity of a trained checkpoint per format, on both paths. By default that is the built-in
demo model (a byte-level RWKV-7 goose trained on the King James Bible) on the text ``goose train`` held
out from it: the last part of the byte stream ``scripts/train_demo_model.sh`` trains on (the output of
Debian's ``bible -f Gen1:1-Rev22:21``, so the ``bible-kjv`` and ``bible-kjv-text`` packages are needed).
``--model PATH --text FILE`` measures another checkpoint on another text instead.
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
        max_text_tokens: int = 1 << 20, decode_text_tokens: int = 4096, cache_dir: Path = DEFAULT_CACHE) -> dict:
    """Print the agreement tables for random checkpoints and the perplexity table of a trained model
    (the built-in demo model on its held-out text unless ``model_path`` is given)."""
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
    results["perplexity"] = perplexity_table(model_path, text_path, formats, max_text_tokens, decode_text_tokens,
                                             group_size)
    return results


def demo_validation_tokens() -> list[int]:
    """The demo model's held-out bytes, as byte-tokenizer ids: the last split of the KJV stream, exactly as
    ``goose data`` + ``goose train`` (TokenDataset's default split) held it out while training it."""
    import shutil
    import subprocess

    from goose.tokenizer import ByteTokenizer
    from goose.train.data import DEFAULT_MIN_VAL_TOKENS, DEFAULT_VAL_FRACTION

    if shutil.which("bible") is None:
        raise ValueError("the demo model's validation text comes from Debian's bible program: apt-get install "
                         "bible-kjv bible-kjv-text (or pass --model and --text)")
    text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    stream = ByteTokenizer().encode(text) + [0]                      # goose data: one document, then end of text
    n_val = max(math.ceil(DEFAULT_VAL_FRACTION * len(stream)), DEFAULT_MIN_VAL_TOKENS)
    return stream[-n_val:]


@torch.inference_mode()
def decode_perplexity(model, tokens: list[int]) -> float:
    """Perplexity computed one token at a time (the decode path: the packed CPU kernels of int8/int4)."""
    ids = torch.tensor([tokens])
    logits = _decode_logits(model, ids[:, :-1])[0]
    return math.exp(F.cross_entropy(logits.float(), ids[0, 1:]).item())


def perplexity_table(model_path: str | None, text_path: str | None, formats=FORMATS, max_tokens: int = 1 << 20,
                     decode_tokens: int = 4096, group_size: int = 64) -> dict:
    """Perplexity (and loss in nats/token) per format on the prefill path (all tokens) and the decode path
    (the first ``decode_tokens``); by default the demo model on its held-out text."""
    from goose.tokenizer import tokenizer_for_vocab

    if model_path is None:
        from goose.demo import ASSETS, info

        model_path, what = str(ASSETS / info()["file"]), "the demo model's held-out KJV text (goose train's val split)"
        tokens = demo_validation_tokens() if text_path is None else None
    elif text_path is None:
        raise ValueError("--text FILE is needed with --model (the text to measure perplexity on)")
    else:
        tokens, what = None, text_path
    model = load(model_path)
    if tokens is None:
        what = text_path
        tokens = tokenizer_for_vocab(model.config.vocab_size).encode(Path(text_path).read_text(encoding="utf-8"))
    tokens = tokens[:max_tokens]
    if len(tokens) < 2:
        raise ValueError(f"{what}: needs at least 2 tokens, got {len(tokens)}")
    short = tokens[:decode_tokens]
    res = {}
    for fmt in ("fp32",) + tuple(f for f in formats if f != "fp32"):
        q = model if fmt == "fp32" else converted(model, fmt, group_size)
        res[fmt] = {"prefill": perplexity(q, tokens), "decode": decode_perplexity(q, short)}
        del q
    base = res["fp32"]
    rows = [[fmt] + [c for path in ("prefill", "decode") for c in
                     (f"{math.log(r[path]):.4f}", f"{r[path]:.4f}", f"{100 * (r[path] / base[path] - 1):+.2f}%")]
            for fmt, r in res.items()]
    print_table(f"{model_path}: perplexity on {what} (prefill path: {len(tokens)} tokens; decode path, one token "
                f"per step: the first {len(short)}; int4 group {group_size})",
                ["format", "loss (nats/token)", "perplexity", "vs fp32", "decode loss", "decode ppl", "vs fp32"], rows)
    return {"model": model_path, "text": what, "tokens": len(tokens), "decode_tokens": len(short), "formats": res}
