"""Checkpoint I/O: official RWKV-LM ``.pth`` and ``.safetensors`` with the same keys.

Loading never runs pickled code (``weights_only=True``), validates every key and shape before a
model is built (so a bad file raises and nothing is half-loaded). RWKV-7 files load into ``RWKV7``,
RWKV-4/5/6 files into the ``goose.legacy`` models; other layouts are named in the error.
"""
from __future__ import annotations

import ctypes
import functools
import os
import pickle
import sys
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .legacy import MODELS as LEGACY_MODELS
from .legacy import NAMES as LEGACY_NAMES
from .legacy import VERSIONS as LEGACY_VERSIONS
from .legacy import LegacyConfig, LegacyRWKV
from .model import ModelConfig, RWKV7

LAYER0_UNUSED = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


class CheckpointError(ValueError):
    """The file is missing, unreadable, not a checkpoint, or not in a layout goose runs."""


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    """Read a ``.pth``/``.safetensors`` file into a dict of CPU tensors, memory-mapped where possible (so they
    are views of the file: copy them before keeping them, as the loaders do)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it contains pickled objects other than tensors, which could run "
            f"arbitrary code ({str(e).splitlines()[0]})") from e
    except Exception as e:  # torch's parser fails on garbage with many types (KeyError, struct.error, ...)
        raise CheckpointError(f"{path} is truncated or corrupt, or not a PyTorch file: {str(e).splitlines()[0]}") from e
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                       for k, v in obj.items()):
        raise CheckpointError(f"{path} is not a checkpoint: expected a flat dict of named tensors, "
                              f"got {type(obj).__name__}")
    return obj


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt, or not a safetensors file: {e}") from e


def detect_version(sd: dict[str, Any]) -> str:
    """Name the architecture a state dict belongs to, as the official ``rwkv`` package tells them apart:
    'x070', 'x060', 'x052', 'x051', 'x050', 'v4', 'hf' (Hugging Face layout), or 'unknown'."""
    keys = set(sd)
    if any(k.startswith(("model.layers.", "model.embeddings.", "model.embed_tokens.")) for k in keys):
        return "hf"
    if "blocks.0.att.r_k" in keys and "blocks.0.att.x_r" in keys:
        return "x070"
    if any(".att.time_maa" in k for k in keys):
        return "x060"
    if "blocks.0.att.ln_x.weight" in keys or "blocks.0.att.time_faaaa" in keys:   # RWKV-5: heads + GroupNorm
        if "blocks.0.att.gate.weight" not in keys:
            return "x050"
        decay = sd.get("blocks.0.att.time_decay")
        per_channel = decay is not None and decay.dim() > 1 and decay.shape[1] > 1
        return "x052" if per_channel else "x051"
    if "blocks.0.att.time_first" in keys:
        return "v4"
    return "unknown"


_VERSION_NAMES = {**LEGACY_NAMES, "hf": "Hugging Face / flash-linear-attention layout"}


def config_from_tensors(sd: dict[str, Tensor], source: str = "state dict") -> ModelConfig:
    """Check that ``sd`` is an RWKV-7 checkpoint and infer its ModelConfig."""
    version = detect_version(sd)
    if version == "x070" and any(".ffn.s_emb" in k for k in sd):
        raise CheckpointError(f"{source} is an RWKV-7a 'DeepEmbed' checkpoint, which goose does not run yet")
    if version in LEGACY_VERSIONS:
        raise CheckpointError(f"{source} is an {_VERSION_NAMES[version]} checkpoint, not RWKV-7 (x070); "
                              f"goose.load runs it as such")
    if version in _VERSION_NAMES:
        raise CheckpointError(f"{source} is in the {_VERSION_NAMES[version]}; goose runs RWKV checkpoints "
                              f"in the RWKV-LM layout")
    if version != "x070":
        raise CheckpointError(f"{source} is not an RWKV checkpoint (no blocks.N.att.* tensors found)")
    try:
        return ModelConfig.from_state_dict(sd)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{source} is an incomplete RWKV-7 checkpoint: {e}") from e


def layout_problems(sd: dict[str, Tensor], model: nn.Module) -> list[str]:
    """What keeps ``sd`` from loading strictly into ``model`` (missing, unexpected, mis-shaped tensors)."""
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    wrong = [f"{k}: expected {expected[k]}, got {tuple(sd[k].shape)}"
             for k in sorted(expected.keys() & sd.keys()) if tuple(sd[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {missing[:4]})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[:4]})")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:4]))
    return problems


def _check_against_model(sd: dict[str, Tensor], cfg: ModelConfig, source: str) -> None:
    with torch.device("meta"):
        problems = layout_problems(sd, RWKV7(cfg))
    if problems:
        raise CheckpointError(f"{source} does not match the RWKV-7 layout it implies ({cfg}): " + ", ".join(problems))


def own_copy(t: Tensor, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` on ``device``, always in new memory (what every loader keeps: files are read
    memory-mapped, see ``load``). Large CPU tensors are asked onto transparent huge pages where Linux
    offers them: decoding reads every weight once per token, and with 2 MB pages it ran 4-10% faster here
    (docs/PERFORMANCE.md)."""
    if torch.device(device).type != "cpu" or t.numel() * dtype.itemsize < 2 * HUGE_PAGE:
        return t.to(device=device, dtype=dtype, copy=True)
    out = torch.empty(t.shape, dtype=dtype)
    _advise_huge_pages(out)           # before the copy touches the pages
    return out.copy_(t)


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _advise_huge_pages(t: Tensor) -> None:
    """madvise(MADV_HUGEPAGE) over the whole 2 MB pages inside ``t``'s memory; a hint, so failures are ignored."""
    libc = _libc()
    start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // HUGE_PAGE * HUGE_PAGE
    if libc is not None and end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)


