import pytest
import torch

from goose.generate import GenerationResult, _TextStream, generate, generate_batch, generate_text
from goose.sampling import SamplingParams
from goose.tokenizer import ByteTokenizer, WorldTokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=12)
PROMPTS = ["User: hi\n\nAssistant:", "The Eiffel tower is in the city of", "x"]


@pytest.fixture
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def tok():
    return WorldTokenizer()


def assert_same_state(a, b):
    for (name, x), y in zip(a.tensors().items(), b.tensors().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=name)


def test_stream_matches_result(model, tok):
    gen = generate(model, tok, PROMPTS[0], GREEDY)
    pieces = list(gen)
    r = gen.result
    assert all(pieces) and "".join(pieces) == r.text == tok.decode(r.tokens)
    assert r.finish_reason == "length" and r.completion_tokens == 12
    assert r.prompt_tokens == len(tok.encode(PROMPTS[0])) and r.state.batch_size == 1
    assert generate_text(model, tok, PROMPTS[0], GREEDY) == r.text
    assert generate(model, tok, tok.encode(PROMPTS[0]), GREEDY).run().tokens == r.tokens


def test_result_needs_a_finished_generation(model, tok):
    gen = generate(model, tok, "x", GREEDY)
    with pytest.raises(RuntimeError, match="not finished"):
        gen.result
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, tok, "", GREEDY)


def test_seeded_sampling_is_deterministic(model, tok):
    def run(seed):
        return generate(model, tok, PROMPTS[1], SamplingParams(top_p=1.0, max_tokens=16, seed=seed)).run().tokens

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_prefill_chunking_does_not_change_output(model, tok):
    ref = generate(model, tok, PROMPTS[0], GREEDY).run()
    chunked = generate(model, tok, PROMPTS[0], GREEDY, prefill_chunk=3).run()
    assert chunked.tokens == ref.tokens
    assert_same_state(chunked.state, ref.state)


def test_stop_token(model, tok):
    ref = generate(model, tok, PROMPTS[0], GREEDY).run().tokens
    stop = ref[4]
    r = generate(model, tok, PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, stop_tokens=(stop,))).run()
    assert r.finish_reason == "stop" and r.tokens == ref[: ref.index(stop)]
    # the stop token is not fed: the state is the one after the tokens before it
    cut = generate(model, tok, PROMPTS[0], SamplingParams(temperature=0, max_tokens=len(r.tokens))).run()
    assert_same_state(r.state, cut.state)


def test_stop_string_split_across_tokens(model, tok):
    params = SamplingParams(temperature=0, max_tokens=20)
    ref = generate(model, tok, PROMPTS[1], params).run()

    def straddling(k):  # 4 characters across the boundary after token k, first seen there
        prefix, nxt = tok.decode(ref.tokens[: k + 1]), tok.decode(ref.tokens[k + 1 : k + 2])
        stop = prefix[-2:] + nxt[:2]
        clean = len(prefix) >= 2 and len(nxt) >= 2 and "\ufffd" not in stop and ref.text.startswith(prefix)
        return stop if clean and ref.text.find(stop) == len(prefix) - 2 else None

    stop = next(s for s in map(straddling, range(len(ref.tokens) - 1)) if s)
    gen = generate(model, tok, PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, stop_strings=("@@", stop)))
    pieces = list(gen)
    r = gen.result
    assert r.finish_reason == "stop"
    assert r.text == "".join(pieces) == ref.text[: ref.text.find(stop)]
    assert r.tokens == ref.tokens[: len(r.tokens)]
    assert stop in tok.decode(r.tokens) and stop[:2] in tok.decode(r.tokens[:-1])


