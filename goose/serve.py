"""``goose serve``: an OpenAI-compatible HTTP server on one continuous-batching Engine.

Needs the ``serve`` extra (``pip install goose[serve]``: FastAPI and uvicorn). Three layers:

* ``PrefixCache``: an LRU map from token prefixes to the batch-1 State after them. An RWKV state is a
  fixed-size snapshot, so a request whose prompt starts with a cached prefix (a system prompt, the
  history of a multi-turn chat) prefills only the rest, from the cached state. States are stored at
  each prompt's end, at chat message boundaries, and after each chat reply (the next turn resends it).
* ``Worker``: one thread owns the Engine. HTTP handlers submit Jobs through a queue; the thread adds
  them to the engine, steps it while it has work (running sequences decode in one batch), and sends
  each job its text pieces and result through the job's asyncio queue. A handler whose client goes
  away cancels its job, which drops the sequence from the engine.
* ``create_app``: FastAPI routes ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (JSON
  or Server-Sent Events with ``stream: true``) and ``/health``, with OpenAI request and response
  shapes and OpenAI-style error bodies.
"""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from collections import Counter, OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Sequence

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from .engine import Engine
from .generate import GenerationResult
from .model import RWKV7
from .sampling import SamplingParams
from .state import State
from .tokenizer import TURN_SEPARATOR, Tokenizer, render_chat

log = logging.getLogger(__name__)

# ---- prefix-state cache ----------------------------------------------------------------------------

_HASH_MOD = (1 << 61) - 1
_HASH_MUL = 1_000_003


def _prefix_hashes(ids: Sequence[int], upto: int) -> list[int]:
    """Rolling hashes of ``ids[:n]`` for n = 0..upto (equal prefixes hash equal; entries are verified)."""
    out = [0]
    h = 0
    for t in ids[:upto]:
        h = (h * _HASH_MUL + t + 1) % _HASH_MOD
        out.append(h)
    return out


def state_bytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state.tensors().values())


class PrefixCache:
    """LRU cache of ``State after tokens[:n]``, bounded by bytes and by entries (0 bytes = off).

    ``lookup(ids)`` returns the longest cached proper prefix of ``ids`` (at least one token is left to
    prefill, since the next-token logits come from it). Cached states are shared, never modified: the
    Engine does not write into a state passed to ``add``.
    """

    def __init__(self, max_bytes: int, max_entries: int = 4096):
        if max_bytes < 0 or max_entries < 0:
            raise ValueError(f"max_bytes and max_entries must be >= 0, got {max_bytes} and {max_entries}")
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._entries: OrderedDict[tuple[int, int], tuple[tuple[int, ...], State, int]] = OrderedDict()
        self._lengths: Counter[int] = Counter()
        self.bytes = self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int]) -> tuple[int, State | None]:
        """(n, state after ids[:n]) for the longest cached n < len(ids), or (0, None)."""
        lengths = sorted((n for n in self._lengths if n < len(ids)), reverse=True)
        if lengths:
            hashes = _prefix_hashes(ids, lengths[0])
            for n in lengths:
                key = (n, hashes[n])
                entry = self._entries.get(key)
                if entry is not None and entry[0] == tuple(ids[:n]):
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return n, entry[1]
        self.misses += 1
        return 0, None

    def insert(self, ids: Sequence[int], state: State) -> None:
        """Remember ``state`` as the state after ``ids`` (the cache keeps the object: pass a copy)."""
        if not ids:
            return
        key = (len(ids), _prefix_hashes(ids, len(ids))[-1])
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        size = state_bytes(state) + 8 * len(ids)
        if size > self.max_bytes or self.max_entries == 0:
            return
        self._entries[key] = (tuple(ids), state, size)
        self._lengths[len(ids)] += 1
        self.bytes += size
        while self.bytes > self.max_bytes or len(self._entries) > self.max_entries:
            (n, _), (_, _, old) = self._entries.popitem(last=False)
            self.bytes -= old
            self._lengths[n] -= 1
            if not self._lengths[n]:
                del self._lengths[n]

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.bytes, "hits": self.hits, "misses": self.misses}


