"""Batched decoding of independent sequences that join and leave at any step (continuous batching).

    engine = Engine(model, tokenizer, max_batch=16)
    seq_id = engine.add("User: hi\\n\\nAssistant:", SamplingParams(max_tokens=100))
    while engine.has_work():
        for event in engine.step():          # Event(seq_id, text, finished)
            print(event.text, end="")
    result = engine.result(seq_id)           # a GenerationResult, as generate() returns

``engine.cancel(seq_id)`` drops a sequence wherever it is (a server does this when its client goes
away). ``add(..., snapshots=(n, ...), on_snapshot=f)`` calls ``f(n, state)`` with a copy of the state
after the first ``n`` prompt tokens (prefill chunks are cut at those positions), which is how a server
caches the state of a shared prompt prefix.

Each step does at most one prefill chunk and one batched decode step:

1. prefill: the oldest waiting sequence runs its next ``prefill_chunk`` prompt tokens, alone, from its
   own state, so a prompt of any length streams through with memory bounded by the chunk, and running
   sequences wait at most one chunk. When its prompt is done it joins the batch (if a slot is free).
2. decode: every running sequence samples a token from its own logits (its own penalties and
   generator), and all tokens are fed in one ``[n, 1]`` forward.

States live in ``max_batch`` preallocated rows of one State; the ``n`` running sequences occupy rows
``0..n-1``, and the model updates those rows in place (``inplace=True``). A sequence that leaves is
replaced by the last row (one row copy): no padding, no gather, and rows never see each other.

Sampling, penalties, stop tokens, stop strings and text streaming follow generate.py exactly (its
bookkeeping is reused), so a sequence's output does not depend on what else is in the batch (for
greedy or seeded sampling, up to float rounding of the batched matmuls). The engine does not call
generate(), and generate() does not call the engine: generate() stays the short readable reference the
engine is tested against, and single-sequence speed comes from the model and weight formats, which
both share.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .generate import GenerationResult, _new_sequence, _prompt_ids, _Sequence, _undecodable_from
from .model import RWKV7
from .sampling import PenaltyTracker, SamplingParams, sample
from .state import State
from .tokenizer import Tokenizer


@dataclass
class Event:
    """A piece of a sequence's text (may be empty on the last event); ``finished`` marks its last event."""

    seq_id: int
    text: str
    finished: bool = False


@dataclass
class _Request:
    """A sequence and what the engine needs to run it."""

    seq_id: int
    seq: _Sequence
    prompt: torch.Tensor            # [1, P] on the model's device
    state: State | None             # batch-1 state while prefilling; None = zeros
    tracker: PenaltyTracker | None  # None: no penalties and no bans, nothing to track
    done: int = 0                   # prompt tokens prefilled so far
    logits: torch.Tensor | None = None
    snapshots: list[int] = field(default_factory=list)   # ascending prompt positions still to report
    on_snapshot: Callable[[int, State], None] | None = None


