"""``goose bench memory``: decode speed and peak memory against context length, RWKV-7 beside a Transformer.

Each point runs in a fresh subprocess (so peak RSS, read from ``getrusage``, belongs to that point only):
fill a context of N tokens by prefilling random ids in chunks, then time ``decode_tokens`` decode steps.
goose carries a fixed-size State, so time and memory per token should not move with N. The Transformer is
a Hugging Face ``LlamaForCausalLM`` (random init, fp32, SDPA attention, its default KV cache) with the
same parameter count as the RWKV-7 checkpoint, prefilled in the same chunks; it runs as far as time and
memory allow: a point is skipped when its KV cache alone would take more than half the free memory, or
after an earlier point timed out.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from goose.bench.common import DEFAULT_CACHE, checkpoint, parse_size, print_table

CONTEXTS = (1024, 8192, 32768, 131072)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; since the last _reset_peak() where supported)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def _reset_peak() -> bool:
    """Start peak tracking afresh (Linux >= 4.0), so loading the model does not mask the run's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _random_chunks(n: int, chunk: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    for lo in range(0, n, chunk):
        yield torch.randint(0, vocab, (1, min(chunk, n - lo)), generator=g)


def _goose_point(size: str, ctx: int, decode_tokens: int, chunk: int, fmt: str, cache_dir: str) -> dict:
    from goose.checkpoint import load
    from goose.quant import quantize

    model = quantize(load(checkpoint(size, Path(cache_dir))), fmt)
    load_peak = _peak_rss_mb()
    reset = _reset_peak()
    with torch.inference_mode():
        t0 = time.perf_counter()
        state = None
        for i, tokens in enumerate(_random_chunks(ctx, chunk, model.config.vocab_size)):
            logits, state = model(tokens, state, last=True, inplace=i > 0)
        prefill = time.perf_counter() - t0
        token = logits.argmax(-1, keepdim=True)
        model(token, state, last=True, inplace=True)                   # warm-up
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            logits, _ = model(token, state, last=True, inplace=True)
            token = logits.argmax(-1, keepdim=True)
        decode = time.perf_counter() - t0
    return {"prefill_tok_s": ctx / prefill, "decode_tok_s": decode_tokens / decode, "peak_rss_mb": _peak_rss_mb(),
            "load_peak_rss_mb": load_peak, "peak_is_run_only": reset, "finite": bool(torch.isfinite(logits).all())}


def llama_config(size: str):
    """A LlamaConfig with the parameter count of the RWKV-7 ``size`` (same width, depth and vocabulary;
    the MLP width is chosen to match the per-layer parameters)."""
    from transformers import LlamaConfig

    L, C, V = parse_size(size)
    rwkv_layer = rwkv_params(size) - 2 * V * C - 2 * C
    per_layer = rwkv_layer / L
    inter = int(round((per_layer - 4 * C * C - 2 * C) / (3 * C) / 64) * 64)
    return LlamaConfig(vocab_size=V, hidden_size=C, intermediate_size=inter, num_hidden_layers=L,
                       num_attention_heads=C // 64, num_key_value_heads=C // 64, max_position_embeddings=1 << 20,
                       tie_word_embeddings=False, attn_implementation="sdpa")


def rwkv_params(size: str) -> int:
    """Parameters of the random checkpoint of ``size`` (the official formula, with its layer-0 v-LoRA)."""
    from goose.random_weights import suggested_ranks

    L, C, V = parse_size(size)
    dw, da, dv, dg = suggested_ranks(C)
    return 2 * V * C + 4 * C + L * (19 * C + 12 * C * C + 2 * C * (dw + da + dv + dg))


def _llama_point(size: str, ctx: int, decode_tokens: int, chunk: int) -> dict:
    from transformers import DynamicCache, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(size)).eval()
    load_peak = _peak_rss_mb()
    reset = _reset_peak()
    with torch.inference_mode():
        cache = DynamicCache()
        t0 = time.perf_counter()
        for tokens in _random_chunks(ctx, chunk, model.config.vocab_size):
            out = model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t0
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - t0
    return {"prefill_tok_s": ctx / prefill, "decode_tok_s": decode_tokens / decode, "peak_rss_mb": _peak_rss_mb(),
            "load_peak_rss_mb": load_peak, "peak_is_run_only": reset,
            "params": sum(p.numel() for p in model.parameters())}


