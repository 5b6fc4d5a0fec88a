"""State tuning: train only the initial WKV state of each layer, with the model frozen.

The learned state is a prompt the model never has to read: exported as a batch-1 :class:`State`
file, ``goose generate/chat --state FILE`` starts from it.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..model import RWKV7
from ..state import State


class TunableState(nn.Module):
    """A learnable ``[L, 1, H, N, N]`` fp32 WKV state (zeros at first: the untuned model), shared by
    every sequence of a batch; token-shift vectors start at zero as in a fresh state."""

    def __init__(self, model: RWKV7, initial: State | None = None):
        super().__init__()
        start = model.new_state(1) if initial is None else initial
        if start.batch_size != 1:
            raise ValueError(f"the initial state must hold one sequence, got {start.batch_size}")
        self.wkv = nn.Parameter(start.wkv.detach().clone().float())
        self.register_buffer("att_shift", start.att_shift.detach().clone())
        self.register_buffer("ffn_shift", start.ffn_shift.detach().clone())

    def expand(self, batch_size: int) -> State:
        """The state for a batch (a view: gradients of every row flow into the one parameter)."""
        L = self.wkv.shape[0]
        return State(self.att_shift.expand(L, batch_size, -1), self.wkv.expand(L, batch_size, -1, -1, -1),
                     self.ffn_shift.expand(L, batch_size, -1))

    def export(self) -> State:
        """A detached batch-1 State, ready for :meth:`State.save`."""
        return State(self.att_shift.clone(), self.wkv.detach().clone(), self.ffn_shift.clone())


class StateTuned(nn.Module):
    """``model`` that starts every sequence from ``tunable`` when no state is passed, so the ordinary
    training losses (next-token, chat SFT) train the state without knowing about it."""

    def __init__(self, model: RWKV7, tunable: TunableState):
        super().__init__()
        self.model, self.tunable = model, tunable

    def forward(self, tokens: Tensor, state: State | None = None, **kwargs) -> tuple[Tensor, State]:
        return self.model(tokens, self.tunable.expand(tokens.shape[0]) if state is None else state, **kwargs)