class Engine:
    """Continuous batching over up to ``max_batch`` sequences (see the module docstring)."""

    def __init__(self, model: RWKV7, tokenizer: Tokenizer, max_batch: int = 16, prefill_chunk: int = 1024):
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch} and {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.state = model.new_state(max_batch)                 # rows 0..n-1 belong to self.running
        self.running: list[_Request] = []
        self.logits: torch.Tensor | None = None                 # [n, V] next-token logits of the running rows
        self.waiting: deque[_Request] = deque()                 # prefilling, or prefilled and waiting for a slot
        self.finished: dict[int, GenerationResult] = {}
        self.last_batch_size = 0                                # rows decoded together by the last step
        self._next_id = 0
        self._no_bytes = _undecodable_from(tokenizer, model.config.vocab_size)

    # ---- requests ----------------------------------------------------------------------------------

    def add(self, prompt: str | list[int], params: SamplingParams, state: State | None = None,
            snapshots: Sequence[int] = (), on_snapshot: Callable[[int, State], None] | None = None) -> int:
        """Queue a sequence (text or token ids, continuing from a batch-1 ``state``); returns its id.

        For each ``n`` in ``snapshots`` (1 <= n <= prompt length), ``on_snapshot(n, copy of the state
        after prompt[:n])`` is called during prefill. The passed-in ``state`` is never modified.
        """
        ids = _prompt_ids(self.tokenizer, prompt)
        if state is not None and state.batch_size != 1:
            raise ValueError(f"expected a batch-1 state per sequence, got batch size {state.batch_size}")
        marks = sorted(set(snapshots))
        if marks and (marks[0] < 1 or marks[-1] > len(ids) or on_snapshot is None):
            raise ValueError(f"snapshots: expected positions in [1, {len(ids)}] and an on_snapshot callback, "
                             f"got {marks}")
        seq = _new_sequence(self.tokenizer, params, len(ids), self.model.device)
        tracker = None
        if params.presence_penalty or params.frequency_penalty or params.token_ban:
            tracker = PenaltyTracker([params], self.model.config.vocab_size, self.tokenizer.decode, self.model.device)
        prompt_t = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        req = _Request(self._next_id, seq, prompt_t, state, tracker, snapshots=marks, on_snapshot=on_snapshot)
        self._next_id += 1
        self.waiting.append(req)
        return req.seq_id

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @torch.inference_mode()
    def cancel(self, seq_id: int) -> bool:
        """Drop a waiting or running sequence (it gets no result); False if it is not in the engine."""
        for req in self.waiting:
            if req.seq_id == seq_id:
                self.waiting.remove(req)
                return True
        for row, req in enumerate(self.running):
            if req.seq_id == seq_id:
                self._leave(row)
                return True
        return False

    def result(self, seq_id: int) -> GenerationResult:
        """The GenerationResult of a finished sequence."""
        if seq_id not in self.finished:
            raise KeyError(f"sequence {seq_id} has not finished (or does not exist)")
        return self.finished[seq_id]

    def run(self, prompts: list[str | list[int]],
            params: SamplingParams | list[SamplingParams]) -> list[GenerationResult]:
        """Add every prompt, step until all finish, return their results in order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"expected one SamplingParams per prompt ({len(prompts)}), got {len(plist)}")
        ids = [self.add(p, sp) for p, sp in zip(prompts, plist)]
        while self.has_work():
            self.step()
        return [self.finished.pop(i) for i in ids]

    # ---- the step ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One prefill chunk (if a sequence is waiting) and one decode step of the running batch."""
        events: list[Event] = []
        self._prefill_chunk(events)
        while self.waiting and self.waiting[0].logits is not None and len(self.running) < self.max_batch:
            self._join(self.waiting.popleft())
        self.last_batch_size = len(self.running)
        if self.running:
            self._decode(events)
        return events

    def _prefill_chunk(self, events: list[Event]) -> None:
        req = next((r for r in self.waiting if r.logits is None), None)
        if req is None:
            return
        end = min(req.done + self.prefill_chunk, *req.snapshots[:1], req.prompt.shape[1])
        chunk = req.prompt[:, req.done:end]
        logits, req.state = self.model(chunk, req.state, last=True, inplace=req.done > 0)
        req.done = end
        if req.snapshots and req.snapshots[0] == end:
            req.snapshots.pop(0)
            req.on_snapshot(end, req.state.clone())
        if req.done == req.prompt.shape[1]:
            req.logits, req.prompt = logits, req.prompt[:, :0]
            if req.seq.params.max_tokens == 0:
                self.waiting.remove(req)
                self._finish(req, "length", req.state, events)

    def _join(self, req: _Request) -> None:
        row = len(self.running)
        for mine, theirs in zip(self.state.tensors().values(), req.state.tensors().values()):
            mine[:, row].copy_(theirs[:, 0])
        self.logits = req.logits if self.logits is None else torch.cat([self.logits, req.logits])
        req.state = req.logits = None
        self.running.append(req)

    def _rows(self) -> State:
        """The running rows of the state, as views (updated in place by the model)."""
        n = len(self.running)
        return State(*(t[:, :n] for t in self.state.tensors().values()))

    def _leave(self, row: int) -> None:
        """Remove a running row: the last row moves into its slot."""
        last = len(self.running) - 1
        if row != last:
            for t in self.state.tensors().values():
                t[:, row].copy_(t[:, last])
            self.logits[row] = self.logits[last]
            self.running[row] = self.running[last]
        self.running.pop()
        self.logits = self.logits[:last] if last else None

    def _decode(self, events: list[Event]) -> None:
        if any(r.tracker is not None for r in self.running):
            rows = [self.logits[i:i + 1] for i in range(len(self.running))]
            penalised = torch.cat([row.float() if r.tracker is None else r.tracker.apply(row)
                                   for r, row in zip(self.running, rows)])
        else:
            penalised = self.logits.float().clone()
        penalised[:, self._no_bytes:] = -torch.inf
        tokens = sample(penalised, [r.seq.params for r in self.running],
                        [r.seq.generator for r in self.running]).tolist()

        # a stop token ends its sequence and is not fed; rows are removed from the end so indices hold
        for row in reversed(range(len(self.running))):
            req = self.running[row]
            if tokens[row] in req.seq.params.stop_tokens:
                self._finish(req, "stop", self._rows().select(row), events)
                self._leave(row)
                tokens[row] = tokens[-1]
                tokens.pop()
        if not self.running:
            return
        for req, token in zip(self.running, tokens):
            if req.tracker is not None:
                req.tracker.update([token])
        feed = torch.tensor(tokens, dtype=torch.long, device=self.model.device)[:, None]
        self.logits, _ = self.model(feed, self._rows(), last=True, inplace=True)

        for row in reversed(range(len(self.running))):
            req, token = self.running[row], tokens[row]
            seq = req.seq
            seq.tokens.append(token)
            text, stopped = seq.stream.push(token)
            if text:
                seq.text.append(text)
                events.append(Event(req.seq_id, text))
            if stopped or len(seq.tokens) >= seq.params.max_tokens:
                self._finish(req, "stop" if stopped else "length", self._rows().select(row), events)
                self._leave(row)

    def _finish(self, req: _Request, reason: str, state: State, events: list[Event]) -> None:
        tail = req.seq.finish(reason, state)
        self.finished[req.seq_id] = req.seq.result
        events.append(Event(req.seq_id, tail, finished=True))
