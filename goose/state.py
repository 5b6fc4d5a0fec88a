"""The recurrent state of an RWKV model: what replaces a KV cache, and its whole API.

Per layer the state holds the last token's ln1 output (time-mix token shift), the WKV state (fp32),
and the last token's ln2 output (channel-mix token shift). For RWKV-7 the WKV state is ``[H, N, N]``
matrices in the official orientation (row = value index, column = key index); the older versions of
goose.legacy use the same fields with their own official WKV layout: RWKV-5/6 ``[H, N, N]`` (row = key
index), RWKV-4 ``[3, A]`` (numerator, denominator, max exponent). Layers are stacked so batches can be
formed and split with one tensor operation each.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch
from torch import Tensor

_FORMAT = "goose.state.v1"


@dataclass
class State:
    """``att_shift``/``ffn_shift``: ``[L, B, C]`` in the model dtype; ``wkv``: ``[L, B, H, N, N]`` fp32
    (RWKV-4: ``[L, B, 3, A]``)."""

    att_shift: Tensor
    wkv: Tensor
    ffn_shift: Tensor

    @classmethod
    def zeros(cls, n_layer: int, n_embd: int, n_head: int, head_size: int, batch_size: int = 1,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> State:
        shift = torch.zeros(n_layer, batch_size, n_embd, device=device, dtype=dtype)
        wkv = torch.zeros(n_layer, batch_size, n_head, head_size, head_size, device=device, dtype=torch.float32)
        return cls(shift, wkv, shift.clone())

    @property
    def batch_size(self) -> int:
        return self.wkv.shape[1]

    @property
    def n_layer(self) -> int:
        return self.wkv.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        return {"att_shift": self.att_shift, "wkv": self.wkv, "ffn_shift": self.ffn_shift}

    def clone(self) -> State:
        return State(**{k: t.clone() for k, t in self.tensors().items()})

    def detach(self) -> State:
        return State(**{k: t.detach() for k, t in self.tensors().items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> State:
        """Move to a device; ``dtype`` changes the token-shift vectors only (WKV stays fp32)."""
        return State(self.att_shift.to(device=device, dtype=dtype), self.wkv.to(device=device),
                     self.ffn_shift.to(device=device, dtype=dtype))

    def copy_(self, other: State) -> State:
        """Overwrite this state's tensors in place (the explicit opt-in to mutation)."""
        for mine, theirs in zip(self.tensors().values(), other.tensors().values()):
            mine.copy_(theirs)
        return self

    @classmethod
    def stack(cls, states: Sequence[State]) -> State:
        """Concatenate states along the batch dimension (each may itself hold a batch)."""
        if not states:
            raise ValueError("State.stack needs at least one state")
        shapes = {(s.wkv.shape[0],) + tuple(s.wkv.shape[2:]) for s in states}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack states of different models: {sorted(shapes)}")
        return cls(*(torch.cat([s.tensors()[k] for s in states], dim=1)
                     for k in ("att_shift", "wkv", "ffn_shift")))

    def select(self, index: int | Sequence[int] | Tensor) -> State:
        """The batch rows in ``index`` (an int keeps a batch of one)."""
        if isinstance(index, int):
            index = [index]
        idx = torch.as_tensor(index, dtype=torch.long, device=self.wkv.device)
        return State(**{k: t.index_select(1, idx) for k, t in self.tensors().items()})

    def split(self) -> list[State]:
        """One batch-1 state per row."""
        return [self.select(i) for i in range(self.batch_size)]

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (atomically: a crash never leaves a partial file behind)."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        meta = {"format": _FORMAT, "shape": json.dumps(list(self.wkv.shape))}
        save_file({k: t.detach().contiguous().cpu() for k, t in self.tensors().items()}, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> State:
        """Read a file written by :meth:`save`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"state file not found: {path}")
        try:
            tensors = load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable goose state file: {e}") from e
        missing = {"att_shift", "wkv", "ffn_shift"} - tensors.keys()
        if missing:
            raise ValueError(f"{path} is not a goose state file (missing {sorted(missing)})")
        # load_file maps the file: copies, so that a later write to the file cannot reach this state
        return cls(tensors["att_shift"].clone(), tensors["wkv"].clone(), tensors["ffn_shift"].clone())

    def to_official(self, row: int = 0) -> list[Tensor]:
        """The ``rwkv`` pip package's state list for one batch row: ``[x_att, wkv, x_ffn] * L``
        (RWKV-4: ``[x_att, aa, bb, pp, x_ffn] * L``)."""
        out: list[Tensor] = []
        for i in range(self.n_layer):
            wkv = list(self.wkv[i, row].clone().unbind(0)) if self.wkv.dim() == 4 else [self.wkv[i, row].clone()]
            out += [self.att_shift[i, row].clone(), *wkv, self.ffn_shift[i, row].clone()]
        return out

    @classmethod
    def from_official(cls, tensors: Sequence[Tensor]) -> State:
        """Inverse of :meth:`to_official` (a batch of one); an RWKV-4 list is told by its vector WKV parts."""
        per_layer = 5 if tensors[1].dim() == 1 else 3
        layers = [tensors[i:i + per_layer] for i in range(0, len(tensors), per_layer)]
        att = torch.stack([layer[0] for layer in layers]).unsqueeze(1)
        wkv = torch.stack([torch.stack(list(layer[1:-1])) if per_layer == 5 else layer[1]
                           for layer in layers]).unsqueeze(1).float()
        ffn = torch.stack([layer[-1] for layer in layers]).unsqueeze(1)
        return cls(att, wkv, ffn)


AnyState = TypeVar("AnyState")


def starting_state(tokens: Tensor, state: AnyState | None, new_state: Callable[[int], AnyState]) -> AnyState:
    """The state a forward pass over ``tokens [B, T]`` starts from: ``state``, or ``new_state(B)`` when None.

    Every model's forward checks its input the same way: 2-D tokens with T >= 1, a state of the same batch.
    """
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be [B, T] with T >= 1, got shape {tuple(tokens.shape)}")
    B = tokens.shape[0]
    if state is None:
        return new_state(B)
    if state.batch_size != B:
        raise ValueError(f"state holds a batch of {state.batch_size}, tokens a batch of {B}")
    return state
