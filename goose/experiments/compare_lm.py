"""A fair language-modelling comparison on the demo model's recipe: RWKV-7, RWKV-7 without its in-context
learning term (``ModelConfig(iclr=False)``), and a Llama of the same size (Hugging Face ``LlamaForCausalLM``).

All three see the same data in the same order, for the same number of steps (so the same tokens), with
the same schedule, optimiser groups (weight decay on the 2-D ``.weight`` matrices only), precision and
loss (cross-entropy + L2Wrap), through the same loop (:func:`goose.train.trainer.fit`). The recipe is
read from a ``goose train`` run's ``config.json``; only the number of steps is set here.

    python -m goose.experiments.compare_lm --recipe runs/demo_kjv/config.json --steps 300 --out runs/compare

The Llama has the RWKV model's depth, width, head size and vocabulary, untied input and output
embeddings (as RWKV has), and the MLP width that brings its parameter count closest to RWKV-7's.
Needs ``transformers`` (and ``matplotlib`` for the plot).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from goose.model import ModelConfig
from goose.train import dist
from goose.train.data import TokenDataset
from goose.train.init import new_model
from goose.train.optim import make_optimizer
from goose.train.trainer import Metrics, TokenBatches, TrainConfig, fit, lm_loss

from .plot import plot_runs, read_metrics

ARMS = ("rwkv7", "rwkv7-no-iclr", "llama")


class CausalLM(nn.Module):
    """A Hugging Face causal LM behind goose's model interface, so ``lm_loss`` and ``fit`` train it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> tuple[Tensor, None]:
        return self.model(input_ids=tokens, use_cache=False).logits, None


def llama(cfg: ModelConfig, target_params: int, ctx_len: int) -> CausalLM:
    """A randomly initialised Llama shaped like ``cfg`` with about ``target_params`` parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    fixed = 2 * V * C + L * (4 * C * C + 2 * C) + C      # embeddings, attention, norms; the MLP has 3 * C * width
    config = LlamaConfig(vocab_size=V, hidden_size=C, intermediate_size=round((target_params - fixed) / (3 * C * L)),
                         num_hidden_layers=L, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                         max_position_embeddings=ctx_len, tie_word_embeddings=False, attn_implementation="sdpa")
    return CausalLM(LlamaForCausalLM(config))


def build(arm: str, cfg: ModelConfig, ctx_len: int, seed: int) -> nn.Module:
    """The model of one arm, freshly initialised from ``seed`` (RWKV: RWKV-LM's init; Llama: its own)."""
    if arm == "rwkv7":
        return new_model(cfg, seed=seed)
    if arm == "rwkv7-no-iclr":
        return new_model(dataclasses.replace(cfg, iclr=False), seed=seed)
    if arm == "llama":
        torch.manual_seed(seed)
        return llama(cfg, sum(p.numel() for p in new_model(cfg).parameters()), ctx_len)
    raise ValueError(f"unknown arm {arm!r}; known: {ARMS}")


def train_arm(model: nn.Module, cfg: TrainConfig, steps: int) -> dict[str, Any]:
    """Train ``model`` for ``steps`` steps of ``cfg``'s recipe; metrics go to ``cfg.out``/metrics.jsonl."""
    d = dist.setup(cfg.device)
    try:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        torch.manual_seed(cfg.seed)
        model = model.to(device=d.device, dtype=torch.float32).train()
        optimizer = make_optimizer(model, cfg.lr_init, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps)
        batches = TokenBatches(TokenDataset(cfg.data), cfg.ctx_len, cfg.micro_batch, d, cfg.seed)
        metrics = Metrics(out, tensorboard=False, enabled=True)
        try:
            return fit(model, optimizer, batches, lm_loss, cfg, d, steps, metrics=metrics)
        finally:
            metrics.close()
    finally:
        dist.teardown(d)


def run(recipe: str | Path, out: str | Path, steps: int, arms: tuple[str, ...] = ARMS,
        eval_every: int = 25) -> dict[str, dict[str, Any]]:
    """Train every arm on ``recipe`` (a run's config.json) for ``steps`` steps; plot and tabulate.

    Writes ``OUT/<arm>/metrics.jsonl``, ``OUT/summary.json`` and ``OUT/val_loss.png``; returns the summaries.
    """
    info = json.loads(Path(recipe).read_text())
    model_cfg = ModelConfig(**info["model"])
    out = Path(out)
    results = {}
    for arm in arms:
        cfg = dataclasses.replace(TrainConfig(**info["train"]), out=str(out / arm), steps=steps, tokens=0,
                                  eval_every=eval_every, save_every=0, resume=False, init_from="")
        model = build(arm, model_cfg, cfg.ctx_len, cfg.seed)
        params = sum(p.numel() for p in model.parameters())
        print(f"{arm}: {params:,} parameters, {steps} steps of {cfg.micro_batch} x {cfg.ctx_len} tokens")
        summary = train_arm(model, cfg, steps)
        results[arm] = {**summary, "parameters": params,
                        "val_curve": read_metrics(out / arm)["val_loss"]}
    (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_runs({arm: out / arm for arm in arms}, out / "val_loss.png",
              f"validation loss, same data / tokens / schedule ({steps} steps)", val_only=True)
    print(markdown_table(results))
    return results


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """Parameters, speed and validation loss at each evaluation, one row per arm."""
    evals = [tokens for tokens, _ in next(iter(results.values()))["val_curve"]]
    lines = ["| model | parameters | train tok/s | wall time | " + " | ".join(f"val @ {t / 1e6:.2f}M" for t in evals)
             + " |", "|---|---:|---:|---:|" + "---:|" * len(evals)]
    for arm, r in results.items():
        losses = " | ".join(f"{loss:.4f}" for _, loss in r["val_curve"])
        lines.append(f"| {arm} | {r['parameters'] / 1e6:.2f}M | {r['tok_s']:,.0f} | {r['seconds'] / 60:.1f} min | "
                     f"{losses} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m goose.experiments.compare_lm", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True, help="config.json of a `goose train` run (data, shape, schedule)")
    p.add_argument("--out", required=True, help="directory for the runs, summary.json and val_loss.png")
    p.add_argument("--steps", type=int, required=True, help="optimiser steps per model (the same for all)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--eval-every", type=int, default=25, help="validation loss every N steps")
    args = p.parse_args(argv)
    run(args.recipe, args.out, args.steps, tuple(args.arms), args.eval_every)


if __name__ == "__main__":
    main()
