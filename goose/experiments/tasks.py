"""Synthetic tasks for the architecture experiments: group word problems, MQAR, parity and mod-m counting.

Every sampler returns ``(inputs [B, T], labels [B, T])`` as int64 tensors; a label of ``IGNORE`` (-100)
marks a position that is not scored, as in ``F.cross_entropy(..., ignore_index=-100)``. Data is drawn
fresh for every batch from a ``torch.Generator``, so runs are reproducible and never see a finite
training set twice (the group tasks have 60^k or more distinct inputs, far beyond any CPU budget).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

IGNORE = -100
GROUPS = ("Z60", "A4xZ5", "A5", "S5")
WORD_PROBLEMS = GROUPS + ("S5-swaps",)   # S5-swaps: S5 words written with the 10 transpositions only


@dataclass(frozen=True)
class Group:
    """A finite group as its multiplication table: ``table[i, j]`` is the index of ``elements[i] * elements[j]``.

    Permutations multiply as functions composed left to right: ``(p * q)[x] = q[p[x]]`` (apply p, then q),
    so the prefix product ``x_1 * ... * x_t`` is the state of a machine that reads the word left to right.
    """

    name: str
    elements: tuple[tuple[int, ...], ...]
    table: np.ndarray

    @property
    def order(self) -> int:
        return len(self.elements)

    @property
    def identity(self) -> int:
        return int(np.flatnonzero((self.table == np.arange(self.order)).all(axis=1))[0])

    @property
    def inverse(self) -> np.ndarray:
        """``inverse[i]`` is the index of the inverse of element i."""
        return np.argmax(self.table == self.identity, axis=1)


def _permutation_group(name: str, perms: list[tuple[int, ...]]) -> Group:
    index = {p: i for i, p in enumerate(perms)}
    table = np.array([[index[tuple(q[x] for x in p)] for q in perms] for p in perms], dtype=np.int64)
    return Group(name, tuple(perms), table)


def _is_even(p: tuple[int, ...]) -> bool:
    inversions = sum(p[i] > p[j] for i in range(len(p)) for j in range(i + 1, len(p)))
    return inversions % 2 == 0


def symmetric(n: int) -> Group:
    """S_n: all permutations of n points (identity first)."""
    return _permutation_group(f"S{n}", list(itertools.permutations(range(n))))


def alternating(n: int) -> Group:
    """A_n: the even permutations of n points."""
    return _permutation_group(f"A{n}", [p for p in itertools.permutations(range(n)) if _is_even(p)])


def cyclic(n: int) -> Group:
    """Z_n: addition modulo n."""
    idx = np.arange(n)
    return Group(f"Z{n}", tuple((i,) for i in range(n)), (idx[:, None] + idx[None, :]) % n)


def direct_product(g: Group, h: Group) -> Group:
    """G x H with componentwise multiplication; element (i, j) has index ``i * |H| + j``."""
    elements = tuple(a + b for a in g.elements for b in h.elements)
    table = (g.table[:, None, :, None] * h.order + h.table[None, :, None, :]).reshape(g.order * h.order, -1)
    return Group(f"{g.name}x{h.name}", elements, table)


def get_group(name: str) -> Group:
    """One of ``GROUPS``: Z60 (abelian), A4xZ5 (solvable, non-abelian), A5 (non-solvable), S5."""
    makers = {"Z60": lambda: cyclic(60), "A4xZ5": lambda: direct_product(alternating(4), cyclic(5)),
              "A5": lambda: alternating(5), "S5": lambda: symmetric(5)}
    if name not in makers:
        raise ValueError(f"unknown group {name!r}; expected one of {GROUPS}")
    return makers[name]()


def transpositions(group: Group) -> list[int]:
    """Indices of the elements that swap exactly two points (the "swap" alphabet of S_n)."""
    return [i for i, p in enumerate(group.elements) if sum(x != y for x, y in enumerate(p)) == 2]


def word_problem(name: str) -> tuple[Group, list[int] | None]:
    """The group and input alphabet (None: every element) of one of ``WORD_PROBLEMS``."""
    if name == "S5-swaps":
        s5 = symmetric(5)
        return s5, transpositions(s5)
    return get_group(name), None


def prefix_products(group: Group, words: Tensor) -> Tensor:
    """``out[:, t] = words[:, 0] * ... * words[:, t]`` for element indices ``words [B, T]``."""
    table = torch.as_tensor(group.table, device=words.device)
    acc = words[:, 0]
    out = [acc]
    for t in range(1, words.shape[1]):
        acc = table[acc, words[:, t]]
        out.append(acc)
    return torch.stack(out, dim=1)


def word_problem_batch(group: Group, batch_size: int, length: int, gen: torch.Generator,
                       alphabet: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """Merrill et al.'s tagged word problem: uniform random elements in, the prefix product at every position out.

    ``alphabet`` restricts the inputs (e.g. ``transpositions(S5)``); the label space is the whole group.
    """
    letters = torch.arange(group.order) if alphabet is None else torch.as_tensor(alphabet)
    words = letters[torch.randint(len(letters), (batch_size, length), generator=gen)]
    return words, prefix_products(group, words)


def mqar_batch(batch_size: int, seq_len: int, num_kv: int, vocab_size: int, gen: torch.Generator,
               power_a: float = 0.01) -> tuple[Tensor, Tensor]:
    """Zoology's multi-query associative recall.

    The sequence opens with ``num_kv`` pairs ``k_1 v_1 ... k_n v_n`` (distinct keys from the lower half of
    the vocabulary, distinct values from the upper half, key 0 excluded). In the rest, each key is asked
    once, at an even offset whose gap from the start of the query region follows the power law
    ``p(gap = i) ~ (i + 1)^(power_a - 1)`` (small gaps likely); the label at a query is its value. All other
    positions hold uniformly random tokens and are not scored.
    """
    context = 2 * num_kv
    space = (seq_len - context) // 2
    half = vocab_size // 2
    if num_kv > min(space, half - 1):
        raise ValueError(f"{num_kv} pairs do not fit in length {seq_len} with vocabulary {vocab_size}")
    B = batch_size
    keys = 1 + torch.rand(B, half - 1, generator=gen).argsort(dim=1)[:, :num_kv]   # distinct, in 1..half-1
    values = half + torch.rand(B, vocab_size - half, generator=gen).argsort(dim=1)[:, :num_kv]
    weights = torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(weights.expand(B, space), num_kv, replacement=False, generator=gen)

    inputs = torch.randint(vocab_size, (B, seq_len), generator=gen)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    query_pos = context + 2 * gaps
    inputs.scatter_(1, query_pos, keys)
    labels = torch.full((B, seq_len), IGNORE, dtype=torch.int64)
    labels.scatter_(1, query_pos, values)
    return inputs, labels


def counting_batch(batch_size: int, length: int, modulus: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random bits in, the number of ones so far modulo ``modulus`` out (parity for 2) at every position."""
    bits = torch.randint(2, (batch_size, length), generator=gen)
    return bits, bits.cumsum(dim=1) % modulus
