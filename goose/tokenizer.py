"""Tokenizers and the chat template for RWKV models.

Two tokenizers share one interface (:class:`Tokenizer`):

* :class:`WorldTokenizer` - the RWKV "World" vocabulary ``rwkv_vocab_v20230424`` used by all
  released RWKV-7 checkpoints (greedy longest match over UTF-8 bytes).
* :class:`ByteTokenizer` - one token per byte, for small models trained from scratch.

Both reserve id 0 for end of text. Decoding works on bytes; :meth:`Tokenizer.decode` turns
invalid UTF-8 into U+FFFD replacement characters, and :class:`StreamDecoder` decodes a token
stream without ever splitting a character (generation uses it).

The chat template (``"User: ...\\n\\nAssistant: ...\\n\\n"``) is defined here and nowhere else:
:func:`render_chat` for inference prompts, :func:`render_chat_ids` for supervised fine-tuning.
"""

from __future__ import annotations

import abc
import ast
import codecs
import functools
import importlib.util
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

EOT_ID = 0
"""Id of the end-of-text token in every tokenizer of this module."""

WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
WORLD_VOCAB_SIZE = 65536
"""Rows of the embedding / head of World models (the vocabulary file fills ids 1..65529)."""

Backend = Literal["auto", "rust", "python"]


