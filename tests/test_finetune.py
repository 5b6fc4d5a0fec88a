"""Fine-tuning pieces: LoRA (merge == unmerged), state tuning (only the state learns), chat SFT masks."""
import json

import pytest
import torch

from goose.checkpoint import load, save
from goose.state import State
from goose.tokenizer import ByteTokenizer
from goose.train.lora import LoRALinear, add_lora, load_adapters, merge_lora, save_adapters
from goose.train.sft import ChatBatches, load_conversations, sft_loss
from goose.train.dist import Dist
from goose.train.state_tune import StateTuned, TunableState

CPU = Dist(rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture()
def byte_model(ckpt_factory):
    return load(ckpt_factory("ft_byte.pth", n_layer=2, n_embd=64, vocab_size=257, head_size=32, seed=21)).train()


def task_batch(batch_size=4, T=32):
    """A fixed periodic byte sequence: learnable in a few steps."""
    seq = torch.tensor(list(b"abcdefgh" * 8)[: T + 1]) + 1
    return seq[:-1].expand(batch_size, T), seq[1:].expand(batch_size, T)


def lm(model, batch, state=None):
    x, y = batch
    logits, _ = model(x, state)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def train_steps(params, loss_fn, steps=15, lr=1e-2):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_lora_learns_and_merge_equals_unmerged(byte_model, tmp_path):
    batch = task_batch()
    with torch.no_grad():
        before = byte_model(batch[0])[0]
    params = add_lora(byte_model, rank=4, alpha=8)
    assert all(not p.requires_grad for n, p in byte_model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        assert torch.equal(byte_model(batch[0])[0], before)      # B = 0: an exact no-op at the start
    losses = train_steps(params, lambda: lm(byte_model, batch))
    assert losses[-1] < 0.7 * losses[0]

    save_adapters(byte_model, tmp_path / "adapter.safetensors", rank=4, alpha=8)
    with torch.no_grad():
        unmerged = byte_model(batch[0])[0]
        merge_lora(byte_model)
        merged = byte_model(batch[0])[0]
    assert not any(isinstance(m, LoRALinear) for m in byte_model.modules())
    assert (merged - unmerged).abs().max() <= 1e-4 * unmerged.std()
    save(byte_model, tmp_path / "merged.pth")
    reloaded = load(tmp_path / "merged.pth")
    assert reloaded.state_dict().keys() == torch.load(tmp_path / "merged.pth", weights_only=True).keys()
    with torch.no_grad():
        assert torch.allclose(reloaded(batch[0])[0], merged, atol=1e-5)


def test_lora_adapter_file_round_trip(ckpt_factory, tmp_path):
    path = ckpt_factory("ft_byte.pth", n_layer=2, n_embd=64, vocab_size=257, head_size=32, seed=21)
    a = load(path)
    add_lora(a, rank=2, alpha=4)
    for p in a.parameters():
        if p.requires_grad:
            p.data.normal_()
    save_adapters(a, tmp_path / "ad.safetensors", rank=2, alpha=4)
    b = load_adapters(load(path), tmp_path / "ad.safetensors")
    x = task_batch()[0]
    with torch.no_grad():
        assert torch.equal(a(x)[0], b(x)[0])
    (tmp_path / "junk.safetensors").write_bytes(b"x")
    with pytest.raises(Exception):
        load_adapters(load(path), tmp_path / "junk.safetensors")


def test_state_tuning_trains_only_the_state(byte_model, tmp_path):
    for p in byte_model.parameters():
        p.requires_grad_(False)
    tunable = TunableState(byte_model)
    tuned_model = StateTuned(byte_model, tunable)
    batch = task_batch()
    frozen = {k: v.clone() for k, v in byte_model.state_dict().items()}
    losses = train_steps([tunable.wkv], lambda: lm(tuned_model, batch), steps=20, lr=0.05)
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.equal(v, byte_model.state_dict()[k]) for k, v in frozen.items())

    tunable.export().save(tmp_path / "tuned.safetensors")
    tuned = State.load(tmp_path / "tuned.safetensors")
    with torch.no_grad():
        via_file = lm(byte_model, batch, State.stack([tuned] * batch[0].shape[0]))
        via_module = lm(tuned_model, batch)
    assert torch.allclose(via_file, via_module, rtol=1e-5)


def write_chats(path, n=6):
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"][:n]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_sft_masks_only_assistant_tokens(tmp_path):
    write_chats(tmp_path / "chat.jsonl")
    tok = ByteTokenizer()
    convs = load_conversations(tmp_path / "chat.jsonl", tok, ctx_len=64)
    batches = ChatBatches(convs, micro_batch=3, d=CPU)
    x, y, m = batches.next()
    for row in range(3):
        learned = tok.decode([t for t, keep in zip(y[row].tolist(), m[row].tolist()) if keep])
        assert learned.startswith(" ") and learned.endswith("\n\n") and "say" not in learned


def test_sft_lowers_the_loss(byte_model, tmp_path):
    write_chats(tmp_path / "chat.jsonl")
    batches = ChatBatches(load_conversations(tmp_path / "chat.jsonl", ByteTokenizer(), 64), 4, CPU)
    batch = batches.next()
    losses = train_steps([p for p in byte_model.parameters()], lambda: sft_loss(byte_model, batch), steps=12, lr=3e-3)
    assert losses[-1] < 0.7 * losses[0]


def test_sft_bad_records(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "no messages"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_conversations(tmp_path / "bad.jsonl", ByteTokenizer(), 64)


def byte_corpus(tmp_path):
    from goose.train.data import BinidxWriter

    with BinidxWriter(tmp_path / "corpus") as w:
        for i in range(40):
            w.add_document(ByteTokenizer().encode("abcdefgh" * 30 + f" {i}"))
    return str(tmp_path / "corpus")


@pytest.mark.parametrize("method,sft", [("lora", False), ("state", False), ("full", True), ("state", True)])
def test_finetune_command_end_to_end(ckpt_factory, tmp_path, method, sft):
    from goose.train.finetune import FinetuneConfig, finetune

    base = ckpt_factory("ft_byte.pth", n_layer=2, n_embd=64, vocab_size=257, head_size=32, seed=21)
    if sft:
        write_chats(tmp_path / "chat.jsonl")
        data = str(tmp_path / "chat.jsonl")
    else:
        data = byte_corpus(tmp_path)
    out = tmp_path / "run"
    cfg = FinetuneConfig(init_from=str(base), data=data, out=str(out), method=method, sft=sft, tokenizer="byte",
                         steps=12, ctx_len=32, micro_batch=4, lr_init=2e-2 if method != "full" else 3e-3,
                         lr_final=1e-3, warmup_steps=0, eval_every=0, save_every=0, progress=False)
    summary = finetune(cfg)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert summary["loss"] < first
    if method == "state":
        state = State.load(out / "state.safetensors")
        assert state.batch_size == 1 and state.wkv.abs().sum() > 0
    else:
        assert load(out / "model.pth").state_dict().keys() == load(base).state_dict().keys()
    if method == "lora":
        assert (out / "adapter.safetensors").exists()


def test_generate_loads_a_tuned_state(ckpt_factory, tmp_path):
    import subprocess
    import sys

    from goose.train.finetune import FinetuneConfig, finetune

    base = ckpt_factory("ft_byte.pth", n_layer=2, n_embd=64, vocab_size=257, head_size=32, seed=21)
    finetune(FinetuneConfig(init_from=str(base), data=byte_corpus(tmp_path), out=str(tmp_path / "s"),
                            method="state", tokenizer="byte", steps=3, ctx_len=32, micro_batch=2,
                            eval_every=0, save_every=0, progress=False))
    proc = subprocess.run([sys.executable, "-m", "goose", "generate", "--model", str(base), "--prompt", "abc",
                           "--max-tokens", "5", "--state", str(tmp_path / "s" / "state.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
