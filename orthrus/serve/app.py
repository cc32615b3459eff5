"""The OpenAI-compatible HTTP app (FastAPI): ``create_app(engine, model_name=...)``.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both
streamed as server-sent events when ``"stream": true``), ``GET /health``, ``GET /metrics``
(Prometheus text). Generation runs on the :class:`~orthrus.serve.scheduler.Scheduler` thread with
continuous batching; handlers only validate, tokenise, submit and relay events.

Every bad request gets a 4xx OpenAI error object and nothing else happens: validation runs before
anything is queued, and a client that disconnects has its slot freed before the next cycle.

Sampling defaults follow the OpenAI API (``temperature`` 1, ``top_p`` 1); pass ``temperature: 0``
for greedy output, which is identical to the frozen model's own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orthrus.config import GenerationConfig
from orthrus.decoding.generator import Event
from orthrus.engine import Orthrus
from orthrus.errors import ContextLengthError, OrthrusError
from orthrus.serve import protocol as P
from orthrus.serve.scheduler import Request as GenRequest
from orthrus.serve.scheduler import Scheduler, SchedulerError

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 2048   # positions per slot unless --max-seq-len says otherwise
DEFAULT_MAX_TOKENS = 256     # when a request gives no max_tokens (capped to what fits)
DISCONNECT_POLL_S = 0.5      # how often a non-streamed request checks that its client is still there
CLIENT_CLOSED = 499          # status logged for a request whose client left (nobody reads it)


class APIError(Exception):
    """An error reply: HTTP ``status`` and an OpenAI error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = P.error_body(message, type_, param, code)


class Server:
    """The app's state: the engine, its scheduler, and the serving limits."""

    def __init__(self, engine: Orthrus, model_name: str, mode: str, max_batch_size: int,
                 max_seq_len: int | None, block_size: int | None) -> None:
        if max_batch_size < 1:
            raise OrthrusError(f"--max-batch-size must be >= 1, got {max_batch_size}")
        if max_seq_len is not None and not 1 < max_seq_len <= engine.max_context:
            raise OrthrusError(f"--max-seq-len must be in [2, {engine.max_context}] (the model's context), "
                               f"got {max_seq_len}")
        self.engine, self.model_name, self.mode = engine, model_name, mode
        self.block_size_override = block_size
        # the server-wide block size (rows of one batch share the adapter; its cycle runs at the
        # largest block of the live rows); this also checks that parallel mode has an adapter
        self.block_size = engine._block_size(GenerationConfig(mode=mode, block_size=block_size))
        self.context = max_seq_len or min(engine.max_context, DEFAULT_MAX_SEQ_LEN)
        # one block of room past the context: the last verify pass writes up to K positions ahead
        self.scheduler = Scheduler(engine, max_batch_size, self.context + self.block_size)
        self.created = int(time.time())
        self.started = time.time()

    # ---- request -> GenerationConfig ------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist: this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def generation(self, body: P.GenerationRequest, n_prompt: int, max_tokens: int | None, prompt_param: str
                   ) -> GenerationConfig:
        """Validate lengths against the context and build the request's :class:`GenerationConfig`."""
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
        # no seed: a fresh one, so unseeded sampled requests differ (greedy ignores it)
        seed = body.seed if body.seed is not None else secrets.randbits(62)
        try:
            return GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, top_k=body.top_k or 0,
                                    top_p=1.0 if body.top_p is None else body.top_p, seed=seed,
                                    stop=body.stop, mode=self.mode, block_size=self.block_size_override)
        except OrthrusError as e:
            raise APIError(400, str(e)) from None

    def submit(self, ids: list[int], gen: GenerationConfig) -> GenRequest:
        if not self.scheduler.alive:
            raise APIError(503, "the generation thread is not running", type_="server_error",
                           code="unavailable")
        req = GenRequest(ids, gen, self.block_size, asyncio.get_running_loop())
        self.scheduler.submit(req)
        return req

    # ---- /metrics -------------------------------------------------------------------------------

    def metrics_text(self) -> str:
        m, s = self.scheduler.metrics, self.scheduler
        rows = [
            ("orthrus_requests_total", "counter", "generation requests accepted", m.requests),
            ("orthrus_requests_finished_total", "counter", "requests that ran to completion", m.finished),
            ("orthrus_requests_cancelled_total", "counter", "requests whose client disconnected", m.cancelled),
            ("orthrus_requests_failed_total", "counter", "requests dropped by a decoder failure", m.failed),
            ("orthrus_requests_rejected_total", "counter", "requests answered with a 4xx error", m.rejected),
            ("orthrus_prompt_tokens_total", "counter", "prompt tokens of accepted requests", m.prompt_tokens),
            ("orthrus_generated_tokens_total", "counter", "tokens sent to clients", m.generated_tokens),
            ("orthrus_prefill_passes_total", "counter", "prefill passes (per request)", m.decode.prefill_passes),
            ("orthrus_forward_passes_total", "counter",
             "draft + verify passes, counted per sequence (prefill apart)", m.decode.forward_passes),
            ("orthrus_verify_passes_total", "counter", "verify passes, counted per sequence", m.decode.verify_passes),
            ("orthrus_decode_steps_total", "counter", "batched decode cycles", m.decode_steps),
            ("orthrus_tpf", "gauge", "tokens per forward pass since start (decode tokens / forward passes)",
             m.decode.tpf),
            ("orthrus_acceptance_length", "gauge", "mean tokens per verify pass since start",
             m.decode.acceptance_length),
            ("orthrus_queue_depth", "gauge", "requests waiting for a slot", s.queue_depth),
            ("orthrus_active_requests", "gauge", "requests holding a decoding slot", s.active),
            ("orthrus_batch_slots", "gauge", "decoding slots (--max-batch-size)", s.max_batch),
            ("orthrus_block_size", "gauge", "tokens per draft block (1 in ar mode)", self.block_size),
        ]
        out = []
        for name, kind, help_, value in rows:
            v = f"{value:.6g}" if isinstance(value, float) else str(value)
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {v}"]
        return "\n".join(out) + "\n"


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(req: GenRequest) -> AsyncIterator[Event]:
    """The request's events up to and including the one that finishes it."""
    while True:
        item = await req.queue.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finish_reason is not None:
            return


