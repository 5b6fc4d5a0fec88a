"""Pretraining on a binidx dataset: the config, the loop, checkpoints, and ``goose train``.

    goose train --data data/mix --out runs/l6 --model-size L6-D512 --tokenizer world
    torchrun --standalone --nproc-per-node 2 -m goose train --data data/mix --out runs/l6 ...   # DDP
    goose train --data data/mix --out runs/l6 ... --resume                          # after a crash

(docs/TRAINING.md has the multi-node command and every flag.)

``fit`` is the loop itself (batch -> forward -> loss -> backward -> clip -> step -> schedule); it takes
the model, an optimiser over whatever parameters are trainable, a batch source and a loss function,
so fine-tuning variants reuse it with their own pieces. ``train`` assembles those pieces for
pretraining and handles the run directory:

    OUT/config.json      TrainConfig, ModelConfig and tokenizer name (generation reads the tokenizer here)
    OUT/metrics.jsonl    one JSON object per step (loss, lr, grad_norm, tokens, tok_s) and per evaluation
    OUT/train_state.pt   everything --resume needs: weights, optimiser, step, data and RNG states, config
    OUT/model.pth        the weights in the official RWKV-LM layout (goose.load, the rwkv package, RWKV-LM)
    OUT/tb/              TensorBoard events, with --tensorboard
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .. import checkpoint
from ..model import RWKV7, ModelConfig
from ..tokenizer import get_tokenizer, tokenizer_for_vocab
from . import dist
from .data import TokenDataset
from .dist import Dist
from .init import model_config, new_model
from .optim import lr_at, make_optimizer

Batch = tuple[Tensor, ...]
LossFn = Callable[[nn.Module, Batch], Tensor]


class BatchSource(Protocol):
    """What :func:`fit` needs from the data."""

    def next(self) -> Batch:
        """This process's next training micro-batch, on its device."""

    def validation(self, n_batches: int) -> Iterator[Batch]:
        """The same ``n_batches`` validation micro-batches at every call, so evaluations compare."""


