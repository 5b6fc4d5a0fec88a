"""Passkey retrieval in miniature (RWKV-X, PAPERS.md §5.5 and E4): a small RWKV-X against a same-size RWKV-7.

    goose experiment passkey --preset quick           # <= 15 min on 2 CPU cores
    python -m goose.experiments.passkey --preset full

RWKV-7 is trained from scratch on RWKV-X's passkey prompt (its exact text, in byte tokens) at short
lengths. The hybrid is grown the way RWKV-X grows its models (PAPERS.md §5.4, ``Preset.grow``): an
RWKV-7 with one block fewer is pretrained as a language model on the same prompts, never asked for the
key (so its state has no reason to keep it); RWKV-X's block expansion (``goose.rwkv_x.expand``) adds
the attention block; stage 1 trains that block alone on passkey retrieval, the RWKV block frozen
(``--only_train_moba``); stage 2 trains everything. With ``grow=None`` the hybrid is instead trained
from scratch like RWKV-7, where its RWKV block learns to keep the key and the attention goes unused.
Both are then scored with RWKV-X's protocol (``evaluation/pass_key_rwkvx.py``) at longer lengths: the
needle at depths 0 .. 90%, greedy decoding of the answer, exact match. The hybrid is also scored with
the KV-cache policy on (scaled down), which compresses the cache at the first decoding step as the
``rwkv-x`` package does; with dense attention, which tells failures of the chunk selection from
failures of the model; and with its attention switched off, which tells whether it answers through
attention at all. Last, decoding time and state memory against context: the hybrid with and without
the policy, with dense attention, and RWKV-7.

Scaled-down choices, each a departure from the paper: byte tokens instead of the World vocabulary
(the answer is `` <key>``, decoded to its length); chunk 32 and top-k 4 instead of 2048 and 3; models
of 2 blocks of width 64 (quick) or 4 of width 128 (full), one of the hybrid's blocks attention,
trained for minutes to hours on lengths up to 1K or 2K, instead of 0.2-3.6B models trained on 64K;
pretraining on the passkey prompts themselves instead of a corpus, and stages 1 and 2 on the passkey
loss (the needle's repeat and the answer) instead of MiniPile and ProLong; the cache policy is
rwkv-x's 20000 / 2000 / 16000 divided by about ten (quick) or five (full).

The two models train in parallel worker processes (``workers``), each scoring its own passkey grid;
the decoding profile then runs in the main process on one thread. Writes OUT/results.json,
OUT/results.md, OUT/passkey_heatmap.png, OUT/decode_vs_context.png and the trained weights,
OUT/rwkv_x.pth (rwkv-x layout; load with ``goose.rwkv_x.load(path, sparse=SparseConfig(32, 4))``)
and OUT/rwkv7.pth (OUT defaults to runs/experiments/passkey), and copies the plots to
docs/results/passkey_heatmap.png and docs/results/passkey_decode.png.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..checkpoint import save as save_checkpoint
from ..model import RWKV7
from ..rwkv_x import RWKVX, CachePolicy, SparseConfig, expand
from ..tokenizer import ByteTokenizer
from ..train.init import model_config, new_model
from .runner import IGNORE, TrainConfig, TrainResult, logits_of, run_jobs, tagging_accuracy, train, write_results

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = " ".join(["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."] * 1000)
QUESTION = "What is the pass key? The pass key is"
ANSWER_WIDTH = 6            # " 49999": answers are padded to this many tokens in training batches
NAME = "passkey"
TOKENIZER = ByteTokenizer()
DENSE_TOPK = 1 << 30        # a top-k that covers every chunk: dense attention


@dataclass(frozen=True)
class Growth:
    """RWKV-X's recipe for the hybrid (PAPERS.md §5.4), scaled down: grow it from a pretrained RWKV-7.

    Each stage runs ``Preset.train``'s schedule for the given multiple of its steps (so that shrinking
    ``train`` shrinks every stage); stage 1 has its own peak learning rate.
    """

    pretrain: float     # the RWKV blocks alone, a language model on the shortest training length (no key recall)
    stage1: float       # ``--only_train_moba``: the attention blocks alone on passkey retrieval, the RWKV blocks frozen
    stage2: float       # every parameter on passkey retrieval
    stage1_lr: float    # stage 1's peak learning rate (the other stages use ``Preset.train``'s)


@dataclass(frozen=True)
class Preset:
    n_layer: int                      # blocks in each model; the hybrid turns n_attn of them into attention
    n_attn: int
    n_embd: int
    head_size: int                    # of the RWKV blocks (the attention's is rwkv-x's 64)
    chunk_size: int
    topk: int
    train_lengths: tuple[int, ...]    # prompt lengths of the training batches (one drawn per batch)
    train: TrainConfig                # passkey training; a grown hybrid's stages run multiples of its steps, and
                                      # RWKV-7 then as many as its stages 1 + 2 (``matched_training``)
    batch_size: int
    eval_lengths: tuple[int, ...]
    depths: int                       # needle depths 0, 1/depths, ... (RWKV-X: 10)
    tests: int                        # pass keys per (length, depth) cell (RWKV-X: 5)
    policy: CachePolicy               # rwkv-x's 20000 / 2000 / 16000, scaled down
    decode_contexts: tuple[int, ...]
    decode_steps: int
    workers: int = 2                  # processes of one thread: the two models train side by side
    grow: Growth | None = None        # the hybrid's recipe; None: from scratch, with RWKV-7's training


PRESETS = {
    "quick": Preset(n_layer=2, n_attn=1, n_embd=64, head_size=32, chunk_size=32, topk=4,
                    train_lengths=(256, 512, 1024), batch_size=8,
                    train=TrainConfig(steps=1200, lr=3e-3, lr_final=3e-4, warmup_steps=30, eval_every=200),
                    eval_lengths=(1024, 2048, 4096, 8192), depths=10, tests=5,
                    policy=CachePolicy(max_size=2048, window=256, min_size=1536),
                    decode_contexts=(1024, 2048, 4096, 8192, 16384, 32768), decode_steps=16,
                    grow=Growth(pretrain=1, stage1=2, stage2=1, stage1_lr=1e-2)),
    "full": Preset(n_layer=4, n_attn=1, n_embd=128, head_size=64, chunk_size=32, topk=4,
                   train_lengths=(256, 512, 1024, 2048), batch_size=8,
                   train=TrainConfig(steps=5000, lr=3e-3, lr_final=3e-4, warmup_steps=100, eval_every=500),
                   eval_lengths=(1024, 2048, 4096, 8192, 16384), depths=10, tests=5,
                   policy=CachePolicy(max_size=4096, window=512, min_size=3072),
                   decode_contexts=(1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072), decode_steps=32,
                   grow=Growth(pretrain=1, stage1=2, stage2=1, stage1_lr=1e-2)),
}


def make_prompt(length: int, depth: float, key: int) -> list[int]:
    """RWKV-X's passkey prompt, in exactly ``length`` byte tokens, the needle ``depth`` of the way into the filler.

    As in ``generate_prompt_landmark``: task, filler prefix, needle, filler suffix, question, one per line;
    both filler parts are cut from the start of the same repeated text.
    """
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    n_filler = length - len(TASK) - len(needle) - len(QUESTION) - 4
    if n_filler < 0:
        raise ValueError(f"a passkey prompt needs at least {length - n_filler} tokens, got length {length}")
    prefix = int(depth * n_filler)
    text = "\n".join([TASK, FILLER[:prefix], needle, FILLER[:n_filler - prefix], QUESTION])
    return TOKENIZER.encode(text)


def eval_key(test: int) -> int:
    """The pass key of test ``test``: RWKV-X's (numpy seeded with the test index), the same in every cell."""
    return int(np.random.RandomState(test).randint(1, 50000))


