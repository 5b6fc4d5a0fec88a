"""The one training loop of the experiments: token labelling with AdamW, warmup + cosine, eval, early stop.

Models are RWKV-7 (goose's own model and initialisation), its ablations, or the GPT baseline; all are
trained by ``train`` with goose.train.optim's parameter groups and learning-rate schedule, so the
optimiser rules exist once. The loop is visible on one screen: sample, forward, loss, backward, clip,
step, and every ``eval_every`` steps an evaluation that can stop the run once it reaches ``target``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..model import RWKV7
from ..train.init import model_config, new_model
from ..train.optim import lr_at, make_optimizer
from .baselines import GPT, GPTConfig, HFMamba
from .tasks import IGNORE

WIDE_LOG_DECAY_FLOOR = -4.6   # decays down to e^-4.6 = 0.01, so w - a (a transition eigenvalue) reaches -0.99
ARCHS = {
    "rwkv7": "RWKV-7",
    "rwkv7-a0": "RWKV-7, a = 0 (diagonal decay, RWKV-6-like)",
    "rwkv7-wide": "RWKV-7, decay floor e^-4.6 (eigenvalues to -1)",
    "gpt": "Transformer (GPT + RoPE)",
    "mamba": "Mamba (Hugging Face, pure-torch path)",
}

Sampler = Callable[[torch.Generator], tuple[Tensor, Tensor]]
Evaluator = Callable[[nn.Module], dict[str, float]]


def build_model(arch: str, n_layer: int, n_embd: int, vocab_size: int, head_size: int, seed: int) -> nn.Module:
    """A freshly initialised model of one of ``ARCHS``; RWKV variants use RWKV-LM's initialisation."""
    if arch in ("gpt", "mamba"):     # torch's default initialisation, seeded without touching the global RNG
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if arch == "gpt":
                return GPT(GPTConfig(n_layer, n_embd, vocab_size, head_size))
            return HFMamba(n_layer, n_embd, vocab_size)
    cfg = model_config(n_layer, n_embd, vocab_size, head_size)
    if arch == "rwkv7-a0":
        cfg = dataclasses.replace(cfg, iclr=False)
    elif arch == "rwkv7-wide":
        cfg = dataclasses.replace(cfg, log_decay_floor=WIDE_LOG_DECAY_FLOOR)
    elif arch != "rwkv7":
        raise ValueError(f"unknown architecture {arch!r}; expected one of {list(ARCHS)}")
    return new_model(cfg, seed)


def state_floats(model: nn.Module) -> int:
    """Recurrent state size in floats: the WKV matrices (layers x heads x N^2) of an RWKV-7; 0 for others."""
    if not isinstance(model, RWKV7):
        return 0
    c = model.config
    return c.n_layer * c.n_head * c.head_size ** 2


def logits_of(model: nn.Module, tokens: Tensor) -> Tensor:
    """``[B, T, V]`` logits from RWKV7 (which also returns a state) or the GPT.

    RWKV-7 runs sequences shorter than one WKV chunk through the step-by-step scan: the chunked form
    pads them to a whole chunk, which made a training step at T = 4 three times slower (72 vs 24 ms).
    """
    if isinstance(model, RWKV7):
        mode = "scan" if tokens.shape[1] < model.config.wkv_chunk_len else "auto"
        return model(tokens, mode=mode)[0]
    return model(tokens)


@torch.no_grad()
def tagging_accuracy(model: nn.Module, inputs: Tensor, labels: Tensor, batch_size: int = 256) -> tuple[Tensor, float]:
    """Accuracy per position (``[T]``, NaN where nothing is labelled) and over all labelled positions."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(inputs.shape[1])
    count = torch.zeros(inputs.shape[1])
    for lo in range(0, len(inputs), batch_size):
        x, y = inputs[lo:lo + batch_size], labels[lo:lo + batch_size]
        mask = y != IGNORE
        hit = (logits_of(model, x).argmax(dim=-1) == y) & mask
        correct += hit.sum(dim=0)
        count += mask.sum(dim=0)
    model.train(was_training)
    return correct / count, (correct.sum() / count.sum()).item()


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    lr: float = 1e-3
    lr_final: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    target: float = math.inf      # stop once evaluate(model)["score"] >= target


@dataclass
class TrainResult:
    steps: int
    seconds: float
    score: float                  # the last evaluation's score
    reached: bool
    metrics: dict[str, float]     # the last evaluation
    history: list[dict[str, float]] = field(default_factory=list)


def train(model: nn.Module, sample: Sampler, evaluate: Evaluator, cfg: TrainConfig, seed: int = 0,
          desc: str = "train", progress: bool = True) -> TrainResult:
    """Train ``model`` on batches from ``sample(generator)`` (labels ``IGNORE`` where unscored).

    ``evaluate`` must return a dict with a ``"score"`` entry; it runs every ``eval_every`` steps and at
    the end. The learning rate follows goose.train.optim's warmup + cosine for the full ``steps`` even
    when the run stops early, so an early stop never changes what the earlier steps did.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    model.train()
    history: list[dict[str, float]] = []
    start, losses = time.perf_counter(), []
    metrics: dict[str, float] = {}
    bar = tqdm(range(cfg.steps), desc=desc, leave=False, dynamic_ncols=True, disable=not progress)
    for step in bar:
        lr = lr_at(step, cfg.lr, cfg.lr_final, cfg.warmup_steps, cfg.steps)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        inputs, labels = sample(gen)
        logits = logits_of(model, inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            metrics = evaluate(model)
            history.append({"step": step + 1, "loss": sum(losses) / len(losses),
                            "seconds": time.perf_counter() - start, **metrics})
            losses = []
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", score=f"{metrics['score']:.3f}")
            if metrics["score"] >= cfg.target:
                break
    bar.close()
    return TrainResult(steps=int(history[-1]["step"]), seconds=time.perf_counter() - start, score=metrics["score"],
                       reached=metrics["score"] >= cfg.target, metrics=metrics, history=history)


def _init_worker() -> None:
    torch.set_num_threads(1)


def run_jobs(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int, desc: str) -> list[Any]:
    """``[fn(*job) for job in jobs]``, in ``workers`` processes of one thread each when ``workers > 1``.

    Independent training runs parallelise perfectly across cores, while one tiny model gains little
    from intra-op threads (and on a loaded machine two-thread small ops were measured 10-20x slower).
    Results come back in job order.
    """
    if workers <= 1:
        return [fn(*job) for job in tqdm(jobs, desc=desc, dynamic_ncols=True)]
    ctx = multiprocessing.get_context("spawn")   # forking after torch's thread pools started is unsafe
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        for f in tqdm(futures, desc=desc, dynamic_ncols=True):
            f.result()
        return [f.result() for f in futures]


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with ``columns`` = (key, header); floats to 3 decimals."""
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "" if v is None else str(v)
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out: Path, results: dict[str, Any], markdown: str) -> None:
    """``results.json`` (with the machine's load average, which wall-clock times depend on) and
    ``results.md`` in ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown.rstrip() + "\n")