def config_field(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A TrainConfig field; its help text (and choices) become the ``goose train`` flag."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    """Every knob of a training run; ``goose train`` has exactly one flag per field."""

    # data and run directory
    data: str = config_field("", "binidx dataset prefix (PREFIX.bin + PREFIX.idx), e.g. written by `goose data`")
    out: str = config_field("out", "run directory: config.json, metrics.jsonl, train_state.pt, model.pth")
    tokenizer: str = config_field("world", "tokenizer the data was made with; recorded in OUT/config.json",
                          choices=("world", "byte"))
    # model: a fresh one, or --init-from an existing checkpoint
    model_size: str = config_field("L6-D512", "fresh model shape as L<layers>-D<width>")
    n_layer: int = config_field(0, "layers; overrides --model-size when > 0")
    n_embd: int = config_field(0, "width; overrides --model-size when > 0")
    head_size: int = config_field(64, "channels per head (64 in every released model)")
    vocab_size: int = config_field(0, "0: the tokenizer's (world 65536, byte 257)")
    init_from: str = config_field("", "start from this checkpoint (.pth / .safetensors) instead of a fresh init")
    resume: bool = config_field(False, "continue the run in OUT from its last checkpoint, exactly")
    # batches and length of the run
    ctx_len: int = config_field(512, "tokens per training sequence")
    micro_batch: int = config_field(4, "sequences per process per forward pass")
    grad_accum: int = config_field(1, "micro-batches per optimiser step")
    steps: int = config_field(1000, "optimiser steps")
    tokens: int = config_field(0, "if > 0, train on this many tokens instead of --steps (rounded up to whole steps)")
    # optimiser and schedule (RWKV-LM's defaults)
    lr_init: float = config_field(6e-4, "peak learning rate, reached after warmup")
    lr_final: float = config_field(6e-5, "learning rate at the last step (cosine decay)")
    warmup_steps: int = config_field(10, "linear warmup from 0.01 * lr_init")
    weight_decay: float = config_field(1e-3, "AdamW weight decay, on the big matrices only")
    beta1: float = config_field(0.9, "AdamW beta1")
    beta2: float = config_field(0.99, "AdamW beta2")
    adam_eps: float = config_field(1e-18, "AdamW epsilon")
    grad_clip: float = config_field(1.0, "clip the global gradient norm to this; 0 = off")
    # numerics and memory
    precision: str = config_field("fp32", "bf16 = bf16 autocast (fp32 weights and optimiser)", choices=("fp32", "bf16"))
    grad_checkpoint: bool = config_field(False, "recompute each layer's activations in backward: less memory, more compute")
    fsdp: bool = config_field(False, "shard weights, gradients and optimiser state across processes (FSDP2)")
    # evaluation, logging, checkpoints
    eval_every: int = config_field(100, "validation loss every N steps (and at the end); 0 = never")
    eval_batches: int = config_field(8, "micro-batches per process per evaluation")
    save_every: int = config_field(100, "checkpoint every N steps; the last step is always saved")
    progress: bool = config_field(True, "show a progress bar")
    tensorboard: bool = config_field(False, "also log to OUT/tb (needs the tensorboard package)")
    # system
    seed: int = config_field(0, "seeds the initialisation and the data order")
    device: str = config_field("auto", "auto (CUDA if available), cpu, cuda")

    def __post_init__(self) -> None:
        positive = ("ctx_len", "micro_batch", "grad_accum", "head_size", "eval_batches")
        bad = [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) < 1]
        bad += [f"{name}={getattr(self, name)}" for name in ("steps", "tokens", "n_layer", "n_embd", "vocab_size",
                                                             "warmup_steps", "eval_every", "save_every",
                                                             "weight_decay", "grad_clip") if getattr(self, name) < 0]
        if bad:
            raise ValueError(f"invalid training settings: {', '.join(bad)}")
        if self.steps == 0 and self.tokens == 0:
            raise ValueError("set --steps or --tokens")
        if not 0 <= self.lr_final <= self.lr_init or self.lr_init == 0:
            raise ValueError(f"need 0 <= lr_final <= lr_init and lr_init > 0, got {self.lr_final} and {self.lr_init}")
        if not re.fullmatch(r"L\d+-D\d+", self.model_size):
            raise ValueError(f"model_size must look like L6-D512, got {self.model_size!r}")
        for name in ("tokenizer", "precision"):
            choices = next(f for f in fields(self) if f.name == name).metadata["choices"]
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")


# Settings that may change between a run and its --resume without changing what is computed.
RESUMABLE_CHANGES = {"out", "resume", "init_from", "progress", "tensorboard", "eval_every", "eval_batches",
                     "save_every", "device"}


class L2Wrap(torch.autograd.Function):
    """RWKV-LM's L2Wrap: the loss passes through; backward adds ``1e-4 / (B*T) * max_logit`` to the
    gradient at each position's largest logit, which keeps logits from drifting upwards.

    As in RWKV-LM's current code, the extra gradient is scaled by the incoming gradient, so it
    follows loss scaling (gradient accumulation divides it too)."""

    @staticmethod
    def forward(ctx, loss: Tensor, logits: Tensor) -> Tensor:
        max_logit, argmax = logits.detach().max(dim=-1, keepdim=True)
        ctx.save_for_backward(max_logit, argmax)
        ctx.logits_meta = logits.shape, logits.dtype, logits.device
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, Tensor]:
        max_logit, argmax = ctx.saved_tensors
        shape, dtype, device = ctx.logits_meta
        factor = 1e-4 / (shape[0] * shape[1])
        grad_logits = torch.zeros(shape, dtype=dtype, device=device).scatter_(-1, argmax, max_logit * factor)
        return grad_loss, grad_loss * grad_logits


def lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Next-token cross-entropy (in fp32) of ``batch = (x, y)``, with L2Wrap's extra gradient."""
    x, y = batch
    logits, _ = model(x)                                                     # [B, T, V]
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    return L2Wrap.apply(loss, logits)


class TokenBatches:
    """Micro-batches of random windows for this process, from one random stream shared by all ranks.

    Every rank draws the same global micro-batch of ``micro_batch * world_size`` windows and keeps
    its own rows: the global batch of a step does not depend on how many processes share it, and
    the position in the data is one generator state (``state_dict``), saved with each checkpoint.
    """

    def __init__(self, dataset: TokenDataset, ctx_len: int, micro_batch: int, d: Dist, seed: int) -> None:
        self.dataset, self.ctx_len, self.micro_batch, self.d, self.seed = dataset, ctx_len, micro_batch, d, seed
        self.generator = torch.Generator().manual_seed(seed)

    def _draw(self, generator: torch.Generator, split: str) -> Batch:
        x, y = self.dataset.get_batch(self.micro_batch * self.d.world_size, self.ctx_len, generator, split)
        rows = slice(self.d.rank * self.micro_batch, (self.d.rank + 1) * self.micro_batch)
        return x[rows].to(self.d.device), y[rows].to(self.d.device)

    def next(self) -> Batch:
        """The next training micro-batch."""
        return self._draw(self.generator, "train")

    def validation(self, n_batches: int) -> Iterator[Batch]:
        """``n_batches`` validation micro-batches, the same at every call."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        for _ in range(n_batches):
            yield self._draw(generator, "val")

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])


class Metrics:
    """Appends one JSON object per line to ``OUT/metrics.jsonl``; mirrors numbers to TensorBoard if asked.
    A no-op on every rank but 0."""

    def __init__(self, out: Path, tensorboard: bool, enabled: bool) -> None:
        self.path, self.enabled, self.tb = out / "metrics.jsonl", enabled, None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(str(out / "tb"))

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (left by a run killed after its last checkpoint)."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except ValueError:  # a line torn by the kill
                continue
        self.path.write_text("".join(kept))

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@torch.no_grad()
def evaluate(model: nn.Module, batches: BatchSource, loss_fn: LossFn, n_batches: int, autocast: torch.autocast,
             d: Dist) -> float:
    """Mean validation loss over ``n_batches`` micro-batches per process, averaged over processes."""
    total = torch.zeros((), device=d.device)
    for batch in batches.validation(n_batches):
        with autocast:
            total += loss_fn(model, batch).float()
    return dist.all_reduce_mean(total / n_batches).item()


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, batches: BatchSource, loss_fn: LossFn,
        cfg: TrainConfig, d: Dist, total_steps: int, start_step: int = 0,
        save: Callable[[int], None] | None = None, metrics: Metrics | None = None) -> dict[str, Any]:
    """Train from ``start_step`` to ``total_steps``: the whole loop. Returns a summary.

    ``optimizer``'s groups carry ``lr_scale`` (see :func:`goose.train.optim.param_groups`);
    ``save(step)`` is called every ``cfg.save_every`` steps and at the end, on every rank.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    tokens_per_step = cfg.ctx_len * cfg.micro_batch * cfg.grad_accum * d.world_size
    bar = tqdm(total=total_steps, initial=start_step, unit="step", disable=not (cfg.progress and d.is_main))
    summary: dict[str, Any] = {"start_step": start_step, "loss": None, "val_loss": None}
    t_start = time.perf_counter()
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.lr_init, cfg.lr_final, cfg.warmup_steps, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]

        loss_sum = torch.zeros((), device=d.device)
        for micro in range(cfg.grad_accum):
            batch = batches.next()
            with dist.no_grad_sync(model, skip=micro < cfg.grad_accum - 1):  # all-reduce on the last one
                with autocast:
                    loss = loss_fn(model, batch)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        grad_norm = dist.full_value(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        summary["loss"] = dist.all_reduce_mean(loss_sum / cfg.grad_accum).item()
        tok_s = tokens_per_step / (time.perf_counter() - t0)
        if metrics:
            metrics.log(done, loss=summary["loss"], lr=lr, grad_norm=grad_norm,
                        tokens=done * tokens_per_step, tok_s=tok_s)
        bar.update()
        bar.set_postfix(loss=f"{summary['loss']:.4f}", tok_s=f"{tok_s:.0f}")
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == total_steps):
            summary["val_loss"] = evaluate(model, batches, loss_fn, cfg.eval_batches, autocast, d)
            if metrics:
                metrics.log(done, val_loss=summary["val_loss"], val_ppl=math.exp(min(summary["val_loss"], 30.0)))
        if save and (done == total_steps or (cfg.save_every and done % cfg.save_every == 0)):
            save(done)
    bar.close()
    seconds = time.perf_counter() - t_start
    trained = total_steps - start_step
    summary.update(step=total_steps, tokens=total_steps * tokens_per_step,
                   seconds=seconds, tok_s=trained * tokens_per_step / seconds if trained else 0.0)
    return summary