def load(path: str | Path, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32) -> RWKV7 | LegacyRWKV:
    """Load an official RWKV checkpoint (``.pth`` or ``.safetensors``): RWKV-7 into an :class:`RWKV7`,
    RWKV-4/5/6 into the matching ``goose.legacy`` model (same calling convention).

    Hyper-parameters are inferred from the tensors; weights are cast to ``dtype`` on ``device``, always into
    memory of the model's own (``own_copy``): the file is read memory-mapped, and weights left in the mapping
    (when the dtype already matches) would change if the file were rewritten in place.
    Files with or without the unused ``blocks.0.att.v0/v1/v2`` are accepted.
    """
    sd = dict(read_tensors(path))
    version = detect_version(sd)
    if version in LEGACY_VERSIONS:
        return _load_legacy(sd, version, str(path), device, dtype)
    cfg = config_from_tensors(sd, str(path))
    C = cfg.n_embd
    absent = [k for k in LAYER0_UNUSED if k not in sd]
    if absent:  # layer 0 never reads them; fill so the module layout stays the official one
        shapes = {"blocks.0.att.v0": (1, 1, C), "blocks.0.att.v1": (C, cfg.rank_v), "blocks.0.att.v2": (cfg.rank_v, C)}
        for k in absent:
            sd[k] = torch.zeros(shapes[k])
    _check_against_model(sd, cfg, str(path))
    with torch.device("meta"):
        model = RWKV7(cfg)
    model.load_state_dict({k: own_copy(t, device, dtype) for k, t in sd.items()}, strict=True, assign=True)
    return model.eval()


def _legacy_config(sd: dict[str, Tensor], version: str, source: str) -> LegacyConfig:
    try:
        return LegacyConfig.from_state_dict(sd, version)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{source} is an incomplete {_VERSION_NAMES[version]} checkpoint: missing or "
                              f"malformed {e}") from e


def _load_legacy(sd: dict[str, Tensor], version: str, source: str, device: torch.device | str,
                 dtype: torch.dtype) -> LegacyRWKV:
    """RWKV-4/5/6: validate the layout the shapes imply, then load. Decay and bonus vectors stay fp32
    whatever ``dtype`` is (as in the official package: they are exponentiated)."""
    name, cfg = _VERSION_NAMES[version], _legacy_config(sd, version, source)
    with torch.device("meta"):
        model = LEGACY_MODELS[version](cfg)
    problems = layout_problems(sd, model)
    if problems:
        raise CheckpointError(f"{source} does not match the {name} layout it implies ({cfg}): " + ", ".join(problems))
    fp32 = (".time_decay", ".time_first", ".time_faaaa")
    model.load_state_dict({k: own_copy(t, device, torch.float32 if k.endswith(fp32) else dtype)
                           for k, t in sd.items()}, strict=True, assign=True)
    return model.eval()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a .tmp file (through a file object, so a full disk raises OSError), then rename:
    ``path`` holds either its previous content or the complete new one, never a partial file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(model: RWKV7, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` in the official layout (``.pth`` via torch.save, or ``.safetensors``), atomically."""
    path = Path(path)
    sd = {k: t.detach().to(dtype=dtype or t.dtype, device="cpu").contiguous() for k, t in model.state_dict().items()}
    if path.suffix != ".safetensors":
        atomic_torch_save(sd, path)
        return
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(sd, str(tmp), metadata={"format": "pt", "architecture": "rwkv7-x070"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def describe(path: str | Path) -> dict[str, Any]:
    """What ``goose info`` prints: version, shapes, parameter count, dtypes, LoRA ranks."""
    sd = read_tensors(path)
    version = detect_version(sd)
    info: dict[str, Any] = {"path": str(path), "version": version, "tensors": len(sd),
                            "parameters": sum(t.numel() for t in sd.values()),
                            "dtypes": dict(Counter(str(t.dtype).replace("torch.", "") for t in sd.values())),
                            "bytes": sum(t.numel() * t.element_size() for t in sd.values())}
    if version == "x070":
        cfg = config_from_tensors(sd, str(path))
        info.update(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, head_size=cfg.head_size,
                    vocab_size=cfg.vocab_size, ffn_dim=cfg.ffn_dim,
                    lora_ranks={"w": cfg.rank_w, "a": cfg.rank_a, "v": cfg.rank_v, "g": cfg.rank_g},
                    layer0_v="blocks.0.att.v0" in sd)
    elif version in LEGACY_VERSIONS:
        cfg = _legacy_config(sd, version, str(path))
        info.update(architecture=_VERSION_NAMES[version], n_layer=cfg.n_layer, n_embd=cfg.n_embd)
        if version != "v4":
            info.update(n_head=cfg.n_head, head_size=cfg.head_size)
        info.update(vocab_size=cfg.vocab_size, ffn_dim=cfg.ffn_dim)
        if cfg.dim_att != cfg.n_embd:
            info.update(dim_att=cfg.dim_att)
        if version == "x060":
            info.update(lora_ranks={"mix": cfg.rank_mix, "decay": cfg.rank_decay})
    return info
