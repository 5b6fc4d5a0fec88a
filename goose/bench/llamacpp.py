"""``goose bench llamacpp``: goose beside llama.cpp on the same RWKV-7 weights, precision by precision.

llama.cpp is not a dependency: ``scripts/build_llamacpp.sh`` builds its ``llama-bench`` (a benchmark-time
tool, never a test step) and a venv for its ``convert_hf_to_gguf.py``. This benchmark

1. writes a random official-layout checkpoint (common.checkpoint), exports it as an fla-hub folder
   (goose.export) and converts that with llama.cpp's converter to GGUF at f32, bf16, f16 and q8_0
   (each step cached, so later runs start at once);
2. times, interleaved round by round (common.race), ``llama-bench -m X.gguf -t THREADS -p 512`` and
   ``-n 128`` (one repetition per round; llama-bench runs its own warm-up) against goose's decode of 128
   tokens at batch 1 and prefill of one 512-token prompt, on the same number of threads;
3. prints tok/s (medians over rounds) and the ratios goose / llama.cpp, with the load average.

Pairs: goose fp32 vs f32, bf16 vs bf16, fp16 vs f16 (weights of the big matrices in that dtype, fp32
elsewhere in goose; llama.cpp stores every matrix in it), int8 vs q8_0 (goose: per-output-channel scales,
the big matrices only; q8_0: a scale per block of 32 weights, every matrix including the LoRAs).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from goose.bench.common import DEFAULT_CACHE, checkpoint, converted, machine, paired, print_table, race
from goose.bench.inference import _goose_decode, _goose_prefill
from goose.checkpoint import load

LLAMA_TYPES = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "q8_0"}   # goose format -> GGUF type
DEFAULT_LLAMA_BENCH = Path("/tmp/llamacpp/llama.cpp/build/bin/llama-bench")      # scripts/build_llamacpp.sh
BUILD_HINT = "build it with scripts/build_llamacpp.sh (about 20 minutes on 2 cores; see docs/perf_llamacpp.md)"


def llama_cpp_tools(llama_bench: str | Path, python: str | Path | None = None) -> tuple[Path, Path, Path]:
    """(llama-bench, convert_hf_to_gguf.py, the python that runs it), checked to exist.

    The converter is found in the llama.cpp tree llama-bench was built in (``build/bin/llama-bench``);
    its python defaults to the venv scripts/build_llamacpp.sh makes next to that tree.
    """
    bench = Path(llama_bench)
    if not bench.is_file():
        raise FileNotFoundError(f"llama-bench not found at {bench}: {BUILD_HINT}")
    root = bench.resolve().parents[2]
    converter = root / "convert_hf_to_gguf.py"
    if not converter.is_file():
        raise FileNotFoundError(f"{converter} not found: llama-bench is expected at <llama.cpp>/build/bin/; "
                                f"{BUILD_HINT}")
    if python is None:
        venv = root.parent / "venv" / "bin" / "python"
        python = venv if venv.is_file() else Path(sys.executable)
    return bench, converter, Path(python)


def gguf_for(size: str, outtype: str, converter: Path, python: Path, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The random checkpoint of ``size`` as GGUF ``outtype``: exported to the fla-hub layout and converted
    by llama.cpp's own converter; both results are cached next to the checkpoint (redone if it is newer)."""
    from goose.export import export_hf

    ckpt = checkpoint(size, cache_dir)

    def fresh(p: Path) -> bool:
        return p.exists() and p.stat().st_mtime >= ckpt.stat().st_mtime

    out = ckpt.with_name(f"{ckpt.stem}-{outtype}.gguf")
    if fresh(out):
        return out
    hf_dir = ckpt.with_name(f"{ckpt.stem}-hf")
    if not fresh(hf_dir / "model.safetensors") or not (hf_dir / "config.json").exists():
        export_hf(load(ckpt), hf_dir)
    tmp = out.with_name(out.name + ".tmp")
    proc = subprocess.run([str(python), str(converter), str(hf_dir), "--outtype", outtype, "--outfile", str(tmp)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_dir} ({outtype}):\n{proc.stderr[-3000:]}")
    tmp.replace(out)
    return out


def llama_bench_rate(bench: Path, gguf: Path, threads: int, n_prompt: int = 0, n_gen: int = 0,
                     repetitions: int = 1) -> float:
    """tok/s of one llama-bench test: prompt processing of ``n_prompt`` tokens, or ``n_gen`` generated."""
    cmd = [str(bench), "-m", str(gguf), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
           "-r", str(repetitions), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    tests = [t for t in json.loads(proc.stdout) if t["n_prompt"] == n_prompt and t["n_gen"] == n_gen]
    if len(tests) != 1:
        raise RuntimeError(f"unexpected llama-bench output for {' '.join(cmd)}:\n{proc.stdout[-2000:]}")
    return float(tests[0]["avg_ts"])


def run(llama_bench: str | Path = DEFAULT_LLAMA_BENCH, size: str = "L12-D768",
        formats=("fp32", "bf16", "fp16", "int8"), threads: int = 2, repeats: int = 5, n_prompt: int = 512,
        n_gen: int = 128, converter_python: str | Path | None = None, cache_dir: Path = DEFAULT_CACHE,
        out: str | None = None) -> dict:
    """Print the table of goose vs llama.cpp (decode and prefill, per precision); returns the numbers."""
    unknown = [f for f in formats if f not in LLAMA_TYPES]
    if unknown:
        raise ValueError(f"no llama.cpp counterpart for {unknown}; choose from {list(LLAMA_TYPES)}")
    bench, converter, python = llama_cpp_tools(llama_bench, converter_python)
    ggufs = {fmt: gguf_for(size, LLAMA_TYPES[fmt], converter, python, cache_dir) for fmt in formats}

    torch.set_num_threads(threads)
    base = load(checkpoint(size, cache_dir))
    prompt = torch.randint(0, base.config.vocab_size, (n_prompt,), generator=torch.Generator().manual_seed(2)).tolist()
    contenders = {}
    for fmt in formats:
        model, gguf, t = converted(base, fmt), ggufs[fmt], LLAMA_TYPES[fmt]
        contenders[f"llama.cpp {t} tg"] = lambda g=gguf: llama_bench_rate(bench, g, threads, n_gen=n_gen)
        contenders[f"goose {fmt} tg"] = _goose_decode(model, 1, n_gen)
        contenders[f"llama.cpp {t} pp"] = lambda g=gguf: llama_bench_rate(bench, g, threads, n_prompt=n_prompt)
        contenders[f"goose {fmt} pp"] = _goose_prefill(model, prompt, n_prompt)

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {threads} threads for both; "
          f"load average at start {info['load_average']}")
    print(f"llama-bench: {bench}")
    rounds: dict[str, list[float]] = {}
    rates = race(contenders, repeats, f"{size} goose vs llama.cpp", rounds)
    load_end = os.getloadavg()
    res = {"size": size, "threads": threads, "repeats": repeats, "n_prompt": n_prompt, "n_gen": n_gen,
           "machine": info, "load_average_end": load_end, "llama_bench": str(bench), "rates": rates,
           "rounds": rounds}
    rows = []
    for fmt in formats:
        t = LLAMA_TYPES[fmt]
        g_tg, l_tg = rates[f"goose {fmt} tg"], rates[f"llama.cpp {t} tg"]
        g_pp, l_pp = rates[f"goose {fmt} pp"], rates[f"llama.cpp {t} pp"]
        tg_paired = paired(rounds[f"goose {fmt} tg"], rounds[f"llama.cpp {t} tg"])
        pp_paired = paired(rounds[f"goose {fmt} pp"], rounds[f"llama.cpp {t} pp"])
        rows.append([f"goose {fmt} / llama.cpp {t}", g_tg, l_tg, f"{g_tg / l_tg:.2f}x", f"{tg_paired:.2f}x",
                     g_pp, l_pp, f"{g_pp / l_pp:.2f}x", f"{pp_paired:.2f}x"])
    print_table(f"{size}, random weights: goose vs llama.cpp, {threads} threads (tok/s, median of {repeats} "
                f"interleaved rounds; decode = tg{n_gen} at batch 1, prefill = pp{n_prompt}; paired = median over "
                f"rounds of that round's ratio)",
                ["", f"goose tg{n_gen}", f"llama.cpp tg{n_gen}", "goose/llama.cpp", "paired",
                 f"goose pp{n_prompt}", f"llama.cpp pp{n_prompt}", "goose/llama.cpp", "paired"], rows)
    print(f"\nload average: start {info['load_average']}, end {load_end}")
    if out:
        Path(out).write_text(json.dumps(res, indent=1, default=str))
        print(f"results written to {out}")
    return res
