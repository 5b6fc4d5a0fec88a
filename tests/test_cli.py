"""The `goose` command as a user runs it (subprocesses, real argv, real exit codes)."""
import json
import subprocess
import sys

import pytest


def goose(*args, stdin=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "goose", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"goose {args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def test_info(ckpt_factory):
    path = ckpt_factory("cli_info.pth", n_layer=2, n_embd=128, vocab_size=512, ranks=(32, 32, 32, 64))
    info = json.loads(goose("info", path, "--json").stdout)
    assert info["version"] == "x070" and info["n_layer"] == 2 and info["lora_ranks"]["g"] == 64
    assert "parameters" in goose("info", path).stdout


@pytest.mark.parametrize("version", ["v4", "x052", "x060"])
def test_older_rwkv_versions_info_generate_and_chat(tmp_path, version):
    import torch
    from goose.random_weights import random_legacy_state_dict

    path = tmp_path / f"{version}.pth"
    torch.save(random_legacy_state_dict(version, 2, 64, 257, head_size=32, seed=1), path)
    info = json.loads(goose("info", path, "--json").stdout)
    assert info["version"] == version and info["n_layer"] == 2 and info["vocab_size"] == 257
    assert f"version: {version}" in goose("info", path).stdout
    out = goose("generate", "--model", path, "--prompt", "Hi", "--max-tokens", "4", "--seed", "0",
                "--save-state", tmp_path / "s.safetensors")
    assert "2 prompt + " in out.stderr
    chat = goose("chat", "--model", path, "--max-tokens", "3", "--state", tmp_path / "s.safetensors",
                 stdin=f"hi\n/save {tmp_path / 'c.safetensors'}\n/reset\nagain\n/quit\n")
    assert chat.stdout.count("Assistant:") == 2 and (tmp_path / "c.safetensors").exists()


def test_generate_streams_and_saves_state(ckpt_factory, tmp_path):
    path = ckpt_factory("cli_gen.pth", n_layer=2, n_embd=128, vocab_size=65536, seed=3)
    out = goose("generate", "--model", path, "--prompt", "Hello", "--max-tokens", "8", "--seed", "1",
                "--save-state", tmp_path / "s.safetensors")
    assert "8 generated tokens" in out.stderr and (tmp_path / "s.safetensors").exists()
    again = goose("generate", "--model", path, "--prompt", "Hello", "--max-tokens", "8", "--seed", "1")
    assert again.stdout == out.stdout
    resumed = goose("generate", "--model", path, "--prompt", " more", "--max-tokens", "3",
                    "--state", tmp_path / "s.safetensors")
    assert "3 generated tokens" in resumed.stderr


def test_demo_model_is_labelled():
    out = goose("generate", "--max-tokens", "3")
    assert "built-in demo model" in out.stderr and "King James Bible" in out.stderr


def test_chat_commands(ckpt_factory, tmp_path):
    path = ckpt_factory("cli_gen.pth", n_layer=2, n_embd=128, vocab_size=65536, seed=3)
    state = tmp_path / "chat.safetensors"
    script = f"hi\n/save {state}\n/reset\n/load {state}\nagain\n/bogus\n/quit\n"
    out = goose("chat", "--model", path, "--max-tokens", "5", "--seed", "0", stdin=script)
    assert out.stdout.count("Assistant:") == 2
    assert "[state saved to" in out.stdout and "[state loaded from" in out.stdout and "[state reset]" in out.stdout
    assert "commands:" in out.stdout and state.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_bad_model_is_a_clear_error(tmp_path, content):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    out = goose("generate", "--model", bad, check=False)
    assert out.returncode == 2 and out.stderr.startswith("goose: error:") and "Traceback" not in out.stderr


def test_tokenizer_mismatch_is_a_clear_error(ckpt_factory):
    path = ckpt_factory("cli_small_vocab.pth", vocab_size=1000)
    out = goose("generate", "--model", path, "--tokenizer", "world", check=False)
    assert out.returncode == 2 and "mismatch" in out.stderr


def test_quantize_writes_a_file_that_generate_loads_as_is(ckpt_factory, tmp_path):
    import torch
    from goose import quant
    from goose.checkpoint import load

    path = ckpt_factory("cli_quant.pth", n_layer=2, n_embd=128, vocab_size=65536, seed=4)
    out_file = tmp_path / "int8.safetensors"
    assert "int8 weights" in goose("quantize", out_file, "--model", path, "--format", "int8").stderr
    saved = quant.load_quantized(out_file)
    expected = quant.quantize(load(path), "int8")
    assert quant.weight_format(saved) == "int8"
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(saved(tokens)[0], expected(tokens)[0])
    gen = goose("generate", "--model", out_file, "--prompt", "Hi", "--max-tokens", "3", "--seed", "0")
    assert "3 generated tokens" in gen.stderr
    bad = goose("quantize", tmp_path / "x.pth", "--model", path, check=False)
    assert bad.returncode == 2 and "safetensors" in bad.stderr and "Traceback" not in bad.stderr
