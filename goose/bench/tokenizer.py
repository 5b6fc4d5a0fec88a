"""Tokenizer encode throughput: goose's rust and python backends vs the official ``rwkv`` tokenizer.

Throughput is in MB/s of UTF-8 input (1 MB = 10**6 bytes), median over repeats, on a deterministic
multilingual text, so numbers are comparable between runs and machines.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from goose.bench import median_seconds
from goose.tokenizer import WorldTokenizer

_SAMPLES = [
    "The quick brown fox jumps over the lazy dog. ",
    "In 1889 the Eiffel Tower was the tallest structure in the world, at 300 metres. ",
    "RWKV is an RNN with transformer-level performance, trained in parallel like a GPT. ",
    "Ça a été une très belle journée à Montréal, n'est-ce pas ? ",
    "Die Größe des Straßennetzes überrascht viele Besucher. ",
    "Москва — столица России, крупнейший город страны. ",
    "你好，世界！今天的天气很好，我们一起去公园散步吧。",
    "日本語のテキストも正しく処理できます。東京は日本の首都です。",
    "한국어 문장도 포함되어 있습니다. ",
    "مرحبا بالعالم، هذه جملة باللغة العربية. ",
    "Emoji 🙂🚀🦜 and symbols ≤ ≥ ∑ √ → ← ✓. ",
    "def f(x: int) -> int:\n    return x * 2 + 1\n\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "User: what is 17 * 23?\n\nAssistant: 17 * 23 = 391.\n\n",
]


def build_text(size_mb: float, seed: int = 0) -> str:
    """Deterministic multilingual text (prose, CJK, RTL, emoji, code, numbers) of about ``size_mb`` MB."""
    rng = random.Random(seed)
    target = int(size_mb * 1e6)
    pieces, size = [], 0
    while size < target:
        piece = rng.choice(_SAMPLES)
        if rng.random() < 0.2:
            piece += f"{rng.randint(0, 10**rng.randint(1, 9))} "
        pieces.append(piece)
        size += len(piece.encode("utf-8"))
    return "".join(pieces)


def _encoders() -> dict[str, Callable[[str], list[int]]]:
    """Available encoders by name; missing optional ones are left out."""
    encoders: dict[str, Callable[[str], list[int]]] = {}
    try:
        encoders["goose rust"] = WorldTokenizer(backend="rust").encode
    except ImportError:
        pass
    encoders["goose python"] = WorldTokenizer(backend="python").encode
    try:
        from rwkv import rwkv_tokenizer
    except ImportError:
        return encoders
    official = rwkv_tokenizer.TRIE_TOKENIZER(
        str(Path(rwkv_tokenizer.__file__).with_name("rwkv_vocab_v20230424.txt"))
    )
    encoders["official rwkv"] = official.encode
    return encoders


def run(size_mb: float = 2.0, repeats: int = 3) -> dict:
    """Time World-tokenizer encoding of a ``size_mb`` MB text; print a table and return the numbers.

    Returns ``{"size_mb", "repeats", "identical", "results": {name: {"seconds", "mb_per_s",
    "tokens", "vs_official"}}}``; ``vs_official`` is None when the ``rwkv`` package is missing, and
    ``identical`` says whether every encoder produced the same ids.
    """
    text = build_text(size_mb)
    megabytes = len(text.encode("utf-8")) / 1e6
    results: dict[str, dict] = {}
    reference = None
    identical = True
    for name, encode in _encoders().items():
        ids = encode(text)  # warm-up, and the ids to compare
        reference = ids if reference is None else reference
        identical = identical and ids == reference
        seconds = median_seconds(lambda: encode(text), repeats)
        results[name] = {"seconds": seconds, "mb_per_s": megabytes / seconds, "tokens": len(ids)}
    official = results.get("official rwkv")
    for entry in results.values():
        entry["vs_official"] = entry["mb_per_s"] / official["mb_per_s"] if official else None

    print(f"World tokenizer encode, {megabytes:.2f} MB multilingual text, median of {repeats}")
    print(f"{'encoder':<14} {'MB/s':>9} {'vs official':>12} {'tokens':>10}")
    for name, entry in results.items():
        ratio = f"{entry['vs_official']:.2f}x" if entry["vs_official"] is not None else "-"
        print(f"{name:<14} {entry['mb_per_s']:>9.2f} {ratio:>12} {entry['tokens']:>10}")
    print(f"identical ids: {identical}")
    return {"size_mb": megabytes, "repeats": repeats, "identical": identical, "results": results}


if __name__ == "__main__":
    run()
