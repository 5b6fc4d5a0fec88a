"""Training data: RWKV-LM-compatible binidx files, a memory-mapped reader, and training windows.

File layout (RWKV7_SPEC.md §3.4, Megatron's MMapIndexedDataset, which RWKV-LM uses):

* ``<prefix>.bin``: the raw little-endian token stream, no header. We write uint16 (dtype code 8).
* ``<prefix>.idx``: ``b"MMIDIDX\\x00\\x00"``, ``<Q`` version 1, ``<B`` dtype code, ``<Q`` n_items,
  ``<Q`` n_doc_idx (34 bytes so far), then ``int32 sizes[n_items]``, ``int64 pointers[n_items]`` (byte
  offsets into .bin) and ``int64 doc_idx[n_doc_idx]`` (item index where each document starts, plus an end).

We write one item per document, and every document ends with token 0 (end of text), as RWKV-LM's
``make_data.py`` does. Training treats the .bin as one flat stream, as RWKV-LM's trainer does: a window
of ``ctx_len + 1`` tokens may span several documents. The last part of the stream is held out as a
validation split that training windows never touch.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import struct
import uuid
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from tqdm import tqdm

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n_items, n_doc_idx: 34 bytes
# Megatron's dtype codes. 6 is Python `float` there, so 6 and 7 are both float64.
DTYPES: dict[int, np.dtype] = {
    1: np.dtype("u1"), 2: np.dtype("i1"), 3: np.dtype("<i2"), 4: np.dtype("<i4"),
    5: np.dtype("<i8"), 6: np.dtype("<f8"), 7: np.dtype("<f8"), 8: np.dtype("<u2"),
}
TOKEN_CODE = 8  # uint16: RWKV's 65536-token vocabulary
TOKEN_DTYPE = DTYPES[TOKEN_CODE]
END_OF_TEXT = 0
SAMPLES_PER_EPOCH = 40320  # RWKV-LM's fixed "mini-epoch"; its dataset asserts epoch_steps * real_bsz == 40320
DEFAULT_VAL_FRACTION = 0.005
DEFAULT_MIN_VAL_TOKENS = 4096  # 8 windows at RWKV-LM's demo ctx_len of 512
DEFAULT_PATTERNS = ("*.txt", "*.md")
_INT32_MAX = 2**31 - 1


def _prefix(path: str | os.PathLike) -> str:
    """Accept `data/x`, `data/x.bin` or `data/x.idx` for the same dataset."""
    path = os.fspath(path)
    return path[:-4] if path.endswith((".bin", ".idx")) else path


class BinidxWriter:
    """Write ``<prefix>.bin`` / ``<prefix>.idx`` in RWKV-LM's layout, one uint16 item per document.

    Use as a context manager. Everything goes to temporary files beside the target, and they are moved
    into place only when the ``with`` block exits without an exception, so an error, a crash or a full
    disk never leaves a half-written dataset under the final names. ``num_documents`` and
    ``num_tokens`` (end-of-text zeros included) count what the current ``with`` block added.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = _prefix(prefix)
        self._bin = None
        self._temps: list[str] = []

    def __enter__(self) -> BinidxWriter:
        if self._bin is not None:
            raise RuntimeError(f"BinidxWriter({self.prefix!r}) is already open")
        self.num_documents = 0
        self.num_tokens = 0
        self._sizes = array("q")
        os.makedirs(os.path.dirname(self.prefix) or ".", exist_ok=True)
        self._bin = self._open_temp(".bin")
        return self

    def _open_temp(self, suffix: str):
        path = f"{self.prefix}{suffix}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        self._temps.append(path)
        return open(path, "xb")

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document; token 0 (end of text) is added after it, so ``ids`` must not contain 0."""
        if self._bin is None:
            raise RuntimeError("add_document() must be called inside `with BinidxWriter(...) as w:`")
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"a document is a 1-D sequence of token ids, got shape {ids.shape}")
        if ids.size:
            if ids.dtype.kind not in "iu":
                raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
            lo, hi = int(ids.min()), int(ids.max())
            if hi > np.iinfo(TOKEN_DTYPE).max:
                raise ValueError(f"token id {hi} does not fit in uint16 binidx (ids must be < 65536)")
            if lo < 0:
                raise ValueError(f"token ids must be >= 0, got {lo}")
            if lo == END_OF_TEXT:
                raise ValueError("token 0 marks end of text and is appended by add_document(); "
                                 "a document must not contain it")
        if ids.size + 1 > _INT32_MAX:
            raise ValueError(f"a document of {ids.size + 1} tokens does not fit binidx's int32 sizes")
        doc = np.empty(ids.size + 1, dtype=TOKEN_DTYPE)
        doc[:-1] = ids
        doc[-1] = END_OF_TEXT
        self._bin.write(doc.tobytes())
        self._sizes.append(doc.size)
        self.num_documents += 1
        self.num_tokens += doc.size

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            self._bin.close()
            self._bin = None
            for path in self._temps:  # committed temps were renamed away; this removes the rest
                if os.path.exists(path):
                    os.remove(path)
            self._temps = []

    def _commit(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int64)
        pointers = np.zeros(len(sizes), dtype="<i8")
        np.cumsum(sizes[:-1] * TOKEN_DTYPE.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(sizes) + 1, dtype="<i8")
        with self._open_temp(".idx") as f:
            f.write(HEADER.pack(MAGIC, VERSION, TOKEN_CODE, len(sizes), len(doc_idx)))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.tobytes())
            f.write(doc_idx.tobytes())
            f.flush()
            os.fsync(f.fileno())
        bin_tmp, idx_tmp = self._temps
        # Remove an old index first: a crash between the two renames then leaves a .bin with no .idx,
        # which TokenDataset refuses, instead of a stale .idx next to the new .bin.
        if os.path.exists(self.prefix + ".idx"):
            os.remove(self.prefix + ".idx")
        os.replace(bin_tmp, self.prefix + ".bin")
        os.replace(idx_tmp, self.prefix + ".idx")
        if hasattr(os, "O_DIRECTORY"):  # make the renames durable (POSIX only)
            fd = os.open(os.path.dirname(self.prefix) or ".", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _map(path: str, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
    """Read-only memmap of `count` items at `offset` (numpy cannot map zero bytes)."""
    if count == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def is_prime(n: int) -> bool:
    """Trial division by 6k +/- 1; fast enough for the magic primes of any real dataset (< 1e12)."""
    if n < 4:
        return n >= 2
    if n % 2 == 0 or n % 3 == 0:
        return False
    for i in range(5, math.isqrt(n) + 1, 6):
        if n % i == 0 or n % (i + 2) == 0:
            return False
    return True


@functools.lru_cache(maxsize=None)
def magic_prime(data_size: int, ctx_len: int) -> int:
    """RWKV-LM's ``--magic_prime``: the largest prime p with p % 3 == 2 and p <= data_size // ctx_len - 1.

    Same search as RWKV-LM's make_data.py / compute_magic_prime.py, so it reproduces their printed value.
    """
    for p in range(data_size // ctx_len - 1, 1, -1):
        if p % 3 == 2 and is_prime(p):
            return p
    raise ValueError(f"{data_size} tokens is too little data for ctx_len {ctx_len}: "
                     f"the RWKV-LM sampler needs at least 3 * ctx_len = {3 * ctx_len} tokens")


def rwkv_window_start(prime: int, ctx_len: int, epoch: int, idx: int, world_size: int = 1, rank: int = 0) -> int:
    """Token offset of RWKV-LM's sample `idx` on `rank` in mini-epoch `epoch` (its dataset.py formula).

    Python ints throughout, so ii**3 never overflows; the float factor is computed in RWKV-LM's order.
    """
    ii = 1 + epoch * SAMPLES_PER_EPOCH + idx * world_size + rank
    factor = int(prime * ((math.sqrt(5) - 1) / 2))
    return (factor * ii**3 % prime) * ctx_len


class TokenDataset:
    """A binidx dataset (ours or RWKV-LM's), memory-mapped, seen as one flat token stream.

    The last ``max(ceil(val_fraction * len), min_val_tokens)`` tokens form the "val" split and the rest
    the "train" split; windows are always drawn inside one split. ``val_fraction=0`` disables the split,
    which is what RWKV-LM's trainer does.
    """

    def __init__(self, prefix: str | os.PathLike, *, val_fraction: float = DEFAULT_VAL_FRACTION,
                 min_val_tokens: int = DEFAULT_MIN_VAL_TOKENS) -> None:
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.prefix = _prefix(prefix)
        bin_path, idx_path = self.prefix + ".bin", self.prefix + ".idx"
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"binidx dataset file not found: {path}")

        idx_bytes = os.path.getsize(idx_path)
        if idx_bytes < HEADER.size:
            raise ValueError(f"{idx_path}: truncated index: {idx_bytes} bytes, the header alone is {HEADER.size}")
        with open(idx_path, "rb") as f:
            magic, version, code, n_items, n_doc_idx = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise ValueError(f"{idx_path}: not a binidx index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise ValueError(f"{idx_path}: unsupported binidx version {version}, expected {VERSION}")
        if code not in DTYPES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}, expected one of {sorted(DTYPES)}")
        expected = HEADER.size + 12 * n_items + 8 * n_doc_idx
        if idx_bytes != expected:
            problem = "truncated" if idx_bytes < expected else "corrupt"
            raise ValueError(f"{idx_path}: {problem} index: the header promises {n_items} items and {n_doc_idx} "
                             f"doc_idx entries ({expected} bytes), the file has {idx_bytes} bytes")
        self.dtype = DTYPES[code]
        self.sizes = _map(idx_path, np.dtype("<i4"), HEADER.size, n_items)
        self.pointers = _map(idx_path, np.dtype("<i8"), HEADER.size + 4 * n_items, n_items)
        self.doc_idx = _map(idx_path, np.dtype("<i8"), HEADER.size + 12 * n_items, n_doc_idx)

        if n_doc_idx == 0 or self.doc_idx[0] != 0 or np.any(np.diff(self.doc_idx) < 0) \
                or self.doc_idx[-1] > n_items:
            raise ValueError(f"{idx_path}: corrupt doc_idx: it must start at 0, never decrease "
                             f"and stay <= n_items ({n_items})")
        if np.any(self.sizes < 0):
            raise ValueError(f"{idx_path}: corrupt index: negative item sizes")
        item_starts = np.zeros(n_items + 1, dtype=np.int64)  # token offset of each item, plus the end
        np.cumsum(self.sizes, dtype=np.int64, out=item_starts[1:])
        if not np.array_equal(self.pointers, item_starts[:-1] * self.dtype.itemsize):
            raise ValueError(f"{idx_path}: corrupt index: pointers are not the running byte offsets of sizes")
        n_tokens = int(item_starts[-1])
        bin_bytes = os.path.getsize(bin_path)
        if bin_bytes != n_tokens * self.dtype.itemsize:
            problem = "truncated" if bin_bytes < n_tokens * self.dtype.itemsize else "size mismatch"
            raise ValueError(f"{bin_path}: {problem}: {idx_path} describes {n_tokens} {self.dtype.name} tokens "
                             f"({n_tokens * self.dtype.itemsize} bytes), the file has {bin_bytes} bytes")
        self._doc_starts = item_starts[self.doc_idx]
        self.tokens = _map(bin_path, self.dtype, 0, n_tokens)

        n_val = 0 if val_fraction == 0 else max(math.ceil(val_fraction * n_tokens), min_val_tokens)
        self.n_train = max(n_tokens - n_val, 0)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    def document(self, i: int) -> np.ndarray:
        """Tokens of document `i` (a memmap view, ending with 0 for data written by make_data or by us)."""
        if not -self.num_documents <= i < self.num_documents:
            raise IndexError(f"document {i} out of range for {self.num_documents} documents")
        i %= self.num_documents
        return self.tokens[self._doc_starts[i]:self._doc_starts[i + 1]]

    def split_range(self, split: str) -> tuple[int, int]:
        """[start, end) token range of "train" or "val"."""
        if split == "train":
            return 0, self.n_train
        if split == "val":
            return self.n_train, len(self)
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def _windows(self, starts: np.ndarray, ctx_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = np.asarray(self.tokens[starts[:, None] + np.arange(ctx_len + 1)], dtype=np.int64)  # [B, T+1]
        d = torch.from_numpy(d)
        return d[:, :-1].contiguous(), d[:, 1:].contiguous()

    def get_batch(self, batch_size: int, ctx_len: int, generator: torch.Generator,
                  split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` uniformly random windows from one split: x, y int64 [B, ctx_len], y = x shifted by one.

        Only `generator` is consumed, so restoring ``generator.get_state()`` resumes the exact same batches.
        """
        lo, hi = self.split_range(split)
        n_starts = hi - lo - ctx_len  # a window reads ctx_len + 1 tokens and must end by `hi`
        if ctx_len < 1 or n_starts < 1:
            raise ValueError(f"the {split} split of {self.prefix} has {hi - lo} tokens; a window of ctx_len "
                             f"{ctx_len} needs at least {ctx_len + 1} (change val_fraction / min_val_tokens)")
        starts = torch.randint(lo, lo + n_starts, (batch_size,), generator=generator).numpy()
        return self._windows(starts, ctx_len)

    def random_window(self, rng: torch.Generator, ctx_len: int,
                      split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """One random window: x, y int64 [ctx_len] from ctx_len + 1 consecutive tokens."""
        x, y = self.get_batch(1, ctx_len, rng, split)
        return x[0], y[0]

    def rwkv_batch(self, step: int, batch_size: int, ctx_len: int, *, world_size: int = 1, rank: int = 0,
                   prime: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """RWKV-LM's deterministic batch number `step` (0-based, counted on this rank) from the train split.

        `batch_size` is the per-rank micro batch. With ``val_fraction=0`` and the same magic prime this
        reproduces RWKV-LM's samples exactly; `prime` defaults to ``magic_prime(n_train, ctx_len)``.
        """
        if batch_size < 1 or world_size < 1 or SAMPLES_PER_EPOCH % (batch_size * world_size):
            raise ValueError(f"batch_size * world_size = {batch_size * world_size} must divide "
                             f"{SAMPLES_PER_EPOCH}, as in RWKV-LM")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if prime is None:
            prime = magic_prime(self.n_train, ctx_len)
        elif not (is_prime(prime) and prime % 3 == 2 and prime * ctx_len + 1 <= self.n_train):
            raise ValueError(f"magic prime {prime} must be a prime with p % 3 == 2 and p * ctx_len + 1 <= "
                             f"{self.n_train} train tokens")
        epoch, j = divmod(step, SAMPLES_PER_EPOCH // (batch_size * world_size))
        starts = np.array([rwkv_window_start(prime, ctx_len, epoch, j * batch_size + b, world_size, rank)
                           for b in range(batch_size)], dtype=np.int64)
        return self._windows(starts, ctx_len)


class Tokenizer(Protocol):
    """Anything with ``encode(str) -> list[int]`` (goose.tokenizer's tokenizers, or a test stub)."""

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class BuildSummary:
    """What build_dataset wrote. `tokens` counts the end-of-text 0s (it is RWKV-LM's data_size)."""

    documents: int
    tokens: int
    bytes: int  # input bytes read
    skipped: int  # empty documents (empty files, blank jsonl lines, empty "text")


def _input_files(inputs: Sequence[str | os.PathLike], patterns: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted({f for pattern in patterns for f in path.rglob(pattern) if f.is_file()})
            if not found:
                raise ValueError(f"{path}: no files match {list(patterns)}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    return files


def _documents(path: Path, render_chat: Callable[[list], str] | None) -> Iterator[tuple[str, int]]:
    """Yield (text, input bytes consumed): a .jsonl file gives one document per line, any other file one."""
    if path.suffix.lower() != ".jsonl":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not valid UTF-8 ({e})") from e
        yield text, path.stat().st_size
        return
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                yield "", len(line)
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: invalid JSON ({e})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if "text" in obj:
                text = obj["text"]
            elif "messages" in obj and render_chat is not None:
                text = render_chat(obj["messages"])
            elif "messages" in obj:
                raise ValueError(f'{where}: a chat line ("messages") needs a render_chat function; none was given')
            else:
                raise ValueError(f'{where}: no "text" field')
            if not isinstance(text, str):
                raise ValueError(f'{where}: "text" must be a string, got {type(text).__name__}')
            yield text, len(line)


def build_dataset(inputs: Sequence[str | os.PathLike], out_prefix: str | os.PathLike, tokenizer: Tokenizer, *,
                  patterns: Sequence[str] = DEFAULT_PATTERNS, render_chat: Callable[[list], str] | None = None,
                  progress: bool = True) -> BuildSummary:
    """Tokenize text files, directories and .jsonl files into ``out_prefix.bin/.idx``.

    A text file is one document; a directory contributes its files matching `patterns`, recursively, in
    sorted order; a .jsonl file gives one document per line: ``{"text": ...}``, or ``{"messages": [...]}``
    rendered to text by `render_chat`. Text files are read as UTF-8 with newlines normalised to "\\n".
    Empty documents are skipped. Nothing is written under `out_prefix` unless every input succeeds.
    """
    files = _input_files(inputs, patterns)
    total_bytes = sum(f.stat().st_size for f in files)
    documents = skipped = 0
    with BinidxWriter(out_prefix) as writer, \
            tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        for path in files:
            for text, n_bytes in _documents(path, render_chat):
                if text:
                    writer.add_document(tokenizer.encode(text))
                    documents += 1
                else:
                    skipped += 1
                bar.update(n_bytes)
    return BuildSummary(documents=documents, tokens=writer.num_tokens, bytes=total_bytes, skipped=skipped)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``goose data INPUT... --out PREFIX``."""
    p = subparsers.add_parser("data", help="tokenize text / jsonl into RWKV-LM binidx (.bin + .idx)",
                              description="Tokenize text files, directories and .jsonl files into "
                              "an RWKV-LM-compatible binidx dataset (one document per file / jsonl line).")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help='text files, directories, or .jsonl files with one {"text": ...} object per line')
    p.add_argument("--out", required=True, metavar="PREFIX", help="write PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", choices=("world", "byte"), default="world", help="default: world")
    p.add_argument("--glob", action="append", metavar="PATTERN",
                   help="file pattern inside directories, repeatable (default: *.txt and *.md)")
    p.add_argument("--ctx-len", type=int, metavar="N",
                   help="also print RWKV-LM's --magic_prime and --my_exit_tokens for this context length")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> None:
    """Build the dataset described by the parsed `goose data` arguments and print a summary."""
    from goose.tokenizer import get_tokenizer

    out = _prefix(args.out)
    s = build_dataset(args.inputs, out, get_tokenizer(args.tokenizer), patterns=args.glob or DEFAULT_PATTERNS)
    print(f"wrote {out}.bin / {out}.idx: {s.documents} documents, {s.tokens} tokens "
          f"from {s.bytes} bytes ({s.skipped} empty documents skipped)")
    if args.ctx_len:
        try:
            print(f"RWKV-LM: --my_exit_tokens {s.tokens} --magic_prime {magic_prime(s.tokens, args.ctx_len)} "
                  f"--ctx_len {args.ctx_len}")
        except ValueError as e:
            print(f"no magic prime: {e}")
