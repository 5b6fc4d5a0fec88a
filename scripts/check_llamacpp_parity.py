"""Is a GGUF conversion the same function as the goose checkpoint it came from? A benchmark-time check.

Runs llama.cpp (through the ctypes bindings of the llama-cpp-python sdist, on the libllama that
scripts/build_llamacpp.sh builds) and goose on the same random prompt, compares the logits of every prompt
position (llama.cpp's batched prompt path, goose's chunked form), then decodes greedily token by token in
both (the decode paths) and compares the tokens and logits. Run with the venv of build_llamacpp.sh:

    DEST=/tmp/llamacpp
    LLAMA_CPP_LIB_PATH=$DEST/llama.cpp/build/bin PYTHONPATH=.:$DEST/llama_cpp_python \\
        $DEST/venv/bin/python scripts/check_llamacpp_parity.py CKPT.pth CKPT-f32.gguf [--format int8]

``--format`` converts goose's big matrices first (goose.quant) and also reports both sides against fp32.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from llama_cpp import Llama

import goose
from goose.bench.common import converted


def report(name: str, a: np.ndarray, b: np.ndarray) -> None:
    """Max and relative RMS difference of logits ``a`` against ``b`` ([T, V]), and top-1 agreement."""
    rel = np.linalg.norm(a - b) / np.linalg.norm(b - b.mean(-1, keepdims=True))
    top1 = (a.argmax(-1) == b.argmax(-1)).mean()
    print(f"{name}: max |diff| {np.abs(a - b).max():.2e}, relative RMS {rel:.2e}, top-1 agreement {top1:.3f} "
          f"over {a.shape[0]} positions")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("gguf")
    p.add_argument("--format", help="goose weight format to compare (default: the checkpoint as loaded, fp32)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--greedy-tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    fp32 = goose.load(args.checkpoint)
    model = converted(fp32, args.format) if args.format else fp32
    vocab = fp32.config.vocab_size
    prompt = torch.randint(1, min(vocab, 65530), (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    llm = Llama(model_path=args.gguf, n_ctx=args.prompt_tokens + args.greedy_tokens + 8, n_batch=512,
                n_threads=args.threads, logits_all=True, verbose=False)
    llm.eval(prompt.tolist())
    l_logits = np.array(llm.scores[:args.prompt_tokens], dtype=np.float64)
    with torch.inference_mode():
        g_logits, state = model(prompt[None])
    g_logits = g_logits[0].double().numpy()
    report(f"prompt logits, llama.cpp vs goose {args.format or 'fp32'}", l_logits, g_logits)
    if args.format:
        with torch.inference_mode():
            ref = fp32(prompt[None])[0][0].double().numpy()
        report("  llama.cpp vs goose fp32", l_logits, ref)
        report(f"  goose {args.format} vs goose fp32", g_logits, ref)

    g_tokens, l_tokens, g_steps, l_steps = [], [], [], []
    g_last, l_last = g_logits[-1], l_logits[-1]
    for _ in range(args.greedy_tokens):
        g_tok, l_tok = int(g_last.argmax()), int(l_last.argmax())
        g_tokens.append(g_tok)
        l_tokens.append(l_tok)
        with torch.inference_mode():
            out, state = model(torch.tensor([[g_tok]]), state, last=True)
        g_last = out[0].double().numpy()
        llm.eval([l_tok])
        l_last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        g_steps.append(g_last)
        l_steps.append(l_last)
    print(f"greedy goose    : {g_tokens}\ngreedy llama.cpp: {l_tokens}\nsame tokens: {g_tokens == l_tokens}")
    report("decode logits (each on its own greedy path)", np.stack(l_steps), np.stack(g_steps))


if __name__ == "__main__":
    main()
