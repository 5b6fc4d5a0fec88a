"""Tests for goose.tokenizer: World (both backends) against the official rwkv tokenizer,
ByteTokenizer, StreamDecoder and the chat template."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest

import goose.tokenizer as tok
from goose.tokenizer import (
    ByteTokenizer,
    StreamDecoder,
    WorldTokenizer,
    get_tokenizer,
    render_chat,
    render_chat_ids,
)

BACKENDS = ["rust", "python"]

SPEC_VECTORS = [
    ("The Eiffel tower is in the city of", [6699, 304, 25740, 109, 39990, 4600, 4596, 22590, 30449, 4706]),
    ("User: hi\n\nAssistant:", [24281, 59, 4571, 261, 5585, 41693, 59]),
    ("你好，世界！", [10464, 11685, 19137, 10267, 14610, 19126]),
    ("Hello world\n\n", [33155, 40213, 261]),
    (
        "\nIn a shocking finding, scientist discovered a herd of dragons living in a remote, "
        "previously unexplored valley, in Tibet. Even more surprising to the researchers was the "
        "fact that the dragons spoke perfect Chinese.",
        [11, 1136, 332, 57212, 51746, 45, 60455, 61885, 332, 31076, 4706, 51525, 46456, 4596, 332,
         47064, 45, 62367, 22658, 2315, 8114, 1843, 47698, 45, 4596, 37461, 47, 28846, 31458, 62620,
         4811, 22590, 63843, 22748, 22590, 30808, 32227, 22590, 51525, 39774, 52445, 50072, 47],
    ),
    ("\n", [11]),
    (" ", [33]),
    ("\n\n", [261]),
    ("", []),
]


@pytest.fixture(scope="module", params=BACKENDS)
def world(request) -> WorldTokenizer:
    return WorldTokenizer(backend=request.param)


@pytest.fixture(scope="module")
def official():
    rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
    path = Path(rwkv_tokenizer.__file__).with_name("rwkv_vocab_v20230424.txt")
    return rwkv_tokenizer.TRIE_TOKENIZER(str(path))


def _random_text(rng: random.Random, vocab_strings: list[str], pieces: int) -> str:
    """Multilingual noise: ASCII, Latin-1, CJK, emoji, any code point, whitespace runs, vocab tokens."""
    words = ["the", " the", "hello", " world", "Hello", "ing", " of", "RWKV", "def", "\t", "...", "。"]
    out = []
    for _ in range(pieces):
        kind = rng.randrange(8)
        n = rng.randint(1, 12)
        if kind == 0:
            out.append("".join(rng.choice(string.printable) for _ in range(n)))
        elif kind == 1:
            out.append("".join(chr(rng.randint(0x80, 0xFF)) for _ in range(n)))
        elif kind == 2:
            out.append("".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(n)))
        elif kind == 3:
            out.append("".join(chr(rng.randint(0x1F300, 0x1FAFF)) for _ in range(n)))
        elif kind == 4:
            cps = (rng.randint(0, 0x10FFFF) for _ in range(n))
            out.append("".join(chr(cp) for cp in cps if not 0xD800 <= cp < 0xE000))
        elif kind == 5:
            out.append(rng.choice([" ", "\n", "\t", "\r\n", "\u3000", "-", "="]) * rng.randint(1, 140))
        elif kind == 6:
            out.append("".join(rng.choice(words) for _ in range(n)))
        else:
            out.append("".join(rng.choice(vocab_strings) for _ in range(n)))
    return "".join(out)


@pytest.fixture(scope="module")
def random_texts() -> list[str]:
    table = tok.load_world_vocab(str(tok.world_vocab_path()))
    vocab_strings = []
    for token in table[1:]:
        try:
            vocab_strings.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    rng = random.Random(20240424)
    texts = [_random_text(rng, vocab_strings, rng.randint(1, 30)) for _ in range(400)]
    texts.append("".join(map(chr, range(256))))  # every single byte / Latin-1 code point
    texts += [chr(b) for b in range(256)]
    texts.append(_random_text(rng, vocab_strings, 20000))  # one long text
    return texts


# --- World tokenizer ------------------------------------------------------------------------


@pytest.mark.parametrize("text,ids", SPEC_VECTORS)
def test_spec_vectors(world, text, ids):
    assert world.encode(text) == ids
    assert world.decode(ids) == text


def test_matches_official_tokenizer(world, official, random_texts):
    for text in random_texts:
        assert world.encode(text) == official.encode(text), repr(text[:80])


def test_round_trip(world, random_texts):
    for text in random_texts:
        ids = world.encode(text)
        assert world.decode(ids) == text
        assert world.decode_bytes(ids) == text.encode("utf-8")


def test_every_token_decodes_to_its_bytes(world, official):
    assert len(official.idx2token) == 65529
    for token_id, token in official.idx2token.items():
        assert world.token_bytes(token_id) == token
    ids = list(official.idx2token)
    assert world.decode_bytes(ids) == b"".join(official.idx2token.values())


def test_world_constants_and_vocab_source(world):
    path = tok.world_vocab_path()
    assert path.name == "rwkv_vocab_v20230424.txt"
    assert path.parent.name == "pyrwkv_tokenizer"
    assert world.vocab_size == 65536
    assert world.eot_id == 0
    assert world.name == "world"
    assert world.backend in BACKENDS


def test_end_of_text_and_bad_ids(world):
    assert world.token_bytes(0) == b""
    assert world.decode([0]) == ""
    assert world.decode([33, 0, 33]) == "  "
    for bad in (-1, 65530, 65535, 65536, 2**40):
        with pytest.raises(ValueError, match=str(bad)):
            world.decode([33, bad])
        with pytest.raises(ValueError):
            world.decode_bytes([bad])
        with pytest.raises(ValueError):
            world.token_bytes(bad)
    with pytest.raises(ValueError, match="unused padding"):
        world.token_bytes(65531)


def test_decode_accepts_arrays(world):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    ids = world.encode("Hello world\n\n")
    assert world.decode(np.array(ids)) == "Hello world\n\n"
    assert world.decode(torch.tensor(ids)) == "Hello world\n\n"
    assert world.decode(iter(ids)) == "Hello world\n\n"


def test_invalid_utf8_decode(world):
    # ids 1..256 are the single bytes 0x00..0xFF
    assert [world.token_bytes(b + 1) for b in range(256)] == [bytes([b]) for b in range(256)]
    first_byte_of_ni = "你".encode("utf-8")[0] + 1
    assert world.decode_bytes([first_byte_of_ni]) == b"\xe4"
    assert world.decode([first_byte_of_ni]) == "\ufffd"
    assert world.decode([0xFF + 1, 33]) == "\ufffd "
    ids = [b + 1 for b in "你".encode("utf-8")]
    assert world.decode(ids) == "你"  # complete again once all bytes are there
    assert world.decode(ids[:2] + [33]) == "\ufffd "


def test_encode_input_errors(world):
    with pytest.raises(TypeError):
        world.encode(b"bytes")
    with pytest.raises(UnicodeEncodeError):
        world.encode("lone \ud800 surrogate")


def test_backend_selection(monkeypatch):
    assert WorldTokenizer(backend="python").backend == "python"
    with pytest.raises(ValueError):
        WorldTokenizer(backend="c++")
    monkeypatch.setattr(tok, "_rust_tokenizer_class", lambda: None)
    assert WorldTokenizer().backend == "python"
    with pytest.raises(ImportError):
        WorldTokenizer(backend="rust")


def test_auto_prefers_rust():
    pytest.importorskip("pyrwkv_tokenizer")
    assert WorldTokenizer().backend == "rust"


def test_vocab_parser_checks_lengths(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("1 'a' 1\n2 b'\\xff' 1\n3 '你' 3\n", encoding="utf-8")
    assert tok.load_world_vocab(str(good)) == (b"", b"a", b"\xff", "你".encode("utf-8"))
    bad = tmp_path / "bad.txt"
    bad.write_text("1 'a' 1\n2 '你' 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="byte length"):
        tok.load_world_vocab(str(bad))
    code = tmp_path / "code.txt"
    code.write_text("1 __import__('os') 1\n", encoding="utf-8")
    with pytest.raises(ValueError):
        tok.load_world_vocab(str(code))


# --- StreamDecoder ----------------------------------------------------------------------------


def _check_stream(tokenizer, ids: list[int], expected: str) -> None:
    stream = StreamDecoder(tokenizer)
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + stream.flush() == expected


def test_stream_decoder_never_splits_characters(world):
    text = "Emoji 🦜🪿 and rare CJK 龘䶮𠀋 mixed with é, ß and 你好。\n\n"
    ids = world.encode(text)
    # the test needs tokens that end inside a character
    assert any(not _is_utf8(world.token_bytes(i)) for i in ids)
    _check_stream(world, ids, text)
    byte_tokenizer = ByteTokenizer()
    _check_stream(byte_tokenizer, byte_tokenizer.encode(text), text)


def test_stream_decoder_matches_decode_on_random_ids(world):
    rng = random.Random(7)
    stream = StreamDecoder(world)
    for _ in range(50):
        ids = [rng.choice([rng.randint(1, 256), rng.randint(0, 65529)]) for _ in range(rng.randint(0, 40))]
        text = "".join(stream.push(i) for i in ids) + stream.flush()  # flush resets for reuse
        assert text == world.decode(ids)


def test_stream_decoder_flush_emits_unfinished_character(world):
    stream = StreamDecoder(world)
    assert stream.push("你".encode("utf-8")[0] + 1) == ""
    assert stream.flush() == "\ufffd"
    assert stream.push(33) == " "


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- ByteTokenizer and factory -----------------------------------------------------------------


def test_byte_tokenizer(random_texts):
    t = ByteTokenizer()
    assert t.vocab_size == 257 and t.eot_id == 0 and t.name == "byte"
    assert t.encode("A\x00é") == [0x41 + 1, 0 + 1, 0xC3 + 1, 0xA9 + 1]
    for text in random_texts:
        ids = t.encode(text)
        assert t.decode(ids) == text
        assert max(ids, default=1) <= 256 and min(ids, default=1) >= 1
    assert t.decode([0, 0x41 + 1, 0]) == "A"
    assert t.decode([0xE4 + 1]) == "\ufffd"
    for bad in (-1, 257):
        with pytest.raises(ValueError):
            t.decode([bad])


def test_get_tokenizer():
    assert isinstance(get_tokenizer("world"), WorldTokenizer)
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    for name in ("world", "byte"):
        assert get_tokenizer(name).name == name
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("gpt2")


# --- chat template ----------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "  You are helpful.\n\n\nBe brief.  "},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "Hello!\r\n\r\nHow can I help?"},
    {"role": "user", "content": "写一首诗。"},
    {"role": "assistant", "content": "春眠不觉晓。"},
]


def test_render_chat():
    expected = (
        "System: You are helpful.\nBe brief.\n\n"
        "User: hi\n\n"
        "Assistant: Hello!\nHow can I help?\n\n"
        "User: 写一首诗。\n\n"
        "Assistant: 春眠不觉晓。\n\n"
    )
    assert render_chat(CONVERSATION, add_generation_prompt=False) == expected
    assert render_chat(CONVERSATION) == expected + "Assistant:"
    assert render_chat([]) == "Assistant:"


def test_render_chat_spec_prompt():
    prompt = render_chat([{"role": "user", "content": "hi"}])
    assert prompt == "User: hi\n\nAssistant:"
    assert WorldTokenizer().encode(prompt) == [24281, 59, 4571, 261, 5585, 41693, 59]


def test_render_chat_validates_messages():
    with pytest.raises(ValueError, match="role"):
        render_chat([{"role": "bot", "content": "x"}])
    with pytest.raises(ValueError):
        render_chat([{"content": "x"}])
    with pytest.raises(TypeError):
        render_chat([{"role": "user", "content": None}])
    with pytest.raises(ValueError):
        render_chat_ids([{"role": "tool", "content": "x"}], ByteTokenizer())


@pytest.mark.parametrize("name", ["world", "byte"])
def test_render_chat_ids_mask(name):
    tokenizer = get_tokenizer(name)
    ids, mask = render_chat_ids(CONVERSATION, tokenizer)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    # same ids as encoding the rendered text in one go: no token straddles a mask boundary
    assert ids == tokenizer.encode(render_chat(CONVERSATION, add_generation_prompt=False))
    spans, current = [], []
    for token_id, m in zip(ids, mask):
        if m:
            current.append(token_id)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    replies = [tok.clean_content(m["content"]) for m in CONVERSATION if m["role"] == "assistant"]
    assert [tokenizer.decode(span) for span in spans] == [f" {r}\n\n" for r in replies]
    unmasked = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert unmasked == "System: You are helpful.\nBe brief.\n\nUser: hi\n\nAssistant:User: 写一首诗。\n\nAssistant:"


def test_render_chat_ids_without_assistant():
    ids, mask = render_chat_ids([{"role": "user", "content": "hi"}], ByteTokenizer())
    assert mask == [0] * len(ids) and ByteTokenizer().decode(ids) == "User: hi\n\n"

