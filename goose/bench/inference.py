"""``goose bench inference``: decode, prefill and batched decode, goose against the official package.

On random official-layout checkpoints, in one process: the official ``rwkv`` package (``cpu fp32``,
``cpu bf16``) and goose with each weight format, timed interleaved (see common.race), medians over
repeats. Tables:

1. decode at batch 1: tok/s, ratio to the official ``cpu fp32``, and the roofline: the machine's
   measured bandwidth (large fp32 matvec, one measurement per round of the race) divided by the bytes of
   weights each token reads; the % of it both as a ratio of medians and paired (median over rounds of each
   round's own ratio, common.paired), which the target uses: the machine's bandwidth drifts by tens of percent
   within a minute;
2. prefill: tok/s for prompts of T tokens (goose in chunks of ``prefill_chunk``, the official package
   as one ``forward(list, None)``), ratios to the official package;
3. batched decode: aggregate tok/s of goose in each format at several batch sizes (one ``[B, 1]`` step per
   token); the B=16 / B=1 target is paired the same way.

Every goose format is checked against the fp32 model's logits before it is timed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from goose.bench.common import (DEFAULT_CACHE, checkpoint, converted, machine, matvec_bandwidth, official,
                                paired, print_table, race, read_bandwidth, timed)
from goose.checkpoint import load
from goose.quant import weight_bytes_per_token

FORMATS = ("fp32", "bf16", "fp16", "int8", "int4")
# a format must agree with the fp32 model's logits to this relative RMS error on a short prompt to be timed: a
# guard against a broken kernel (unrelated logits give ~1.41, NaN fails too). Random checkpoints are chaotic and
# amplify rounding through the layers (measured: L12-D768 bf16 0.09, int8 0.3, int4 0.7; L24-D1024 fp16 0.44,
# bf16 0.60, int8 0.74, int4 1.07; even fp32's panels layout, which only sums in another order, 0.048 on
# L24-D1024, where against an fp64 run of the model it is 0.012 off and nn.Linear's fp32 0.054), so only that is
# checked here; kernels are tested against fp64 and the dequantized matmul in tests/test_gemm.py and
# tests/test_quant.py, and quality is measured by `goose bench quant`.
SANITY = {"fp32": 0.25, "fp16": 1.25, "bf16": 1.25, "int8": 1.25, "int4": 1.25}


# Every timed decode run starts with one untimed step: the contender before it in a race leaves the caches full
# of its own data (measured, int8 L12 batch 1 over 8 tokens: 185 tok/s alone, 148 right after a batch-64 run)
def _goose_decode(model, batch: int, n: int):
    state = model.new_state(batch)
    tokens = torch.randint(0, model.config.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(tokens, state, last=True, inplace=True)

    with torch.inference_mode():
        step()

    def run() -> float:
        with torch.inference_mode():
            step()
            return batch * n / timed(lambda: [step() for _ in range(n)])
    return run


def _official_decode(ref, n: int):
    _, state = ref.forward([1, 2, 3], None)

    def run() -> float:
        ref.forward([7], state)
        return n / timed(lambda: [ref.forward([7], state) for _ in range(n)])
    return run


def _goose_prefill(model, prompt: list[int], chunk: int):
    tokens = torch.tensor([prompt])

    def run() -> float:
        def go():
            with torch.inference_mode():
                state = None
                for lo in range(0, tokens.shape[1], chunk):
                    _, state = model(tokens[:, lo:lo + chunk], state, last=True, inplace=lo > 0)
        return tokens.shape[1] / timed(go)
    return run


def _official_prefill(ref, prompt: list[int]):
    return lambda: len(prompt) / timed(lambda: ref.forward(prompt, None))


def _check(base: torch.nn.Module, models: dict, vocab: int) -> None:
    """Refuse to time a format whose logits stray from the fp32 model's (``SANITY``)."""
    tokens = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, _ = base(tokens)
        for fmt, m in models.items():
            out, _ = m(tokens)
            err = ((out.float() - ref).norm() / (ref - ref.mean()).norm()).item()
            if not err <= SANITY[fmt]:
                raise RuntimeError(f"goose {fmt} disagrees with fp32 (relative RMS error {err:.2e}); not timing it")


