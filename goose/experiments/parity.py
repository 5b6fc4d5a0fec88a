"""Parity and mod-3 counting with length generalisation: train on length <= 40, test on length 256.

Input: random bits; label at every position: the number of ones so far modulo m (m = 2 is parity).
Labels at every position mean a model trained at length 40 is trained on every length up to 40.
Both are the simplest state-tracking problems: parity needs a transition with eigenvalue -1 (flip a
sign per one), which RWKV-7's released decay clamp (w >= 0.545, eigenvalues > -0.455) and the
diagonal a = 0 ablation (eigenvalues in (0, 1)) cannot realise exactly; the "wide" variant lowers the
decay floor so that w - a reaches -0.99. Mod-3 needs a rotation by 120 degrees: no single step with
real eigenvalues gives one, so theory says it needs more than one layer (or fails) even when widened.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .runner import ARCHS, TrainConfig, build_model, markdown_table, run_jobs, tagging_accuracy, train, write_results
from .tasks import counting_batch

NAME = "parity"
TASKS = {2: "parity", 3: "mod-3 counting"}


@dataclass(frozen=True)
class Preset:
    moduli: tuple[int, ...]
    archs: tuple[str, ...]
    layers: tuple[int, ...]
    n_embd: int
    head_size: int
    batch_size: int
    steps: int
    lr: float
    train_len: int = 40
    test_len: int = 256
    eval_size: int = 512
    eval_every: int = 100
    target: float = 0.999        # stop when every position up to train_len is this accurate
    workers: int = 2


PRESETS = {
    "quick": Preset(moduli=(2, 3), archs=("rwkv7", "rwkv7-a0", "rwkv7-wide"), layers=(1, 2), n_embd=64,
                    head_size=16, batch_size=64, steps=600, lr=3e-3),
    "full": Preset(moduli=(2, 3), archs=("rwkv7", "rwkv7-a0", "rwkv7-wide"), layers=(1, 2, 3), n_embd=128,
                   head_size=32, batch_size=128, steps=10000, lr=2e-3),
}


def _run_one(modulus: int, arch: str, layers: int, p: Preset, seed: int, progress: bool) -> dict[str, Any]:
    model = build_model(arch, layers, p.n_embd, max(modulus, 2), p.head_size, seed)
    eval_in = counting_batch(p.eval_size, p.train_len, modulus, torch.Generator().manual_seed(1))
    test_in = counting_batch(p.eval_size, p.test_len, modulus, torch.Generator().manual_seed(2))

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        per_position, overall = tagging_accuracy(m, *eval_in)
        return {"score": overall, "last": per_position[-1].item()}

    cfg = TrainConfig(steps=p.steps, lr=p.lr, eval_every=p.eval_every, target=p.target)
    res = train(model, lambda g: counting_batch(p.batch_size, p.train_len, modulus, g), evaluate, cfg, seed=seed,
                desc=f"mod {modulus} {arch} L{layers}", progress=progress)
    per_position, _ = tagging_accuracy(model, *test_in)
    return {"task": TASKS[modulus], "modulus": modulus, "arch": arch, "layers": layers,
            "train_acc": res.score, "test_acc_beyond": per_position[p.train_len:].mean().item(),
            "test_acc_last": per_position[-1].item(), "steps": res.steps, "seconds": round(res.seconds),
            "per_position": [round(x, 4) for x in per_position.tolist()], "history": res.history}


def _plot(rows: list[dict[str, Any]], p: Preset, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(p.moduli), len(p.layers), figsize=(4.2 * len(p.layers), 3.2 * len(p.moduli)),
                             squeeze=False, sharex=True, sharey=True)
    for row in rows:
        ax = axes[p.moduli.index(row["modulus"])][p.layers.index(row["layers"])]
        acc = torch.tensor(row["per_position"])
        window = 8                                           # smooth the per-position curve a little
        smooth = acc.unfold(0, window, window).mean(dim=1)
        ax.plot(torch.arange(len(smooth)) * window + window / 2, smooth, label=ARCHS[row["arch"]])
    for i, m in enumerate(p.moduli):
        for j, layers in enumerate(p.layers):
            ax = axes[i][j]
            ax.axvline(p.train_len, color="grey", lw=0.8, ls=":")
            ax.axhline(1 / m, color="grey", lw=0.8, ls="--")
            ax.set_title(f"{TASKS[m]}, {layers} layer{'s' if layers > 1 else ''}")
            ax.set_xlabel("position")
            ax.set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: list[dict[str, Any]], p: Preset, preset_name: str, seconds: float) -> str:
    cols = [("task", "task"), ("model", "model"), ("layers", "layers"), ("train_acc", f"acc, len {p.train_len}"),
            ("test_acc_beyond", f"acc, positions {p.train_len + 1}-{p.test_len}"),
            ("test_acc_last", f"acc, position {p.test_len}"), ("steps", "steps"), ("seconds", "s")]
    table = [{**r, "model": ARCHS[r["arch"]]} for r in rows]
    return "\n\n".join([
        f"# Parity and mod-3 counting ({preset_name} preset)",
        f"Trained at length {p.train_len} (labels at every position), tested at length {p.test_len}. Width "
        f"{p.n_embd}, head size {p.head_size}, batch {p.batch_size}, lr {p.lr}, at most {p.steps} steps (early stop "
        f"at {p.target:.1%} on length {p.train_len}). Chance is 1/m. Total time {seconds / 60:.1f} min.",
        markdown_table(table, cols),
    ])


def run(p: Preset, out: Path, seed: int = 0, preset_name: str = "custom") -> dict[str, Any]:
    """Train every (task, model, depth), write results.{json,md} and length_generalisation.png to ``out``."""
    start = time.perf_counter()
    jobs = [(m, arch, layers, p, seed, p.workers <= 1) for m in p.moduli for layers in p.layers for arch in p.archs]
    rows = run_jobs(_run_one, jobs, p.workers, NAME)
    seconds = time.perf_counter() - start
    results = {"experiment": NAME, "preset": preset_name, "settings": asdict(p), "seed": seed,
               "seconds": round(seconds, 1), "rows": rows}
    write_results(out, results, report(rows, p, preset_name, seconds))
    _plot(rows, p, out / "length_generalisation.png")
    return results
