"""From-scratch initialisation of RWKV-7, as RWKV-LM's x070 trainer does it (RWKV7_SPEC.md §3.1).

RWKV-LM initialises in two places: ``RWKV_Tmix_x070.__init__`` sets the per-channel vectors and the
LoRA matrices, then ``generate_init_weight`` overwrites every 2-D ``*.weight`` (orthogonal with a
per-matrix gain, zero for the output projections, tiny uniform for the embedding). This module
produces the result of both in one pass over the parameters. Values follow the version since
RWKV-LM commit b3b4d056 (zigzag w0/a0, v0 = 0.73 - 0.4 linear, k_k = 0.71 - 0.1 linear, ...).

With l = layer id, L = layers, C = n_embd, N = head size, n = channel index:
``ratio_0_to_1 = l / (L - 1)``, ``ratio_1_to_almost0 = 1 - l / L``, ``ddd = n / C``,
``linear = n / (C - 1) - 0.5``, ``z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)``, ``zigzag = z |z|``.
RWKV-LM divides by ``L - 1``, which fails for one layer; here a single layer counts as the first
(``ratio_0_to_1 = 0``), which is what ``ratio_1_to_almost0 = 1`` already says about it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..model import RWKV7, ModelConfig

# orthogonal gains of generate_init_weight's 2-D weights; 0 means zeros
MATRIX_GAINS = {"att.receptance.weight": 1.0, "att.key.weight": 0.1, "att.value.weight": 1.0,
                "att.output.weight": 0.0, "ffn.key.weight": 1.0, "ffn.value.weight": 0.0}
MIX_POWERS = {"att.x_r": 0.2, "att.x_w": 0.9, "att.x_k": 0.7, "att.x_v": 0.7, "att.x_a": 0.9, "att.x_g": 0.2}
LORA_UP = ("att.w2", "att.a2", "att.v2", "att.g2")      # orthogonal, gain 0.1
LORA_DOWN = ("att.w1", "att.a1", "att.v1", "att.g1")    # zeros


def lora_ranks(n_embd: int) -> tuple[int, int, int, int]:
    """RWKV-LM x070's suggested LoRA ranks (w, a, v, g): ``max(32, round(s * sqrt(C) / 32) * 32)``.

    The scales are 2.5, 2.5, 1.7 and 5, as in ``train_temp/src/model.py``; for C = 768 this gives
    the released models' 64, 64, 32, 128.
    """
    def rank(scale: float) -> int:
        return max(32, round(scale * math.sqrt(n_embd) / 32) * 32)
    return rank(2.5), rank(2.5), rank(1.7), rank(5.0)


def model_config(n_layer: int, n_embd: int, vocab_size: int, head_size: int = 64) -> ModelConfig:
    """A ModelConfig for a new model, with RWKV-LM's LoRA ranks for this width."""
    w, a, v, g = lora_ranks(n_embd)
    return ModelConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, head_size=head_size,
                       rank_w=w, rank_a=a, rank_v=v, rank_g=g)


def _orthogonal(shape: torch.Size, gain: float, generator: torch.Generator | None) -> Tensor:
    return nn.init.orthogonal_(torch.empty(shape), gain=gain, generator=generator)


def _layer_vectors(cfg: ModelConfig, layer: int) -> dict[str, Tensor]:
    """The deterministic per-channel values of block ``layer``, keyed by name inside the block."""
    L, C, N, H = cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.n_head
    ratio_0_to_1 = layer / (L - 1) if L > 1 else 0.0
    ratio_1_to_almost0 = 1.0 - layer / L
    n = torch.arange(C, dtype=torch.float64)
    ddd = n / C
    linear = n / (C - 1) - 0.5
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = z * z.abs()
    www = -6 + 6 * (n / (C - 1)) ** (1 + ratio_0_to_1 ** 0.3)

    values = {name: 1 - ddd ** (power * ratio_1_to_almost0) for name, power in MIX_POWERS.items()}
    values.update({
        "att.w0": www + 0.5 + 2.5 * zigzag,          # the 0.5 comes from F.softplus (RWKV-LM's comment)
        "att.a0": -0.19 + 0.3 * zigzag + 0.4 * linear,
        "att.v0": 0.73 - 0.4 * linear,
        "att.k_k": 0.71 - 0.1 * linear,
        "att.k_a": torch.full((C,), 1.02, dtype=torch.float64),
        "att.r_k": torch.full((H, N), -0.04, dtype=torch.float64),
        "att.ln_x.weight": torch.full((C,), ((1 + layer) / L) ** 0.7, dtype=torch.float64),
        "ffn.x_k": 1 - ddd ** (ratio_1_to_almost0 ** 4),
    })
    return values


def _initial_value(name: str, shape: torch.Size, cfg: ModelConfig, vectors: dict[str, Tensor],
                   generator: torch.Generator | None) -> Tensor:
    """The initial value of parameter ``name``; ``vectors`` are ``_layer_vectors`` of its block."""
    C, V = cfg.n_embd, cfg.vocab_size
    if name == "emb.weight":
        return nn.init.uniform_(torch.empty(shape), -1e-4, 1e-4, generator=generator)
    if name == "head.weight":
        return _orthogonal(shape, 0.5 * math.sqrt(V / C) if V > C else 0.5, generator)
    key = name.split(".", 2)[2] if name.startswith("blocks.") else name   # "att.x_r", "ln1.weight", ...
    if key in vectors:
        return vectors[key].reshape(shape)
    if key in MATRIX_GAINS:
        gain = MATRIX_GAINS[key]
        return _orthogonal(shape, gain, generator) if gain else torch.zeros(shape)
    if key in LORA_UP:   # RWKV-LM's ortho_init: an extra sqrt(rows/cols) when rows > cols
        rows, cols = shape
        return _orthogonal(shape, 0.1 * (math.sqrt(rows / cols) if rows > cols else 1.0), generator)
    if key in LORA_DOWN or key.endswith(".bias"):  # LoRA down-projections; LayerNorm / GroupNorm biases
        return torch.zeros(shape)
    if key.endswith(".weight") and key.split(".")[-2] in ("ln0", "ln1", "ln2", "ln_out"):
        return torch.ones(shape)
    raise ValueError(f"no initialisation rule for parameter {name!r} of shape {tuple(shape)}")


@torch.no_grad()
def init_weights(model: RWKV7, generator: torch.Generator | None = None) -> None:
    """Overwrite every parameter of ``model`` with RWKV-LM's x070 initial value, in place.

    Random draws (orthogonal matrices, the embedding) use ``generator`` (CPU; default: torch's
    global RNG) and are made on the CPU, so a seed gives the same weights on every device.
    """
    cfg = model.config
    if cfg.head_size < 2:
        raise ValueError(f"the x070 initialisation needs head_size >= 2, got {cfg.head_size}")
    for name, p in model.named_parameters():
        vectors = _layer_vectors(cfg, int(name.split(".")[1])) if name.startswith("blocks.") else {}
        p.copy_(_initial_value(name, p.shape, cfg, vectors, generator))


def new_model(cfg: ModelConfig, seed: int = 0, device: torch.device | str = "cpu") -> RWKV7:
    """A freshly initialised fp32 model; the same ``seed`` gives the same weights on any device."""
    with torch.device("meta"):  # skip nn.Linear's default init: every value is overwritten anyway
        model = RWKV7(cfg)
    model.to_empty(device=device)
    init_weights(model, torch.Generator().manual_seed(seed))
    return model
