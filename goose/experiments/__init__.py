"""Small-scale reproductions of the RWKV-7 paper's architectural claims: ``goose experiment NAME``.

* ``word_problems``: group word problems (state tracking), min layers against length.
* ``mqar``: multi-query associative recall against width / state size.
* ``parity``: parity and mod-3 counting, trained at length <= 40 and tested at 256.
* ``passkey``: the RWKV-X hybrid beside a pure RWKV-7 on passkey retrieval, and decode cost against context.

Each writes ``results.json``, ``results.md`` and PNG plots under ``runs/experiments/NAME/`` by default.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path

EXPERIMENTS = ("word_problems", "mqar", "parity", "passkey")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``goose experiment NAME [--preset quick|full] [--out DIR] [--seed N] [--workers N]``."""
    p = subparsers.add_parser("experiment", help="reproduce a paper experiment at small scale (CPU)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=EXPERIMENTS)
    p.add_argument("--preset", choices=("quick", "full"), default="quick",
                   help="quick: <= 15 min on a 2-core CPU; full: hours (default: quick)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output directory (default: runs/experiments/NAME)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, metavar="N",
                   help="parallel training processes of one thread each (default: the preset's, 2)")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> None:
    """Run the experiment named by the parsed arguments and print its results table."""
    import torch

    torch.set_num_threads(1)   # tiny models: processes, not intra-op threads, use the cores (see runner.run_jobs)
    module = importlib.import_module(f"{__name__}.{args.name}")
    preset = module.PRESETS[args.preset]
    if args.workers:
        preset = dataclasses.replace(preset, workers=args.workers)
    out = args.out or Path("runs/experiments") / args.name
    module.run(preset, out, seed=args.seed, preset_name=args.preset)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.md, results.json and plots", file=sys.stderr)
