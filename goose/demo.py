"""The built-in demo model: what ``goose generate`` and ``goose chat`` run when no --model is given.

It is a small byte-level RWKV-7 trained from scratch on the King James Bible by
``scripts/train_demo_model.sh``, stored in the official layout (bf16) in ``goose/assets/``, beside a
JSON file with its shape, tokenizer, corpus (origin and licence), recipe and losses. After a run,

    python -m goose.demo package runs/demo_kjv

turns the run directory into those two files.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load, save
from .model import RWKV7

ASSETS = Path(__file__).parent / "assets"
INFO_FILE = ASSETS / "demo-kjv.json"
WEIGHTS_FILE = "demo-kjv.pth"
CORPUS = {
    "name": "King James Version of the Bible (1611), 31,102 verses, one per line as 'Ge1:1 In the beginning ...'",
    "origin": "Debian package bible-kjv-text 4.38, read out with `bible -f Gen1:1-Rev22:21` (Debian package bible-kjv)",
    "licence": "public domain: its copyright has expired (Debian copyright file of bible-kjv-text); in the United "
               "Kingdom the Crown's letters patent still govern printing the text",
}


def info() -> dict[str, Any]:
    """The demo model's description (``goose/assets/demo-kjv.json``)."""
    return json.loads(INFO_FILE.read_text())


def notice(meta: dict[str, Any]) -> str:
    """The one line that tells the user what the demo model is, and what it is not."""
    return (f"[goose] no --model given: using the built-in demo model, a {meta['parameters'] / 1e6:.1f}M-parameter "
            f"byte-level RWKV-7 trained on {meta['train']['tokens'] / 1e6:.1f}M bytes of the King James Bible only "
            f"(validation loss {meta['val_loss']:.2f} nats/byte). It writes Bible-like English, knows nothing else "
            f"and is not a chat model; pass --model PATH for a real checkpoint.")


def load_demo(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> RWKV7:
    """The demo model, on ``device`` in ``dtype``."""
    return load(ASSETS / info()["file"], device=device, dtype=dtype)


def package(run: str | Path) -> dict[str, Any]:
    """Write the demo assets from a finished ``goose train`` run directory; returns the description."""
    run = Path(run)
    config = json.loads((run / "config.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    val_loss = [r["val_loss"] for r in records if "val_loss" in r and r["step"] == last["step"]]
    if not val_loss:
        raise ValueError(f"{run}: no validation loss at the last step ({last['step']}); was the run finished?")
    model = load(run / "model.pth")
    ASSETS.mkdir(exist_ok=True)
    save(model, ASSETS / WEIGHTS_FILE, dtype=torch.bfloat16)
    meta = {
        "file": WEIGHTS_FILE,
        "format": "official RWKV-LM x070 .pth, bf16",
        "tokenizer": config["tokenizer"],
        "model": config["model"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus": CORPUS,
        "train": {**config["train"], "steps": last["step"], "tokens": last["tokens"]},
        "train_loss": last["loss"],            # the last step's batch
        "val_loss": val_loss[0],
        "recipe": "scripts/train_demo_model.sh",
    }
    INFO_FILE.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m goose.demo", description="Build the built-in demo model's assets.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("package", help="copy a training run into goose/assets/").add_argument("run", help="run directory")
    args = p.parse_args(argv)
    meta = package(args.run)
    print(f"wrote {ASSETS / meta['file']} and {INFO_FILE}: {meta['parameters']:,} parameters, "
          f"val loss {meta['val_loss']:.4f}")


if __name__ == "__main__":
    main()
