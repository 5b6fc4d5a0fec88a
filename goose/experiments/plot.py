"""Loss curves from training runs' ``metrics.jsonl`` files (needs matplotlib).

    python -m goose.experiments.plot docs/demo_model_loss.png runs/demo_kjv
    python -m goose.experiments.plot out.png rwkv7=runs/cmp/rwkv7 llama=runs/cmp/llama --val-only
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(run: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{"loss": [(tokens, loss), ...], "val_loss": [(tokens, loss), ...]}`` of a run directory.

    Evaluations are logged without a token count; they take the one of the training step they follow.
    """
    curves: dict[str, list[tuple[int, float]]] = {"loss": [], "val_loss": []}
    tokens_at: dict[int, int] = {}
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            tokens_at[record["step"]] = record["tokens"]
            curves["loss"].append((record["tokens"], record["loss"]))
        if "val_loss" in record:
            curves["val_loss"].append((tokens_at[record["step"]], record["val_loss"]))
    return curves


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average, so that noisy per-step losses show their trend."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs: dict[str, str | Path], out: str | Path, title: str, val_only: bool = False,
              smooth: int = 20) -> None:
    """One figure: per run, the training loss (moving average of ``smooth`` steps) and the validation loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for i, (label, run) in enumerate(runs.items()):
        curves, color = read_metrics(run), f"C{i}"
        name = f"{label} " if len(runs) > 1 else ""
        if not val_only and curves["loss"]:
            tokens, loss = zip(*curves["loss"])
            ax.plot([t / 1e6 for t in tokens], _smooth(list(loss), smooth), color=color, alpha=0.45, lw=1,
                    label=f"{name}train (mean of {smooth} steps)")
        if curves["val_loss"]:
            tokens, loss = zip(*curves["val_loss"])
            ax.plot([t / 1e6 for t in tokens], loss, color=color, marker="o", ms=3, lw=1.5, label=f"{name}validation")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Plot training and validation loss of runs (metrics.jsonl).")
    p.add_argument("out", help="PNG to write")
    p.add_argument("runs", nargs="+", metavar="[LABEL=]RUN_DIR")
    p.add_argument("--title", default="training and validation loss")
    p.add_argument("--val-only", action="store_true", help="leave out the training-loss curves")
    args = p.parse_args(argv)
    runs = dict(r.split("=", 1) if "=" in r else (Path(r).name, r) for r in args.runs)
    plot_runs(runs, args.out, args.title, val_only=args.val_only)


if __name__ == "__main__":
    main()
