"""goose export --format hf: the fla-hub RWKV7ForCausalLM folder maps back 1:1 to the official layout."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from goose.checkpoint import LAYER0_UNUSED, load
from goose.cli import main
from goose.export import export_hf
from goose.model import ModelConfig, RWKV7
from goose.quant import quantize
from goose.tokenizer import WORLD_VOCAB_FILE, world_vocab_path


def official_from_hf(hf: dict[str, torch.Tensor], n_embd: int) -> dict[str, torch.Tensor]:
    """The inverse of the export, written from RWKV7_SPEC.md section 1.1 (not from goose/export.py)."""
    top = {"model.embeddings.weight": "emb.weight", "model.norm.weight": "ln_out.weight",
           "model.norm.bias": "ln_out.bias", "lm_head.weight": "head.weight"}
    norms = {"pre_norm": "ln0", "attn_norm": "ln1", "ffn_norm": "ln2"}
    proj = {"r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output", "g_norm": "ln_x"}
    out = {}
    for name, t in hf.items():
        if name in top:
            out[top[name]] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(\w+)\.(.+)", name)
        assert m, name
        i, module, rest = m.groups()
        if module in norms:
            out[f"blocks.{i}.{norms[module]}.{rest}"] = t
        elif module == "ffn":
            out[f"blocks.{i}.ffn.{rest}"] = t.reshape(1, 1, n_embd) if rest == "x_k" else t
        else:
            assert module == "attn", name
            lora = re.fullmatch(r"([wavg])_lora\.lora\.(0\.weight|2\.weight|2\.bias)", rest)
            if lora:
                kind, part = lora.groups()
                if part == "2.bias":
                    out[f"blocks.{i}.att.{kind}0"] = t.reshape(1, 1, n_embd)
                else:
                    out[f"blocks.{i}.att.{kind}{'1' if part == '0.weight' else '2'}"] = t.t()
            elif rest.split(".")[0] in proj:
                head, *tail = rest.split(".")
                out[".".join([f"blocks.{i}.att", proj[head], *tail])] = t
            elif rest in ("k_k", "k_a"):
                out[f"blocks.{i}.att.{rest}"] = t.reshape(1, 1, n_embd)
            else:
                out[f"blocks.{i}.att.{rest}"] = t
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_maps_back_one_to_one(ckpt_factory, tmp_path, dtype):
    path = ckpt_factory("export.pth", n_layer=3, n_embd=128, vocab_size=300, ranks=(32, 48, 16, 64), seed=5)
    model = load(path, dtype=dtype)
    export_hf(model, tmp_path / "hf")
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    official = torch.load(path, weights_only=True)
    back = official_from_hf(hf, 128)

    assert len(back) == len(hf)                                    # no two FLA names map to one tensor
    assert back.keys() == official.keys() - set(LAYER0_UNUSED)     # only the unused layer-0 v's are dropped
    for k, t in back.items():
        assert t.shape == official[k].shape, k
        assert t.dtype == dtype, k
        assert torch.equal(t, official[k].to(dtype)), k

    # FLA's own shapes: x_* [1,1,C]; k_k, k_a, ffn.x_k, LoRA biases [C]; LoRA matrices as nn.Linear weights
    assert hf["model.layers.1.attn.x_r"].shape == (1, 1, 128)
    assert hf["model.layers.1.attn.k_k"].shape == (128,)
    assert hf["model.layers.1.ffn.x_k"].shape == (128,)
    assert hf["model.layers.1.attn.w_lora.lora.0.weight"].shape == (32, 128)
    assert hf["model.layers.1.attn.a_lora.lora.2.weight"].shape == (128, 48)
    assert hf["model.layers.1.attn.v_lora.lora.2.bias"].shape == (128,)
    assert hf["model.layers.1.attn.r_k"].shape == (2, 64)
    assert "model.layers.0.attn.v_lora.lora.0.weight" not in hf
    assert "model.layers.1.pre_norm.weight" not in hf and "model.layers.0.pre_norm.weight" in hf
    assert not any("g_lora.lora.2.bias" in k for k in hf)          # the gate LoRA has no bias

    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["RWKV7ForCausalLM"] and cfg["model_type"] == "rwkv7"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"],
            cfg["intermediate_size"]) == (3, 128, 300, 64, 512)
    assert (cfg["decay_low_rank_dim"], cfg["a_low_rank_dim"], cfg["v_low_rank_dim"],
            cfg["gate_low_rank_dim"]) == (32, 48, 16, 64)
    assert not (tmp_path / "hf" / WORLD_VOCAB_FILE).exists()       # not the World vocabulary

    # the mapped-back tensors are the same function
    back.update({k: official[k] for k in LAYER0_UNUSED})
    again = RWKV7(ModelConfig.from_state_dict(back))
    again.load_state_dict({k: t.float() for k, t in back.items()}, strict=True)
    tokens = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(tokens)[0], load(path, dtype=dtype).float()(tokens)[0])


def test_cli_export_world_vocab(ckpt_factory, tmp_path, capsys):
    path = ckpt_factory("export_world.pth", n_layer=1, n_embd=64, vocab_size=65536, seed=6)
    main(["export", "--format", "hf", "--model", str(path), str(tmp_path / "out")])
    assert "World vocabulary" in capsys.readouterr().out
    out = tmp_path / "out"
    assert (out / WORLD_VOCAB_FILE).read_bytes() == world_vocab_path().read_bytes()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"   # as stored
    main(["export", "--model", str(path), "--dtype", "bf16", str(tmp_path / "bf16")])
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16


def test_export_refuses_converted_and_ablated_models(ckpt_factory, tmp_path):
    path = ckpt_factory("export_q.pth", n_layer=1, n_embd=64, vocab_size=100, seed=7)
    with pytest.raises(ValueError, match="weight format"):
        export_hf(quantize(load(path), "int8"), tmp_path / "q")
    with pytest.raises(ValueError, match="ablation"):
        export_hf(RWKV7(ModelConfig(n_layer=1, n_embd=64, vocab_size=100, iclr=False)), tmp_path / "a")
    assert not (tmp_path / "q").exists() and not (tmp_path / "a").exists()