def test_text_stream_holds_back_possible_stop_strings():
    tok = ByteTokenizer()

    def run(text, stops):
        stream = _TextStream(tok, stops)
        pieces = []
        for t in tok.encode(text):
            piece, stopped = stream.push(t)
            pieces.append(piece)
            if stopped:
                return pieces, True
        return pieces + [stream.flush()], False

    pieces, stopped = run("ab\n\ncd", ("\n\n",))
    assert stopped and "".join(pieces) == "ab" and pieces[:3] == ["a", "b", ""]
    pieces, stopped = run("aaab", ("aab",))
    assert stopped and "".join(pieces) == "a"
    pieces, stopped = run("ab\nc\n", ("\n\n",))
    assert not stopped and "".join(pieces) == "ab\nc\n"
    # a stop string made of a multi-byte character split over byte tokens
    pieces, stopped = run("x é!y", ("é!",))
    assert stopped and "".join(pieces) == "x " and "\ufffd" not in "".join(pieces)
    pieces, stopped = run("日本語", ("本",))
    assert stopped and pieces == ["", "", "日", "", "", ""]


def test_max_tokens_zero(model, tok):
    r = generate(model, tok, "x", SamplingParams(max_tokens=0)).run()
    assert (r.text, r.tokens, r.finish_reason, r.prompt_tokens) == ("", [], "length", 1)


def test_continuing_from_final_state(model, tok):
    a, b = PROMPTS[0], " and then"
    first = generate(model, tok, a, GREEDY).run()
    before = first.state.clone()
    resumed = generate(model, tok, b, GREEDY, state=first.state).run()
    assert_same_state(first.state, before)  # the caller's state is not modified
    one_go = generate(model, tok, tok.encode(a) + first.tokens + tok.encode(b), GREEDY).run()
    assert resumed.tokens == one_go.tokens
    assert_same_state(resumed.state, one_go.state)


def test_final_state_includes_stop_string_tokens(model, tok):
    ref = generate(model, tok, PROMPTS[1], GREEDY).run()
    stop = tok.decode(ref.tokens[2:3])
    r = generate(model, tok, PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, stop_strings=(stop,))).run()
    assert r.tokens == ref.tokens[:3] and r.finish_reason == "stop"
    cut = generate(model, tok, PROMPTS[1], SamplingParams(temperature=0, max_tokens=3)).run()
    assert_same_state(r.state, cut.state)


def test_greedy_batch_equals_singles(model, tok):
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (12, 7, 10)]
    batch = generate_batch(model, tok, PROMPTS, params)
    for prompt, p, got in zip(PROMPTS, params, batch):
        alone = generate(model, tok, prompt, p).run()
        assert isinstance(got, GenerationResult)
        assert (got.tokens, got.text, got.finish_reason) == (alone.tokens, alone.text, alone.finish_reason)
        assert got.prompt_tokens == alone.prompt_tokens
        assert_same_state(got.state, alone.state)


def test_batch_with_stops_states_and_seeds(model, tok):
    """Sequences leave the batch at different steps (stop token, stop string, length); seeded
    sampling and a passed-in state give the same output as running each prompt alone."""
    ref = generate(model, tok, PROMPTS[0], GREEDY).run()
    context = generate(model, tok, "Once upon a time", SamplingParams(temperature=0, max_tokens=3)).run().state
    params = [
        SamplingParams(temperature=0, max_tokens=12, stop_tokens=(ref.tokens[3],)),
        SamplingParams(top_p=0.9, temperature=0.8, max_tokens=9, seed=11, stop_strings=("\n\n",)),
        SamplingParams(top_p=1.0, max_tokens=12, seed=12),
        SamplingParams(max_tokens=0),
    ]
    prompts = [PROMPTS[0], PROMPTS[1], " there was", "y"]
    states = [None, None, context, None]
    batch = generate_batch(model, tok, prompts, params, states)
    assert batch[0].tokens == ref.tokens[:3] and batch[0].finish_reason == "stop"
    assert batch[3].tokens == [] and batch[3].finish_reason == "length"
    for prompt, p, s, got in zip(prompts, params, states, batch):
        alone = generate(model, tok, prompt, p, state=s).run()
        assert (got.tokens, got.text, got.finish_reason) == (alone.tokens, alone.text, alone.finish_reason)
        assert_same_state(got.state, alone.state)
    with pytest.raises(ValueError, match="one per prompt"):
        generate_batch(model, tok, prompts, params[:2])