def run_size(size: str, formats=FORMATS, repeats: int = 5, decode_tokens: int = 16, prefill=(1024, 8192),
             prefill_repeats: int = 3, batches=(1, 4, 16, 64),
             prefill_chunk: int = 1024, with_official: bool = True, cache_dir: Path = DEFAULT_CACHE) -> dict:
    """All three tables for one checkpoint size; returns the numbers."""
    path = checkpoint(size, cache_dir)
    base = load(path)
    # every format a converted copy of the model as loaded, as `goose generate` runs it (fp32: the weights in the
    # native kernels' panels layout); `base` (nn.Linear) gives the reference logits
    models = {fmt: converted(base, fmt) for fmt in formats}
    _check(base, models, base.config.vocab_size)
    goose = {f"goose {fmt}": m for fmt, m in models.items()}
    refs = {}
    if with_official:
        for dt in ("fp32", "bf16"):
            ref = official(path, f"cpu {dt}")
            if ref is not None:
                refs[f"official cpu {dt}"] = ref
    # every contender's rate per round, for ratios taken within a round (common.paired)
    res: dict = {"size": size, "decode": {}, "prefill": {}, "batch": {}, "rounds": {"prefill": {}, "batch": {}}}

    # 1. decode, batch 1; the bandwidth is measured in the same race, so it sees the same machine load
    contenders = {name: _official_decode(r, decode_tokens) for name, r in refs.items()}
    contenders.update({name: _goose_decode(m, 1, decode_tokens) for name, m in goose.items()})
    contenders["bandwidth"] = lambda: matvec_bandwidth(repeats=3)
    rounds = res["rounds"]["decode"] = {}
    rates = race(contenders, repeats, f"{size} decode", rounds)
    bw = res["bandwidth_gbs"] = rates.pop("bandwidth")
    base_rate = rates.get("official cpu fp32")
    rows = []
    for name, rate in rates.items():
        if name.startswith("official"):
            nbytes = weight_bytes_per_token(base) // (2 if name.endswith("bf16") else 1)
        else:
            nbytes = weight_bytes_per_token(goose[name])
        roof = bw * 1e9 / nbytes
        share = paired([r * nbytes / 1e9 for r in rounds[name]], rounds["bandwidth"])
        res["decode"][name] = {"tok_s": rate, "weight_mb": nbytes / 1e6, "roofline_tok_s": roof,
                               "roofline_share_paired": share}
        rows.append([name, rate, f"{rate / base_rate:.2f}x" if base_rate else "-", nbytes / 1e6, roof,
                     f"{100 * rate / roof:.0f}%", f"{100 * share:.0f}%"])
    print_table(f"{size}: decode, batch 1 (tok/s; median of {repeats} x {decode_tokens} tokens; roofline = "
                f"{bw:.1f} GB/s / weight bytes per token; paired: median over rounds of that round's share)",
                ["", "tok/s", "vs official fp32", "weights MB/token", "roofline tok/s", "% of roofline",
                 "paired"], rows)

    # 2. prefill
    g = torch.Generator().manual_seed(2)
    for T in prefill:
        prompt = torch.randint(0, base.config.vocab_size, (T,), generator=g).tolist()
        contenders = {name: _official_prefill(r, prompt) for name, r in refs.items()}
        contenders.update({name: _goose_prefill(m, prompt, prefill_chunk) for name, m in goose.items()})
        res["rounds"]["prefill"][T] = {}
        res["prefill"][T] = race(contenders, prefill_repeats, f"{size} prefill T={T}", res["rounds"]["prefill"][T])
    rows = []
    for name in res["prefill"][prefill[0]] if prefill else []:
        row = [name]
        for T in prefill:
            rate = res["prefill"][T][name]
            row += [rate] + [f"{rate / res['prefill'][T][o]:.2f}x" for o in refs]
        rows.append(row)
    if prefill:
        print_table(f"{size}: prefill (tok/s, median of {prefill_repeats}; goose in chunks of {prefill_chunk})",
                    [""] + [h for T in prefill for h in [f"T={T}"] + [f"vs {o[9:]}" for o in refs]], rows)

    # 3. batched decode, every format
    for fmt in models:
        contenders = {B: _goose_decode(models[fmt], B, decode_tokens) for B in batches}
        rounds = res["rounds"]["batch"][fmt] = {}
        res["batch"][fmt] = race(contenders, repeats, f"{size} {fmt} batches", rounds)
    rows = [[f"goose {fmt}"] + [r[B] for B in batches] + [f"{r[B] / r[batches[0]]:.1f}x" for B in batches[1:]]
            for fmt, r in res["batch"].items()]
    if rows:
        print_table(f"{size}: batched decode, aggregate tok/s (median of {repeats})",
                    [""] + [f"B={B}" for B in batches] + [f"B={B} / B={batches[0]}" for B in batches[1:]], rows)
    return res