def training_batch(lengths: tuple[int, ...], batch_size: int, gen: torch.Generator,
                   recall: bool = True) -> tuple[Tensor, Tensor]:
    """(inputs, labels) ``[B, L + ANSWER_WIDTH - 1]``: prompt + " key", labelled for passkey retrieval or, with
    ``recall=False``, as a language model that is never asked to recall the key.

    Retrieval labels the needle's repeat and the answer. The key's first appearance is random, so it is
    not scored; from ``. Remember it. key is the pass key.`` on, the needle can be copied from a few
    tokens back, a short-range version of the task. The language model labels every token of the prompt
    (the repeat's key too, a copy over about 15 tokens) and nothing after it: the answer, the only
    tokens that need the key carried across the filler, is never asked for.
    """
    length = lengths[int(torch.randint(len(lengths), (1,), generator=gen))]
    rows, masks = [], []
    for _ in range(batch_size):
        key = int(torch.randint(1, 50000, (1,), generator=gen))
        depth = float(torch.rand((), generator=gen))
        prompt = make_prompt(length, depth, key)
        answer = TOKENIZER.encode(f" {key}")
        tokens = prompt + answer + TOKENIZER.encode("\n" * (ANSWER_WIDTH - len(answer)))
        text = TOKENIZER.decode(prompt)
        start = text.index(f"The pass key is {key}.") + len(f"The pass key is {key}")
        if recall:
            scored = torch.zeros(len(tokens), dtype=torch.bool)
            scored[start:start + len(f". Remember it. {key} is the pass key.")] = True
            scored[len(prompt):len(prompt) + len(answer)] = True
        else:
            scored = torch.ones(len(tokens), dtype=torch.bool)
            scored[len(prompt):] = False
        rows.append(torch.tensor(tokens))
        masks.append(scored)
    tokens, scored = torch.stack(rows), torch.stack(masks)
    labels = tokens[:, 1:].masked_fill(~scored[:, 1:], IGNORE)
    return tokens[:, :-1], labels


