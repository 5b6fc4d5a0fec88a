"""Fine-tuning an existing checkpoint: LoRA, state tuning or all weights, on text or chat data.

    goose finetune --init-from base.pth --data data/corpus --method lora --out runs/lora
    goose finetune --init-from base.pth --data chats.jsonl --sft --method state --out runs/state

It reuses the pretraining loop (:func:`goose.train.trainer.fit`) with the pieces each method needs;
what it writes depends on the method:

    lora   OUT/adapter.safetensors (the adapters) and OUT/model.pth (merged, official layout)
    state  OUT/state.safetensors (load it with ``goose generate/chat --state``)
    full   OUT/model.pth
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..tokenizer import tokenizer_for_vocab
from . import dist
from .data import TokenDataset
from .lora import DEFAULT_TARGETS, add_lora, merge_lora, save_adapters
from .optim import make_optimizer
from .sft import ChatBatches, load_conversations, sft_loss
from .state_tune import StateTuned, TunableState
from .trainer import Metrics, TokenBatches, TrainConfig, add_config_flags, config_field, fit, lm_loss

METHODS = ("lora", "state", "full")
# pretraining-only settings that fine-tuning does not offer
NOT_FOR_FINETUNING = ("model_size", "n_layer", "n_embd", "head_size", "vocab_size", "resume", "fsdp")


@dataclass
class FinetuneConfig(TrainConfig):
    """TrainConfig plus the fine-tuning method; ``init_from`` (the base model) is required."""

    method: str = config_field("lora", "lora: low-rank adapters; state: the initial WKV state only; full: all weights",
                       choices=METHODS)
    sft: bool = config_field(False, "--data is chat jsonl ({\"messages\": [...]}); loss on assistant replies only")
    lora_rank: int = config_field(8, "LoRA rank")
    lora_alpha: float = config_field(16.0, "LoRA scale numerator (the update is alpha/rank * B A)")
    lr_init: float = config_field(1e-4, "peak learning rate, reached after warmup")
    lr_final: float = config_field(1e-5, "learning rate at the last step (cosine decay)")
    steps: int = config_field(200, "optimiser steps")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.init_from:
            raise ValueError("fine-tuning needs a base model: --init-from PATH")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune ``cfg.init_from`` on ``cfg.data`` with ``cfg.method``; returns the loop's summary."""
    d = dist.setup(cfg.device)
    try:
        if d.world_size > 1:
            raise ValueError("goose finetune runs in one process; use goose train --init-from for data parallelism")
        return _finetune(cfg, d)
    finally:
        dist.teardown(d)


def _finetune(cfg: FinetuneConfig, d: dist.Dist) -> dict[str, Any]:
    out = Path(cfg.out)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a run; choose another --out")
    model = checkpoint.load(cfg.init_from, device=d.device).train()
    tokenizer = tokenizer_for_vocab(model.config.vocab_size, cfg.tokenizer)
    torch.manual_seed(cfg.seed)

    if cfg.sft:
        batches = ChatBatches(load_conversations(cfg.data, tokenizer, cfg.ctx_len), cfg.micro_batch, d, cfg.seed)
    else:
        batches = TokenBatches(TokenDataset(cfg.data), cfg.ctx_len, cfg.micro_batch, d, cfg.seed)

    tunable = None
    if cfg.method == "full":
        for name in ("v0", "v1", "v2"):  # layer 0 never reads them
            getattr(model.blocks[0].att, name).requires_grad_(False)
        optimizer = make_optimizer(model, cfg.lr_init, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps)
        trained = model
    else:
        if cfg.method == "lora":
            params = add_lora(model, cfg.lora_rank, cfg.lora_alpha, DEFAULT_TARGETS)
            trained = model
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            tunable = TunableState(model).to(d.device)
            params = [tunable.wkv]
            trained = StateTuned(model, tunable)
        optimizer = torch.optim.AdamW([{"params": params, "weight_decay": 0.0, "lr_scale": 1.0}],
                                      lr=cfg.lr_init, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"finetune": asdict(cfg), "model": asdict(model.config),
                                                 "tokenizer": tokenizer.name}, indent=2) + "\n")

    def save(step: int) -> None:
        if cfg.method == "state":
            tunable.export().save(out / "state.safetensors")
        elif cfg.method == "lora":
            save_adapters(model, out / "adapter.safetensors", cfg.lora_rank, cfg.lora_alpha)
        else:
            checkpoint.save(model, out / "model.pth")

    metrics = Metrics(out, cfg.tensorboard, enabled=True)
    loss_fn = sft_loss if cfg.sft else lm_loss
    try:
        summary = fit(trained, optimizer, batches, loss_fn, cfg, d, cfg.steps, 0, save, metrics)
    finally:
        metrics.close()
    if cfg.method == "lora":  # the merged model, in the official layout
        checkpoint.save(merge_lora(model), out / "model.pth")
    return {**summary, "out": str(out)}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``goose finetune``."""
    p = subparsers.add_parser("finetune", help="fine-tune a checkpoint: LoRA, state tuning or all weights",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(p, FinetuneConfig, exclude=NOT_FOR_FINETUNING)
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> None:
    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)
                            if f.name not in NOT_FOR_FINETUNING})
    summary = finetune(cfg)
    written = {"lora": "adapter.safetensors and model.pth (merged)", "state": "state.safetensors",
               "full": "model.pth"}[cfg.method]
    val = f", val loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""
    print(f"fine-tuned ({cfg.method}{', SFT' if cfg.sft else ''}) for {summary['step']} steps in "
          f"{summary['seconds']:.0f} s; last loss {summary['loss']:.4f}{val}; wrote {written} in {summary['out']}")