async def _collect(server: Server, req: GenRequest, http: Request) -> tuple[str, str, Event] | None:
    """Wait for a non-streamed request to finish: (text, finish_reason, last event). If the client
    goes away meanwhile, cancel the request (freeing its slot) and return None."""
    text: list[str] = []
    checked = time.monotonic()
    try:
        while True:
            try:
                item = await asyncio.wait_for(req.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                item = None
            # poll on a clock, not only when idle: a busy request yields events faster than the poll
            if time.monotonic() - checked >= DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await http.is_disconnected():
                    return None
            if item is None:
                continue
            if isinstance(item, SchedulerError):
                raise APIError(500, str(item), type_="server_error", code="generation_failed")
            text.append(item.text)
            if item.finish_reason is not None:
                return "".join(text), item.finish_reason, item
    finally:
        server.scheduler.cancel(req)  # no-op once finished


async def _reply(server: Server, req: GenRequest, http: Request, prompt_tokens: int,
                 respond: Callable[[str, str, dict, dict], Any]) -> Any:
    """A non-streamed reply: wait for ``req``, then ``respond(text, finish_reason, usage, extra)``."""
    done = await _collect(server, req, http)
    if done is None:
        return Response(status_code=CLIENT_CLOSED)
    text, finish, last = done
    return respond(text, finish, P.usage(prompt_tokens, len(last.row.tokens)), _extra(last))


def _streamed(server: Server, req: GenRequest, chunks: AsyncIterator[dict]) -> StreamingResponse:
    """A streamed reply: each chunk as a server-sent event, then ``[DONE]``. A scheduler failure
    becomes an error event; the request is cancelled when the stream ends or the client leaves
    (a no-op once it finished)."""
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield _sse(chunk)
        except SchedulerError as e:
            yield _sse(P.error_body(str(e), "server_error"))
        finally:
            server.scheduler.cancel(req)
        yield _sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _extra(ev: Event) -> dict[str, Any]:
    """Per-request decoding stats, returned beside ``usage``."""
    s = ev.row.stats
    return {"tpf": round(s.tpf, 4), "acceptance_length": round(s.acceptance_length, 4),
            "forward_passes": s.forward_passes, "seconds": round(s.seconds, 4),
            "tokens_per_second": round(len(ev.row.tokens) / s.seconds, 2) if s.seconds > 0 else 0.0}


def create_app(engine: Orthrus, model_name: str, mode: str = "parallel", max_batch_size: int = 8,
               max_seq_len: int | None = None, block_size: int | None = None) -> FastAPI:
    """Build the app around a loaded engine.

    Args:
        engine: the loaded base model and adapter.
        model_name: the name ``/v1/models`` reports; requests must name it.
        mode: ``parallel`` (needs an adapter) or ``ar``, for every request.
        max_batch_size: decoding slots (requests decoded together).
        max_seq_len: prompt + completion limit per request (default: min(model context, 2048)).
        block_size: draft block size in parallel mode (default: the adapter's).

    The scheduler thread starts and stops with the app's lifespan.
    """
    server = Server(engine, model_name, mode, max_batch_size, max_seq_len, block_size)

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

    def reject(status: int, body: dict) -> JSONResponse:
        server.scheduler.metrics.rejected += 1
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status >= 500:
            return JSONResponse(exc.body, status_code=exc.status)
        return reject(exc.status, exc.body)

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
        ok = server.scheduler.alive
        return JSONResponse({"status": "ok" if ok else "generation thread stopped", "model": model_name,
                             "mode": mode, "active_requests": server.scheduler.active,
                             "queue_depth": server.scheduler.queue_depth,
                             "uptime_s": round(time.time() - server.started, 1)},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "orthrus", "max_model_len": server.context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Any:
        server.check_model(body.model)
        ids = engine.encode(body.chat())
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        gen = server.generation(body, len(ids), max_tokens, "messages")
        req = server.submit(ids, gen)
        rid = P.new_id("chatcmpl")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if not body.stream:
            return await _reply(server, req, request, len(ids),
                                lambda *a: P.chat_response(rid, model_name, *a))

        async def chunks() -> AsyncIterator[dict]:
            created = int(time.time())
            yield P.chat_chunk(rid, model_name, created, {"role": "assistant", "content": ""}, None)
            async for ev in _events(req):
                if ev.text:
                    yield P.chat_chunk(rid, model_name, created, {"content": ev.text}, None)
                if ev.finish_reason is not None:
                    yield P.chat_chunk(rid, model_name, created, {}, ev.finish_reason)
                    if include_usage:
                        yield P.usage_chunk(rid, model_name, created, "chat.completion.chunk",
                                            P.usage(len(ids), len(ev.row.tokens)))

        return _streamed(server, req, chunks())

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request) -> Any:
        server.check_model(body.model)
        if isinstance(body.prompt, str):
            ids = engine.encode(body.prompt, chat_template=False)
        else:
            vocab = engine.model.config.vocab_size
            if not all(0 <= t < vocab for t in body.prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt",
                               code="invalid_value")
            ids = list(body.prompt)
        gen = server.generation(body, len(ids), body.max_tokens, "prompt")
        req = server.submit(ids, gen)
        rid = P.new_id("cmpl")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if not body.stream:
            return await _reply(server, req, request, len(ids),
                                lambda *a: P.completion_response(rid, model_name, *a))

        async def chunks() -> AsyncIterator[dict]:
            created = int(time.time())
            async for ev in _events(req):
                if ev.text or ev.finish_reason is not None:
                    yield P.completion_chunk(rid, model_name, created, ev.text, ev.finish_reason)
                if ev.finish_reason is not None and include_usage:
                    yield P.usage_chunk(rid, model_name, created, "text_completion",
                                        P.usage(len(ids), len(ev.row.tokens)))

        return _streamed(server, req, chunks())

    return app