# ---- the engine thread -----------------------------------------------------------------------------

@dataclass
class Job:
    """One request to the engine. The worker puts ``("text", str)`` items on ``queue``, then one
    ``("done", GenerationResult)`` or ``("error", message)``."""

    ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    snapshots: tuple[int, ...] = ()     # prompt positions (besides its end) whose states are cached
    cache_reply: bool = False           # cache the state after prompt + reply (a chat's next turn)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq_id: int | None = None
    cached_tokens: int = 0              # prompt tokens skipped thanks to the cache


_STOP = object()


class Worker:
    """The thread that owns the Engine and the PrefixCache (see the module docstring)."""

    def __init__(self, engine: Engine, cache: PrefixCache, initial_state: State | None = None):
        self.engine, self.cache, self.initial_state = engine, cache, initial_state
        self._inbox: queue.Queue = queue.Queue()
        self._jobs: dict[int, Job] = {}
        self._thread: threading.Thread | None = None
        self.counters = Counter(requests=0, cancelled=0, prefilled_tokens=0, cached_tokens=0, steps=0,
                                max_batch_seen=0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="goose-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self._inbox.put(("add", job))

    def cancel(self, job: Job) -> None:
        self._inbox.put(("cancel", job))

    def stats(self) -> dict[str, Any]:
        return {"running": len(self.engine.running), "waiting": len(self.engine.waiting), **self.counters,
                "state_cache": self.cache.stats()}

    @staticmethod
    def _send(job: Job, kind: str, value: Any) -> None:
        try:
            job.loop.call_soon_threadsafe(job.queue.put_nowait, (kind, value))
        except RuntimeError:            # the request's event loop is gone: nobody is listening
            pass

    @torch.inference_mode()
    def _run(self) -> None:
        while True:
            try:
                command = self._inbox.get(block=not self.engine.has_work())
            except queue.Empty:
                command = None
            while command is not None:
                if command is _STOP:
                    for job in self._jobs.values():
                        self._send(job, "error", "the server is shutting down")
                    return
                self._handle(*command)
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.has_work():
                self._step()

    def _handle(self, kind: str, job: Job) -> None:
        if kind == "cancel":
            if job.seq_id is not None and self._jobs.pop(job.seq_id, None) is not None:
                self.engine.cancel(job.seq_id)
                self.counters["cancelled"] += 1
            return
        n, state = self.cache.lookup(job.ids)
        marks = sorted({p - n for p in (*job.snapshots, len(job.ids)) if p > n})

        def remember(m: int, snapshot: State) -> None:
            self.cache.insert(job.ids[:n + m], snapshot)

        try:
            job.seq_id = self.engine.add(job.ids[n:], job.params, self.initial_state if state is None else state,
                                         snapshots=marks if self.cache.max_bytes else (), on_snapshot=remember)
        except ValueError as e:
            self._send(job, "error", str(e))
            return
        job.cached_tokens = n
        self._jobs[job.seq_id] = job
        self.counters.update(requests=1, prefilled_tokens=len(job.ids) - n, cached_tokens=n)

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:          # a failed step leaves the engine unusable: fail every job, start afresh
            log.exception("engine step failed; failing %d requests and restarting the engine", len(self._jobs))
            for job in self._jobs.values():
                self._send(job, "error", f"generation failed: {type(e).__name__}: {e}")
            self._jobs.clear()
            self.engine = Engine(self.engine.model, self.engine.tokenizer, self.engine.max_batch,
                                 self.engine.prefill_chunk)
            return
        self.counters["steps"] += 1
        self.counters["max_batch_seen"] = max(self.counters["max_batch_seen"], self.engine.last_batch_size)
        for event in events:
            job = self._jobs.get(event.seq_id)
            result: GenerationResult | None = self.engine.finished.pop(event.seq_id) if event.finished else None
            if job is None:
                continue
            if event.text:
                self._send(job, "text", event.text)
            if result is not None:
                del self._jobs[event.seq_id]
                if job.cache_reply and result.tokens and self.cache.max_bytes:
                    self.cache.insert(job.ids + result.tokens, result.state)
                self._send(job, "done", result)


# ---- HTTP: requests --------------------------------------------------------------------------------

class APIError(Exception):
    """An error returned to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"message": message, "type": type, "param": param, "code": code}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")   # wrong types are errors; unknown fields ignored


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    """The OpenAI sampling fields; top_k, min_p, penalty_decay and ignore_eos (do not stop at the
    end-of-text token 0) are goose extensions. Omitted fields take goose's defaults (the official RWKV
    sampling defaults, see SamplingParams)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    penalty_decay: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart]


class ChatRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


# features an OpenAI client may ask for that goose does not have: a clear 400 rather than silently ignoring
_UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions")


def _sampling_params(req: _GenerationRequest, max_tokens: int | None, extra_stops: tuple[str, ...] = ()) -> SamplingParams:
    extra = req.model_extra or {}
    for name in _UNSUPPORTED:
        if extra.get(name):
            raise APIError(400, f"'{name}' is not supported by goose serve", param=name)
    if extra.get("best_of", 1) != 1:
        raise APIError(400, "only best_of=1 is supported", param="best_of")
    if req.n != 1:
        raise APIError(400, f"only n=1 is supported, got n={req.n}", param="n")
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    given = {name: getattr(req, name) for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                                   "frequency_penalty", "penalty_decay", "seed")}
    try:
        return SamplingParams(**{k: v for k, v in given.items() if v is not None},
                              **({} if max_tokens is None else {"max_tokens": max_tokens}),
                              **({"stop_tokens": ()} if req.ignore_eos else {}), stop_strings=extra_stops + stops)
    except ValueError as e:                         # "SamplingParams.top_p: expected ..., got ..."
        message = str(e).removeprefix("SamplingParams.")
        raise APIError(400, message, param=message.split(":")[0]) from None


def _chat_turns(messages: list[ChatMessage]) -> list[dict[str, str]]:
    turns = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        content = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
        turns.append({"role": role, "content": content})
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}]: unsupported role {m.role!r} (system, developer, user, assistant)",
                           param="messages")
    if not turns:
        raise APIError(400, "messages must not be empty", param="messages")
    return turns


def _message_boundaries(turns: list[dict[str, str]], ids: list[int], tokenizer: Tokenizer) -> tuple[int, ...]:
    """Token positions in ``ids`` where a complete message ends (where its encoding is a prefix of ``ids``)."""
    marks = []
    for k in range(1, len(turns) + 1):
        head = tokenizer.encode(render_chat(turns[:k], add_generation_prompt=False))
        if 0 < len(head) < len(ids) and ids[:len(head)] == head:
            marks.append(len(head))
    return tuple(marks)


