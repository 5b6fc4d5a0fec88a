"""The ``goose`` command: argparse subcommands that turn flags into calls of the library."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH",
                   help="RWKV-7 checkpoint (.pth or .safetensors); default: the built-in demo model")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype (the WKV state is always fp32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--tokenizer", choices=("world", "byte"), help="default: chosen from the model's vocabulary size")
    p.add_argument("--state", metavar="FILE", help="start from a saved state (e.g. a state-tuned one)")
    p.add_argument("--quant", choices=("int8", "int4", "bf16", "fp16", "fp32"),
                   help="weight format of the big matrices, converted on load: int8 (per output channel), int4 "
                        "(groups of 64), or bf16/fp16/fp32 weights with --dtype activations (see goose/quant.py); "
                        "a file written by goose.quant.save_quantized loads in its own format")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.2)
    p.add_argument("--frequency-penalty", type=float, default=0.2)
    p.add_argument("--penalty-decay", type=float, default=0.996)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, help="make sampling reproducible")


def _sampling_params(args: argparse.Namespace, stop_strings: tuple[str, ...] = ()):
    from .sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          penalty_decay=args.penalty_decay, stop_strings=tuple(args.stop) + stop_strings,
                          max_tokens=args.max_tokens, seed=args.seed)


def _load_model(args: argparse.Namespace):
    """(model, tokenizer, initial state) from the common model flags."""
    from . import demo
    from .checkpoint import load
    from .state import State
    from .tokenizer import tokenizer_for_vocab

    from . import quant

    dtype = DTYPES[args.dtype]
    if args.model and quant.is_quantized_file(args.model):
        model = quant.load_quantized(args.model, device=args.device, dtype=dtype)
    else:
        if args.model:
            model = load(args.model, device=args.device, dtype=dtype)
        else:
            print(demo.notice(demo.info()), file=sys.stderr)
            model = demo.load_demo(device=args.device, dtype=dtype)
        # the big matrices in an inference format: --quant's, else the weights' own dtype (fp32 weights then live
        # in the native kernels' panels layout on CPU, faster to decode and batch than nn.Linear's; goose/quant.py)
        model = quant.quantize(model, getattr(args, "quant", None) or args.dtype)
    tokenizer = tokenizer_for_vocab(model.config.vocab_size, args.tokenizer)
    state = State.load(args.state, device=args.device).to(dtype=dtype) if args.state else None
    return model, tokenizer, state


def cmd_generate(args: argparse.Namespace) -> None:
    from .generate import generate

    model, tokenizer, state = _load_model(args)
    gen = generate(model, tokenizer, args.prompt, _sampling_params(args), state=state)
    with torch.inference_mode():
        for piece in gen:
            print(piece, end="", flush=True)
    print()
    result = gen.result
    if args.save_state:
        result.state.save(args.save_state)
    print(f"[{result.prompt_tokens} prompt + {result.completion_tokens} generated tokens, "
          f"finish: {result.finish_reason}]", file=sys.stderr)


CHAT_HELP = "commands: /save FILE, /load FILE, /reset, /quit"


def cmd_chat(args: argparse.Namespace) -> None:
    """A terminal chat; the conversation lives in the recurrent state, which /save and /load keep."""
    from .generate import generate
    from .state import State
    from .tokenizer import render_chat

    model, tokenizer, initial = _load_model(args)
    params = _sampling_params(args, stop_strings=("\n\n",))
    state, needs_separator = initial, False
    print(f"goose chat: {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("User: ")
        except EOFError:
            print()
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command == "/quit":
                return
            if command == "/reset":
                state, needs_separator = initial, False
                print("[state reset]")
            elif command in ("/save", "/load") and arg.strip():
                path = Path(arg.strip()).expanduser()
                try:
                    if command == "/save":
                        if state is None:
                            state = model.new_state()
                        state.save(path)
                        print(f"[state saved to {path}]")
                    else:
                        state, needs_separator = State.load(path, device=model.device).to(dtype=model.dtype), False
                        print(f"[state loaded from {path}]")
                except (OSError, ValueError) as e:
                    print(f"[error: {e}]")
            else:
                print(f"[{CHAT_HELP}]")
            continue
        prompt = ("\n\n" if needs_separator else "") + render_chat([{"role": "user", "content": line}])
        print("Assistant:", end="", flush=True)
        gen = generate(model, tokenizer, prompt, params, state=state)
        with torch.inference_mode():
            for piece in gen:
                print(piece, end="", flush=True)
        print("\n")
        state = gen.result.state
        needs_separator = not tokenizer.decode(gen.result.tokens).endswith("\n\n")


def cmd_serve(args: argparse.Namespace) -> None:
    """The OpenAI-compatible server (goose/serve.py) on the model of the common model flags."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("goose: error: goose serve needs FastAPI and uvicorn: pip install 'goose[serve]'", file=sys.stderr)
        sys.exit(2)
    from . import demo
    from .serve import create_app, serve

    model, tokenizer, state = _load_model(args)
    name = args.model_name or (Path(args.model).stem if args.model else Path(demo.info()["file"]).stem)
    app = create_app(model, tokenizer, name, max_batch=args.max_batch, state=state,
                     state_cache_mb=args.state_cache_mb, max_prompt_tokens=args.max_prompt_tokens)
    print(f"goose serve: model {name!r} at http://{args.host}:{args.port}/v1 (OpenAI API: /v1/models, "
          f"/v1/completions, /v1/chat/completions)", file=sys.stderr)
    serve(app, host=args.host, port=args.port)


