"""Text generation on top of ``logits, state = model(tokens, state)``: the readable reference loop.

``generate`` streams one completion; ``generate_batch`` decodes several prompts together, one
``[B, 1]`` forward per step. Both run the same loop:

1. prefill the prompt in chunks (``last=True``), starting from the given State (or zeros);
2. repeat: penalise the logits (PenaltyTracker), sample, stop on a stop token (not emitted, not fed),
   otherwise feed the token to the model and stream its text, stopping on a stop string (cut from
   the text) or after ``max_tokens`` tokens.

The final State has consumed the prompt and every id in ``GenerationResult.tokens`` (all sampled
ids except a stop token, including those that completed a stop string), so a conversation continues
by passing it back with the next piece of text as the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import torch

from goose.model import RWKV7
from goose.sampling import PenaltyTracker, SamplingParams, sample
from goose.state import State
from goose.tokenizer import StreamDecoder, Tokenizer

FinishReason = Literal["stop", "length"]


@dataclass
class GenerationResult:
    """Outcome of one generation.

    text: the emitted text (stop string excluded). tokens: generated ids the final state consumed
    (a stop token is not among them). finish_reason: "stop" (stop token or stop string) or "length"
    (max_tokens). prompt_tokens: ids prefilled for this call (context already in a passed-in state
    is not counted). state: batch-1 State after the prompt and ``tokens``.
    """

    text: str
    tokens: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    state: State

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class _TextStream:
    """Incremental text of a token stream with stop strings cut out.

    Text that could be the beginning of a stop string is held back until the next tokens show
    whether it is one, so a stop string split across tokens is never emitted.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str]) -> None:
        self._decoder = StreamDecoder(tokenizer)
        self._stops = stop_strings
        self._pending = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (text safe to emit, whether a stop string was completed)."""
        self._pending += self._decoder.push(token)
        return self._release(final=False)

    def flush(self) -> str:
        """End of stream: the remaining text (an unfinished UTF-8 character becomes U+FFFD)."""
        self._pending += self._decoder.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        text = self._pending
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return text[: min(hits)], True
        hold = 0 if final else max((self._overlap(s) for s in self._stops), default=0)
        self._pending = text[len(text) - hold:]
        return text[: len(text) - hold], False

    def _overlap(self, stop: str) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of `stop`."""
        for n in range(min(len(stop) - 1, len(self._pending)), 0, -1):
            if self._pending.endswith(stop[:n]):
                return n
        return 0


@dataclass
class _Sequence:
    """Bookkeeping of one sequence while decoding."""

    params: SamplingParams
    stream: _TextStream
    prompt_tokens: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    result: GenerationResult | None = None

    def finish(self, reason: FinishReason, state: State) -> str:
        """Record the result; return the last text to emit."""
        tail = self.stream.flush()
        self.text.append(tail)
        self.result = GenerationResult("".join(self.text), self.tokens, reason, self.prompt_tokens, state)
        return tail


class Generation:
    """Iterator over the text pieces of one generation (see :func:`generate`).

    Pieces are never empty and never split a UTF-8 character. Once the iterator is exhausted,
    ``result`` holds the GenerationResult (text, tokens, finish_reason, counts, final state).
    """

    def __init__(self, pieces: Iterator[tuple[int, str]], seq: _Sequence) -> None:
        self._pieces = pieces
        self._seq = seq

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        return next(self._pieces)[1]

    @property
    def result(self) -> GenerationResult:
        if self._seq.result is None:
            raise RuntimeError("the generation has not finished: iterate it to the end (or call run())")
        return self._seq.result

    def run(self) -> GenerationResult:
        """Consume the remaining pieces and return the result."""
        for _ in self:
            pass
        return self.result


