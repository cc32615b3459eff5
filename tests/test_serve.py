"""The OpenAI-compatible server, over real HTTP on loopback (uvicorn in a background thread).

Runs on the real default model with a fresh adapter (parallel mode: greedy output must equal the
frozen model's own), with small max_tokens to stay fast. The server has 4 slots, so 8 concurrent
requests also exercise the queue and requests joining a running batch.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import httpx
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from orthrus.serve.app import create_app  # noqa: E402

MODEL = "smollm2-135m"
SLOTS = 4
CONTEXT = 256
QUESTIONS = ["Say hi.", "What is 2+2?", "Name a color.", "Write one word about the sea.",
             "What is the capital of France?", "Count to five.", "Give me a fruit.", "Is the sky blue?"]


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def live(real_engine) -> Iterator[LiveServer]:
    app = create_app(real_engine, model_name=MODEL, mode="parallel", max_batch_size=SLOTS,
                     max_seq_len=CONTEXT, block_size=4)
    srv = LiveServer(app)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def http(live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(live) -> Any:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def metrics(http: httpx.Client) -> dict[str, float]:
    text = http.get("/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(orthrus_\w+) (\S+)$", text, re.M)}


def chat(client: Any, question: str, max_tokens: int, **kw: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                          max_tokens=max_tokens, temperature=0, **kw)


def wait_idle(http: httpx.Client, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(http)
        if m["orthrus_active_requests"] == 0 and m["orthrus_queue_depth"] == 0:
            return m
        assert time.monotonic() < deadline, f"server still busy: {m}"
        time.sleep(0.05)


# ---- endpoints ----------------------------------------------------------------------------------

def test_models_health_metrics(http: httpx.Client) -> None:
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("requests_total", "generated_tokens_total", "forward_passes_total", "verify_passes_total",
                 "tpf", "acceptance_length", "queue_depth", "active_requests"):
        assert re.search(rf"^# TYPE orthrus_{name} (counter|gauge)$", r.text, re.M), name
        assert re.search(rf"^orthrus_{name} [0-9.e+-]+$", r.text, re.M), name
    assert metrics(http)["orthrus_batch_slots"] == SLOTS


def test_stream_equals_non_stream_and_offline(client: Any, http: httpx.Client, real_engine) -> None:
    before = wait_idle(http)
    full = chat(client, QUESTIONS[0], 16)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason in ("stop", "length") and text
    assert full.usage.completion_tokens == 16 or full.choices[0].finish_reason == "stop"
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    ids = real_engine.encode([{"role": "user", "content": QUESTIONS[0]}])
    assert full.usage.prompt_tokens == len(ids)

    chunks = list(chat(client, QUESTIONS[0], 16, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    # the same tokens as offline greedy AR decoding of the frozen model (exactness through HTTP)
    ref = real_engine.generate([[{"role": "user", "content": QUESTIONS[0]}]], mode="ar", max_new_tokens=16)[0]
    assert text == ref.text

    m = wait_idle(http)
    assert m["orthrus_requests_total"] - before["orthrus_requests_total"] == 2
    assert m["orthrus_generated_tokens_total"] - before["orthrus_generated_tokens_total"] == \
        2 * full.usage.completion_tokens
    assert m["orthrus_tpf"] > 0 and m["orthrus_acceptance_length"] >= 1


def test_raw_completions_stream_and_not(client: Any) -> None:
    prompt = "The three primary colors are"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert full.object == "text_completion" and full.choices[0].text
    assert full.usage.completion_tokens == 12 or full.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in
                       client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                 stream=True))
    assert streamed == full.choices[0].text


def test_stop_and_seeded_sampling(client: Any) -> None:
    text = chat(client, QUESTIONS[1], 12).choices[0].message.content
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    cut = chat(client, QUESTIONS[1], 12, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]

    def sampled(seed: int) -> str:
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTIONS[2]}], max_tokens=8,
            temperature=1.0, top_p=0.9, seed=seed).choices[0].message.content

    assert sampled(7) == sampled(7)


def test_request_that_fills_the_context_exactly(client: Any, real_engine) -> None:
    question = "Repeat: " + "one two three " * 73
    n = len(real_engine.encode([{"role": "user", "content": question}]))
    assert 1 <= CONTEXT - n <= 8, n  # only a few tokens of room: the limit is really reached
    r = chat(client, question, CONTEXT - n)  # prompt + max_tokens == the context: allowed
    assert r.usage.prompt_tokens == n and r.usage.completion_tokens <= CONTEXT - n
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, question, CONTEXT - n + 1)
    assert e.value.code == "context_length_exceeded"


# ---- batching -----------------------------------------------------------------------------------

def test_eight_concurrent_requests_match_solo(client: Any, http: httpx.Client) -> None:
    lengths = [10, 5, 8, 3, 10, 6, 4, 9]  # uneven, so rows finish and queued ones join mid-batch
    solo_steps = 0
    solo = []
    for q, n in zip(QUESTIONS, lengths):
        before = metrics(http)["orthrus_decode_steps_total"]
        solo.append(chat(client, q, n).choices[0].message.content)
        solo_steps += metrics(http)["orthrus_decode_steps_total"] - before

    before = wait_idle(http)["orthrus_decode_steps_total"]
    start = threading.Barrier(len(QUESTIONS))

    def one(i: int) -> str:
        start.wait()
        stream = i % 2 == 1  # half streamed, half not
        r = chat(client, QUESTIONS[i], lengths[i], stream=stream)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        return r.choices[0].message.content

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(one, range(len(QUESTIONS))))
    assert together == solo
    steps = wait_idle(http)["orthrus_decode_steps_total"] - before
    assert steps < 0.6 * solo_steps, (steps, solo_steps)  # decoded together, not one after another


def test_new_request_joins_running_batch(live: LiveServer, client: Any) -> None:
    """A short request sent while a long one streams finishes first: it did not wait for the batch."""
    stream = chat(client, QUESTIONS[3], 40, stream=True)
    events: list[tuple[str, float]] = []
    it = iter(stream)
    next(it)  # the long request is decoding
    with ThreadPoolExecutor(1) as pool:
        short = pool.submit(lambda: (chat(client, QUESTIONS[1], 3), events.append(("short", time.monotonic()))))
        for _ in it:
            pass
        events.append(("long", time.monotonic()))
        short.result()
    assert [name for name, _ in sorted(events, key=lambda e: e[1])] == ["short", "long"]


# ---- bad input ----------------------------------------------------------------------------------

GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _with(**kw: Any) -> dict:
    return {**GOOD, **kw}


BAD: list[tuple[str, Any, int, str | None]] = [  # (name, body, status, code)
    ("malformed json", '{"model": "x", "messages": [', 400, "invalid_json"),
    ("not an object", "[1, 2]", 400, "invalid_type"),
    ("empty body", "", 400, None),
    ("missing messages", {"model": MODEL}, 400, "missing_required_parameter"),
    ("missing model", {"messages": GOOD["messages"]}, 400, "missing_required_parameter"),
    ("empty messages", _with(messages=[]), 400, None),
    ("messages not a list", _with(messages="hi"), 400, None),
    ("unknown role", _with(messages=[{"role": "tool", "content": "x"}]), 400, None),
    ("function role", _with(messages=[{"role": "function", "content": "x"}]), 400, None),
    ("content wrong type", _with(messages=[{"role": "user", "content": 5}]), 400, None),
    ("missing content", _with(messages=[{"role": "user"}]), 400, "missing_required_parameter"),
    ("max_tokens string", _with(max_tokens="5"), 400, None),
    ("max_tokens negative", _with(max_tokens=-3), 400, None),
    ("max_tokens zero", _with(max_tokens=0), 400, None),
    ("max_tokens float", _with(max_tokens=2.5), 400, None),
    ("temperature NaN", '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], '
                        '"temperature": NaN}' % MODEL, 400, None),
    ("temperature Infinity", '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], '
                             '"temperature": Infinity}' % MODEL, 400, None),
    ("temperature negative", _with(temperature=-1), 400, None),
    ("temperature bool", _with(temperature=True), 400, None),
    ("top_p zero", _with(top_p=0), 400, None),
    ("top_p > 1", _with(top_p=1.5), 400, None),
    ("seed negative", _with(seed=-1), 400, None),
    ("n = 2", _with(n=2), 400, None),
    ("stop empty string", _with(stop=""), 400, None),
    ("stop wrong type", _with(stop=[1]), 400, None),
    ("stream not bool", _with(stream="yes"), 400, None),
    ("max_tokens beyond context", _with(max_tokens=CONTEXT * 10), 400, "context_length_exceeded"),
    ("prompt beyond context", _with(messages=[{"role": "user", "content": "word " * (CONTEXT * 2)}]), 400,
     "context_length_exceeded"),
    ("unknown model", _with(model="gpt-4"), 404, "model_not_found"),
]


@pytest.mark.parametrize("name,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_input_is_a_4xx_json_error(http: httpx.Client, name: str, body: Any, status: int,
                                            code: str | None) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    r = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    if code is not None:
        assert err["code"] == code


@pytest.mark.parametrize("body,code", [
    ({"model": MODEL, "prompt": "word " * (CONTEXT * 2)}, "context_length_exceeded"),
    ({"model": MODEL, "prompt": ["a", "b"]}, None),
    ({"model": MODEL, "prompt": [10**9]}, None),
    ({"model": MODEL, "prompt": ""}, None),
    ({"model": MODEL, "prompt": "   "}, None),
    ({"model": MODEL}, "missing_required_parameter"),
])
def test_bad_completion_input(http: httpx.Client, body: dict, code: str | None) -> None:
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    if code is not None:
        assert r.json()["error"]["code"] == code


def test_unknown_route_and_method(http: httpx.Client) -> None:
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_server_still_serves_after_bad_input(client: Any, http: httpx.Client) -> None:
    for _, body, _, _ in BAD[:4]:
        http.post("/v1/chat/completions", content=body if isinstance(body, str) else json.dumps(body),
                  headers={"content-type": "application/json"})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2)
    r = chat(client, QUESTIONS[0], 4)
    assert r.choices[0].message.content
    assert metrics(http)["orthrus_requests_rejected_total"] >= len(BAD)


def test_decoder_failure_fails_the_request_not_the_server(live: LiveServer, client: Any, http: httpx.Client,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    wait_idle(http)
    decoder = live.app.state.server.scheduler.decoder

    def boom() -> list:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(decoder, "step", boom)  # the scheduler thread is idle: safe to swap
    r = http.post("/v1/chat/completions", json={**GOOD, "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    with http.stream("POST", "/v1/chat/completions", json={**GOOD, "max_tokens": 4, "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line]
    assert '"server_error"' in lines[-2] and lines[-1] == "data: [DONE]"
    monkeypatch.undo()
    m = wait_idle(http)
    assert m["orthrus_requests_failed_total"] >= 2 and decoder.free_slots() == list(range(SLOTS))
    assert chat(client, QUESTIONS[0], 3).choices[0].message.content


# ---- disconnects --------------------------------------------------------------------------------

LONG = "Write a long story about a ship at sea."  # a greedy answer that runs to max_tokens


@pytest.fixture
def slow_steps(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each decoder step takes >= 0.25 s, so a request cannot finish before its client has gone
    (on a fast machine it otherwise could, and the test would race the disconnect)."""
    decoder = live.app.state.server.scheduler.decoder
    step = decoder.step

    def slow() -> list:
        time.sleep(0.25)
        return step()

    monkeypatch.setattr(decoder, "step", slow)  # the scheduler thread is idle: safe to swap