def _field_path(loc: Sequence[Any]) -> str | None:
    """``messages[0].content`` from a pydantic error location (dropping "body" and union-member tags)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "body" and part.isidentifier() and not part[0].isupper() and part not in ("str", "int", "list"):
            path += f".{part}" if path else part
    return path or None


# ---- HTTP: responses -------------------------------------------------------------------------------

def _usage(job: Job, result: GenerationResult) -> dict[str, Any]:
    prompt = len(job.ids)
    return {"prompt_tokens": prompt, "completion_tokens": result.completion_tokens,
            "total_tokens": prompt + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class _ReplyText:
    """Chat text as the client sees it: without the one space the template puts after "Assistant:"."""

    def __init__(self) -> None:
        self.started = False

    def __call__(self, piece: str) -> str:
        if not self.started and piece:
            self.started = True
            return piece.removeprefix(" ")
        return piece


def create_app(model: RWKV7, tokenizer: Tokenizer, model_name: str = "goose", *, max_batch: int = 16,
               state: State | None = None, state_cache_mb: float = 256, max_prompt_tokens: int = 32768,
               prefill_chunk: int = 1024) -> FastAPI:
    """The FastAPI app serving ``model`` under ``model_name``; its lifespan starts and stops the worker."""
    if max_prompt_tokens < 1 or state_cache_mb < 0:
        raise ValueError(f"max_prompt_tokens must be >= 1 and state_cache_mb >= 0, "
                         f"got {max_prompt_tokens} and {state_cache_mb}")
    if state is not None:
        state = state.to(device=model.device)
    worker = Worker(Engine(model, tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk),
                    PrefixCache(int(state_cache_mb * 2**20)), state)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="goose", description="OpenAI-compatible RWKV-7 server", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse({"error": exc.body}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            where, message = None, f"invalid JSON body: {err.get('ctx', {}).get('error', err['msg'])}"
        else:
            where = _field_path(err.get("loc", ()))
            message = f"{where}: {err['msg']} (got {json.dumps(err.get('input'), default=str)[:80]})" if where \
                else err["msg"]
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": where,
                                       "code": None}}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None,
                                       "code": None}}, status_code=exc.status_code)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "goose"}

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"model {name!r} not found; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def check_prompt(ids: list[int]) -> None:
        if not ids:
            raise APIError(400, "the prompt must not be empty", param="prompt")
        if len(ids) > max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than this server's limit of "
                                f"{max_prompt_tokens} (--max-prompt-tokens)", param="prompt",
                           code="context_length_exceeded")
        vocab = model.config.vocab_size
        if not all(0 <= t < vocab for t in ids):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")

    async def results(job: Job) -> AsyncIterator[tuple[str, Any]]:
        """The job's items, submitting it first and cancelling it if the consumer stops early."""
        worker.submit(job)
        done = False
        try:
            while not done:
                kind, value = await job.queue.get()
                done = kind != "text"
                yield kind, value
        finally:
            if not done:
                worker.cancel(job)

    async def respond(job: Job, stream: bool, include_usage: bool, chat: bool) -> Any:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name}
        reply = _ReplyText() if chat else (lambda piece: piece)
        if not stream:
            pieces = []
            async for kind, value in results(job):
                if kind == "error":
                    raise APIError(500, value, type="server_error")
                if kind == "text":
                    pieces.append(reply(value))
            text = "".join(pieces)
            choice = {"index": 0, "logprobs": None, "finish_reason": value.finish_reason,
                      **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
            return {**head, "choices": [choice], "usage": _usage(job, value)}

        head["object"] = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice]}

        async def events() -> AsyncIterator[str]:
            if chat:
                yield _sse(chunk(None, role=True))
            async for kind, value in results(job):
                if kind == "text":
                    if text := reply(value):
                        yield _sse(chunk(text))
                elif kind == "error":
                    yield _sse({"error": {"message": value, "type": "server_error", "param": None, "code": None}})
                else:
                    yield _sse(chunk(None, finish=value.finish_reason))
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(job, value)})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **worker.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_prompt(ids)
        job = Job(ids, _sampling_params(req, req.max_tokens), asyncio.get_running_loop())
        return await respond(job, req.stream, bool(req.stream_options and req.stream_options.include_usage),
                             chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Any:
        check_model(req.model)
        turns = _chat_turns(req.messages)
        ids = tokenizer.encode(render_chat(turns))
        check_prompt(ids)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = _sampling_params(req, max_tokens, extra_stops=(TURN_SEPARATOR,))
        job = Job(ids, params, asyncio.get_running_loop(), snapshots=_message_boundaries(turns, ids, tokenizer),
                  cache_reply=True)
        return await respond(job, req.stream, bool(req.stream_options and req.stream_options.include_usage),
                             chat=True)

    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