def _prompt_ids(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise ValueError("prompt must contain at least one token (the next-token logits come from it)")
    return ids


def _new_sequence(tokenizer: Tokenizer, params: SamplingParams, prompt_tokens: int, device: torch.device) -> _Sequence:
    generator = None if params.seed is None else torch.Generator(device).manual_seed(params.seed)
    return _Sequence(params, _TextStream(tokenizer, params.stop_strings), prompt_tokens, generator)


@torch.no_grad()
def _prefill(model: RWKV7, ids: list[int], state: State | None, chunk: int) -> tuple[torch.Tensor, State]:
    """Run the prompt in chunks; return the last position's logits [1, V] and the new state."""
    if chunk < 1:
        raise ValueError(f"prefill_chunk: expected an int >= 1, got {chunk}")
    if state is not None and state.batch_size != 1:
        raise ValueError(f"expected a batch-1 state per prompt, got batch size {state.batch_size}")
    tokens = torch.tensor([ids], dtype=torch.long, device=model.device)
    for start in range(0, len(ids), chunk):
        logits, state = model(tokens[:, start:start + chunk], state, last=True)
    return logits, state


def _undecodable_from(tokenizer: Tokenizer, vocab_size: int) -> int:
    """First id of the top range of model ids the tokenizer has no bytes for (World pads 65530..65535)."""
    first = vocab_size
    while first > 0:
        try:
            tokenizer.token_bytes(first - 1)
        except ValueError:
            first -= 1
        else:
            break
    return first


def _decode_loop(model: RWKV7, tokenizer: Tokenizer, logits: torch.Tensor, state: State,
                 seqs: list[_Sequence]) -> Iterator[tuple[int, str]]:
    """The decode loop over a batch; yields (sequence index, text piece) and fills each seq.result.

    Row r of `logits` [B, V] / `state` / the tracker belongs to seqs[active[r]]; finished rows are
    dropped from all three.
    """
    vocab = logits.shape[-1]
    no_bytes = _undecodable_from(tokenizer, vocab)
    tracker = PenaltyTracker([s.params for s in seqs], vocab, tokenizer.decode, logits.device)
    active = list(range(len(seqs)))

    def keep(rows: list[int]) -> None:
        nonlocal active, logits, state, tracker
        if len(rows) < len(active):
            active = [active[r] for r in rows]
            logits, state, tracker = logits[rows], state.select(rows), tracker.select(rows)

    for r, i in enumerate(active):
        if seqs[i].params.max_tokens == 0:
            seqs[i].finish("length", state.select(r))
    keep([r for r, i in enumerate(active) if seqs[i].result is None])
    while active:
        penalised = tracker.apply(logits)
        penalised[:, no_bytes:] = -torch.inf
        tokens = sample(penalised, [seqs[i].params for i in active], [seqs[i].generator for i in active]).tolist()

        fed = []
        for r, (i, token) in enumerate(zip(active, tokens)):
            if token in seqs[i].params.stop_tokens:
                if tail := seqs[i].finish("stop", state.select(r)):
                    yield i, tail
            else:
                fed.append(r)
        keep(fed)
        if not active:
            break
        tokens = [tokens[r] for r in fed]
        tracker.update(tokens)
        with torch.no_grad():
            feed = torch.tensor(tokens, dtype=torch.long, device=logits.device)[:, None]
            logits, state = model(feed, state, last=True)

        running = []
        for r, (i, token) in enumerate(zip(active, tokens)):
            seq = seqs[i]
            seq.tokens.append(token)
            text, stopped = seq.stream.push(token)
            if text:
                seq.text.append(text)
                yield i, text
            if stopped or len(seq.tokens) >= seq.params.max_tokens:
                if tail := seq.finish("stop" if stopped else "length", state.select(r)):
                    yield i, tail
            else:
                running.append(r)
        keep(running)


def generate(model: RWKV7, tokenizer: Tokenizer, prompt: str | Sequence[int], params: SamplingParams,
             state: State | None = None, prefill_chunk: int = 1024) -> Generation:
    """Stream a completion of `prompt` (text or token ids), continuing from `state` (None = zeros).

    Returns a Generation: iterate it for text pieces, then read ``.result``. The passed-in state is
    not modified. The prompt is prefilled lazily, on the first ``next()``.
    """
    ids = _prompt_ids(tokenizer, prompt)
    seq = _new_sequence(tokenizer, params, len(ids), model.device)

    def pieces() -> Iterator[tuple[int, str]]:
        logits, final = _prefill(model, ids, state, prefill_chunk)
        yield from _decode_loop(model, tokenizer, logits, final, [seq])

    return Generation(pieces(), seq)


def generate_text(model: RWKV7, tokenizer: Tokenizer, prompt: str | Sequence[int], params: SamplingParams,
                  state: State | None = None, prefill_chunk: int = 1024) -> str:
    """The completion of `prompt` as one string (see :func:`generate`)."""
    return generate(model, tokenizer, prompt, params, state, prefill_chunk).run().text


def generate_batch(model: RWKV7, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]],
                   params: SamplingParams | Sequence[SamplingParams], states: Sequence[State | None] | None = None,
                   prefill_chunk: int = 1024) -> list[GenerationResult]:
    """Complete several prompts together, one batched ``[B, 1]`` forward per decode step.

    Each prompt is prefilled on its own (from its entry of `states`, None = zeros), then the states
    are stacked and decoded as one batch; finished sequences leave the batch. `params` is shared or
    one per prompt; each sequence has its own penalties and, with a seed, its own generator, so its
    output does not depend on the other prompts (up to float rounding of the batched forward).
    """
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    slist = [None] * len(prompts) if states is None else list(states)
    if len(plist) != len(prompts) or len(slist) != len(prompts):
        raise ValueError(f"expected {len(prompts)} params and states (one per prompt), "
                         f"got {len(plist)} and {len(slist)}")
    if not prompts:
        return []
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    seqs = [_new_sequence(tokenizer, p, len(i), model.device) for p, i in zip(plist, ids)]
    prefilled = [_prefill(model, i, s, prefill_chunk) for i, s in zip(ids, slist)]
    logits = torch.cat([lg for lg, _ in prefilled])
    state = State.stack([s for _, s in prefilled])
    for _ in _decode_loop(model, tokenizer, logits, state, seqs):
        pass
    return [s.result for s in seqs]
