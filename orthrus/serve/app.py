"""The OpenAI-compatible HTTP app (FastAPI): ``create_app(engine, model_name=...)``.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both
streamed as server-sent events when ``"stream": true``), ``GET /health``, ``GET /metrics``
(Prometheus, ``orthrus.serve.metrics``). Generation runs on the
:class:`~orthrus.serve.scheduler.Scheduler` thread with continuous batching; handlers only validate,
tokenise, submit and relay events. Before a ``/v1`` request reaches them it passes the
:class:`~orthrus.serve.gate.Gate`: the drain (503 after SIGTERM), the optional API key (401) and the
body size limit (413).

Every bad request gets a 4xx OpenAI error object and nothing else happens: validation runs before
anything is queued, an OpenAI field we do not implement is refused by name unless it asks for
nothing (``protocol.py``), a request the decoder refuses when it is added fails alone (the rows
already decoding go on), and a client that disconnects has its slot freed before the next cycle.

A request is one or more rows of the batch (its *choices*): ``n`` per prompt, and on
``/v1/completions`` a list of prompts, prompt-major (choice ``p * n + j``). Choice ``i`` samples
with ``seed + i`` when the request has a seed, else with a fresh random seed. ``echo`` (completions)
puts the prompt text before each choice's text.

Sampling defaults follow the OpenAI API (``temperature`` 1, ``top_p`` 1); pass ``temperature: 0``
for greedy output, which is identical to the frozen model's own.

Log-probs (chat ``logprobs`` / ``top_logprobs``, completions ``logprobs``) are the frozen model's
own distribution at each generated position (the verify pass's log-softmax, before temperature,
top-k and top-p), in both modes and when streaming: each chunk carries those of its tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orthrus.config import GenerationConfig
from orthrus.decoding.generator import Event, Row, cache_room
from orthrus.decoding.stats import DecodeStats
from orthrus.engine import Orthrus, row_seed
from orthrus.errors import ContextLengthError, OrthrusError
from orthrus.serve import protocol as P
from orthrus.serve.gate import DEFAULT_MAX_BODY_BYTES, Gate, GateState
from orthrus.serve.metrics import CONTENT_TYPE, ServerMetrics
from orthrus.serve.scheduler import Request as GenRequest
from orthrus.serve.scheduler import Scheduler, SchedulerError

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 2048   # positions per slot unless --max-seq-len says otherwise
DEFAULT_MAX_TOKENS = 256     # when a request gives no max_tokens (capped to what fits)
DEFAULT_MAX_QUEUE = 256      # sequences that may wait for a decoding slot; more get a 429
DISCONNECT_POLL_S = 0.5      # how often a non-streamed request checks that its client is still there
CLIENT_CLOSED = 499          # status logged for a request whose client left (nobody reads it)


class APIError(Exception):
    """An error reply: HTTP ``status`` and an OpenAI error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = P.error_body(message, type_, param, code)


