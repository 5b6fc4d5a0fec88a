"""Supervised fine-tuning on chat data: ``{"messages": [...]}`` jsonl, loss only on assistant tokens.

Conversations are rendered once with the chat template of :mod:`goose.tokenizer` (the same one
generation uses), padded on the right (harmless for a causal RNN: padding comes after every real
token) and masked, so padding and user/system text never contribute to the loss.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tokenizer import Tokenizer, render_chat_ids
from .dist import Dist

SftBatch = tuple[Tensor, Tensor, Tensor]


def load_conversations(path: str | Path, tokenizer: Tokenizer, ctx_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) per jsonl line, truncated to ``ctx_len + 1`` tokens; errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat data not found: {path}")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ids, mask = render_chat_ids(record["messages"], tokenizer)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{number}: not a chat record {{\"messages\": [...]}}: {e}") from e
        if sum(mask) == 0:
            raise ValueError(f"{path}:{number}: conversation has no assistant reply to learn from")
        out.append((ids[:ctx_len + 1], mask[:ctx_len + 1]))
    if not out:
        raise ValueError(f"{path} holds no conversations")
    return out


class ChatBatches:
    """Random micro-batches of conversations, padded to the longest; the last ``val_fraction`` of the
    file (at least one conversation when there are two or more) is held out for validation."""

    def __init__(self, conversations: list[tuple[list[int], list[int]]], micro_batch: int,
                 d: Dist, seed: int = 0, val_fraction: float = 0.05):
        n_val = max(1, round(len(conversations) * val_fraction)) if len(conversations) > 1 else 0
        self.train_set = conversations[:len(conversations) - n_val]
        self.val_set = conversations[len(conversations) - n_val:] or self.train_set
        self.micro_batch, self.d, self.seed = micro_batch, d, seed
        self.generator = torch.Generator().manual_seed(seed)

    def _collate(self, rows: list[tuple[list[int], list[int]]]) -> SftBatch:
        T = max(len(ids) for ids, _ in rows) - 1
        x = torch.zeros(len(rows), T, dtype=torch.long)
        y = torch.zeros(len(rows), T, dtype=torch.long)
        m = torch.zeros(len(rows), T)
        for i, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            x[i, :n] = torch.tensor(ids[:-1])
            y[i, :n] = torch.tensor(ids[1:])
            m[i, :n] = torch.tensor(mask[1:], dtype=torch.float32)
        device = self.d.device
        return x.to(device), y.to(device), m.to(device)

    def next(self) -> SftBatch:
        idx = torch.randint(len(self.train_set), (self.micro_batch,), generator=self.generator)
        return self._collate([self.train_set[i] for i in idx.tolist()])

    def validation(self, n_batches: int) -> Iterator[SftBatch]:
        for start in range(0, min(len(self.val_set), n_batches * self.micro_batch), self.micro_batch):
            yield self._collate(self.val_set[start:start + self.micro_batch])

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])


def sft_loss(model: nn.Module, batch: SftBatch) -> Tensor:
    """Cross-entropy averaged over the assistant tokens of the batch only."""
    x, y, mask = batch
    logits, _ = model(x)
    losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
    return (losses * mask.flatten()).sum() / mask.sum().clamp(min=1)