class LogitsOnly(nn.Module):
    """``tokens -> logits`` for runner.train, whose ``logits_of`` unpacks ``(logits, state)`` of RWKV7 only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)[0]


def answer_accuracy(model: nn.Module, inputs: Tensor, labels: Tensor) -> dict[str, float]:
    """Teacher-forced score on a fixed batch: the fraction of prompts whose every answer token is right."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = logits_of(model, inputs)
    model.train(was_training)
    answer = labels != IGNORE
    answer[:, :-ANSWER_WIDTH] = False                       # the needle's repeat is scored in training only
    right = ((logits.argmax(dim=-1) == labels) | ~answer).all(dim=1)
    return {"score": right.float().mean().item()}


@torch.no_grad()
def greedy_tokens(model: nn.Module, logits: Tensor, state: Any, n: int) -> list[list[int]]:
    """``n`` tokens per row, decoded greedily from the prompt's last ``logits [B, V]`` and ``state``."""
    tokens = []
    for i in range(n):
        tokens.append(logits.argmax(dim=-1))
        if i + 1 < n:
            logits, state = model(tokens[-1].unsqueeze(1), state, last=True)
    return torch.stack(tokens, dim=1).tolist()


@torch.no_grad()
def passkey_grid(model: nn.Module, p: Preset, variants: dict[str, tuple[SparseConfig | None, CachePolicy | None]],
                 rows_per_batch: int = 10) -> dict[str, dict[int, list[float]]]:
    """Accuracy (%) per variant, length and depth: ``{name: {length: [acc at depth 0, ...]}}``.

    A variant is the hybrid's ``(sparse, policy)`` setting, ``(None, None)`` for RWKV-7. The answer is
    the ``1 + len(key)`` tokens after the prompt (`` <key>`` in bytes), stripped, exactly matching the
    key. Variants with the same attention share one prefill: the policy acts from the first decoding
    step on, as in the rwkv-x package (a prefill never compresses the cache it starts empty).
    """
    model.eval()
    saved = (model.sparse, model.policy) if isinstance(model, RWKVX) else None
    cells = [(d, t) for d in range(p.depths) for t in range(p.tests)]
    grid: dict[str, dict[int, list[float]]] = {name: {} for name in variants}
    for length in p.eval_lengths:
        hits = {name: [0] * p.depths for name in variants}
        for lo in range(0, len(cells), rows_per_batch):
            batch = cells[lo:lo + rows_per_batch]
            keys = [str(eval_key(t)) for _, t in batch]
            prompts = torch.tensor([make_prompt(length, d / p.depths, eval_key(t)) for d, t in batch])
            for sparse in dict.fromkeys(sparse for sparse, _ in variants.values()):
                if saved:
                    model.sparse, model.policy = sparse, None
                logits, state = model(prompts, last=True)
                for name, (variant_sparse, policy) in variants.items():
                    if variant_sparse != sparse:
                        continue
                    if saved:
                        model.policy = policy
                    decoded = greedy_tokens(model, logits, state, 1 + max(map(len, keys)))
                    for (d, _), key, tokens in zip(batch, keys, decoded):   # as RWKV-X: len(answer) tokens, stripped
                        hits[name][d] += TOKENIZER.decode(tokens[:1 + len(key)]).strip() == key
        for name in variants:
            grid[name][length] = [100.0 * h / p.tests for h in hits[name]]
    if saved:
        model.sparse, model.policy = saved
    return grid