def checkpoint_activations(model: RWKV7) -> None:
    """Recompute each TimeMix and ChannelMix in backward instead of storing their activations.

    ``RWKV7.forward`` calls ``block.att`` and ``block.ffn`` directly, so wrapping their ``forward``
    in torch.utils.checkpoint is all it takes, and parameter names stay the official ones.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        for module in (block.att, block.ffn):
            module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)


def _model_shape(cfg: TrainConfig) -> ModelConfig:
    n_layer, n_embd = map(int, re.findall(r"\d+", cfg.model_size))
    vocab = cfg.vocab_size or get_tokenizer(cfg.tokenizer).vocab_size
    return model_config(cfg.n_layer or n_layer, cfg.n_embd or n_embd, vocab, cfg.head_size)


def _config_differences(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    now = asdict(cfg)
    return [f"{key}: run has {saved.get(key)!r}, now {now[key]!r}" for key in now
            if key not in RESUMABLE_CHANGES and saved.get(key) != now[key]]


def _saver(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, batches: TokenBatches,
           cfg: TrainConfig, model_cfg: ModelConfig, d: Dist) -> Callable[[int], None]:
    def save(step: int) -> None:
        model_sd, optim_sd = dist.full_state_dicts(model, optimizer, sharded=cfg.fsdp)  # collective with FSDP
        if not d.is_main:
            return
        state = {"step": step, "model": model_sd, "optimizer": optim_sd, "data": batches.state_dict(),
                 "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                 "config": asdict(cfg), "model_config": asdict(model_cfg), "world_size": d.world_size}
        with torch.device("meta"):
            official = RWKV7(model_cfg)
        official.load_state_dict(model_sd, assign=True)
        try:
            checkpoint.atomic_torch_save(state, out / "train_state.pt")
            checkpoint.save(official, out / "model.pth")
        except OSError as e:
            raise OSError(f"could not write the step-{step} checkpoint in {out}: {e}. Nothing was left "
                          f"half-written: train_state.pt and model.pth each hold their last complete version "
                          f"(each file is written to a .tmp file, then renamed)") from e
    return save


def _load_resume_state(out: Path, cfg: TrainConfig, d: Dist) -> dict[str, Any]:
    path = out / "train_state.pt"
    if not path.exists():
        raise FileNotFoundError(f"--resume: nothing to resume, {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    differences = _config_differences(state["config"], cfg)
    if state["world_size"] != d.world_size:
        differences.append(f"world size: run has {state['world_size']} processes, now {d.world_size}")
    if differences:
        raise ValueError(f"--resume: {out} holds a run with different settings; an exact continuation "
                         f"needs the same ones:\n  " + "\n  ".join(differences))
    return state


def train(cfg: TrainConfig, model: RWKV7 | None = None) -> dict[str, Any]:
    """Run (or with ``cfg.resume`` continue) the training described by ``cfg``; returns a summary.

    The model is, in order of precedence: the run's own checkpoint (resume), ``model``, the
    ``cfg.init_from`` checkpoint, or a fresh RWKV-LM initialisation of ``cfg``'s shape.
    Under torchrun every process calls this; rank 0 alone writes files and shows progress.
    """
    d = dist.setup(cfg.device)
    try:
        return _train(cfg, model, d)
    finally:
        dist.teardown(d)


def _train(cfg: TrainConfig, model: RWKV7 | None, d: Dist) -> dict[str, Any]:
    if not cfg.data:
        raise ValueError("no dataset: set --data PREFIX (PREFIX.bin + PREFIX.idx, e.g. from `goose data`)")
    dataset = TokenDataset(cfg.data)
    out = Path(cfg.out)
    resumed = _load_resume_state(out, cfg, d) if cfg.resume else None
    if resumed is None and (out / "train_state.pt").exists():
        raise FileExistsError(f"{out} already holds a training run; pass --resume to continue it, "
                              f"or choose another --out")
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(out, cfg.tensorboard, enabled=d.is_main)

    if resumed is not None:
        with torch.device("meta"):
            model = RWKV7(ModelConfig(**resumed["model_config"]))
        model.load_state_dict(resumed["model"], assign=True)
    elif model is None and cfg.init_from:
        model = checkpoint.load(cfg.init_from)
    elif model is None:
        model = new_model(_model_shape(cfg), seed=cfg.seed)
    model_cfg = model.config
    tokenizer_for_vocab(model_cfg.vocab_size, cfg.tokenizer)   # raises if they do not fit together
    total_steps = cfg.steps
    if cfg.tokens:
        total_steps = math.ceil(cfg.tokens / (cfg.ctx_len * cfg.micro_batch * cfg.grad_accum * d.world_size))

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = model.to(dtype=torch.float32).train()
    if not cfg.fsdp:  # fully_shard moves only this process's shards to the device
        model = model.to(d.device)
    for name in ("v0", "v1", "v2"):  # layer 0 never reads these; DDP would wait forever for their grads
        getattr(model.blocks[0].att, name).requires_grad_(False)
    if cfg.grad_checkpoint:
        checkpoint_activations(model)
    wrapped = dist.wrap(model, d, fsdp=cfg.fsdp)
    optimizer = make_optimizer(model, cfg.lr_init, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps)
    batches = TokenBatches(dataset, cfg.ctx_len, cfg.micro_batch, d, cfg.seed)
    start_step = 0
    if resumed is not None:  # the weights are in place already
        dist.load_optimizer_state(wrapped, optimizer, resumed["optimizer"], sharded=cfg.fsdp)
        batches.load_state_dict(resumed["data"])
        torch.set_rng_state(resumed["torch_rng"])
        random.setstate(resumed["python_rng"])
        start_step = resumed["step"]
        del resumed  # the optimiser holds its own copy of that state now

    if d.is_main:
        info = {"train": asdict(cfg), "model": asdict(model_cfg), "tokenizer": cfg.tokenizer,
                "world_size": d.world_size, "steps": total_steps}
        (out / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    metrics.truncate_after(start_step)
    dist.barrier()
    save = _saver(out, wrapped, optimizer, batches, cfg, model_cfg, d)
    try:
        summary = fit(wrapped, optimizer, batches, lm_loss, cfg, d, total_steps, start_step, save, metrics)
    finally:
        metrics.close()
    return {**summary, "out": str(out), "parameters": sum(p.numel() for p in model.parameters())}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``goose train``: one ``--flag`` per TrainConfig field."""
    p = subparsers.add_parser("train", help="pretrain or continue training on a binidx dataset",
                              description="Train an RWKV-7 model with RWKV-LM's recipe (init, optimiser "
                              "groups, schedule, L2Wrap). Run under torchrun for data parallelism. "
                              "See docs/TRAINING.md.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(p, TrainConfig)
    p.set_defaults(func=run_cli)
    return p


def add_config_flags(p: argparse.ArgumentParser, config: type, exclude: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of a TrainConfig-like dataclass (help and choices from its metadata)."""
    for f in fields(config):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"default": f.default, "help": f.metadata["help"]}
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            p.add_argument(flag, type=type(f.default), choices=f.metadata.get("choices"), **kwargs)


def run_cli(args: argparse.Namespace) -> None:
    """Train with the parsed ``goose train`` flags and print a summary (rank 0)."""
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        loss = f"; last loss {summary['loss']:.4f}" if summary["loss"] is not None else ""
        val = f", val loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""
        print(f"trained to step {summary['step']} ({summary['tokens']:,} tokens) in {summary['seconds']:.0f} s, "
              f"{summary['tok_s']:.0f} tok/s{loss}{val}; wrote {summary['out']}/model.pth")
