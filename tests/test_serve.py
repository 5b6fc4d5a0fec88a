"""goose serve: OpenAI request/response shapes, streaming, batching, the prefix-state cache, cancellation
and errors, checked against generate() on tiny models."""
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from goose import demo  # noqa: E402
from goose.cli import main  # noqa: E402
from goose.generate import generate  # noqa: E402
from goose.sampling import SamplingParams  # noqa: E402
from goose.serve import PrefixCache, create_app  # noqa: E402
from goose.tokenizer import ByteTokenizer, render_chat  # noqa: E402

TOK = ByteTokenizer()
GREEDY = SamplingParams(temperature=0, max_tokens=12)
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def model(tiny_byte_model):
    return tiny_byte_model


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, TOK, "tiny", max_batch=4, max_prompt_tokens=200)) as c:
        yield c


@pytest.fixture(scope="module")
def kjv():
    return demo.load_demo()


def reference(model, prompt, params=GREEDY, state=None):
    return generate(model, TOK, prompt, params, state=state).run()


def sse(response) -> list:
    """The JSON payloads of an SSE body (the final "[DONE]" kept as a string)."""
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [p if p == "[DONE]" else json.loads(p) for p in (line[6:] for line in lines)]


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"


def test_completion_equals_generate(model, client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once upon", "max_tokens": 12,
                                             "temperature": 0})
    assert r.status_code == 200
    body, ref = r.json(), reference(model, "Once upon")
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "tiny"
    assert body["choices"] == [{"index": 0, "text": ref.text, "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    ids = client.post("/v1/completions", json={"prompt": TOK.encode("Once upon"), "max_tokens": 12,
                                               "temperature": 0}).json()
    assert ids["choices"][0]["text"] == ref.text


def test_completion_stream(model, client):
    r = client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 12, "temperature": 0,
                                             "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference(model, "Once upon").text
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "length"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12


def test_chat_and_chat_stream(model, client):
    ref = reference(model, render_chat(CHAT), SamplingParams(temperature=0, max_tokens=12, stop_strings=("\n\n",)))
    expected = ref.text.removeprefix(" ")                      # the space after "Assistant:"
    body = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 12, "temperature": 0}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["choices"][0]["finish_reason"] == ref.finish_reason
    assert body["usage"]["prompt_tokens"] == len(render_chat(CHAT))

    events = sse(client.post("/v1/chat/completions", json={"messages": CHAT, "max_completion_tokens": 12,
                                                            "temperature": 0, "stream": True}))
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
    assert "".join(d.get("content", "") for d in deltas) == expected
    assert events[-2]["choices"][0]["finish_reason"] == ref.finish_reason
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


def test_sampling_parameters_and_stop_strings(model, client):
    full = reference(model, "Once upon", SamplingParams(temperature=0, max_tokens=20)).text
    stop = full[6:8]
    for value in (stop, [stop, "never seen"]):
        body = client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 20, "temperature": 0,
                                                    "stop": value}).json()
        assert body["choices"][0]["text"] == full[:full.index(stop)]
        assert body["choices"][0]["finish_reason"] == "stop"
    params = dict(temperature=0.9, top_p=0.95, top_k=20, presence_penalty=0.4, frequency_penalty=0.3, seed=11)
    body = client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 15, **params}).json()
    assert body["choices"][0]["text"] == reference(model, "Once upon", SamplingParams(max_tokens=15, **params)).text


def test_concurrent_requests_are_decoded_in_one_batch(model):
    prompts = ["Once upon", "The Eiffel tower", "x", "Hello there, how"]
    with TestClient(create_app(model, TOK, "tiny", max_batch=4)) as c:
        out = {}

        def ask(prompt):
            out[prompt] = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 150, "temperature": 0,
                                                          "ignore_eos": True}).json()

        threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        health = c.get("/health").json()
    assert health["max_batch_seen"] > 1 and health["requests"] == 4
    no_eos = SamplingParams(temperature=0, max_tokens=150, stop_tokens=())
    for prompt in prompts:
        assert out[prompt]["choices"][0]["text"] == reference(model, prompt, no_eos).text