def _subprocess(point: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "goose.bench.memory", "--point", json.dumps(point)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"skipped": f"failed: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _free_mb() -> float:
    try:
        import psutil
        return psutil.virtual_memory().available / 2**20
    except ImportError:
        import os
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**20


def run(size: str = "L12-D768", contexts=CONTEXTS, decode_tokens: int = 16, chunk: int = 1024, fmt: str = "fp32",
        transformer: bool = True, timeout: float = 1800, plot: str | None = "context.png", out: str | None = None,
        cache_dir: Path = DEFAULT_CACHE) -> dict:
    """Measure every context length for goose (and the Transformer); print a table, save a plot/JSON."""
    checkpoint(size, cache_dir)                                   # write it once, outside the timed children
    L, C, V = parse_size(size)
    has_hf = False
    if transformer:
        try:
            import transformers  # noqa: F401
            has_hf = True
        except ImportError:
            print("[bench] transformers is not installed (pip install transformers): the Transformer column "
                  "is skipped")
    res: dict = {"size": size, "format": fmt, "chunk": chunk, "goose": {}, "llama": {}}
    hf_stopped = None
    for ctx in contexts:
        res["goose"][ctx] = _subprocess({"who": "goose", "size": size, "ctx": ctx, "decode_tokens": decode_tokens,
                                         "chunk": chunk, "fmt": fmt, "cache_dir": str(cache_dir)}, timeout)
        print(f"[bench] goose ctx {ctx}: {res['goose'][ctx]}", file=sys.stderr)
        if not has_hf:
            continue
        kv_mb = 2 * L * C * 4 * ctx / 2**20
        if hf_stopped:
            res["llama"][ctx] = {"skipped": hf_stopped}
        elif kv_mb > _free_mb() / 2:
            res["llama"][ctx] = {"skipped": f"KV cache alone needs {kv_mb / 1024:.1f} GiB (> half the free memory)"}
        else:
            res["llama"][ctx] = _subprocess({"who": "llama", "size": size, "ctx": ctx, "decode_tokens": decode_tokens,
                                             "chunk": chunk}, timeout)
        if "skipped" in res["llama"][ctx]:
            hf_stopped = hf_stopped or f"stopped after {ctx}: " + res["llama"][ctx]["skipped"]
        print(f"[bench] llama ctx {ctx}: {res['llama'][ctx]}", file=sys.stderr)

    def cell(r: dict, key: str) -> object:
        return r.get(key, "-") if r else "-"
    rows = []
    for ctx in contexts:
        g, h = res["goose"].get(ctx, {}), res["llama"].get(ctx, {})
        rows.append([_label(ctx), cell(g, "decode_tok_s"), cell(g, "peak_rss_mb"), cell(g, "prefill_tok_s"),
                     cell(h, "decode_tok_s"), cell(h, "peak_rss_mb"), h.get("skipped", "") if h else ""])
    print_table(f"{size}: decode tok/s and peak RSS (MB, while prefilling and decoding, model included) against "
                f"context (goose {fmt}; Transformer: Llama with the same parameter count, fp32, KV cache; each "
                f"point a fresh process)",
                ["context", "goose tok/s", "goose RSS MB", "goose prefill tok/s", "Llama tok/s", "Llama RSS MB",
                 "note"], rows)
    g0, g1 = res["goose"].get(contexts[0], {}), res["goose"].get(contexts[-1], {})
    if "peak_rss_mb" in g0 and "peak_rss_mb" in g1:
        growth = g1["peak_rss_mb"] / g0["peak_rss_mb"] - 1
        res["rss_growth"] = growth
        print(f"goose peak RSS at {contexts[-1]} tokens vs {contexts[0]}: {100 * growth:+.1f}%")
    if plot:
        _plot(res, contexts, plot)
    if out:
        Path(out).write_text(json.dumps(res, indent=1))
    return res


def _label(ctx: int) -> str:
    return f"{ctx // 1024}K" if ctx % 1024 == 0 else str(ctx)


def _plot(res: dict, contexts, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib is not installed: no plot")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for who, label, style in (("goose", f"RWKV-7 (goose {res['format']})", "o-"), ("llama", "Llama + KV cache", "s--")):
        pts = [(c, r) for c, r in res[who].items() if "decode_tok_s" in r]
        if pts:
            ax1.plot([c for c, _ in pts], [r["decode_tok_s"] for _, r in pts], style, label=label)
            ax2.plot([c for c, _ in pts], [r["peak_rss_mb"] / 1024 for _, r in pts], style, label=label)
    for ax, title in ((ax1, "decode tok/s"), (ax2, "peak RSS (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(contexts), [_label(c) for c in contexts])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{res['size']}: decode speed and memory against context")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def _child() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--point", required=True)
    point = json.loads(p.parse_args().point)
    who = point.pop("who")
    torch.set_grad_enabled(False)
    result = _goose_point(**point) if who == "goose" else _llama_point(**point)
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) and math.isfinite(v) else v) for k, v in result.items()}))


if __name__ == "__main__":
    _child()