class Tokenizer(abc.ABC):
    """Common interface: text <-> token ids, with id 0 = end of text.

    Subclasses provide ``encode`` and a table mapping each id to its bytes; decoding is shared so
    that every tokenizer (and every backend) treats bad ids and invalid UTF-8 the same way.
    """

    name: str
    """Short name recorded in checkpoints and accepted by :func:`get_tokenizer`."""
    eot_id: int = EOT_ID
    _table: Sequence[bytes]  # id -> bytes for every id that has bytes; id 0 maps to b""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the model's embedding and head must cover."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (never includes end of text)."""

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one token (``b""`` for end of text). Raises ValueError for unknown ids."""
        token_id = operator.index(token_id)
        if not 0 <= token_id < len(self._table):
            raise ValueError(self._bad_id_message(token_id))
        return self._table[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated bytes of ``ids`` (end of text contributes nothing).

        Accepts any iterable of ints, including numpy arrays and torch tensors.
        Raises ValueError for ids that are negative, >= ``vocab_size``, or unused slots.
        """
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if not ids:
            return b""
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= len(self._table):
            raise ValueError(self._bad_id_message(lo if lo < 0 else hi))
        return b"".join(map(self._table.__getitem__, ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``. Invalid UTF-8 (e.g. a character cut in half) becomes U+FFFD.

        ``errors="replace"`` is used so that decoding arbitrary model output never raises; use
        :meth:`decode_bytes` for the exact bytes or :class:`StreamDecoder` while generating.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _bad_id_message(self, token_id: int) -> str:
        if 0 <= token_id < self.vocab_size:
            return (
                f"token id {token_id} has no bytes in the {self.name} tokenizer: ids "
                f"{len(self._table)}..{self.vocab_size - 1} are unused padding of the "
                f"{self.vocab_size}-row embedding"
            )
        return f"token id {token_id} is out of range for the {self.name} tokenizer [0, {self.vocab_size})"


# ---------------------------------------------------------------------------------------------
# World tokenizer


def world_vocab_path() -> Path:
    """Path of ``rwkv_vocab_v20230424.txt`` as shipped inside the ``pyrwkv_tokenizer`` package.

    The package directory is found without importing it, so the pure-Python backend still works
    when the compiled extension cannot be loaded.
    """
    spec = importlib.util.find_spec("pyrwkv_tokenizer")
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / WORLD_VOCAB_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{WORLD_VOCAB_FILE} not found: install the 'pyrwkv-tokenizer' package, which ships it"
    )


@functools.lru_cache(maxsize=4)
def load_world_vocab(path: str) -> tuple[bytes, ...]:
    """Parse a World vocabulary file into a table id -> bytes, with ``table[0] = b""`` (end of text).

    Each line is ``<id> <python str or bytes literal> <byte length>``; literals are parsed with
    ``ast.literal_eval`` (never ``eval``), str literals are UTF-8 encoded, ids must be 1, 2, 3, ...
    and every byte length is checked. Cached because the file takes ~0.2 s to parse.
    """
    table = [b""]
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            first, last = line.find(" "), line.rfind(" ")
            if first <= 0 or last <= first:
                raise ValueError(f"{path}:{line_no}: expected '<id> <literal> <length>'")
            token = ast.literal_eval(line[first + 1 : last])
            if isinstance(token, str):
                token = token.encode("utf-8")
            if not isinstance(token, bytes):
                raise ValueError(f"{path}:{line_no}: token literal is not str or bytes")
            if int(line[:first]) != len(table):
                raise ValueError(f"{path}:{line_no}: expected id {len(table)}, got {line[:first]}")
            if int(line[last + 1 :]) != len(token):
                raise ValueError(f"{path}:{line_no}: byte length {line[last + 1:]} != {len(token)}")
            table.append(token)
    if len(table) > WORLD_VOCAB_SIZE:
        raise ValueError(f"{path}: {len(table) - 1} tokens do not fit in {WORLD_VOCAB_SIZE} ids")
    return tuple(table)


# A trie node maps the next byte to (id of the token ending there or 0, child node or None).
_TrieNode = dict[int, tuple[int, "_TrieNode | None"]]


@functools.lru_cache(maxsize=4)
def _build_trie(table: tuple[bytes, ...]) -> tuple[tuple[int, _TrieNode | None], ...]:
    """Byte trie of ``table`` as 256 root entries (one per first byte), for greedy matching."""
    root: dict = {}
    for token_id, token in enumerate(table):
        if not token:
            continue
        node = root
        for byte in token[:-1]:
            node = node.setdefault(byte, [0, {}])[1]
        node.setdefault(token[-1], [0, {}])[0] = token_id

    def freeze(node: dict) -> _TrieNode:
        return {b: (tid, freeze(child) if child else None) for b, (tid, child) in node.items()}

    frozen = freeze(root)
    missing = [b for b in range(256) if b not in frozen or frozen[b][0] == 0]
    if missing:
        raise ValueError(f"vocabulary lacks single-byte tokens for bytes {missing[:8]}...")
    return tuple(frozen[b] for b in range(256))


def _rust_tokenizer_class() -> type | None:
    """``pyrwkv_tokenizer.WorldTokenizer`` if the compiled extension imports, else None."""
    try:
        from pyrwkv_tokenizer import WorldTokenizer as RustWorldTokenizer
    except ImportError:
        return None
    return RustWorldTokenizer


class WorldTokenizer(Tokenizer):
    """The RWKV World tokenizer: greedy longest match over UTF-8 bytes, left to right.

    ``backend`` only affects :meth:`encode`: ``"rust"`` uses ``pyrwkv_tokenizer`` (fast),
    ``"python"`` a pure-Python byte trie, ``"auto"`` picks rust when it imports. Both produce the
    same ids as the official ``rwkv`` package. Decoding is always done here in Python, because the
    Rust ``decode`` panics on invalid UTF-8 and unknown ids and decodes id 0 as ``"\\x00"``.

    Id 0 is end of text (empty bytes); ids 65530..65535 exist in the model but have no token.
    """

    name = "world"
    USED_IDS = 65530
    """Ids 0..65529 carry tokens; a World model needs at least this many embedding rows."""

    def __init__(self, backend: Backend = "auto", vocab_path: str | Path | None = None) -> None:
        if backend not in ("auto", "rust", "python"):
            raise ValueError(f"backend must be 'auto', 'rust' or 'python', got {backend!r}")
        path = str(vocab_path if vocab_path is not None else world_vocab_path())
        self._table = load_world_vocab(path)
        rust_cls = _rust_tokenizer_class() if backend != "python" else None
        if backend == "rust" and rust_cls is None:
            raise ImportError("backend='rust' needs the compiled 'pyrwkv_tokenizer' extension")
        if rust_cls is not None:
            self.backend = "rust"
            self._rust = rust_cls(path)
        else:
            self.backend = "python"
            self._trie = _build_trie(self._table)
            self._max_len = max(map(len, self._table))

    @property
    def vocab_size(self) -> int:
        """65536: the embedding size of World models (ids without a token are padding)."""
        return WORLD_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (lone surrogates raise UnicodeEncodeError, as in ``str.encode``)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if self.backend == "rust":
            return self._rust.encode(text)
        return self._encode_python(text.encode("utf-8"))

    def _encode_python(self, data: bytes) -> list[int]:
        # Walk the trie from each start, remembering the last node that completed a token: the
        # vocabulary is not prefix-closed, so the deepest node reached may not be a token.
        roots, tail = self._trie, self._max_len - 1
        out: list[int] = []
        append = out.append
        i, n = 0, len(data)
        while i < n:
            best, node = roots[data[i]]  # every single byte is a token
            i += 1
            end = j = i
            if node is not None:
                for byte in data[i : i + tail]:
                    entry = node.get(byte)
                    if entry is None:
                        break
                    j += 1
                    token_id, node = entry
                    if token_id:
                        best, end = token_id, j
                    if node is None:
                        break
            append(best)
            i = end
        return out


# ---------------------------------------------------------------------------------------------
# Byte tokenizer


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte, for small models trained from scratch.

    Id 0 is end of text and byte ``b`` is id ``b + 1``, so ``vocab_size`` is 257. (Ids 1..256
    happen to be the single-byte tokens of the World vocabulary too.)
    """

    name = "byte"

    def __init__(self) -> None:
        self._table = (b"",) + tuple(bytes([b]) for b in range(256))

    @property
    def vocab_size(self) -> int:
        """257: end of text plus the 256 byte values."""
        return 257

    def encode(self, text: str) -> list[int]:
        """``[b + 1 for b in text.encode("utf-8")]``."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return [b + 1 for b in text.encode("utf-8")]


TOKENIZERS: dict[str, type[Tokenizer]] = {"world": WorldTokenizer, "byte": ByteTokenizer}


def get_tokenizer(name: str) -> Tokenizer:
    """Tokenizer by the name a checkpoint records (``tokenizer.name``): "world" or "byte"."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; known: {sorted(TOKENIZERS)}")
    return TOKENIZERS[name]()


def tokenizer_for_vocab(vocab_size: int, name: str | None = None) -> Tokenizer:
    """The tokenizer for a model with ``vocab_size`` rows, or ``name`` checked against it.

    World models have 65536 rows (65530 used); byte models 257. Anything else (e.g. the 50304 of
    "Pile" models, whose 20B tokenizer goose does not ship) is a clear error, never silent garbage.
    """
    if name is None:
        if vocab_size >= WorldTokenizer.USED_IDS:
            name = "world"
        elif vocab_size == ByteTokenizer().vocab_size:
            name = "byte"
        else:
            raise ValueError(f"no tokenizer for a model with vocab size {vocab_size}: goose ships the World "
                             f"tokenizer (vocab 65536) and the byte tokenizer (vocab 257)")
    tokenizer = get_tokenizer(name)
    needed = WorldTokenizer.USED_IDS if name == "world" else tokenizer.vocab_size
    if vocab_size < needed:
        raise ValueError(f"tokenizer/model mismatch: the {name} tokenizer emits ids up to {needed - 1} but the "
                         f"model's vocabulary has only {vocab_size} rows")
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Streaming decode


class StreamDecoder:
    """Turns generated token ids into text pieces that never split a UTF-8 character.

    A token may end in the middle of a multi-byte character; its bytes are held back until the
    character is complete. Invalid bytes become U+FFFD, exactly as in :meth:`Tokenizer.decode`,
    so the pieces plus :meth:`flush` always concatenate to ``tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became complete (possibly "")."""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: return held-back bytes (an unfinished character becomes U+FFFD) and reset."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


# ---------------------------------------------------------------------------------------------
# Chat template

CHAT_ROLES: dict[str, str] = {"system": "System", "user": "User", "assistant": "Assistant"}
"""Message role -> speaker name in the prompt."""

TURN_SEPARATOR = "\n\n"
"""Ends every turn; also the stop string of generation (stop on text: it can be split across
tokens, e.g. a reply ending in "。" is tokenized as "。\\n", "\\n")."""

_NEWLINE_RUNS = re.compile(r"\n{2,}")


def clean_content(text: str) -> str:
    """Normalize message text as the official RWKV demos do.

    CRLF -> LF, strip surrounding whitespace, and collapse runs of 2+ newlines into one, since
    "\\n\\n" would otherwise end the turn early.
    """
    return _NEWLINE_RUNS.sub("\n", text.replace("\r\n", "\n").strip())


def _turns(messages: Iterable[Mapping[str, str]]) -> list[tuple[str, str]]:
    """Validated (role, cleaned content) pairs."""
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {index} must be a dict with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise ValueError(f"message {index}: unknown role {role!r}; expected one of {list(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise TypeError(f"message {index}: content must be str, got {type(content).__name__}")
        turns.append((role, clean_content(content)))
    return turns


def render_chat(messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """Render messages as ``"User: hi\\n\\nAssistant: hello\\n\\n"``.

    With ``add_generation_prompt`` the result ends in ``"Assistant:"`` (no trailing space: the
    model generates the space as part of its first token).
    """
    text = "".join(f"{CHAT_ROLES[role]}: {content}{TURN_SEPARATOR}" for role, content in _turns(messages))
    return text + "Assistant:" if add_generation_prompt else text


def render_chat_ids(
    messages: Iterable[Mapping[str, str]], tokenizer: Tokenizer
) -> tuple[list[int], list[int]]:
    """Token ids of ``render_chat(messages, add_generation_prompt=False)`` and a loss mask.

    The mask is 1 exactly on the tokens of each assistant reply, i.e. ``" " + content + "\\n\\n"``
    (what the model generates after "Assistant:", including the separator so it learns to stop),
    and 0 on everything else. Replies are encoded separately from the surrounding prompt text so
    that no token straddles a mask boundary; for the World vocabulary this gives the same ids as
    encoding the whole string, because no token contains ": " or a newline followed by a role.
    """
    segments: list[list] = []  # [text, mask], neighbours differ in mask
    for role, content in _turns(messages):
        if role == "assistant":
            pieces = [("Assistant:", 0), (f" {content}{TURN_SEPARATOR}", 1)]
        else:
            pieces = [(f"{CHAT_ROLES[role]}: {content}{TURN_SEPARATOR}", 0)]
        for piece, piece_mask in pieces:
            if segments and segments[-1][1] == piece_mask:
                segments[-1][0] += piece
            else:
                segments.append([piece, piece_mask])
    ids: list[int] = []
    mask: list[int] = []
    for text, text_mask in segments:
        text_ids = tokenizer.encode(text)
        ids += text_ids
        mask += [text_mask] * len(text_ids)
    return ids, mask