def test_prefix_cache_skips_the_shared_prefix_and_keeps_the_output(kjv):
    """A shared system prompt and a resent chat history are prefilled once; greedy output is unchanged."""
    system = {"role": "system", "content": "Thou art a scribe of the law, and thou answerest shortly."}
    turn1 = [system, {"role": "user", "content": "Who made the heaven and the earth?"}]
    other = [system, {"role": "user", "content": "Where is the land of Egypt?"}]
    ask = dict(max_tokens=33, temperature=0)          # a reply without trailing space (the template strips it)
    with TestClient(create_app(kjv, TOK, "kjv")) as cached, TestClient(create_app(kjv, TOK, "kjv",
                                                                                  state_cache_mb=0)) as cold:
        def chat(c, messages):
            before = c.get("/health").json()["prefilled_tokens"]
            body = c.post("/v1/chat/completions", json={"messages": messages, **ask}).json()
            return body, c.get("/health").json()["prefilled_tokens"] - before

        first, _ = chat(cached, turn1)
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        reply = first["choices"][0]["message"]["content"]
        turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And the sea?"}]
        system_len = len(render_chat([system], add_generation_prompt=False))
        expected_hits = {"other": system_len,                                   # the system message
                         "turn2": len(render_chat(turn1)) + first["usage"]["completion_tokens"]}  # turn 1 + reply
        for name, messages in (("other", other), ("turn2", turn2)):
            warm, prefilled = chat(cached, messages)
            ref, cold_prefilled = chat(cold, messages)
            cached_tokens = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached_tokens == expected_hits[name], name
            assert prefilled == cold_prefilled - cached_tokens == warm["usage"]["prompt_tokens"] - cached_tokens
            assert ref["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            assert warm["choices"] == ref["choices"], name
        assert cached.get("/health").json()["state_cache"]["hits"] == 2


def test_prefix_cache_lru(model):
    state = model.new_state()
    size = sum(t.numel() * t.element_size() for t in state.tensors().values())
    cache = PrefixCache(max_bytes=2 * size + 100)
    cache.insert([1, 2, 3], state)
    cache.insert([1, 2], state.clone())
    assert cache.lookup([1, 2, 3])[0] == 2                  # a proper prefix only: one token is left to prefill
    assert cache.lookup([1, 2, 3, 4])[0] == 3
    assert cache.lookup([1, 3, 3, 4]) == (0, None) and cache.lookup([7])[0] == 0
    cache.lookup([1, 2, 9])                                 # [1, 2] is now the most recently used
    cache.insert([5, 6], state.clone())                     # over budget: [1, 2, 3] goes
    assert len(cache) == 2 and cache.lookup([1, 2, 3, 4])[0] == 2 and cache.lookup([5, 6, 7])[0] == 2
    assert PrefixCache(max_bytes=0).lookup([1, 2]) == (0, None)


def test_initial_state(model):
    context = reference(model, "Long ago", SamplingParams(temperature=0, max_tokens=5)).state
    with TestClient(create_app(model, TOK, "tiny", state=context)) as c:
        for prompt in (" there was", " there was a king"):    # the second one starts from the first's state
            body = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0}).json()
            assert body["choices"][0]["text"] == reference(model, prompt, state=context).text
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == len(" there was")


def test_client_disconnect_cancels_the_sequence(client):
    before = client.get("/health").json()["cancelled"]
    with client.stream("POST", "/v1/completions", json={"prompt": "Once upon", "max_tokens": 100000,
                                                        "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    for _ in range(100):
        health = client.get("/health").json()
        if health["running"] == 0 and health["cancelled"] > before:
            break
        time.sleep(0.02)
    assert health["running"] == 0 and health["waiting"] == 0 and health["cancelled"] == before + 1
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("url, body, status, param", [
    ("/v1/completions", '{"prompt": "x",', 400, None),
    ("/v1/completions", '{"prompt": 3}', 400, "prompt"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    ("/v1/completions", '{"prompt": "x", "temperature": -1}', 400, "temperature"),
    ("/v1/completions", '{"prompt": "x", "model": "gpt-4"}', 404, "model"),
    ("/v1/completions", '{"prompt": "x", "n": 2}', 400, "n"),
    ("/v1/completions", '{"prompt": "x", "logprobs": 3}', 400, "logprobs"),
    ("/v1/completions", '{"prompt": ["a", "b"]}', 400, "prompt"),
    ("/v1/completions", '{"prompt": ""}', 400, "prompt"),
    ("/v1/completions", '{"prompt": [1, 999]}', 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": "x" * 201}), 400, "prompt"),
    ("/v1/chat/completions", '{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "tool", "content": "x"}]}', 400, "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content"),
])
def test_errors(client, url, body, status, param):
    r = client.post(url, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_cli(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--host", "--port", "--max-batch", "--quant", "--state", "--state-cache-mb",
                 "--model-name", "--max-prompt-tokens"):
        assert flag in out
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)     # as if the serve extra were missing
    with pytest.raises(SystemExit) as e:
        main(["serve"])
    assert e.value.code == 2 and "pip install 'goose[serve]'" in capsys.readouterr().err

