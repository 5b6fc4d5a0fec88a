"""Export a model to the Hugging Face / flash-linear-attention layout (fla-hub ``RWKV7ForCausalLM``).

``goose export --format hf OUT_DIR`` writes the folder that fla-hub publishes and that other runtimes read
(llama.cpp's ``convert_hf_to_gguf.py`` among them): ``config.json``, ``model.safetensors`` and, for the
World vocabulary, ``rwkv_vocab_v20230424.txt``. The tensor names follow the mapping of FLA's
``utils/convert_from_rwkv7.py`` (RWKV7_SPEC.md section 1.1):

- ``emb``/``ln_out``/``head`` -> ``model.embeddings``/``model.norm``/``lm_head``;
- ``blocks.i.ln0/ln1/ln2`` -> ``model.layers.i.pre_norm/attn_norm/ffn_norm``;
- ``att.receptance/key/value/output`` -> ``attn.r_proj/k_proj/v_proj/o_proj`` (same ``[out, in]``);
- ``att.ln_x`` -> ``attn.g_norm``;
- LoRAs ``att.{w,a,v,g}1 [C, D]`` / ``{w,a,v,g}2 [D, C]`` -> ``attn.{w,a,v,g}_lora.lora.0.weight [D, C]`` /
  ``lora.2.weight [C, D]`` (transposed: FLA stores them as nn.Linear weights), ``att.{w,a,v}0`` ->
  ``lora.2.bias [C]``;
- ``att.x_*`` stay ``[1, 1, C]``; ``att.k_k``, ``att.k_a`` and ``ffn.x_k`` become ``[C]``; ``r_k`` stays ``[H, N]``;
- ``blocks.0.att.v0/v1/v2`` are dropped (layer 0 never uses them; FLA has no ``v_lora`` there).

Every other tensor keeps its name under ``model.layers.i.attn.`` / ``.ffn.``; values are copied unchanged.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import LAYER0_UNUSED
from .model import OFFICIAL_LOG_DECAY_FLOOR, RWKV7, ModelConfig
from .tokenizer import WORLD_VOCAB_FILE, world_vocab_path

EXPORT_FORMATS = ("hf",)
WORLD_VOCAB_SIZE = 65536
LAYER_NORM_EPS = 1e-5          # every LayerNorm of RWKV-7; FLA derives ln_x's 64e-5 as head_size * this
_TOP = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
        "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
_NORMS = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
_ATT = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
_LORA = re.compile(r"([wavg])([012])")
_LORA_PART = {"0": "lora.2.bias", "1": "lora.0.weight", "2": "lora.2.weight"}
_FLAT = ("att.k_k", "att.k_a", "ffn.x_k")   # [1, 1, C] in RWKV-LM, [C] in FLA


def hf_name(key: str) -> str | None:
    """The FLA name of an official RWKV-LM tensor name; None for the unused ``blocks.0.att.v0/v1/v2``."""
    if key in _TOP:
        return _TOP[key]
    if key in LAYER0_UNUSED:
        return None
    parts = key.split(".")
    if len(parts) < 4 or parts[0] != "blocks" or not parts[1].isdigit():
        raise ValueError(f"not an RWKV-7 tensor name: {key!r}")
    layer, module, rest = parts[1], parts[2], parts[3:]
    prefix = f"model.layers.{layer}."
    if module in _NORMS:
        return prefix + ".".join([_NORMS[module], *rest])
    if module == "ffn":
        return prefix + ".".join(["ffn", *rest])
    if module != "att":
        raise ValueError(f"not an RWKV-7 tensor name: {key!r}")
    lora = _LORA.fullmatch(rest[0])
    if lora and len(rest) == 1:
        return prefix + f"attn.{lora[1]}_lora.{_LORA_PART[lora[2]]}"
    if rest[0] in _ATT:
        return prefix + ".".join(["attn", _ATT[rest[0]], *rest[1:]])
    return prefix + ".".join(["attn", *rest])


def hf_tensor(key: str, t: Tensor) -> Tensor:
    """The value FLA stores for official tensor ``key``: LoRA matrices transposed, some vectors flattened."""
    name = key.rsplit(".", 1)[-1]
    if ".att." in key and _LORA.fullmatch(name):
        t = t.flatten() if name.endswith("0") else t.t()
    elif key.endswith(_FLAT):
        t = t.flatten()
    return t.contiguous()


def hf_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """An official RWKV-7 state dict in FLA names and shapes (see the module docstring)."""
    out = {}
    for key, t in sd.items():
        name = hf_name(key)
        if name is not None:
            out[name] = hf_tensor(key, t)
    return out


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """``config.json`` of an fla-hub ``RWKV7ForCausalLM`` with the architecture of ``cfg``."""
    return {
        "architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
        "head_dim": cfg.head_size, "num_heads": cfg.n_head, "intermediate_size": cfg.ffn_dim,
        "hidden_ratio": cfg.ffn_dim // cfg.n_embd if cfg.ffn_dim % cfg.n_embd == 0 else cfg.ffn_dim / cfg.n_embd,
        "decay_low_rank_dim": cfg.rank_w, "a_low_rank_dim": cfg.rank_a, "v_low_rank_dim": cfg.rank_v,
        "gate_low_rank_dim": cfg.rank_g, "value_dim": [cfg.n_embd] * cfg.n_layer,
        "hidden_act": "sqrelu", "norm_first": True, "norm_bias": True, "norm_eps": LAYER_NORM_EPS,
        "attn": None, "attn_mode": "chunk", "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export_hf(model: RWKV7, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as an fla-hub folder in ``out_dir`` (created; existing files there are replaced).

    ``dtype`` casts the weights (default: the model's). Only a plain model exports: a model whose matrices
    goose converted to another weight format (goose.quant) has no official tensors to write.
    """
    cfg = model.config
    if not cfg.iclr or cfg.log_decay_floor != OFFICIAL_LOG_DECAY_FLOOR:
        raise ValueError("only the official RWKV-7 architecture exports; this model is an ablation "
                         f"(iclr={cfg.iclr}, log_decay_floor={cfg.log_decay_floor})")
    sd = model.state_dict()
    official = {k for k, v in model.named_parameters()}
    if set(sd) != official:
        raise ValueError("this model's big matrices are in a goose weight format (goose.quant); export the "
                         "checkpoint it was loaded from instead")
    dtype = dtype or model.dtype
    tensors = {k: t.detach().to(device="cpu", dtype=dtype) for k, t in hf_state_dict(sd).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    tmp = out / "model.safetensors.tmp"
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / "model.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2) + "\n")
    if cfg.vocab_size == WORLD_VOCAB_SIZE:
        shutil.copyfile(world_vocab_path(), out / WORLD_VOCAB_FILE)
    return out


def add_parser(sub) -> None:
    """``goose export``: the subcommand's arguments."""
    p = sub.add_parser("export", help="write a model in another layout: hf = the Hugging Face / "
                                      "flash-linear-attention folder (fla-hub RWKV7ForCausalLM)")
    p.add_argument("out_dir", help="output folder (created)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="hf", help="target layout")
    p.add_argument("--model", metavar="PATH",
                   help="RWKV-7 checkpoint (.pth or .safetensors); default: the built-in demo model")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="weight dtype (default: as stored)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> None:
    from . import demo
    from .checkpoint import load, read_tensors

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if args.model:
        emb = None if args.dtype else read_tensors(args.model).get("emb.weight")
        stored = emb.dtype if emb is not None and emb.is_floating_point() else torch.float32
        model = load(args.model, dtype=dtypes[args.dtype] if args.dtype else stored)
    else:
        model = demo.load_demo(dtype=dtypes[args.dtype or "bf16"])
    out = export_hf(model, args.out_dir)
    vocab = "with the World vocabulary file" if model.config.vocab_size == WORLD_VOCAB_SIZE else \
        f"without a tokenizer (vocabulary {model.config.vocab_size} is not the World one)"
    print(f"wrote {out}: config.json, model.safetensors ({model.dtype}), {vocab}")
