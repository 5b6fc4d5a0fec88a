"""Engine: batched decoding with sequences joining and leaving equals generate() run on each alone."""
import pytest
import torch

from goose.engine import Engine
from goose.generate import generate
from goose.sampling import SamplingParams
from goose.tokenizer import ByteTokenizer, WorldTokenizer

PROMPTS = ["User: hi\n\nAssistant:", "The Eiffel tower is in the city of", "x", "Once upon a time there was"]


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture
def model(tiny_byte_model):
    return tiny_byte_model


def assert_same(got, alone):
    assert (got.tokens, got.text, got.finish_reason, got.prompt_tokens) == \
        (alone.tokens, alone.text, alone.finish_reason, alone.prompt_tokens)
    for (name, x), y in zip(got.state.tensors().items(), alone.state.tensors().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("vocab", ["byte", "world"])
def test_greedy_batch_equals_generate_per_row(vocab, tiny_model, tiny_byte_model):
    model, tok = (tiny_byte_model, ByteTokenizer()) if vocab == "byte" else (tiny_model, WorldTokenizer())
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (12, 5, 9, 16)]
    results = Engine(model, tok, max_batch=4).run(PROMPTS, params)
    for prompt, p, got in zip(PROMPTS, params, results):
        assert_same(got, generate(model, tok, prompt, p).run())


def test_sequences_join_and_leave_mid_batch(model, tok):
    """Two slots for six sequences: they wait for a slot, join while others run, leave at different
    steps (length, stop token, stop string), and rows moved by a departure keep their own state."""
    ref = generate(model, tok, PROMPTS[0], SamplingParams(temperature=0, max_tokens=12)).run()
    params = [
        SamplingParams(temperature=0, max_tokens=12, stop_tokens=(ref.tokens[5],)),
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=9, seed=3),
        SamplingParams(temperature=0, max_tokens=3),
        SamplingParams(temperature=0, max_tokens=20, stop_strings=(tok.decode(ref.tokens[2:4]),)),
        SamplingParams(max_tokens=0),
        SamplingParams(top_p=1.0, max_tokens=7, seed=4, presence_penalty=0.5, frequency_penalty=0.5),
    ]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0], "y", PROMPTS[3]]
    engine = Engine(model, tok, max_batch=2, prefill_chunk=4)
    ids = [engine.add(p, sp) for p, sp in zip(prompts[:3], params[:3])]
    pieces: dict[int, list[str]] = {}
    finished = []
    for step in range(200):
        if step == 3:                      # late arrivals, while the batch is running
            ids += [engine.add(p, sp) for p, sp in zip(prompts[3:], params[3:])]
        if not engine.has_work() and step > 3:
            break
        for ev in engine.step():
            pieces.setdefault(ev.seq_id, []).append(ev.text)
            if ev.finished:
                finished.append(ev.seq_id)
        assert len(engine.running) <= 2
    assert sorted(finished) == sorted(ids)
    for i, prompt, p in zip(ids, prompts, params):
        got = engine.result(i)
        assert "".join(pieces[i]) == got.text
        assert_same(got, generate(model, tok, prompt, p).run())
    assert engine.result(ids[0]).finish_reason == "stop"
    assert engine.result(ids[3]).finish_reason == "stop"


def test_chunked_prefill_of_a_long_prompt_equals_one_prefill(model, tok):
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0, max_tokens=4)
    one = Engine(model, tok, prefill_chunk=1000).run([ids], params)[0]
    chunked = Engine(model, tok, prefill_chunk=7).run([ids], params)[0]
    assert_same(chunked, one)
    with torch.no_grad():
        _, state = model(torch.tensor([ids + one.tokens[:-1]]))
        _, state = model(torch.tensor([one.tokens[-1:]]), state)
    torch.testing.assert_close(chunked.state.wkv, state.wkv, rtol=1e-4, atol=1e-5)


def test_prefill_interleaves_with_decoding(model, tok):
    """A long prompt is prefilled one chunk per step while the running sequence keeps decoding."""
    engine = Engine(model, tok, prefill_chunk=8)
    engine.add("x", SamplingParams(temperature=0, max_tokens=30))
    engine.step()                                    # prefilled, joined and decoded its first token
    engine.add(list(range(100, 180)), SamplingParams(temperature=0, max_tokens=2))
    decoded = []
    for _ in range(5):                               # 80 prompt tokens = 10 chunks: still prefilling
        engine.step()
        decoded.append(len(engine.running[0].seq.tokens))
    assert len(engine.running) == 1 and decoded == [2, 3, 4, 5, 6]
    assert engine.waiting[0].done == 40


def test_continues_from_a_state_and_leaves_it_alone(model, tok):
    context = generate(model, tok, "Once upon a time", SamplingParams(temperature=0, max_tokens=3)).run().state
    before = context.clone()
    engine = Engine(model, tok)
    i = engine.add(" there was", SamplingParams(temperature=0, max_tokens=6), state=context)
    while engine.has_work():
        engine.step()
    assert_same(engine.result(i), generate(model, tok, " there was", SamplingParams(temperature=0, max_tokens=6),
                                           state=context).run())
    assert all(torch.equal(a, b) for a, b in zip(context.tensors().values(), before.tensors().values()))


def test_errors(model, tok):
    engine = Engine(model, tok)
    with pytest.raises(ValueError, match="at least one token"):
        engine.add("", SamplingParams())
    with pytest.raises(ValueError, match="batch-1"):
        engine.add("x", SamplingParams(), state=model.new_state(2))
    with pytest.raises(KeyError):
        engine.result(0)
    with pytest.raises(ValueError):
        Engine(model, tok, max_batch=0)


def test_cancel_drops_a_sequence_and_the_others_continue(model, tok):
    params = SamplingParams(temperature=0, max_tokens=10)
    engine = Engine(model, tok, max_batch=4)
    ids = [engine.add(p, params) for p in PROMPTS[:3]]
    for _ in range(4):
        engine.step()
    assert len(engine.running) == 3
    assert engine.cancel(ids[0])                     # running: its row is taken by the last one
    late = engine.add(PROMPTS[3], params)
    assert engine.cancel(late)                       # still waiting
    assert not engine.cancel(late) and not engine.cancel(99)
    while engine.has_work():
        engine.step()
    assert sorted(engine.finished) == ids[1:]
    for i, prompt in zip(ids[1:], PROMPTS[1:3]):
        assert_same(engine.result(i), generate(model, tok, prompt, params).run())


def test_snapshots_report_the_state_after_each_prompt_prefix(model, tok):
    ids = list(range(60, 90))
    got = {}
    engine = Engine(model, tok, prefill_chunk=8)
    i = engine.add(ids, SamplingParams(temperature=0, max_tokens=3), snapshots=(30, 5, 12),
                   on_snapshot=lambda n, s: got.setdefault(n, s))
    while engine.has_work():
        engine.step()
    assert sorted(got) == [5, 12, 30]
    for n, state in got.items():
        with torch.no_grad():
            _, ref = model(torch.tensor([ids[:n]]))
        for (name, x), y in zip(state.tensors().items(), ref.tensors().values()):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=f"{name} after {n} tokens")
    assert got[30].wkv.data_ptr() != engine.result(i).state.wkv.data_ptr()   # a copy, not the live state
    assert_same(engine.result(i), generate(model, tok, ids, SamplingParams(temperature=0, max_tokens=3)).run())
    with pytest.raises(ValueError, match="snapshots"):
        engine.add(ids, SamplingParams(), snapshots=(31,), on_snapshot=print)
    with pytest.raises(ValueError, match="snapshots"):
        engine.add(ids, SamplingParams(), snapshots=(3,))
