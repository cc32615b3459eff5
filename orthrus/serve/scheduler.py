"""Continuous batching for the server: one thread owns the engine's :class:`Decoder`.

HTTP handlers (on the asyncio event loop) :meth:`Scheduler.submit` requests; the scheduler thread
loops::

    release the slots of cancelled requests
    move queued requests into free slots (Decoder.add: prefill, first token; a request the
        decoder refuses fails alone, with a 400)
    Decoder.step()  (one draft + verify cycle for every live row)
    route each Event to its request's asyncio queue; release the slots of finished rows

so a new request joins the running batch at the next cycle instead of waiting for the batch to
drain. Greedy rows do not depend on their neighbours (each row attends only to its own cache), so a
greedy request's text is the same alone or in a batch. The thread sleeps on a condition when idle.

Everything the decoder does happens on this one thread (the decoder is not thread-safe); the event
loop only ever sees finished :class:`Event` objects, handed over with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from orthrus.config import GenerationConfig
from orthrus.decoding.generator import Event
from orthrus.decoding.stats import DecodeStats
from orthrus.engine import Orthrus
from orthrus.errors import OrthrusError

log = logging.getLogger(__name__)


class SchedulerError(RuntimeError):
    """The decoder failed while this request was in it (the request is dropped, the server goes on).

    ``status`` is the HTTP status the request gets: 400 when the request itself could not be added
    (the decoder refused it: too long for the cache, a bad parameter found late), else 500.
    """

    def __init__(self, message: str, status: int = 500, code: str = "generation_failed") -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(eq=False)
class Request:
    """One generation request as the scheduler sees it.

    ``queue`` receives :class:`Event` s, then ends with an event whose ``finish_reason`` is set, or
    with a :class:`SchedulerError`. ``cancelled`` is set by the HTTP side (client gone); the slot is
    released before the next cycle.
    """

    prompt_ids: list[int]
    gen: GenerationConfig
    block_size: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: bool = False
    finished: bool = False
    slot: int | None = None
    # DecodeStats already counted into the server metrics: (tokens, prefill, draft, verify passes)
    _seen: tuple[int, int, int, int] = (0, 0, 0, 0)
    # time.monotonic() of its arrival (submit) and of its latest token delivery (None: none yet)
    arrived: float = field(default_factory=time.monotonic)
    last_token: float | None = None


class Observer(Protocol):
    """Receives the scheduler's latency observations (``orthrus.serve.metrics.Latencies``); called
    on the scheduler thread."""

    def queued(self, seconds: float) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def tokens(self, gap: float, n: int) -> None: ...
    def verify_pass(self, tokens: int) -> None: ...
    def finished(self, seconds: float) -> None: ...


@dataclass
class Metrics:
    """Server counters (written by the scheduler thread, read by /metrics).

    ``decode`` sums every row's :class:`~orthrus.decoding.stats.DecodeStats`, so TPF and acceptance
    length are the offline definitions (METHOD.md); ``decode_steps`` counts batched cycles (one
    draft + one verify forward for the whole batch).
    """

    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0            # 4xx replies (counted by the app)
    prompt_tokens: int = 0
    generated_tokens: int = 0    # tokens sent to clients
    decode_steps: int = 0
    decode: DecodeStats = field(default_factory=DecodeStats)


class Scheduler:
    """Owns a :class:`Decoder` of ``max_batch`` slots x ``capacity`` positions and its thread.

    ``observer`` (optional) receives the latency observations: queue wait, time to first token,
    inter-token gaps, tokens per verify pass, request latency.
    """

    def __init__(self, engine: Orthrus, max_batch: int, capacity: int, observer: Observer | None = None) -> None:
        self.engine = engine
        self.decoder = engine.new_decoder(max_batch, capacity)
        self.metrics = Metrics()
        self.observer = observer
        self._cond = threading.Condition()
        self._pending: deque[Request] = deque()  # guarded by _cond
        self._live: dict[str, Request] = {}       # in a slot; scheduler thread only
        self._stopping = False
        self._thread: threading.Thread | None = None

    def warm_up(self, gen: GenerationConfig, block_size: int, rows: int) -> list[int]:
        """Before :meth:`start`: decode one short request (``gen``, a fixed 16-token prompt) in 1, 2,
        4, ... up to ``rows`` slots at once, through this very decoder, so that the cycle shapes
        of those row counts are compiled (or read from the on-disk cache) before a client waits
        on them; the slots are free again after. Returns the row counts run."""
        if self._thread is not None:
            raise RuntimeError("warm_up runs before the scheduler thread starts")
        prompt = list(range(1, 17))
        done, n = [], 1
        while n <= min(rows, self.decoder.max_batch):
            self.decoder.add([(f"warm-up-{n}-{i}", prompt, gen, block_size) for i in range(n)])
            while any(r is not None and r.finish_reason is None for r in self.decoder.rows):
                self.decoder.step()
            for slot, row in enumerate(self.decoder.rows):
                if row is not None:
                    self.decoder.release(slot)
            done.append(n)
            n *= 2
        return done

    # ---- called from the event loop -----------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="orthrus-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, *reqs: Request, max_queue: int | None = None) -> bool:
        """Queue ``reqs`` (together); each joins the running batch at the next cycle with a free slot.

        With ``max_queue``: refuse them all (return False, queue nothing) when more than
        ``max_queue`` rows would be left waiting for a slot; else True."""
        with self._cond:
            if max_queue is not None:
                free = self.decoder.max_batch - len(self._live)  # an estimate: the thread may be admitting
                if len(self._pending) + len(reqs) - max(0, free) > max_queue:
                    return False
            now = time.monotonic()
            for req in reqs:
                req.arrived = now
                self.metrics.requests += 1
                self.metrics.prompt_tokens += len(req.prompt_ids)
                self._pending.append(req)
            self._cond.notify()
        return True

    def cancel(self, req: Request) -> None:
        """Drop ``req`` (its client went away); its slot is freed before the next cycle."""
        if req.finished or req.cancelled:
            return
        with self._cond:
            req.cancelled = True
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        """Requests holding a slot."""
        return len(self._live)

    @property
    def max_batch(self) -> int:
        return self.decoder.max_batch

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the scheduler thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not self._live:
                    self._cond.wait()
                if self._stopping:
                    break
                self._drop_cancelled_pending()
            self._release_cancelled()
            with self._cond:
                n = min(len(self.decoder.free_slots()), len(self._pending))
                admit = [self._pending.popleft() for _ in range(n)]
            if admit and self.observer is not None:
                now = time.monotonic()
                for req in admit:
                    self.observer.queued(now - req.arrived)
            try:
                if admit:
                    self._admit(admit)
                if self._live:
                    events = self.decoder.step()
                    self.metrics.decode_steps += 1
                    self._route(events)
            except Exception as e:  # a decoder failure must not take the server down
                log.exception("decoder failure; dropping the %d requests in the batch", len(self._live))
                self._fail_all(SchedulerError(f"generation failed: {e}"))
        self._fail_all(SchedulerError("the server is shutting down"))
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for req in pending:
            self._deliver(req, SchedulerError("the server is shutting down"))

    def _admit(self, admit: list[Request]) -> None:
        """Add ``admit`` into free slots (one batched prefill). If the decoder refuses the batch,
        add them one by one, so that only the request at fault fails; the rows already decoding
        are never touched (``Decoder.add`` checks before it writes, and a prefill writes only the
        new slots)."""
        try:
            events = self._add(admit)
        except Exception:
            self._unadd(admit)
            events = []
            for req in admit:
                try:
                    events += self._add([req])
                except Exception as e:  # this request alone fails
                    self._unadd([req])
                    bad_input = isinstance(e, (ValueError, OrthrusError))
                    if not bad_input:
                        log.exception("could not add request %s", req.id)
                    self.metrics.failed += 1
                    req.finished = True
                    self._deliver(req, SchedulerError(
                        f"the request could not be added: {e}" if bad_input else f"generation failed: {e}",
                        400 if bad_input else 500, "invalid_request" if bad_input else "generation_failed"))
        self._route(events)

    def _add(self, reqs: list[Request]) -> list[Event]:
        for req in reqs:
            self._live[req.id] = req
        events = self.decoder.add([(r.id, r.prompt_ids, r.gen, r.block_size) for r in reqs])
        for slot, row in enumerate(self.decoder.rows):
            if row is not None and row.request_id in self._live:
                self._live[row.request_id].slot = slot
        return events

    def _unadd(self, reqs: list[Request]) -> None:
        """Undo a failed :meth:`_add`: forget ``reqs`` and free the slots they may hold."""
        ids = {r.id for r in reqs}
        for req in reqs:
            self._live.pop(req.id, None)
            req.slot = None
        for slot, row in enumerate(self.decoder.rows):
            if row is not None and row.request_id in ids:
                self.decoder.release(slot)

    def _route(self, events: list[Event]) -> None:
        m, obs = self.metrics, self.observer
        now = time.monotonic()
        for ev in events:
            req = self._live[ev.request_id]
            s = ev.row.stats
            tok, prefills, drafts, verifies = req._seen
            d = m.decode
            d.tokens += s.tokens - tok
            d.prefill_passes += s.prefill_passes - prefills
            d.draft_passes += s.draft_passes - drafts
            d.verify_passes += s.verify_passes - verifies
            req._seen = (s.tokens, s.prefill_passes, s.draft_passes, s.verify_passes)
            m.generated_tokens += len(ev.token_ids)
            if obs is not None:
                self._observe(obs, req, ev, now, s.verify_passes - verifies, s.tokens - tok)
            if ev.finish_reason is not None:
                m.finished += 1
                req.finished = True
                self._free(req)
            if req.cancelled:
                continue
            if ev.finish_reason == "error":  # a numerical fault: this request fails alone (500)
                self._deliver(req, SchedulerError(ev.row.error or "generation failed", 500, "numerical_error"))
            else:
                self._deliver(req, ev)

    @staticmethod
    def _observe(obs: Observer, req: Request, ev: Event, now: float, verifies: int, kept: int) -> None:
        """Latency observations for one event of ``req`` (``verifies`` verify passes and ``kept``
        tokens since its previous event)."""
        if verifies == 1:  # one decode cycle (a prefill's first token, or a faulted cycle, has none)
            obs.verify_pass(kept)
        n = len(ev.token_ids)
        if n:
            if req.last_token is None:
                obs.first_token(now - req.arrived)  # the prefill's one token
            else:
                obs.tokens(now - req.last_token, n)
            req.last_token = now
        if ev.finish_reason in ("stop", "length"):
            obs.finished(now - req.arrived)

    def _drop_cancelled_pending(self) -> None:
        """(holding ``_cond``) forget queued requests whose client left before they got a slot."""
        if any(r.cancelled for r in self._pending):
            kept = deque(r for r in self._pending if not r.cancelled)
            self.metrics.cancelled += len(self._pending) - len(kept)
            self._pending = kept

    def _release_cancelled(self) -> None:
        for req in [r for r in self._live.values() if r.cancelled]:
            self.metrics.cancelled += 1
            self._free(req)

    def _free(self, req: Request) -> None:
        self._live.pop(req.id, None)
        if req.slot is not None:
            self.decoder.release(req.slot)
            req.slot = None

    def _fail_all(self, err: SchedulerError) -> None:
        for req in list(self._live.values()):
            self.metrics.failed += 1
            self._free(req)
            self._deliver(req, err)
        # a failure mid-add can leave rows that never reached _live; free every slot
        for slot, row in enumerate(self.decoder.rows):
            if row is not None:
                self.decoder.release(slot)

    @staticmethod
    def _deliver(req: Request, item: Event | BaseException) -> None:
        try:
            req.loop.call_soon_threadsafe(req.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server shutting down): nobody is listening
            pass
