"""The server's operational side, on a tiny random model: the API key, the body size limit,
``/metrics`` through prometheus_client (histograms included), and the SIGTERM drain of a real
``orthrus serve`` process.

The tiny model is a Hugging Face folder with a word-level tokenizer and a chat template
(``tiny_chat_folder`` in conftest): words ``w5..w96`` are tokens; its greedy answers run to max_tokens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from orthrus.engine import Orthrus  # noqa: E402
from orthrus.serve.app import create_app  # noqa: E402
from test_serve import LiveServer  # noqa: E402

MODEL = "tiny"
KEY = "sk-test-0123456789"
REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "w5 w6 w7"}]
API_KEY_ENV = "ORTHRUS_API_KEY"


@pytest.fixture(scope="module")
def keyed(tiny_chat_engine: Orthrus) -> Iterator[LiveServer]:
    """A parallel-mode server with an API key and a 2 KiB body limit."""
    srv = LiveServer(create_app(tiny_chat_engine, model_name=MODEL, mode="parallel", max_batch_size=2,
                                max_seq_len=128, api_key=KEY, max_body_bytes=2048))
    yield srv
    srv.close()


def test_warm_up_runs_each_row_count_once_and_leaves_the_slots_free(tiny_chat_engine: Orthrus, monkeypatch) -> None:
    """serve --warmup: before the scheduler starts, a short request in 1, 2, 4 slots at once (capped
    at the server's slots) through the server's own decoder; then every slot is free, no request
    is counted, and the server answers as usual. Once serving, a warm-up is refused."""
    app = create_app(tiny_chat_engine, model_name=MODEL, mode="parallel", max_batch_size=4, max_seq_len=128)
    server = app.state.server
    dec = server.scheduler.decoder
    live_rows: list[int] = []
    step = dec.step
    monkeypatch.setattr(dec, "step", lambda: live_rows.append(sum(r is not None for r in dec.rows)) or step())
    server.warm_up(16)
    assert sorted(set(live_rows)) == [1, 2, 4]
    assert all(r is None for r in dec.rows) and server.scheduler.metrics.requests == 0
    srv = LiveServer(app)
    try:
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=body(max_tokens=6), timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
        with pytest.raises(RuntimeError, match="before the scheduler thread starts"):
            server.scheduler.warm_up(None, 4, 1)
    finally:
        srv.close()


def body(**kw: Any) -> dict:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, **kw}


def scrape(url: str) -> dict[str, dict[str, float]]:
    """``/metrics`` parsed by prometheus_client's own parser: family -> {sample name + labels: value}."""
    text = httpx.get(url + "/metrics").text
    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out.setdefault(fam.name, {})[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


# ---- API key --------------------------------------------------------------------------------------

def _assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    return err


def test_api_key_required_on_v1_only(keyed: LiveServer) -> None:
    before = scrape(keyed.url)["orthrus_requests_rejected"]["orthrus_requests_rejected_total"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
            r = httpx.request(method, keyed.url + path, headers=headers, json=body())
            err = _assert_error(r, 401, "invalid_api_key")
            assert err["type"] == "invalid_request_error" and r.headers["www-authenticate"] == "Bearer"
    after = scrape(keyed.url)["orthrus_requests_rejected"]["orthrus_requests_rejected_total"]
    assert after - before == 15
    good = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(keyed.url + "/v1/models", headers=good).status_code == 200
    assert httpx.get(keyed.url + "/v1/models", headers={"authorization": f"bearer  {KEY}"}).status_code == 200
    # /health and /metrics stay open
    assert httpx.get(keyed.url + "/health").json()["status"] == "ok"
    assert httpx.get(keyed.url + "/metrics").status_code == 200
    # the official client sends the key as a bearer token
    ok = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    assert ok.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0).choices
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert e.value.code == "invalid_api_key"


def test_api_key_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key check goes through hmac.compare_digest (on digests: no length leak either)."""
    import hmac

    from orthrus.serve import gate

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(gate.hmac, "compare_digest", spy)
    state = gate.GateState(api_key=KEY)
    assert state.authorised(f"Bearer {KEY}".encode()) and not state.authorised(b"Bearer short")
    assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)
    with pytest.raises(ValueError, match="empty"):
        gate.GateState(api_key="  ")


# ---- body size ------------------------------------------------------------------------------------

def test_body_size_limit(keyed: LiveServer) -> None:
    h = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    before = scrape(keyed.url)["orthrus_requests"]["orthrus_requests_total"]
    big = json.dumps(body(messages=[{"role": "user", "content": "w5 " * 1000}]))
    assert len(big) > 2048
    err = _assert_error(httpx.post(keyed.url + "/v1/chat/completions", content=big, headers=h), 413,
                        "request_too_large")
    assert "2048 bytes" in err["message"] and "--max-body-bytes" in err["message"]
    # checked before parsing: an oversized body that is not even JSON is a 413, not a 400
    _assert_error(httpx.post(keyed.url + "/v1/chat/completions", content=b"{" * 5000, headers=h), 413,
                  "request_too_large")

    # a body without Content-Length (chunked) is cut off once it grows past the limit
    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 500):
            yield big[i:i + 500].encode()

    r = httpx.post(keyed.url + "/v1/chat/completions", content=chunks(), headers=h)
    assert "content-length" not in r.request.headers
    _assert_error(r, 413, "request_too_large")
    # nothing of them reached the scheduler; a body under the limit (chunked too) is served
    assert scrape(keyed.url)["orthrus_requests"]["orthrus_requests_total"] == before
    small = json.dumps(body()).encode()
    assert httpx.post(keyed.url + "/v1/chat/completions", content=small, headers=h).status_code == 200
    r = httpx.post(keyed.url + "/v1/chat/completions", content=iter([small[:10], small[10:]]), headers=h)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


# ---- /metrics -------------------------------------------------------------------------------------

def test_metrics_histograms(tiny_chat_engine: Orthrus) -> None:
    """Counters keep their names; the five histograms count what they should. Two servers in one
    process have their own registries."""
    servers = [LiveServer(create_app(tiny_chat_engine, model_name=MODEL, mode=mode, max_batch_size=2, max_seq_len=128))
               for mode in ("parallel", "ar")]
    try:
        for srv in servers:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            n_tokens = [5, 9]
            for i, n in enumerate(n_tokens):
                r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"w{20 + i} w9"}],
                                              max_tokens=n, temperature=0, stream=i == 1)
                if i == 1:
                    assert sum(bool(ch.choices[0].finish_reason) for ch in r if ch.choices) == 1  # read to the end
            m = scrape(srv.url)
            assert m["orthrus_requests"]["orthrus_requests_total"] == 2
            assert m["orthrus_generated_tokens"]["orthrus_generated_tokens_total"] == sum(n_tokens)
            verify = m["orthrus_verify_passes"]["orthrus_verify_passes_total"]
            for name in ("queue_wait_seconds", "time_to_first_token_seconds", "request_latency_seconds"):
                h = m[f"orthrus_{name}"]
                assert h[f"orthrus_{name}_count"] == 2 and h[f"orthrus_{name}_sum"] > 0, name
                assert h[f"orthrus_{name}_bucket{{le=+Inf}}"] == 2
            itl = m["orthrus_inter_token_latency_seconds"]
            assert itl["orthrus_inter_token_latency_seconds_count"] == sum(n_tokens) - 2  # all but first tokens
            per_pass = m["orthrus_tokens_per_verify_pass"]
            assert per_pass["orthrus_tokens_per_verify_pass_count"] == verify
            assert per_pass["orthrus_tokens_per_verify_pass_sum"] == sum(n_tokens) - 2
            if srv.app.state.server.mode == "ar":
                assert per_pass["orthrus_tokens_per_verify_pass_bucket{le=1.0}"] == verify
            else:
                assert verify < sum(n_tokens) - 2  # drafts were accepted: several tokens per pass
            ttft, e2e = (m[f"orthrus_{n}"][f"orthrus_{n}_sum"] for n in ("time_to_first_token_seconds",
                                                                        "request_latency_seconds"))
            assert ttft < e2e
            for gauge in ("tpf", "acceptance_length", "queue_depth", "active_requests", "batch_slots",
                          "block_size", "requests_in_flight", "draining"):
                assert m[f"orthrus_{gauge}"], gauge
            assert m["orthrus_draining"]["orthrus_draining"] == 0
    finally:
        for srv in servers:
            srv.close()


# ---- SIGTERM drain ---------------------------------------------------------------------------------

# a real `orthrus serve` whose decode cycles take >= 50 ms, so that a request is still running when
# the signal comes (the tiny model would otherwise finish before the test can send it)
SLOW_SERVE = """
import sys, time
from orthrus.decoding.generator import Decoder
step = Decoder.step
def slow(self):
    time.sleep(0.05)
    return step(self)
Decoder.step = slow
from orthrus import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``orthrus serve`` on the tiny folder in a subprocess (AR mode, slowed down as above)."""

    def __init__(self, folder: Path, *extra: str) -> None:
        self.model = str(folder)  # the model name it serves
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "OMP_NUM_THREADS": "1"}
        env.pop(API_KEY_ENV, None)
        argv = [sys.executable, "-c", SLOW_SERVE, "serve", "--model", str(folder), "--mode", "ar",
                "--port", str(self.port), "--max-seq-len", "256", *extra]
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.monotonic() + 180
        while True:
            assert self.proc.poll() is None, self.proc.communicate()[1]
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)

    def stream_in_background(self, max_tokens: int) -> tuple[threading.Thread, list[str], threading.Event]:
        """A streamed chat request read in a thread; returns (thread, its data lines, set at the
        first content chunk)."""
        lines: list[str] = []
        started = threading.Event()

        def read() -> None:
            req = {"model": self.model, "messages": MESSAGES, "max_tokens": max_tokens,
                   "temperature": 0, "stream": True}
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=req, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                    if '"content": "w' in line:
                        started.set()
            started.set()

        t = threading.Thread(target=read, daemon=True)
        t.start()
        return t, lines, started

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()



@pytest.fixture
def serve_process(tiny_chat_folder: Path) -> Iterator[Any]:
    procs: list[ServeProcess] = []

    def start(*extra: str) -> ServeProcess:
        p = ServeProcess(tiny_chat_folder, *extra)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()


def _content(lines: list[str]) -> tuple[int, str | None, bool]:
    """(content chunks, the finish reason, whether an error event came) of a streamed chat reply."""
    pieces, finish, error = 0, None, False
    for line in lines:
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            continue
        obj = json.loads(data)
        if "error" in obj:
            error = True
            continue
        for ch in obj["choices"]:
            pieces += bool(ch["delta"].get("content"))
            finish = ch["finish_reason"] or finish
    return pieces, finish, error


def test_sigterm_drains_in_flight_and_refuses_new(serve_process: Any) -> None:
    srv = serve_process("--drain-timeout", "60")
    t, lines, started = srv.stream_in_background(max_tokens=40)  # ~2 s of 50 ms cycles
    assert started.wait(60)
    srv.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while True:  # the signal is handled between two event-loop ticks
        r = httpx.post(srv.url + "/v1/chat/completions", json=body(model=srv.model), timeout=10)
        if r.status_code == 503 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    err = _assert_error(r, 503, "server_shutting_down")
    assert err["type"] == "server_error"
    health = httpx.get(srv.url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "draining"
    t.join(60)
    assert not t.is_alive()
    pieces, finish, error = _content(lines)
    assert finish == "length" and not error and lines[-1] == "data: [DONE]"  # ran to its end
    assert pieces >= 30  # its tokens, word by word
    assert srv.proc.wait(30) == 0
    assert "Traceback" not in srv.proc.communicate()[1]


def test_sigterm_drain_timeout_fails_what_is_left(serve_process: Any) -> None:
    srv = serve_process("--drain-timeout", "1")
    t, lines, started = srv.stream_in_background(max_tokens=240)  # ~12 s: longer than the drain
    assert started.wait(60)
    sent = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    assert time.monotonic() - sent < 10  # did not wait for the request to finish
    t.join(30)
    pieces, finish, error = _content(lines)
    assert error and finish is None and lines[-1] == "data: [DONE]", lines[-3:]
    assert "shutting down" in lines[-2]