def test_disconnect_mid_stream_frees_slot(live: LiveServer, http: httpx.Client, slow_steps: None) -> None:
    before = wait_idle(http)
    body = {**GOOD, "messages": [{"role": "user", "content": LONG}], "max_tokens": 200,
            "temperature": 0, "stream": True}
    with httpx.Client(base_url=live.url, timeout=60) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        seen = 0
        for line in lines:  # read until some content arrived: the request holds a slot
            if line.startswith("data:") and '"content": "' in line and '"content": ""' not in line:
                seen += 1
                if seen == 2:
                    break
        assert metrics(http)["orthrus_active_requests"] == 1
    # the client is gone; its slot must be freed long before 200 tokens could be generated
    m = wait_idle(http, timeout=20)
    assert m["orthrus_requests_cancelled_total"] - before["orthrus_requests_cancelled_total"] == 1
    assert m["orthrus_generated_tokens_total"] - before["orthrus_generated_tokens_total"] < 100


def test_disconnect_while_waiting_non_streamed(live: LiveServer, http: httpx.Client, slow_steps: None) -> None:
    before = wait_idle(http)
    body = {**GOOD, "messages": [{"role": "user", "content": LONG}], "max_tokens": 200, "temperature": 0}
    with httpx.Client(base_url=live.url, timeout=1.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json=body)
    m = wait_idle(http, timeout=20)
    assert m["orthrus_requests_cancelled_total"] - before["orthrus_requests_cancelled_total"] == 1
    assert http.get("/health").json()["status"] == "ok"


# ---- the command --------------------------------------------------------------------------------

def test_serve_command_builds_the_app(monkeypatch: pytest.MonkeyPatch, real_engine) -> None:
    from orthrus import cli
    from orthrus.commands import serve

    seen: dict[str, Any] = {}
    monkeypatch.setattr(serve, "load_engine", lambda args: real_engine)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert cli.main(["serve", "--adapter", "init", "--port", "0", "--max-batch-size", "2",
                     "--max-seq-len", "64", "--mode", "ar"]) == 0
    state = seen["app"].state.server
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 0)
    assert (state.model_name, state.mode, state.context, state.scheduler.max_batch) == (MODEL, "ar", 64, 2)


@pytest.mark.parametrize("argv", [["--max-batch-size", "0"], ["--max-seq-len", "1"], ["--port", "-1"],
                                  ["--model", "no-such-model"]])
def test_serve_command_bad_options(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    from orthrus import cli

    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orthrus: error:") and len(err.strip().splitlines()) == 1