def _prefill(model: nn.Module, prompt: Tensor, segment: int) -> tuple[Tensor, Any, float]:
    """Last logits, state and seconds of a prefill in segments of ``segment`` tokens."""
    state, start = None, time.perf_counter()
    for lo in range(0, prompt.shape[1], segment):
        logits, state = model(prompt[:, lo:lo + segment], state, last=True)
    return logits, state, time.perf_counter() - start


def _time_decoding(model: nn.Module, logits: Tensor, state: Any, steps: int) -> tuple[list[float], Any]:
    """Seconds of each of ``steps + 1`` greedy decoding steps, and the final state."""
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        logits, state = model(logits.argmax(dim=-1, keepdim=True), state, last=True)
        times.append(time.perf_counter() - start)
    return times, state


@torch.no_grad()
def decode_profile(hybrid: RWKVX, rwkv7: RWKV7, p: Preset, segment: int = 2048) -> list[dict[str, Any]]:
    """Decoding time per token (median over ``decode_steps``) and state memory against context length.

    Each context is a passkey prompt, prefilled in segments. The hybrid's prefilled state is decoded
    three ways: sparse attention with an unbounded cache, with the cache policy (whose first step,
    which compresses the prefilled cache, is reported apart), and dense attention over the same cache.
    """
    sparse = hybrid.sparse
    variants = {"RWKV-X, unbounded cache": (sparse, None), "RWKV-X, cache policy": (sparse, p.policy),
                "RWKV-X, dense attention": (dataclasses.replace(sparse, topk=DENSE_TOPK), None)}
    hybrid.eval(), rwkv7.eval()
    rows = []
    for context in tqdm(p.decode_contexts, desc="decode profile", dynamic_ncols=True):
        prompt = torch.tensor([make_prompt(context, 0.5, eval_key(0))])
        logits, state, prefill_s = _prefill(hybrid, prompt, segment)
        for variant, (sparse_cfg, policy) in variants.items():
            hybrid.sparse, hybrid.policy = sparse_cfg, policy
            times, s = _time_decoding(hybrid, logits, state.clone(), p.decode_steps)
            rows.append({"model": variant, "context": context, "prefill_s": prefill_s, "first_step_ms": 1e3 * times[0],
                         "ms_per_token": 1e3 * statistics.median(times[1:]), "state_mib": s.nbytes / 2 ** 20,
                         "kv_entries": s.cache_len})
        hybrid.sparse, hybrid.policy = sparse, None
        logits, state, prefill_s = _prefill(rwkv7, prompt, segment)
        times, s = _time_decoding(rwkv7, logits, state, p.decode_steps)
        nbytes = sum(t.numel() * t.element_size() for t in s.tensors().values())
        rows.append({"model": "RWKV-7", "context": context, "prefill_s": prefill_s, "first_step_ms": 1e3 * times[0],
                     "ms_per_token": 1e3 * statistics.median(times[1:]), "state_mib": nbytes / 2 ** 20,
                     "kv_entries": 0})
    return rows


def build_model(name: str, p: Preset, seed: int) -> nn.Module:
    """"RWKV-7" or "RWKV-X": fresh RWKV-LM initialisations of the same seed with ``p.n_layer`` blocks each."""
    cfg = model_config(p.n_layer, p.n_embd, TOKENIZER.vocab_size, p.head_size)
    if name == "RWKV-7":
        return new_model(cfg, seed)
    trunk = new_model(dataclasses.replace(cfg, n_layer=p.n_layer - p.n_attn), seed)
    return expand(trunk, p.n_attn, SparseConfig(p.chunk_size, p.topk))


def _variants(model: nn.Module, p: Preset) -> dict[str, tuple[SparseConfig | None, CachePolicy | None]]:
    """What the passkey grid scores: RWKV-7 as is; the hybrid as trained, with the cache policy, and dense."""
    if not isinstance(model, RWKVX):
        return {"RWKV-7": (None, None)}
    return {"RWKV-X": (model.sparse, None), "RWKV-X + cache policy": (model.sparse, p.policy),
            "RWKV-X, dense attention": (dataclasses.replace(model.sparse, topk=DENSE_TOPK), None)}


