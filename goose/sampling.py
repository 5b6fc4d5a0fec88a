"""Token sampling: top-p / top-k / min-p filtering, temperature, repetition penalties.

Semantics follow the official `rwkv` pip package (`rwkv.utils.PIPELINE`, RWKV7_SPEC.md §5):

* ``temperature == 0`` is greedy (``argmax`` of the penalised logits; the lowest id wins a tie, where
  the official code samples among tied maxima).
* ``probs = softmax(fp32 logits)``. Then three filters, each judged on these same unfiltered probs; a
  token survives only if every enabled filter keeps it:

  - top-p: sort descending, take the first index where the cumulative sum reaches ``top_p``; tokens
    below the prob at that index are dropped (ties with it are kept). The mass is measured over the
    full distribution, as in the official code, not renormalised after another filter.
  - top-k: keep the ``top_k`` most probable tokens (ties broken by the lower id).
  - min-p: drop tokens whose prob is below ``min_p * max(probs)``.

  Each filter keeps a prefix of the tokens sorted by probability, so this is the official order
  (top-p, then top-k) followed by min-p.
* Temperature is applied after filtering, as ``probs ** (1 / T)`` renormalised over the kept tokens
  (computed as ``softmax(logits / T)`` on the kept set, which is the same distribution without
  underflow for small T).

Two fixes against the official code: ``top_p >= 1`` disables top-p filtering (the official fp32
cumulative sum can end below 1.0 and then keeps only the top token), and the cumulative sum is taken
in float64 (float32 on MPS, which has no float64).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# Tokens whose decoded text is a substring of this are recorded by the penalty tracker with weight 0
# (they still get the presence penalty once seen), as in the official PIPELINE.generate.
PENALTY_FREE_TEXT = " \t0123456789"


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence sampling and stopping settings (defaults = official PIPELINE_ARGS).

    presence_penalty / frequency_penalty / penalty_decay are the official alpha_presence /
    alpha_frequency / alpha_decay. stop_tokens end generation without being emitted; stop_strings end
    it when the decoded text contains one (the stop string itself is not emitted). max_tokens caps the
    number of generated tokens. seed makes sampling reproducible (None = torch's global generator).
    """

    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.2
    frequency_penalty: float = 0.2
    penalty_decay: float = 0.996
    token_ban: tuple[int, ...] = ()
    stop_tokens: tuple[int, ...] = (0,)
    stop_strings: tuple[str, ...] = ()
    max_tokens: int = 256
    seed: int | None = None

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ValueError(f"SamplingParams.{name}: expected {expected}, got {getattr(self, name)!r}")

        def finite(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def integer(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        check("temperature", finite(self.temperature) and self.temperature >= 0, "a finite float >= 0")
        check("top_p", finite(self.top_p) and 0 <= self.top_p <= 1, "a float in [0, 1]")
        check("top_k", integer(self.top_k) and self.top_k >= 0, "an int >= 0 (0 = off)")
        check("min_p", finite(self.min_p) and 0 <= self.min_p <= 1, "a float in [0, 1]")
        check("presence_penalty", finite(self.presence_penalty), "a finite float")
        check("frequency_penalty", finite(self.frequency_penalty), "a finite float")
        check("penalty_decay", finite(self.penalty_decay) and 0 <= self.penalty_decay <= 1, "a float in [0, 1]")
        check("max_tokens", integer(self.max_tokens) and self.max_tokens >= 0, "an int >= 0")
        check("seed", self.seed is None or integer(self.seed), "None or an int")
        for name in ("token_ban", "stop_tokens", "stop_strings"):
            value = getattr(self, name)
            check(name, isinstance(value, (list, tuple)), "a tuple or list")
            object.__setattr__(self, name, tuple(value))
        check("token_ban", all(integer(t) and t >= 0 for t in self.token_ban), "token ids >= 0")
        check("stop_tokens", all(integer(t) and t >= 0 for t in self.stop_tokens), "token ids >= 0")
        check("stop_strings", all(isinstance(s, str) and s for s in self.stop_strings), "non-empty strings")


ParamsArg = SamplingParams | Sequence[SamplingParams]
GeneratorArg = torch.Generator | Sequence[torch.Generator | None] | None


def _params_list(params: ParamsArg, batch_size: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * batch_size
    params = list(params)
    if len(params) != batch_size:
        raise ValueError(f"expected one SamplingParams per row ({batch_size}), got {len(params)}")
    if not all(isinstance(p, SamplingParams) for p in params):
        raise TypeError("expected SamplingParams objects")
    return params


def _as_2d(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() == 1:
        return logits[None]
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape [V] or [B, V], got {tuple(logits.shape)}")
    return logits


def _filter_mask(probs: torch.Tensor, plist: list[SamplingParams]) -> torch.Tensor:
    """Bool mask [B, V] of the tokens kept by top-p, top-k and min-p (see the module docstring)."""
    B, V = probs.shape
    dev = probs.device
    keep = probs > 0
    min_p = torch.tensor([p.min_p for p in plist], device=dev)
    if bool((min_p > 0).any()):
        keep &= probs >= min_p[:, None] * probs.amax(-1, keepdim=True)
    if all(p.top_p >= 1 and p.top_k == 0 for p in plist):
        return keep
    acc = torch.float32 if dev.type == "mps" else torch.float64
    top_p = torch.tensor([p.top_p for p in plist], device=dev, dtype=acc)[:, None]
    top_k = torch.tensor([p.top_k for p in plist], device=dev)[:, None]
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    cum = sorted_p.to(acc).cumsum(-1)
    # cum is non-decreasing, so counting entries below top_p gives the first index reaching it; if
    # rounding leaves the total below top_p, keep everything (clamp) instead of only the top token.
    first = (cum < top_p).sum(-1, keepdim=True).clamp_(max=V - 1)
    cutoff = sorted_p.gather(-1, first).masked_fill(top_p >= 1, 0.0)
    keep &= probs >= cutoff
    rank_ok = (torch.arange(V, device=dev) < top_k) | (top_k == 0)
    return keep & torch.zeros_like(keep).scatter_(-1, order, rank_ok)


def sampling_probs(logits: torch.Tensor, params: ParamsArg) -> torch.Tensor:
    """The distribution `sample` draws from: float32 [B, V] (or [V]) rows summing to 1.

    logits: [B, V] or [V], already penalised (see PenaltyTracker). Greedy rows are one-hot.
    """
    x = _as_2d(logits).float()
    plist = _params_list(params, x.shape[0])
    temperature = torch.tensor([p.temperature for p in plist], device=x.device)[:, None]
    greedy = temperature == 0
    keep = _filter_mask(torch.softmax(x, -1), plist)
    scaled = (x / temperature.masked_fill(greedy, 1.0)).masked_fill(~keep, -math.inf)
    probs = torch.softmax(scaled, -1)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy, onehot, probs)
    return probs if logits.dim() == 2 else probs[0]


def sample(logits: torch.Tensor, params: ParamsArg, generator: GeneratorArg = None) -> torch.Tensor:
    """Sample one token per row. Returns LongTensor [B] (a 0-d tensor for [V] logits).

    params: one SamplingParams for every row, or one per row. generator: None (torch's global RNG),
    one torch.Generator for the whole batch, or one per row (None entries use the global RNG). With
    one generator per row a row's tokens do not depend on the other rows of the batch; greedy rows
    draw no random numbers. The draw is an exponential race, argmax(probs / E) with E ~ Exp(1), which
    picks token i with probability probs[i].
    """
    x = _as_2d(logits)
    B, V = x.shape
    plist = _params_list(params, B)
    greedy = [p.temperature == 0 for p in plist]
    if all(greedy):
        tokens = x.argmax(-1)
    else:
        probs = sampling_probs(x, plist)
        if isinstance(generator, (list, tuple)):
            if len(generator) != B:
                raise ValueError(f"expected one generator per row ({B}), got {len(generator)}")
            noise = torch.stack([
                torch.ones(V, device=x.device) if g_row else torch.empty(V, device=x.device).exponential_(generator=g)
                for g_row, g in zip(greedy, generator)
            ])
        else:
            noise = torch.empty_like(probs).exponential_(generator=generator)
        tokens = (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(-1)
    return tokens if logits.dim() == 2 else tokens[0]


class PenaltyTracker:
    """Repetition penalties with decay for a batch of sequences, as dense [B, V] tensors.

    Official semantics: ``apply`` sets banned logits to -inf and subtracts
    ``presence + occurrence[n] * frequency`` from every token n generated so far; ``update`` (after
    sampling) first multiplies all occurrences by ``penalty_decay``, then adds 1 to the new token's
    occurrence, or 0 if its decoded text is a substring of ``PENALTY_FREE_TEXT`` (spaces, tabs,
    digits). A weight-0 token is still marked as seen, so the presence penalty applies to it. A token
    that decodes to "" (e.g. a lone UTF-8 fragment, if the tokenizer drops it) counts with weight 1,
    as the official decoder returns "\\ufffd" for it. Prompt tokens are not tracked.
    """

    def __init__(
        self,
        params: ParamsArg,
        vocab_size: int,
        decode: Callable[[list[int]], str],
        device: torch.device | str | None = None,
        batch_size: int = 1,
    ) -> None:
        """params: one SamplingParams (shared by batch_size rows) or one per row.
        decode: token ids -> text (e.g. ``tokenizer.decode``), used for the whitespace/digit rule."""
        plist = _params_list(params, batch_size if isinstance(params, SamplingParams) else len(params))
        B = len(plist)
        self.occurrence = torch.zeros(B, vocab_size, device=device)
        self.seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        self.banned = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        for row, p in enumerate(plist):
            bad = [t for t in p.token_ban if t >= vocab_size]
            if bad:
                raise ValueError(f"token_ban: expected ids < vocab_size ({vocab_size}), got {bad}")
            self.banned[row, list(p.token_ban)] = True
        self.presence = torch.tensor([[p.presence_penalty] for p in plist], device=device)
        self.frequency = torch.tensor([[p.frequency_penalty] for p in plist], device=device)
        self.decay = torch.tensor([[p.penalty_decay] for p in plist], device=device)
        self._decode = decode
        self._weights: dict[int, float] = {}

    @property
    def batch_size(self) -> int:
        return self.occurrence.shape[0]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Return penalised float32 logits [B, V] (a new tensor; the input is not modified)."""
        x = logits.float().masked_fill(self.banned, -math.inf)
        return x - self.seen * (self.presence + self.occurrence * self.frequency)

    def update(self, tokens: torch.Tensor | Sequence[int]) -> None:
        """Record one sampled token per row (LongTensor [B] or list of B ids)."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if len(ids) != self.batch_size:
            raise ValueError(f"expected {self.batch_size} tokens, got {len(ids)}")
        rows = torch.arange(self.batch_size, device=self.occurrence.device)
        cols = torch.tensor(ids, device=self.occurrence.device)
        weights = torch.tensor([self.weight(t) for t in ids], device=self.occurrence.device)
        self.occurrence.mul_(self.decay)
        self.occurrence[rows, cols] += weights
        self.seen[rows, cols] = True

    def weight(self, token: int) -> float:
        """Occurrence increment for `token`: 0.0 for whitespace/digit tokens, else 1.0 (cached)."""
        w = self._weights.get(token)
        if w is None:
            text = self._decode([token])
            w = 0.0 if text and text in PENALTY_FREE_TEXT else 1.0
            self._weights[token] = w
        return w

    def select(self, indices: Sequence[int] | torch.Tensor) -> PenaltyTracker:
        """A tracker holding only the given rows (in that order), e.g. after sequences finish."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.occurrence.device)
        out = copy.copy(self)
        for name in ("occurrence", "seen", "banned", "presence", "frequency", "decay"):
            setattr(out, name, getattr(self, name)[idx])
        return out