def cmd_info(args: argparse.Namespace) -> None:
    from .checkpoint import describe

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "parameters":
            value = f"{value:,} ({value / 1e6:.2f}M)"
        elif key == "bytes":
            value = f"{value / 2**20:.1f} MiB"
        print(f"{key:>12}: {value}")


def cmd_quantize(args: argparse.Namespace) -> None:
    """Convert a checkpoint's big matrices once and write the result; ``--model`` then loads it as it is."""
    from . import demo, quant
    from .checkpoint import load
    from .model import RWKV7

    source = Path(args.model) if args.model else demo.ASSETS / demo.WEIGHTS_FILE
    model = load(source, dtype=DTYPES[args.dtype])
    if not isinstance(model, RWKV7):
        raise ValueError(f"{source}: quantized files hold RWKV-7 models; this is {model.config.version} (convert "
                         f"it on load instead: --quant {args.format})")
    quant.quantize(model, args.format, group_size=args.group_size)
    quant.save_quantized(model, args.out)
    size = Path(args.out).stat().st_size
    print(f"{args.out}: {args.format} weights ({size / 2**20:.1f} MiB, {source.stat().st_size / size:.1f}x "
          f"smaller than {source.name}); load it with --model {args.out}", file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> None:
    if args.what == "wkv":
        from .bench.wkv import run
        run(seq_len=args.seq_len, batch_size=args.batch_size, n_head=args.n_head, repeats=args.repeats)
    elif args.what == "tokenizer":
        from .bench.tokenizer import run
        run(size_mb=args.size_mb, repeats=args.repeats)
    elif args.what == "train":
        from .bench.train import run
        run(repeats=args.repeats)
    elif args.what == "inference":
        from .bench.inference import run
        run(sizes=args.sizes.split(","), out=args.out, formats=tuple(args.formats.split(",")),
            repeats=args.repeats, prefill=tuple(int(t) for t in args.prefill.split(",") if t),
            batches=tuple(int(b) for b in args.batches.split(",")), with_official=not args.no_official)
    elif args.what == "memory":
        from .bench.memory import run
        run(size=args.sizes.split(",")[0], contexts=tuple(int(c) for c in args.contexts.split(",")),
            transformer=not args.no_transformer, plot=args.plot, out=args.out)
    elif args.what == "quant":
        from .bench.quant import run
        run(sizes=args.sizes.split(","), model_path=args.model, text_path=args.text)
    elif args.what == "kernels":
        from .bench.kernels import run
        run(repeats=args.repeats)
    elif args.what == "llamacpp":
        from .bench.llamacpp import DEFAULT_LLAMA_BENCH, LLAMA_TYPES, run
        run(llama_bench=args.llama_bench or DEFAULT_LLAMA_BENCH, size=args.sizes.split(",")[0],
            formats=tuple(f for f in args.formats.split(",") if f in LLAMA_TYPES), repeats=args.repeats,
            out=args.out)


def build_parser() -> argparse.ArgumentParser:
    from .experiments import add_parser as add_experiment_parser
    from .export import add_parser as add_export_parser
    from .train.data import add_parser as add_data_parser
    from .train.finetune import add_parser as add_finetune_parser
    from .train.trainer import add_parser as add_train_parser

    parser = argparse.ArgumentParser(prog="goose", description="RWKV-7 'Goose': run, chat, train, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="stream a completion of a prompt")
    _model_args(p)
    p.add_argument("--prompt", default="The Eiffel tower is in the city of", help="text to continue")
    p.add_argument("--save-state", metavar="FILE", help="write the final state (prompt + completion) here")
    _sampling_args(p, max_tokens=100)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (User:/Assistant: turns) with /save, /load, /reset")
    _model_args(p)
    _sampling_args(p, max_tokens=500)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, prefix-state cache)")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", metavar="NAME", help="the model id clients send (default: the file's stem)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--state-cache-mb", type=float, default=256,
                   help="memory for cached prompt-prefix states (0 = no cache)")
    p.add_argument("--max-prompt-tokens", type=int, default=32768, help="longer prompts are refused (400)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("info", help="describe a checkpoint: version, shapes, parameters, dtype, LoRA ranks")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("quantize", help="convert a checkpoint's big matrices to int8/int4/bf16/fp16 and save it "
                                        "(a .safetensors file that --model loads in that format)")
    p.add_argument("out", help="output file (.safetensors)")
    p.add_argument("--model", metavar="PATH",
                   help="RWKV-7 checkpoint (.pth or .safetensors); default: the built-in demo model")
    p.add_argument("--format", choices=("int8", "int4", "bf16", "fp16"), default="int8",
                   help="int8: one scale per output channel; int4: a scale and zero per group (see goose/quant.py)")
    p.add_argument("--group-size", type=int, default=64, help="int4: input channels per group")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="dtype of the tensors that stay unconverted (embedding, norms, LoRAs)")
    p.set_defaults(func=cmd_quantize)

    add_data_parser(sub)
    add_train_parser(sub)
    add_finetune_parser(sub)
    add_experiment_parser(sub)
    add_export_parser(sub)

    p = sub.add_parser("bench", help="measure speed against the reference (prints a table)")
    p.add_argument("what", choices=("wkv", "tokenizer", "train", "inference", "memory", "quant", "kernels",
                                    "llamacpp"),
                   help="train: forward+backward tokens/s and MFU of an L6-D512 World-vocabulary model at "
                        "ctx 512, micro-batch 4, chunked WKV vs the scan, fp32 and bf16 autocast; inference: "
                        "decode/prefill/batched decode vs the official rwkv package, with the roofline; memory: "
                        "decode speed and peak RSS against context length beside a Transformer; quant: quality "
                        "of each weight format against fp32; kernels: matmul throughput of each weight format "
                        "by batch size; llamacpp: decode and pp512 beside llama.cpp's llama-bench on the same "
                        "weights, per precision")
    p.add_argument("--seq-len", type=int, default=4096, help="wkv: sequence length")
    p.add_argument("--batch-size", type=int, default=1, help="wkv: batch size")
    p.add_argument("--n-head", type=int, default=12, help="wkv: heads of 64 channels")
    p.add_argument("--size-mb", type=float, default=2.0, help="tokenizer: text size")
    p.add_argument("--sizes", default="L12-D768,L24-D1024",
                   help="inference/memory/quant: random checkpoints, e.g. L12-D768 (memory uses the first)")
    p.add_argument("--formats", default="fp32,bf16,fp16,int8,int4", help="inference: goose weight formats")
    p.add_argument("--prefill", default="1024,8192", help="inference: prompt lengths")
    p.add_argument("--batches", default="1,4,16,64", help="inference: batch sizes of the batched decode table")
    p.add_argument("--no-official", action="store_true", help="inference: skip the official rwkv package")
    p.add_argument("--contexts", default="1024,8192,32768,131072", help="memory: context lengths")
    p.add_argument("--no-transformer", action="store_true", help="memory: skip the Hugging Face Llama")
    p.add_argument("--plot", default="context.png", help="memory: PNG of speed and memory against context")
    p.add_argument("--model", metavar="PATH", help="quant: a trained checkpoint to measure perplexity with")
    p.add_argument("--text", metavar="FILE", help="quant: the text for --model's perplexity")
    p.add_argument("--llama-bench", metavar="PATH",
                   help="llamacpp: llama.cpp's llama-bench, built by scripts/build_llamacpp.sh "
                        "(default /tmp/llamacpp/llama.cpp/build/bin/llama-bench)")
    p.add_argument("--out", metavar="JSON", help="inference/memory/llamacpp: also write the numbers here")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    from .checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, OSError, ValueError) as e:  # OSError: missing files, existing run dirs, full disks
        print(f"goose: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