@contextlib.contextmanager
def attention_off(model: RWKVX) -> Iterator[None]:
    """An ablation: zero the attention blocks' output projections (their FFNs stay), restore them after."""
    saved = [block.att.output.weight.detach().clone() for block in model.moba]
    with torch.no_grad():
        for block in model.moba:
            block.att.output.weight.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for block, weight in zip(model.moba, saved):
                block.att.output.weight.copy_(weight)


def stage_config(p: Preset, times: float, **changes: Any) -> TrainConfig:
    """``p.train`` for ``times`` its steps (at least one), with ``changes``."""
    return dataclasses.replace(p.train, steps=max(1, round(times * p.train.steps)), **changes)


def matched_training(p: Preset) -> TrainConfig:
    """The passkey training of a model trained from scratch: with a grown hybrid beside it, as many steps as
    the hybrid's stages 1 and 2 together, so that both see the same number of passkey batches (its
    pretraining never asks for the key); otherwise ``p.train``."""
    return stage_config(p, p.grow.stage1 + p.grow.stage2) if p.grow else p.train


def fit_passkey(model: nn.Module, p: Preset, cfg: TrainConfig, seed: int, desc: str, progress: bool) -> TrainResult:
    """Train ``model``'s trainable parameters on passkey retrieval with ``cfg``, scored by ``answer_accuracy``
    on 16 fixed prompts of the longest training length."""
    val = training_batch((max(p.train_lengths),), 16, torch.Generator().manual_seed(seed + 12345))
    return train(model if isinstance(model, RWKV7) else LogitsOnly(model),
                 lambda gen: training_batch(p.train_lengths, p.batch_size, gen),
                 lambda m: answer_accuracy(m, *val), cfg, seed=seed, desc=desc, progress=progress)


def pretrain_trunk(p: Preset, cfg: TrainConfig, seed: int, progress: bool) -> tuple[RWKV7, TrainResult]:
    """The hybrid's RWKV blocks as an RWKV-7 of their own, trained with ``cfg`` as a language model that is
    never asked for the key (``training_batch(recall=False)``), on the shortest training length, where
    the needle's short-range copy is the largest share of the loss; scored by token accuracy on 16
    fixed prompts."""
    trunk = new_model(model_config(p.n_layer - p.n_attn, p.n_embd, TOKENIZER.vocab_size, p.head_size), seed)
    lengths = p.train_lengths[:1]
    val = training_batch(lengths, 16, torch.Generator().manual_seed(seed + 12345), recall=False)
    fit = train(trunk, lambda gen: training_batch(lengths, p.batch_size, gen, recall=False),
                lambda m: {"score": tagging_accuracy(m, *val)[1]}, cfg, seed=seed + 1, desc="RWKV-X pretraining",
                progress=progress)
    return trunk, fit


def train_attention(model: RWKVX, p: Preset, cfg: TrainConfig, seed: int, progress: bool) -> TrainResult:
    """RWKV-X's stage 1 (``--only_train_moba``): passkey training of the attention blocks alone, with ``cfg``.

    The RWKV blocks, embedding and head are frozen for it, so the optimiser (which takes the parameters
    that require grad) holds only the attention blocks'; they are unfrozen afterwards.
    """
    model.rwkv.requires_grad_(False)
    try:
        return fit_passkey(model, p, cfg, seed, "RWKV-X stage 1 (attention only)", progress)
    finally:
        model.rwkv.requires_grad_(True)


def grow_hybrid(p: Preset, grow: Growth, seed: int, progress: bool) -> tuple[RWKVX, dict[str, TrainResult]]:
    """The hybrid as RWKV-X grows its models: a pretrained RWKV-7, expanded (``rwkv_x.expand``), stage 1 on
    the attention blocks alone, stage 2 on everything; returns it and each stage's training."""
    trunk, pretrained = pretrain_trunk(p, stage_config(p, grow.pretrain), seed, progress)
    model = expand(trunk, p.n_attn, SparseConfig(p.chunk_size, p.topk))
    stage1 = train_attention(model, p, stage_config(p, grow.stage1, lr=grow.stage1_lr), seed, progress)
    stage2 = fit_passkey(model, p, stage_config(p, grow.stage2), seed + 2, "RWKV-X stage 2 (all)", progress)
    return model, {"language-model pretraining": pretrained, "stage 1, attention only": stage1,
                   "stage 2, all": stage2}