class Server:
    """The app's state: the engine, its scheduler, the serving limits, the gate's state (API key,
    body limit, drain) and the metrics registry."""

    def __init__(self, engine: Orthrus, model_name: str, mode: str, max_batch_size: int,
                 max_seq_len: int | None, block_size: int | None, draft: str = "diffusion",
                 schedule: str = "two-pass", candidates: int | None = None, verify: str = "auto",
                 max_queue: int = DEFAULT_MAX_QUEUE, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        try:
            self.gate = GateState(api_key, max_body_bytes)
        except ValueError as e:
            raise OrthrusError(str(e)) from None
        if max_batch_size < 1:
            raise OrthrusError(f"--max-batch-size must be >= 1, got {max_batch_size}")
        if max_queue < 0:
            raise OrthrusError(f"--max-queue must be >= 0, got {max_queue}")
        self.max_queue = max_queue
        if max_seq_len is not None and not 1 < max_seq_len <= engine.max_context:
            raise OrthrusError(f"--max-seq-len must be in [2, {engine.max_context}] (the model's context), "
                               f"got {max_seq_len}")
        self.engine, self.model_name, self.mode, self.draft = engine, model_name, mode, draft
        # checked here, once: a bad combination fails at start-up, not on every request
        self.schedule_args = dict(schedule=schedule, candidates=candidates, verify=verify)
        GenerationConfig(mode=mode, draft=draft, **self.schedule_args)
        self.block_size_override = block_size
        # the server-wide block size (rows of one batch share the adapter; its cycle runs at the
        # largest block of the live rows); this also checks that parallel mode has an adapter
        self.block_size = engine._block_size(GenerationConfig(mode=mode, block_size=block_size, draft=draft))
        self.context = max_seq_len or min(engine.max_context, DEFAULT_MAX_SEQ_LEN)
        # one block of room past the context: the last verify pass writes up to K positions ahead
        room = cache_room(GenerationConfig(mode=mode, draft=draft), self.block_size)
        self.metrics = ServerMetrics(self)
        self.scheduler = Scheduler(engine, max_batch_size, self.context + room, self.metrics.latencies)
        self.created = int(time.time())
        self.started = time.time()
        self._token_texts: dict[int, str] = {}

    # ---- request -> GenerationConfig ------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist: this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def generation(self, body: P.ChatCompletionRequest | P.CompletionRequest, n_prompt: int,
                   max_tokens: int | None, prompt_param: str, seed: int) -> GenerationConfig:
        """Validate lengths against the context and build one row's :class:`GenerationConfig`."""
        ctx = self.context
        if n_prompt >= ctx:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens, but the prompt is "
                                f"{n_prompt} tokens (and at least one token must be generated)",
                           param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, ctx - n_prompt)
        elif n_prompt + max_tokens > ctx:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens, but you requested "
                                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} "
                                f"in max_tokens): lower max_tokens to at most {ctx - n_prompt}",
                           param="max_tokens", code="context_length_exceeded")
        temperature = 1.0 if body.temperature is None else body.temperature
        try:
            return GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, top_k=body.top_k or 0,
                                    top_p=1.0 if body.top_p is None else body.top_p, seed=seed,
                                    stop=body.stop, mode=self.mode, block_size=self.block_size_override,
                                    draft=self.draft, logprobs=body.logprobs_top, **self.schedule_args)
        except OrthrusError as e:
            raise APIError(400, str(e)) from None

    def warm_up(self, rows: int) -> None:
        """Before serving: run a short greedy request of the server's settings in 1, 2, 4, ... up to
        ``rows`` slots (:meth:`Scheduler.warm_up`), so that a compiling engine compiles those cycle
        shapes now, not while the first clients wait (minutes per shape on an empty cache)."""
        gen = GenerationConfig(max_new_tokens=3 * self.block_size + 2, temperature=0.0, mode=self.mode,
                               block_size=self.block_size_override, draft=self.draft, **self.schedule_args)
        t = time.perf_counter()
        done = self.scheduler.warm_up(gen, self.block_size, rows)
        log.info("warmed up %s row(s) at once in %.1f s", ", ".join(map(str, done)), time.perf_counter() - t)

    def token_text(self, token_id: int) -> str:
        """A token's text in log-probs (special tokens shown; cached)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    @staticmethod
    def seeds(body: P.GenerationRequest, count: int) -> list[int]:
        """One seed per row (choice) of a request: ``seed + i`` for choice ``i`` when the request
        gives a seed (reproducible), else a fresh random one each (unseeded requests differ)."""
        if body.seed is not None:
            return [row_seed(body.seed, i) for i in range(count)]
        return [secrets.randbits(63) for _ in range(count)]

    def submit(self, rows: list[tuple[list[int], GenerationConfig]]) -> "Call":
        """Queue the rows of one request (``(prompt ids, config)`` each, in choice order) together."""
        if not self.scheduler.alive:
            raise APIError(503, "the generation thread is not running", type_="server_error",
                           code="unavailable")
        queue: asyncio.Queue = asyncio.Queue()  # shared: events of every row, in the order they come
        loop = asyncio.get_running_loop()
        reqs = [GenRequest(ids, gen, self.block_size, loop, queue=queue) for ids, gen in rows]
        if not self.scheduler.submit(*reqs, max_queue=self.max_queue):
            # a bounded queue: a flood gets 429s, not unbounded memory; retry once about one batch
            # of the waiting rows has had time to go through
            waiting = self.scheduler.queue_depth
            retry = 1 + waiting // self.scheduler.decoder.max_batch
            raise APIError(429, f"the server is busy: {waiting} sequences are waiting for a decoding slot "
                                f"(at most {self.max_queue} may wait); retry in {retry} s",
                           type_="rate_limit_error", code="server_busy", headers={"Retry-After": str(retry)})
        return Call(self.scheduler, reqs, queue)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def _api_error(e: SchedulerError) -> APIError:
    return APIError(e.status, str(e), type_="invalid_request_error" if e.status < 500 else "server_error",
                    code=e.code)


class Call:
    """The rows of one HTTP request (its choices: ``n`` per prompt, in index order), whose events
    arrive on one shared queue. Events read while waiting are kept in ``buffer`` (for the reply)."""

    def __init__(self, scheduler: Scheduler, reqs: list[GenRequest], queue: asyncio.Queue) -> None:
        self.scheduler, self.reqs, self.queue = scheduler, reqs, queue
        self.index = {r.id: i for i, r in enumerate(reqs)}
        self.started: set[int] = set()          # rows that got a slot (their first event came)
        self.finished: dict[int, Event] = {}    # row -> its last event
        self.buffer: list[tuple[int, Event]] = []

    @property
    def admitted(self) -> bool:
        return len(self.started) == len(self.reqs)

    @property
    def done(self) -> bool:
        return len(self.finished) == len(self.reqs)

    async def next(self) -> tuple[int, Event]:
        """The next event of any row, as (choice index, event); raises the rows' SchedulerError."""
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        i = self.index[item.request_id]
        self.started.add(i)
        if item.finish_reason is not None:
            self.finished[i] = item
        return i, item

    async def wait(self, http: Request, until: Callable[[], bool]) -> bool:
        """Read events into ``buffer`` until ``until()``. A scheduler error becomes an
        :class:`APIError` (a row the decoder refused: 400). False if the client went away."""
        checked = time.monotonic()
        while not until():
            try:
                self.buffer.append(await asyncio.wait_for(self.next(), DISCONNECT_POLL_S))
            except asyncio.TimeoutError:
                pass
            except SchedulerError as e:
                raise _api_error(e) from None
            # poll on a clock, not only when idle: a busy request yields events faster than the poll
            if time.monotonic() - checked >= DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await http.is_disconnected():
                    return False
        return True

    async def rest(self) -> AsyncIterator[tuple[int, Event]]:
        """The buffered events, then the others as they come, until every row has finished."""
        buffered, self.buffer = self.buffer, []
        for item in buffered:
            yield item
        while not self.done:
            yield await self.next()

    def cancel(self) -> None:
        """Free every row's slot (a no-op for finished rows)."""
        for r in self.reqs:
            self.scheduler.cancel(r)

    def usage(self, prompt_tokens: int) -> dict[str, int]:
        return P.usage(prompt_tokens, sum(len(ev.row.tokens) for ev in self.finished.values()))

    def extra(self) -> dict[str, Any]:
        """Decoding stats over the rows, returned beside ``usage``."""
        s = DecodeStats()
        for ev in self.finished.values():
            s = s.merge(ev.row.stats)
        tokens = sum(len(ev.row.tokens) for ev in self.finished.values())
        return {"tpf": round(s.tpf, 4), "acceptance_length": round(s.acceptance_length, 4),
                "forward_passes": s.forward_passes, "seconds": round(s.seconds, 4),
                "tokens_per_second": round(tokens / s.seconds, 2) if s.seconds > 0 else 0.0}


