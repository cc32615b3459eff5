"""Running the app under uvicorn, with a drain on SIGTERM.

On SIGTERM (what a container runtime or systemd sends before killing a process) the server drains:

1. it stops taking work: every new ``/v1`` request gets 503 ``server_shutting_down`` (the socket
   stays open, so clients get an answer rather than a refused connection) and ``/health`` answers
   503, so that a load balancer takes the server out of rotation;
2. the requests in flight (streams included) run to their end, for at most ``drain_timeout``
   seconds;
3. then the process exits with status 0. Requests still running at the timeout are failed by the
   scheduler with "the server is shutting down" (an error event on a stream, a 500 otherwise).

A second SIGTERM during the drain, or SIGINT (Ctrl-C), keeps uvicorn's behaviour: stop now (SIGINT
twice: force).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT = 30.0  # seconds the requests in flight get to finish after SIGTERM
CLOSE_GRACE_S = 5.0           # after the drain: time for the last replies to reach their clients


class DrainingServer(uvicorn.Server):
    """A :class:`uvicorn.Server` that drains on SIGTERM (see the module docstring).

    Args:
        config: uvicorn's config; its app is the orthrus app (``app.state.server`` is its
            :class:`~orthrus.serve.app.Server`).
        drain_timeout: seconds in-flight requests may take after SIGTERM.
    """

    def __init__(self, config: uvicorn.Config, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT) -> None:
        super().__init__(config)
        if drain_timeout < 0:
            raise ValueError(f"the drain timeout must be >= 0 seconds, got {drain_timeout}")
        self.drain_timeout = drain_timeout
        self.drain_deadline: float | None = None

    @property
    def _state(self) -> Any:
        return self.config.app.state.server

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # a signal handler: only set flags here; on_tick (on the event loop) does the rest
        if sig == signal.SIGTERM and self.drain_deadline is None and not self.should_exit:
            self.drain_deadline = time.monotonic() + self.drain_timeout
            self._state.gate.draining = True
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            state = self._state
            if state.gate.in_flight == 0:
                log.info("drained: no request in flight; exiting")
                return True
            if time.monotonic() >= self.drain_deadline:
                log.warning("drain timeout (%.0f s): failing the %d request(s) still in flight",
                            self.drain_timeout, state.gate.in_flight)
                await asyncio.to_thread(state.scheduler.stop)
                return True
        return await super().on_tick(counter)


def serve(app: Any, host: str, port: int, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
          log_level: str = "warning") -> None:
    """Serve ``app`` (from :func:`~orthrus.serve.app.create_app`) on ``host:port`` until SIGINT,
    or until SIGTERM and the drain (see the module docstring)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(CLOSE_GRACE_S))
    DrainingServer(config, drain_timeout).run()