def _train_and_score(name: str, p: Preset, seed: int, progress: bool) -> dict[str, Any]:
    """One worker's job: train ``name``, score its passkey grid(s); returns the results and the weights."""
    cpu = time.process_time()
    if name == "RWKV-X" and p.grow is not None:
        model, stages = grow_hybrid(p, p.grow, seed, progress)
    else:
        model = build_model(name, p, seed)
        stages = {"passkey training": fit_passkey(model, p, matched_training(p), seed, name, progress)}
    cpu_train = time.process_time() - cpu
    fit = list(stages.values())[-1]
    start = time.perf_counter()
    grid = passkey_grid(model, p, _variants(model, p))
    if isinstance(model, RWKVX):   # does the hybrid answer through its attention at all?
        with attention_off(model):
            grid.update(passkey_grid(model, p, {"RWKV-X, attention off": (model.sparse, None)}))
    return {"name": name, "parameters": sum(t.numel() for t in model.parameters()),
            "stages": [{"stage": stage, "steps": f.steps, "seconds": f.seconds, "score": f.score, "history": f.history}
                       for stage, f in stages.items()],
            "train_seconds": sum(f.seconds for f in stages.values()), "train_cpu_seconds": cpu_train,
            "eval_seconds": time.perf_counter() - start, "train_answer_accuracy": fit.score, "passkey": grid,
            "weights": {k: t.detach().clone() for k, t in model.state_dict().items()}}