async def _reply(call: Call, http: Request, prompt_tokens: int, prefixes: list[str],
                 respond: Callable[[list[P.Choice], dict, dict], Any],
                 logprobs: Callable[[Row], dict] | None = None) -> Any:
    """A non-streamed reply: wait for every row, then ``respond(choices, usage, extra)`` with
    ``choices`` = (prefix + text, finish_reason, ``logprobs(row)`` or None) per row. If the client
    goes away meanwhile, the rows are cancelled (their slots freed)."""
    try:
        if not await call.wait(http, lambda: call.done):
            return Response(status_code=CLIENT_CLOSED)
    finally:
        call.cancel()  # no-op once finished
    texts = [[p] for p in prefixes]
    for i, ev in call.buffer:
        texts[i].append(ev.text)
    choices = []
    for i, t in enumerate(texts):
        row = call.finished[i].row
        lp = logprobs(row) if logprobs is not None and row.logprobs is not None else None
        choices.append(("".join(t), call.finished[i].finish_reason or "", lp))
    return respond(choices, call.usage(prompt_tokens), call.extra())


async def _streamed(call: Call, http: Request, chunks: Callable[[], AsyncIterator[dict]]) -> Any:
    """A streamed reply: each chunk as a server-sent event, then ``[DONE]``.

    The stream starts once every row has a slot, so that a row the decoder refuses fails the
    request with a 4xx reply, not with an error event after a 200. A scheduler failure after that
    becomes an error event; the rows are cancelled when the stream ends or the client leaves (a
    no-op once they finished).
    """
    try:
        if not await call.wait(http, lambda: call.admitted):
            call.cancel()
            return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        call.cancel()
        raise

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks():
                yield _sse(chunk)
        except SchedulerError as e:
            yield _sse(P.error_body(str(e), "server_error"))
        finally:
            call.cancel()
        yield _sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(engine: Orthrus, model_name: str, mode: str = "parallel", max_batch_size: int = 8,
               max_seq_len: int | None = None, block_size: int | None = None,
               draft: str = "diffusion", schedule: str = "two-pass", candidates: int | None = None,
               verify: str = "auto", max_queue: int = DEFAULT_MAX_QUEUE, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """Build the app around a loaded engine.

    Args:
        engine: the loaded base model and adapter.
        model_name: the name ``/v1/models`` reports; requests must name it.
        mode: ``parallel`` (needs an adapter) or ``ar``, for every request.
        max_batch_size: decoding slots (requests decoded together).
        max_seq_len: prompt + completion limit per request (default: min(model context, 2048)).
        block_size: draft block size in parallel mode (default: the adapter's).
        draft: where parallel mode's drafts come from: ``diffusion`` (the adapter), ``ngram``
            (prompt lookup, no adapter needed) or ``hybrid`` (n-gram where it matches, else diffusion).
        max_queue: sequences that may wait for a slot; a request that would exceed it gets a 429
            with ``Retry-After`` (nothing of it is queued).
        schedule, candidates, verify: the diffusion drafts' schedule (``two-pass`` or ``one-pass``),
            the one-pass candidate blocks and how greedy rows verify them (``auto``, ``tree`` or
            ``chain``; see :class:`~orthrus.config.GenerationConfig`).
        api_key: when set, every ``/v1`` request must send ``Authorization: Bearer <api_key>``
            (else 401 ``invalid_api_key``); ``/health`` and ``/metrics`` stay open.
        max_body_bytes: larger request bodies get 413 ``request_too_large``, unparsed.

    The scheduler thread starts and stops with the app's lifespan. ``app.state.server.gate.draining``
    (set on SIGTERM by :mod:`orthrus.serve.run`) makes new ``/v1`` requests 503s.
    """
    server = Server(engine, model_name, mode, max_batch_size, max_seq_len, block_size, draft, schedule, candidates,
                    verify, max_queue, api_key, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.scheduler.start()
        log.info("serving '%s' (%s mode, block %d, %d slots x %d tokens)", model_name, mode,
                 server.block_size, max_batch_size, server.context)
        try:
            yield
        finally:
            server.scheduler.stop()

    app = FastAPI(title="orthrus", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(Gate, state=server.gate)

    def reject(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
        server.scheduler.metrics.rejected += 1
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status >= 500:
            return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)
        return reject(exc.status, exc.body, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return reject(400, P.validation_error_body(list(exc.errors())))

    @app.exception_handler(ContextLengthError)
    async def _too_long(request: Request, exc: ContextLengthError) -> JSONResponse:
        return reject(400, P.error_body(str(exc), code="context_length_exceeded"))

    @app.exception_handler(OrthrusError)
    async def _bad_input(request: Request, exc: OrthrusError) -> JSONResponse:
        return reject(400, P.error_body(str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = (f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405)
               else str(exc.detail))
        return reject(exc.status_code, P.error_body(msg, param=None, code=code))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(P.error_body(f"internal error: {type(exc).__name__}", "server_error"),
                            status_code=500)

    # ---- routes -----------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        draining = server.gate.draining
        ok = server.scheduler.alive and not draining
        status = "draining" if draining else ("ok" if ok else "generation thread stopped")
        return JSONResponse({"status": status, "model": model_name,
                             "mode": mode, "active_requests": server.scheduler.active,
                             "queue_depth": server.scheduler.queue_depth,
                             "uptime_s": round(time.time() - server.started, 1)},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "orthrus", "max_model_len": server.context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Any:
        server.check_model(body.model)
        ids = engine.encode(body.chat())
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        seeds = server.seeds(body, body.choices_per_prompt)
        gen = server.generation(body, len(ids), max_tokens, "messages", seeds[0])
        call = server.submit([(ids, replace(gen, seed=s)) for s in seeds])
        rid = P.new_id("chatcmpl")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if not body.stream:
            return await _reply(call, request, len(ids), [""] * len(seeds),
                                lambda *a: P.chat_response(rid, model_name, *a),
                                lambda row: P.chat_logprobs(row.tokens, row.logprobs, server.token_text))

        async def chunks() -> AsyncIterator[dict]:
            created = int(time.time())
            for i in range(len(seeds)):
                yield P.chat_chunk(rid, model_name, created, i, {"role": "assistant", "content": ""}, None)
            async for i, ev in call.rest():
                if ev.logprobs is not None and ev.token_ids:  # the chunk of these tokens, even if its text
                    lp = P.chat_logprobs(ev.token_ids, ev.logprobs, server.token_text)  # is held back
                    yield P.chat_chunk(rid, model_name, created, i, {"content": ev.text}, None, lp)
                elif ev.text:
                    yield P.chat_chunk(rid, model_name, created, i, {"content": ev.text}, None)
                if ev.finish_reason is not None:
                    yield P.chat_chunk(rid, model_name, created, i, {}, ev.finish_reason)
            if include_usage:
                yield P.usage_chunk(rid, model_name, created, "chat.completion.chunk", call.usage(len(ids)))

        return await _streamed(call, request, chunks)

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request) -> Any:
        server.check_model(body.model)
        n, prompts = body.choices_per_prompt, body.prompt
        if len(prompts) * n > P.MAX_CHOICES:
            raise APIError(400, f"at most {P.MAX_CHOICES} choices per request (prompts x n), got "
                                f"{len(prompts)} x {n}", param="n", code="invalid_value")
        vocab = engine.model.config.vocab_size
        seeds = server.seeds(body, len(prompts) * n)
        rows: list[tuple[list[int], GenerationConfig]] = []
        prefixes: list[str] = []
        prompt_tokens = 0
        for p, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{p}]"
            if isinstance(prompt, str):
                ids = engine.encode(prompt, chat_template=False)
            else:
                if not all(0 <= t < vocab for t in prompt):
                    raise APIError(400, f"prompt token ids must be in [0, {vocab})", param=param,
                                   code="invalid_value")
                ids = list(prompt)
            gen = server.generation(body, len(ids), body.max_tokens, param, seeds[p * n])
            # prompt-major, as OpenAI: choice p * n + j is sample j of prompt p
            rows += [(ids, replace(gen, seed=seeds[p * n + j])) for j in range(n)]
            echo = (prompt if isinstance(prompt, str) else engine.decode(ids)) if body.echo else ""
            prefixes += [echo] * n
            prompt_tokens += len(ids)  # counted once per prompt, not per choice (as OpenAI)
        call = server.submit(rows)
        rid = P.new_id("cmpl")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if not body.stream:
            return await _reply(call, request, prompt_tokens, prefixes,
                                lambda *a: P.completion_response(rid, model_name, *a),
                                lambda row: P.completion_logprobs(row.tokens, row.logprobs, server.token_text))

        async def chunks() -> AsyncIterator[dict]:
            created = int(time.time())
            offsets = [0] * len(prefixes)  # per choice: text_offset of its next token (no echo with logprobs)
            for i, prefix in enumerate(prefixes):
                if prefix:  # echo: the prompt text comes first
                    yield P.completion_chunk(rid, model_name, created, i, prefix, None)
            async for i, ev in call.rest():
                lp = None
                if ev.logprobs is not None and ev.token_ids:
                    lp = P.completion_logprobs(ev.token_ids, ev.logprobs, server.token_text, offsets[i])
                    offsets[i] += sum(len(t) for t in lp["tokens"])
                if ev.text or ev.finish_reason is not None or lp is not None:
                    yield P.completion_chunk(rid, model_name, created, i, ev.text, ev.finish_reason, lp)
            if include_usage:
                yield P.usage_chunk(rid, model_name, created, "text_completion", call.usage(prompt_tokens))

        return await _streamed(call, request, chunks)

    return app
