"""Model-level behaviour beyond parity: ablation variants and modes agreeing on them."""
import torch

from goose.model import RWKV7, ModelConfig
from goose.random_weights import random_state_dict


def build(**variant):
    sd = random_state_dict(2, 128, 300, seed=13)
    cfg = ModelConfig(**{**ModelConfig.from_state_dict(sd).__dict__, **variant})
    model = RWKV7(cfg)
    model.load_state_dict(sd)
    return model.eval()


def test_ablations_change_the_function_and_modes_still_agree():
    tokens = torch.randint(0, 300, (2, 45), generator=torch.Generator().manual_seed(0))
    outputs = {}
    with torch.no_grad():
        for name, variant in {"official": {}, "no_iclr": {"iclr": False}, "wide": {"log_decay_floor": -4.6}}.items():
            model = build(**variant)
            chunked, _ = model(tokens, mode="chunked")
            scan, _ = model(tokens, mode="scan")
            assert (chunked - scan).abs().max() <= 1e-4 * scan.std(), name
            outputs[name] = chunked
    assert not torch.allclose(outputs["official"], outputs["no_iclr"])
    assert not torch.allclose(outputs["official"], outputs["wide"])


def test_no_iclr_removes_the_delta_term():
    """With iclr=False the a-LoRA and k_a have no influence on the output."""
    model = build(iclr=False)
    tokens = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, _ = model(tokens)
        for block in model.blocks:
            block.att.a0.add_(3.0)
            block.att.k_a.mul_(0.1)
        after, _ = model(tokens)
    assert torch.equal(before, after)