def run(p: Preset | str, out: Path | str, seed: int = 0, preset_name: str = "custom",
        docs: Path | None = Path("docs/results")) -> dict[str, Any]:
    """Train both models, score passkey retrieval, profile decoding; write tables and plots; return the results.

    ``p`` is a Preset or a name in PRESETS; the plots are also copied to ``docs`` unless it is None.
    """
    if isinstance(p, str):
        p, preset_name = PRESETS[p], p
    out = Path(out)
    start = time.perf_counter()
    jobs = [(name, p, seed, p.workers <= 1) for name in ("RWKV-X", "RWKV-7")]
    trained = {r["name"]: r for r in run_jobs(_train_and_score, jobs, p.workers, NAME)}
    models = {}
    for name, r in trained.items():
        models[name] = build_model(name, p, seed)
        models[name].load_state_dict(r.pop("weights"))
    out.mkdir(parents=True, exist_ok=True)
    torch.save(models["RWKV-X"].state_dict(), out / "rwkv_x.pth")   # the rwkv-x layout: goose.rwkv_x.load reads it
    save_checkpoint(models["RWKV-7"], out / "rwkv7.pth")
    decode = decode_profile(models["RWKV-X"], models["RWKV-7"], p)
    passkey = {variant: grid for r in trained.values() for variant, grid in r.pop("passkey").items()}
    results = {"experiment": NAME, "preset": preset_name, "settings": _jsonable(dataclasses.asdict(p)), "seed": seed,
               "seconds": round(time.perf_counter() - start, 1), "models": trained, "passkey": passkey,
               "decode": decode}
    write_results(out, results, report(results, p))
    plot_heatmaps(passkey, p, out / "passkey_heatmap.png")
    plot_decode(decode, out / "decode_vs_context.png")
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "passkey_heatmap.png", docs / "passkey_heatmap.png")
        shutil.copy(out / "decode_vs_context.png", docs / "passkey_decode.png")
    return results


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _tokens(n: int) -> str:
    """1024 -> "1K"; other counts as they are."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def report(results: dict[str, Any], p: Preset) -> str:
    """The results tables: models, passkey accuracy by length (and by depth), decoding against context."""
    lines = [f"# Passkey retrieval, RWKV-X vs RWKV-7 ({results['preset']} preset)", "",
             f"Seed {results['seed']}; total {results['seconds'] / 60:.1f} min wall time. Training lengths "
             f"{', '.join(map(str, p.train_lengths))} (byte tokens), {p.train.steps} steps of {p.batch_size} prompts; "
             f"chunk {p.chunk_size}, top-k {p.topk}.", "",
             *([] if p.grow is None else [
                 "The hybrid is grown as RWKV-X's are: its RWKV block(s) pretrained as a language model that is "
                 f"never asked for the key (length {p.train_lengths[0]}), expanded, then its attention block(s) "
                 f"alone trained on passkey retrieval (stage 1, lr {p.grow.stage1_lr:g}), then everything (stage 2). "
                 "RWKV-7 is trained on passkey retrieval from scratch.", ""]),
             "| model | parameters | training (wall / CPU) | answer accuracy at training length |",
             "|---|---:|---:|---:|"]
    for name, m in results["models"].items():
        stages = " + ".join(f"{s['steps']} steps {s['stage']}" for s in m["stages"])
        lines.append(f"| {name} | {m['parameters']:,} | {stages}, {m['train_seconds'] / 60:.1f} / "
                     f"{m['train_cpu_seconds'] / 60:.1f} min | {100 * m['train_answer_accuracy']:.0f}% |")
    lengths = p.eval_lengths
    lines += ["", f"Passkey accuracy (%), mean over {p.depths} depths x {p.tests} keys (RWKV-X's protocol):", "",
              "| model | " + " | ".join(map(_tokens, lengths)) + " |", "|---|" + "---:|" * len(lengths)]
    for name, grid in results["passkey"].items():
        lines.append(f"| {name} | " + " | ".join(f"{statistics.mean(grid[n]):.0f}" for n in lengths) + " |")
    for name, grid in results["passkey"].items():
        lines += ["", f"{name}, accuracy (%) by depth (rows) and length (columns):", "",
                  "| depth | " + " | ".join(map(_tokens, lengths)) + " |", "|---|" + "---:|" * len(lengths)]
        for d in range(p.depths):
            lines.append(f"| {100 * d // p.depths}% | " + " | ".join(f"{grid[n][d]:.0f}" for n in lengths) + " |")
    lines += ["", f"Decoding, median ms per token over {p.decode_steps} steps and state memory (MiB); "
              f"cache policy {p.policy.max_size} / {p.policy.window} / {p.policy.min_size}:", "",
              "| context | " + " | ".join(dict.fromkeys(r["model"] for r in results["decode"])) + " |",
              "|---:|" + "---:|" * len({r["model"] for r in results["decode"]})]
    for context in p.decode_contexts:
        cells = [f"{r['ms_per_token']:.1f} ms, {r['state_mib']:.3g} MiB" for r in results["decode"]
                 if r["context"] == context]
        lines.append(f"| {_tokens(context)} | " + " | ".join(cells) + " |")
    first = [r for r in results["decode"] if r["model"] == "RWKV-X, cache policy"]
    lines += ["", "First decoding step with the cache policy (compresses the prefilled cache): " +
              ", ".join(f"{r['context']}: {r['first_step_ms']:.0f} ms" for r in first), ""]
    return "\n".join(lines)


def plot_heatmaps(grids: dict[str, dict[int, list[float]]], p: Preset, path: Path) -> None:
    """One depth x length heatmap per model, colours as in RWKV-X's plot (red 0 -> yellow -> green 100)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("passkey", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, axes = plt.subplots(1, len(grids), figsize=(3.6 * len(grids), 3.6), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items()):
        data = np.array([grid[n] for n in p.eval_lengths]).T            # [depth, length]
        ax.imshow(data, cmap=cmap, vmin=0, vmax=100, aspect="auto")
        for (d, i), value in np.ndenumerate(data):
            ax.text(i, d, f"{value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(p.eval_lengths)), [_tokens(n) for n in p.eval_lengths])
        ax.set_yticks(range(p.depths), [f"{100 * d // p.depths}" for d in range(p.depths)])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (%)")
        ax.set_title(name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_decode(rows: list[dict[str, Any]], path: Path) -> None:
    """Decoding ms/token and state memory against context, one line per model/variant (the unbounded and
    dense variants hold the same cache, so their memory lines coincide)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        x = [r["context"] for r in mine]
        ax_t.plot(x, [r["ms_per_token"] for r in mine], marker="o", label=name)
        ax_m.plot(x, [r["state_mib"] for r in mine], marker="o", label=name)
    contexts = sorted({r["context"] for r in rows})
    for ax, label in ((ax_t, "ms per decoded token (median)"), (ax_m, "state memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [_tokens(n) for n in contexts])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_m.set_yscale("log")
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m goose.experiments.passkey", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    parser.add_argument("--out", type=Path, default=Path("runs/experiments") / NAME)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)   # as `goose experiment`: the workers use the cores, one thread each
    run(PRESETS[args.preset], args.out, args.seed, args.preset)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