def targets(res: dict) -> list[list[object]]:
    """The issue's targets for one size, as table rows: target, measured (paired: the median over rounds of
    each round's ratio), the ratio of the medians, met (judged on the paired value)."""
    dec, pre, bat, rounds = res["decode"], res["prefill"], res["batch"], res["rounds"]
    rows = []

    def check(name: str, pair: tuple[float, float] | None, goal: float, unit: str = "x") -> None:
        """``pair``: (paired ratio, ratio of medians)."""
        if pair is None:
            rows.append([name, "not measured", "-", "-"])
            return
        shown = [f"{100 * v:.0f}%" if unit == "%" else f"{v:.2f}x" for v in pair]
        rows.append([name, *shown, "met" if pair[0] >= goal else "MISSED"])

    def ratio(medians: dict, race_rounds: dict, x, y) -> tuple[float, float] | None:
        if x not in medians or y not in medians:
            return None
        return paired(race_rounds[x], race_rounds[y]), medians[x] / medians[y]

    official = "official cpu fp32"
    dec_rates = {name: d["tok_s"] for name, d in dec.items()}
    check("decode B=1, fp32 weights >= 1.5x official cpu fp32",
          ratio(dec_rates, rounds["decode"], "goose fp32", official), 1.5)
    if "goose fp32" in dec:
        d = dec["goose fp32"]
        check("decode B=1, fp32 weights >= 80% of the roofline",
              (d["roofline_share_paired"], d["tok_s"] / d["roofline_tok_s"]), 0.8, "%")
    check("decode B=1, int8 >= 3x official cpu fp32", ratio(dec_rates, rounds["decode"], "goose int8", official), 3.0)
    if 1024 in pre and official in pre[1024]:
        for fmt, goal in (("fp32", 2.0), ("bf16", 3.5)):
            if f"goose {fmt}" in pre[1024]:
                for ref in ("official cpu fp32", "official cpu bf16"):
                    if ref in pre[1024]:
                        check(f"prefill T=1024, {fmt} weights >= {goal}x {ref}",
                              ratio(pre[1024], rounds["prefill"][1024], f"goose {fmt}", ref), goal)
    for fmt, r in bat.items():
        if 16 in r and 1 in r:
            check(f"batched decode B=16 >= 8x B=1, goose {fmt}", ratio(r, rounds["batch"][fmt], 16, 1), 8.0)
    return rows


def run(sizes=("L12-D768", "L24-D1024"), out: str | None = None, **kwargs) -> dict:
    """Print the machine, the bandwidth and every table for each size; optionally save them as JSON."""
    info = machine()
    bw, rd = matvec_bandwidth(), read_bandwidth()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['torch_threads']} "
          f"threads, rwkv {info['rwkv']}, load average {info['load_average']}")
    print(f"bandwidth at start: fp32 matvec 16384x8192 {bw:.1f} GB/s, streaming read {rd:.1f} GB/s (the roofline "
          f"uses the matvec figure measured inside each decode race)")
    results = {"machine": info, "matvec_gbs": bw, "read_gbs": rd, "sizes": {}}
    for size in sizes:
        results["sizes"][size] = run_size(size, **kwargs)
    results["load_average_end"] = machine()["load_average"]
    for size, res in results["sizes"].items():
        print_table(f"{size}: targets of the issue (ratios from this run; measured = paired)",
                    ["target", "measured", "ratio of medians", ""], targets(res))
    print(f"\nload average at the end: {results['load_average_end']}")
    if out:
        Path(out).write_text(json.dumps(results, indent=1, default=str))
        print(f"\nresults written to {out}")
    return results
