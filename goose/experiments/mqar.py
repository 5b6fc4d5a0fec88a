"""Multi-query associative recall (Zoology's MQAR) against model width, i.e. recurrent state size.

The RWKV-7 paper's Table 6 trains 2-layer models of width d (head size 64, so the WKV state holds
2 x (d / 64) x 64^2 floats) on (sequence length, key-value pairs) settings (64, 4) ... (2048, 256) and
reports accuracy on the queries. Here each model trains on a round-robin mixture of the preset's
settings (one setting per step, batches of about ``tokens_per_batch`` tokens), as Zoology trains on a
mixture, and is scored on fresh sequences of each setting; the run stops early once every setting
reaches ``target``. RWKV-7 is compared with its a = 0 ablation (diagonal decay, no delta-rule
removal), which has exactly the same state size.

Each width has its own learning rate (``lrs``), as Zoology sweeps the rate per model: at lr 3e-3 both
width-128 models stayed at chance (loss ln 64, the uniform guess over values) for all 1000 steps, while
at 1e-3 the width-128 RWKV-7 reached 97-100 %; wider models need smaller rates.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .runner import (ARCHS, TrainConfig, build_model, markdown_table, run_jobs, state_floats, tagging_accuracy, train,
                     write_results)
from .tasks import mqar_batch

NAME = "mqar"


@dataclass(frozen=True)
class Preset:
    settings: tuple[tuple[int, int], ...]     # (sequence length, key-value pairs)
    widths: tuple[int, ...]
    lrs: tuple[float, ...]                    # one learning rate per width
    archs: tuple[str, ...]
    vocab_size: int
    steps: int
    n_layer: int = 2
    head_size: int = 64
    tokens_per_batch: int = 2048
    eval_size: int = 256
    eval_every: int = 100
    target: float = 0.99
    workers: int = 2

    def __post_init__(self) -> None:
        if len(self.lrs) != len(self.widths):
            raise ValueError(f"need one learning rate per width: {len(self.widths)} widths, {len(self.lrs)} lrs")

    def lr(self, width: int) -> float:
        return self.lrs[self.widths.index(width)]


PRESETS = {   # full: the rate for width 256 continues the trend and has not been tried
    "quick": Preset(settings=((64, 4), (128, 8), (256, 16)), widths=(64, 128), lrs=(3e-3, 1e-3),
                    archs=("rwkv7", "rwkv7-a0"), vocab_size=128, steps=1000, tokens_per_batch=2048, eval_size=128),
    "full": Preset(settings=((64, 4), (128, 8), (256, 16), (512, 64)), widths=(64, 128, 256), lrs=(3e-3, 1e-3, 5e-4),
                   archs=("rwkv7", "rwkv7-a0"), vocab_size=1024, steps=8000, tokens_per_batch=8192),
}


def _eval_sets(p: Preset) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return {(T, kv): mqar_batch(p.eval_size, T, kv, p.vocab_size, gen) for T, kv in p.settings}


def _run_one(arch: str, width: int, p: Preset, seed: int, progress: bool) -> dict[str, Any]:
    model = build_model(arch, p.n_layer, width, p.vocab_size, p.head_size, seed)
    eval_sets = _eval_sets(p)
    step = 0

    def sample(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal step
        T, kv = p.settings[step % len(p.settings)]
        step += 1
        return mqar_batch(max(1, p.tokens_per_batch // T), T, kv, p.vocab_size, gen)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        accs = {f"acc_{T}_{kv}": tagging_accuracy(m, x, y, batch_size=64)[1] for (T, kv), (x, y) in eval_sets.items()}
        return {"score": min(accs.values()), **accs}

    cfg = TrainConfig(steps=p.steps, lr=p.lr(width), eval_every=p.eval_every, target=p.target)
    res = train(model, sample, evaluate, cfg, seed=seed, desc=f"mqar {arch} d={width}", progress=progress)
    return {"arch": arch, "width": width, "state": state_floats(model), "lr": p.lr(width), "steps": res.steps,
            "seconds": round(res.seconds), **{k: v for k, v in res.metrics.items() if k != "score"},
            "history": res.history}


def _plot(rows: list[dict[str, Any]], p: Preset, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(p.settings), figsize=(3.4 * len(p.settings), 3.2), squeeze=False, sharey=True)
    for ax, (T, kv) in zip(axes[0], p.settings):
        for arch in p.archs:
            mine = sorted((r for r in rows if r["arch"] == arch), key=lambda r: r["state"])
            ax.plot([r["state"] for r in mine], [r[f"acc_{T}_{kv}"] for r in mine], "o-", label=ARCHS[arch])
        ax.set_xscale("log", base=2)
        ax.set_title(f"T={T}, {kv} pairs")
        ax.set_xlabel("WKV state (floats)")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("query accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: list[dict[str, Any]], p: Preset, preset_name: str, seconds: float) -> str:
    cols = ([("model", "model"), ("width", "d"), ("state", "state (floats)"), ("lr", "lr")]
            + [(f"acc_{T}_{kv}", f"({T},{kv})") for T, kv in p.settings] + [("steps", "steps"), ("seconds", "s")])
    table = [{**r, "model": ARCHS[r["arch"]], "lr": f"{r['lr']:g}"} for r in rows]
    return "\n\n".join([
        f"# MQAR ({preset_name} preset)",
        f"Query accuracy per (sequence length, key-value pairs). {p.n_layer} layers, head size {p.head_size}, "
        f"vocabulary {p.vocab_size}, about {p.tokens_per_batch} tokens per batch, at most {p.steps} "
        f"steps on a mixture of all settings (early stop when every setting reaches {p.target:.0%}). "
        f"Total time {seconds / 60:.1f} min.",
        markdown_table(table, cols),
    ])


def run(p: Preset, out: Path, seed: int = 0, preset_name: str = "custom") -> dict[str, Any]:
    """Train every (model, width), write results.{json,md} and accuracy_vs_state.png to ``out``."""
    start = time.perf_counter()
    jobs = [(arch, width, p, seed, p.workers <= 1) for width in sorted(p.widths, reverse=True) for arch in p.archs]
    rows = sorted(run_jobs(_run_one, jobs, p.workers, NAME), key=lambda r: (p.archs.index(r["arch"]), r["width"]))
    seconds = time.perf_counter() - start
    results = {"experiment": NAME, "preset": preset_name, "settings": asdict(p), "seed": seed,
               "seconds": round(seconds, 1), "rows": rows}
    write_results(out, results, report(rows, p, preset_name, seconds))
    _plot(rows, p, out / "accuracy_vs_state.png")
    return results
