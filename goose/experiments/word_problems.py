"""Group word problems (Merrill et al., "The Illusion of State"): how many layers does state tracking take?

Input: k group elements; label: the prefix product at every position. A model "solves" length k when
its accuracy at the last position (the full k-fold product, the hardest one) exceeds ``threshold`` on
fresh words. For each architecture and problem we report the minimum number of layers that solves k,
for growing k. The protocol, per (problem, architecture, layers):

* a curriculum over k: one model is trained at the smallest k, then warm-started at the next, and so
  on; each stage stops early at the threshold, or fails after ``steps`` steps, which ends the chain
  (longer words are then not tried with that depth);
* deeper models are trained only while some k is unsolved; min layers(k) = the smallest depth whose
  chain solved k ("> max" if none did);
* each solved stage is also tested at length 2k (same model, never trained there).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .runner import ARCHS, TrainConfig, build_model, markdown_table, run_jobs, tagging_accuracy, train, write_results
from .tasks import word_problem, word_problem_batch

NAME = "word_problems"


@dataclass(frozen=True)
class Preset:
    problems: tuple[str, ...]
    lengths: tuple[int, ...]
    archs: tuple[str, ...]
    max_layers: int
    n_embd: int
    head_size: int
    batch_size: int
    steps: int                  # per (layers, k) stage
    lr: float
    eval_size: int = 512
    eval_every: int = 100
    threshold: float = 0.95
    workers: int = 2


PRESETS = {
    # Z60 (abelian) and A5 (non-solvable) at k = 2, 4. k = 2 is a one-step table lookup, the curriculum's
    # first stage: a 1-layer width-64 RWKV-7 did not learn it for Z60 in 3000 steps; at width 128 it did.
    "quick": Preset(problems=("Z60", "A5"), lengths=(2, 4), archs=("rwkv7", "rwkv7-a0", "gpt"), max_layers=2,
                    n_embd=128, head_size=32, batch_size=64, steps=1500, lr=3e-3),
    "full": Preset(problems=("Z60", "A4xZ5", "A5", "S5", "S5-swaps"), lengths=(2, 4, 8, 16, 32),
                   archs=("rwkv7", "rwkv7-a0", "rwkv7-wide", "gpt"), max_layers=4, n_embd=128, head_size=32,
                   batch_size=128, steps=10000, lr=3e-3),
}


def _accuracy(model: torch.nn.Module, problem: str, length: int, size: int) -> tuple[torch.Tensor, float]:
    group, alphabet = word_problem(problem)
    gen = torch.Generator().manual_seed(10_000 + length)        # the same test words for every model
    return tagging_accuracy(model, *word_problem_batch(group, size, length, gen, alphabet))


def _chain(problem: str, arch: str, layers: int, p: Preset, seed: int, progress: bool) -> list[dict[str, Any]]:
    """Train one depth through the lengths (warm start); one row per stage, ending at the first failure."""
    group, alphabet = word_problem(problem)
    model = build_model(arch, layers, p.n_embd, group.order, p.head_size, seed)
    cfg = TrainConfig(steps=p.steps, lr=p.lr, eval_every=p.eval_every, target=p.threshold)
    rows = []
    for k in p.lengths:
        def evaluate(m: torch.nn.Module, k: int = k) -> dict[str, float]:
            per_position, overall = _accuracy(m, problem, k, p.eval_size)
            return {"score": per_position[-1].item(), "all_positions": overall}

        res = train(model, lambda g, k=k: word_problem_batch(group, p.batch_size, k, g, alphabet), evaluate, cfg,
                    seed=seed + k, desc=f"{problem} {arch} L{layers} k={k}", progress=progress)
        row = {"problem": problem, "arch": arch, "layers": layers, "k": k, "solved": res.reached,
               "last_acc": res.score, "all_acc": res.metrics["all_positions"], "steps": res.steps,
               "seconds": round(res.seconds), "history": res.history}
        if res.reached:
            per_position, _ = _accuracy(model, problem, 2 * k, p.eval_size)
            row.update(acc_2k_last=per_position[-1].item(), acc_2k_beyond=per_position[k:].mean().item())
        rows.append(row)
        if not res.reached:
            break
    return rows


def _search(problem: str, arch: str, p: Preset, seed: int, progress: bool) -> list[dict[str, Any]]:
    """Chains of growing depth until every length is solved or ``max_layers`` is reached."""
    rows: list[dict[str, Any]] = []
    for layers in range(1, p.max_layers + 1):
        rows += _chain(problem, arch, layers, p, seed, progress)
        if all(any(r["solved"] and r["k"] == k for r in rows) for k in p.lengths):
            break
    return rows


def min_layers(rows: list[dict[str, Any]], problem: str, arch: str, k: int) -> int | None:
    """The smallest depth that solved ``k`` (None: none of the depths tried)."""
    depths = [r["layers"] for r in rows if r["problem"] == problem and r["arch"] == arch and r["k"] == k and r["solved"]]
    return min(depths, default=None)


def _plot(rows: list[dict[str, Any]], p: Preset, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(p.problems), figsize=(4.2 * len(p.problems), 3.4), squeeze=False)
    for ax, problem in zip(axes[0], p.problems):
        for i, arch in enumerate(p.archs):
            ys = [min_layers(rows, problem, arch, k) for k in p.lengths]
            ys = [y if y is not None else p.max_layers + 1 for y in ys]
            offset = 0.06 * (i - (len(p.archs) - 1) / 2)           # keep overlapping lines visible
            ax.plot(p.lengths, [y + offset for y in ys], "o-", label=ARCHS[arch])
        ax.axhline(p.max_layers + 0.5, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(p.lengths, [str(k) for k in p.lengths])
        ax.set_yticks(range(1, p.max_layers + 2), [str(i) for i in range(1, p.max_layers + 1)] + [f">{p.max_layers}"])
        ax.set_xlabel("sequence length k")
        ax.set_ylabel(f"min layers for >{p.threshold:.0%} (last position)")
        ax.set_title(problem)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: list[dict[str, Any]], p: Preset, preset_name: str, seconds: float) -> str:
    """The markdown results: min-layer table, then every stage that was trained."""
    summary = []
    for problem in p.problems:
        for arch in p.archs:
            row = {"problem": problem, "arch": ARCHS[arch]}
            for k in p.lengths:
                depth = min_layers(rows, problem, arch, k)
                tried = any(r["problem"] == problem and r["arch"] == arch and r["k"] == k for r in rows)
                row[f"k{k}"] = depth if depth is not None else f">{p.max_layers}" if tried else f"(>{p.max_layers})"
            summary.append(row)
    stage_cols = [("problem", "problem"), ("arch", "arch"), ("layers", "layers"), ("k", "k"), ("solved", "solved"),
                  ("last_acc", "acc @k (last)"), ("all_acc", "acc @k (all)"), ("acc_2k_last", "acc @2k (last)"),
                  ("acc_2k_beyond", "acc @2k (pos > k)"), ("steps", "steps"), ("seconds", "s")]
    return "\n\n".join([
        f"# Group word problems ({preset_name} preset)",
        f"Minimum layers reaching > {p.threshold:.0%} accuracy at the last position of length-k words "
        f"(\">{p.max_layers}\": no depth up to {p.max_layers} did, within {p.steps} steps per stage; "
        f"\"(>{p.max_layers})\": not tried, as every depth already failed at a shorter length). "
        f"Width {p.n_embd}, head size {p.head_size}, batch {p.batch_size}, lr {p.lr}, "
        f"curriculum over k with warm starts. Total time {seconds / 60:.1f} min.",
        markdown_table(summary, [("problem", "problem"), ("arch", "model")] + [(f"k{k}", f"k={k}") for k in p.lengths]),
        "## Every stage trained",
        markdown_table(rows, stage_cols),
    ])


def run(p: Preset, out: Path, seed: int = 0, preset_name: str = "custom") -> dict[str, Any]:
    """Run the sweep, write results.{json,md} and min_layers.png to ``out``; returns the results."""
    start = time.perf_counter()
    jobs = [(problem, arch, p, seed, p.workers <= 1) for problem in p.problems for arch in p.archs]
    rows = [row for chunk in run_jobs(_search, jobs, p.workers, NAME) for row in chunk]
    seconds = time.perf_counter() - start
    results = {"experiment": NAME, "preset": preset_name, "settings": asdict(p), "seed": seed,
               "seconds": round(seconds, 1), "rows": rows}
    markdown = report([{k: v for k, v in r.items() if k != "history"} for r in rows], p, preset_name, seconds)
    write_results(out, results, markdown)
    _plot(rows, p, out / "min_layers.png")
    return results
