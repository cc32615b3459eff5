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
    ("n = 0", _with(n=0), 400, None),
    ("n too large", _with(n=129), 400, None),
    ("unknown field", _with(foo=1), 400, "unknown_parameter"),
    ("unknown message field", _with(messages=[{"role": "user", "content": "x", "colour": 1}]), 400,
     "unknown_parameter"),
    ("unknown stream option", _with(stream=True, stream_options={"x": 1}), 400, "unknown_parameter"),
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
    ({"model": MODEL, "prompt": ["a", ""]}, None),
    ({"model": MODEL, "prompt": []}, None),
    ({"model": MODEL, "prompt": [[]]}, None),
    ({"model": MODEL, "prompt": [[1], [10**9]]}, None),
    ({"model": MODEL, "prompt": ["a", "b"], "n": 100}, None),  # 200 choices: over the cap
    ({"model": MODEL, "prompt": ["a", "word " * (CONTEXT * 2)]}, "context_length_exceeded"),
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


def test_numerical_fault_fails_that_request_alone(live: LiveServer, client: Any, http: httpx.Client,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Non-finite verify logits: that request gets a 500 naming the fault; the server goes on."""
    from orthrus.models.llama import Transformer

    wait_idle(http)
    orig = Transformer.logits

    def poisoned(self, hidden):  # every pass after the prefill (whose hidden is [B, C]) overflows
        out = orig(self, hidden)
        return out if hidden.dim() == 2 else out * float("nan")

    monkeypatch.setattr(Transformer, "logits", poisoned)
    r = http.post("/v1/chat/completions", json={**GOOD, "max_tokens": 6, "temperature": 0})
    monkeypatch.undo()
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "numerical_error" and "non-finite" in err["message"]
    wait_idle(http)
    assert live.app.state.server.scheduler.decoder.free_slots() == list(range(SLOTS))
    assert chat(client, QUESTIONS[0], 3).choices[0].message.content


def test_bounded_queue_answers_429_with_retry_after(live: LiveServer, http: httpx.Client,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """More sequences than free slots + --max-queue: a 429 with Retry-After, nothing queued; a
    request that fits still runs."""
    wait_idle(http)
    server = live.app.state.server
    monkeypatch.setattr(server, "max_queue", 0)
    before = server.scheduler.metrics.requests
    r = http.post("/v1/chat/completions", json={**GOOD, "max_tokens": 2, "n": SLOTS + 1})
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "server_busy"
    assert server.scheduler.metrics.requests == before and server.scheduler.queue_depth == 0
    r = http.post("/v1/chat/completions", json={**GOOD, "max_tokens": 2, "n": SLOTS})
    assert r.status_code == 200 and len(r.json()["choices"]) == SLOTS


# ---- every OpenAI field: honoured or refused by name -------------------------------------------

# (field, a value that asks for something we do not implement); each must be a 400 naming the field
REFUSED_CHAT = {
    "frequency_penalty": 0.5, "presence_penalty": -0.5, "logit_bias": {"15": 5},
    "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "required",
    "functions": [{"name": "f", "parameters": {}}], "function_call": {"name": "f"},
    "audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"}, "moderation": {"model": "x"},
    "reasoning_effort": "high", "verbosity": "low", "web_search_options": {}, "store": True,
    "service_tier": "flex",
}
REFUSED_COMPLETION = {"frequency_penalty": 0.5, "presence_penalty": 1.0, "logit_bias": {"15": 5},
                      "suffix": " the end", "best_of": 2}
# fields we honour (tested elsewhere: logprobs in test_logprobs.py) and hints that change no output
HONOURED_CHAT = {"messages", "model", "max_completion_tokens", "max_tokens", "n", "seed", "stop", "stream",
                 "stream_options", "temperature", "top_p", "logprobs", "top_logprobs"}
HINTS_CHAT = {"metadata", "parallel_tool_calls", "prompt_cache_key", "prompt_cache_options",
              "prompt_cache_retention", "safety_identifier", "user"}
HONOURED_COMPLETION = {"model", "prompt", "echo", "max_tokens", "n", "seed", "stop", "stream", "stream_options",
                       "temperature", "top_p", "logprobs"}
HINTS_COMPLETION = {"user"}
CLIENT_ONLY = {"self", "extra_headers", "extra_query", "extra_body", "timeout"}


def _client_fields(create: Any) -> set[str]:
    import inspect
    return set(inspect.signature(create).parameters) - CLIENT_ONLY


def test_every_field_the_official_client_exposes_is_honoured_or_refused(client: Any) -> None:
    """Each parameter of the client's ``create`` is either implemented, a harmless hint, or refused
    with a 400 naming it (a new client field fails here until it is classified)."""
    chat_fields = _client_fields(client.chat.completions.create)
    assert chat_fields == HONOURED_CHAT | HINTS_CHAT | set(REFUSED_CHAT), chat_fields ^ (
        HONOURED_CHAT | HINTS_CHAT | set(REFUSED_CHAT))
    completion_fields = _client_fields(client.completions.create)
    assert completion_fields == HONOURED_COMPLETION | HINTS_COMPLETION | set(REFUSED_COMPLETION)
    for field, value in REFUSED_CHAT.items():
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, "hi", 2, **{field: value})
        assert e.value.status_code == 400 and e.value.param == field, (field, e.value)
        assert e.value.code == "unsupported_parameter" and field in e.value.message
    for field, value in REFUSED_COMPLETION.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2, **{field: value})
        assert e.value.status_code == 400 and e.value.param == field, (field, e.value)
        assert e.value.code == "unsupported_parameter" and field in e.value.message


def test_default_values_and_hints_are_accepted(client: Any) -> None:
    plain = chat(client, QUESTIONS[1], 6).choices[0].message.content
    r = chat(client, QUESTIONS[1], 6, frequency_penalty=0, presence_penalty=0.0, logit_bias={}, logprobs=False,
             top_logprobs=0, response_format={"type": "text"}, tools=[], tool_choice="none",
             parallel_tool_calls=True, modalities=["text"], store=False, service_tier="auto",
             metadata={"k": "v"}, safety_identifier="s", prompt_cache_key="c", user="u", n=1,
             extra_body={"messages": [{"role": "user", "content": QUESTIONS[1], "name": None,
                                       "tool_calls": None, "refusal": None}]})
    assert r.choices[0].message.content == plain
    c = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=4, temperature=0,
                                  frequency_penalty=0, presence_penalty=0, logit_bias={}, suffix="",
                                  best_of=1, echo=False, user="u", n=1)
    assert c.choices[0].text


def test_unknown_fields_are_refused_by_name(http: httpx.Client) -> None:
    for path, body in [("/v1/chat/completions", _with(min_p=0.1)),
                       ("/v1/completions", {"model": MODEL, "prompt": "hi", "repetition_penalty": 1.2})]:
        r = http.post(path, json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "unknown_parameter" and err["param"] in ("min_p", "repetition_penalty")
        assert err["param"] in err["message"]
    r = http.post("/v1/chat/completions", json=_with(messages=[{"role": "user", "content": "x", "name": "bob"}]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].name"


# ---- n, prompt lists, echo ------------------------------------------------------------------------

def _stream_choices(chunks: Any, chat_api: bool) -> dict[int, str]:
    out: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            piece = (ch.delta.content or "") if chat_api else ch.text
            out[ch.index] = out.get(ch.index, "") + piece
    return out


def test_n_choices_independent_seeded_and_streamed(client: Any) -> None:
    def ask(**kw: Any) -> Any:
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[6]}],
                                              max_tokens=8, temperature=1.0, **kw)

    r = ask(n=3, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) == 3, texts  # independent samples, not one sample three times
    assert 3 <= r.usage.completion_tokens <= 3 * 8
    # choice i uses seed + i: the same as a request of its own with that seed
    assert [ask(seed=5 + i).choices[0].message.content for i in range(3)] == texts
    assert [c.message.content for c in ask(n=3, seed=5).choices] == texts
    assert _stream_choices(ask(n=3, seed=5, stream=True), True) == dict(enumerate(texts))
    unseeded = [c.message.content for c in ask(n=3).choices]
    assert len(set(unseeded)) > 1, unseeded
    greedy = chat(client, QUESTIONS[0], 6, n=2)
    assert [c.message.content for c in greedy.choices] == [chat(client, QUESTIONS[0], 6).choices[0].message.content] * 2


def test_prompt_list_n_and_echo_on_completions(client: Any, real_engine) -> None:
    prompts = ["The capital of France is", "One, two, three,"]
    solo = [client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0).choices[0].text
            for p in prompts]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [solo[0], solo[0], solo[1], solo[1]]  # prompt-major
    n_prompt = [len(real_engine.encode(p, chat_template=False)) for p in prompts]
    assert r.usage.prompt_tokens == sum(n_prompt)  # once per prompt, not per choice
    streamed = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, n=2, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(streamed)
    assert _stream_choices([c for c in chunks if c.choices], False) == dict(enumerate(c.text for c in r.choices))
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    # token-id prompts, a list of them
    ids = [real_engine.encode(p, chat_template=False) for p in prompts]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in by_ids.choices] == solo

    # echo: the prompt text, then the completion
    e = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, echo=True)
    assert [c.text for c in e.choices] == [p + t for p, t in zip(prompts, solo)]
    es = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=5, temperature=0, echo=True,
                                   stream=True)
    assert "".join(c.choices[0].text for c in es) == prompts[0] + solo[0]
    e_ids = client.completions.create(model=MODEL, prompt=ids[1], max_tokens=5, temperature=0, echo=True)
    assert e_ids.choices[0].text == real_engine.decode(ids[1]) + solo[1]


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


# ---- one bad request never fails others ------------------------------------------------------------

def test_request_refused_late_fails_alone(live: LiveServer, client: Any, http: httpx.Client,
                                          slow_steps: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that passes the HTTP checks but that the decoder refuses (here: too long for its
    cache, by widening the server's own check) gets a 400, streamed or not, while a request already
    decoding goes on untouched and gives its solo text."""
    solo = chat(client, QUESTIONS[4], 12).choices[0].message.content
    before = wait_idle(http)
    server = live.app.state.server
    monkeypatch.setattr(server, "context", CONTEXT * 10)  # the cache still holds CONTEXT + K
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: "".join(c.choices[0].delta.content or ""
                                              for c in chat(client, QUESTIONS[4], 12, stream=True) if c.choices))
        deadline = time.monotonic() + 20
        while metrics(http)["orthrus_active_requests"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        too_long = {**GOOD, "max_tokens": CONTEXT * 2}
        for stream in (False, True):
            r = http.post("/v1/chat/completions", json={**too_long, "stream": stream})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and "cache positions" in err["message"]
        assert metrics(http)["orthrus_active_requests"] == 1  # the running request is still there
        assert running.result() == solo
    m = wait_idle(http)
    assert m["orthrus_requests_failed_total"] - before["orthrus_requests_failed_total"] == 2
    assert server.scheduler.decoder.free_slots() == list(range(SLOTS))


class _NowLoop:
    """Stands in for the event loop: delivers at once (the scheduler runs on this thread here)."""

    @staticmethod
    def call_soon_threadsafe(fn: Any, *args: Any) -> None:
        fn(*args)


def test_scheduler_admits_around_a_refused_request(real_engine) -> None:
    """Admitted in one batch with good requests, a request the decoder refuses fails alone: the
    others are added, and a row already decoding keeps its exact greedy tokens."""
    import asyncio

    from orthrus.config import GenerationConfig
    from orthrus.serve.scheduler import Request as GenRequest
    from orthrus.serve.scheduler import Scheduler, SchedulerError

    sched = Scheduler(real_engine, 3, 64)
    gen = GenerationConfig(max_new_tokens=12, mode="ar")
    prompts = [real_engine.encode(q) for q in QUESTIONS[:2]]
    assert max(len(p) for p in prompts) + 12 <= 64

    def request(ids: list[int], g: GenerationConfig) -> GenRequest:
        return GenRequest(ids, g, 1, _NowLoop(), queue=asyncio.Queue())  # type: ignore[arg-type]

    first, second = request(prompts[0], gen), request(prompts[1], gen)
    bad = request(prompts[1], GenerationConfig(max_new_tokens=60, mode="ar"))  # needs > 64 positions
    sched._admit([first])
    sched._route(sched.decoder.step())  # `first` is decoding
    sched._admit([bad, second])
    while sched._live:
        sched._route(sched.decoder.step())

    def drained(req: GenRequest) -> list[Any]:
        items = []
        while not req.queue.empty():
            items.append(req.queue.get_nowait())
        return items

    err = drained(bad)
    assert len(err) == 1 and isinstance(err[0], SchedulerError) and err[0].status == 400
    ref = real_engine.generate([[{"role": "user", "content": q}] for q in QUESTIONS[:2]], gen)
    for req, want in zip((first, second), ref):
        events = drained(req)
        assert events[-1].finish_reason is not None and events[-1].row.tokens == want.token_ids
    assert sched.decoder.free_slots() == [0, 1, 2] and sched.metrics.failed == 1


# ---- the command --------------------------------------------------------------------------------

def test_serve_command_builds_the_app(monkeypatch: pytest.MonkeyPatch, real_engine) -> None:
    from orthrus import cli
    from orthrus.commands import serve
    from orthrus.serve import run as runner

    seen: dict[str, Any] = {}
    monkeypatch.setattr(serve, "load_engine", lambda args, **kw: real_engine)
    monkeypatch.setattr(runner, "serve", lambda app, **kw: seen.update(app=app, **kw))
    warmed: list[int] = []
    monkeypatch.setattr("orthrus.serve.app.Server.warm_up", lambda self, rows: warmed.append(rows))
    monkeypatch.delenv("ORTHRUS_API_KEY", raising=False)
    assert cli.main(["serve", "--adapter", "init", "--port", "0", "--max-batch-size", "2",
                     "--max-seq-len", "64", "--mode", "ar"]) == 0
    state = seen["app"].state.server
    assert (seen["host"], seen["port"], seen["drain_timeout"]) == ("127.0.0.1", 0, 30.0)
    assert (state.model_name, state.mode, state.context, state.scheduler.max_batch) == (MODEL, "ar", 64, 2)
    assert not state.gate.has_key and state.gate.max_body_bytes == 4 * 1024 * 1024
    # the API key: from the flag, else from $ORTHRUS_API_KEY; the limits from their flags
    monkeypatch.setenv("ORTHRUS_API_KEY", "from-env")
    assert cli.main(["serve", "--adapter", "init", "--mode", "ar", "--max-seq-len", "64",
                     "--max-body-bytes", "1000", "--drain-timeout", "2.5"]) == 0
    gate = seen["app"].state.server.gate
    assert gate.authorised(b"Bearer from-env") and gate.max_body_bytes == 1000 and seen["drain_timeout"] == 2.5
    assert cli.main(["serve", "--adapter", "init", "--mode", "ar", "--max-seq-len", "64",
                     "--api-key", "from-flag"]) == 0
    gate = seen["app"].state.server.gate
    assert gate.authorised(b"Bearer from-flag") and not gate.authorised(b"Bearer from-env")
    assert warmed == []  # an eager engine: no warm-up unless asked
    assert cli.main(["serve", "--adapter", "init", "--mode", "ar", "--max-seq-len", "64", "--warmup", "4"]) == 0
    assert warmed == [4]


@pytest.mark.parametrize("argv", [["--max-batch-size", "0"], ["--max-seq-len", "1"], ["--port", "-1"],
                                  ["--model", "no-such-model"], ["--api-key", " "], ["--max-body-bytes", "0"],
                                  ["--drain-timeout", "-1"], ["--drain-timeout", "nan"], ["--warmup", "-1"]])
def test_serve_command_bad_options(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    from orthrus import cli

    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orthrus: error:") and len(err.strip().splitlines()) == 1


def test_ngram_server_is_exact_and_needs_no_adapter(real_engine) -> None:
    """``serve --draft ngram``: drafts by prompt lookup (no draft pass), greedy output == AR."""
    from orthrus.engine import Orthrus

    engine = Orthrus(real_engine.base, None, prepare=False)  # no adapter at all (model already prepared)
    app = create_app(engine, model_name=MODEL, mode="parallel", max_batch_size=2, max_seq_len=CONTEXT,
                     block_size=4, draft="ngram")
    srv = LiveServer(app)
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        q = "Repeat exactly: the cat sat on the mat, the cat sat on the mat, the cat sat on the mat."
        got = chat(c, q, 40).choices[0].message.content
        ref = real_engine.generate([q], mode="ar", max_new_tokens=40)[0].text
        assert got == ref
        with httpx.Client(base_url=srv.url, timeout=60) as h:
            m = metrics(h)
        assert m["orthrus_block_size"] == 4
        assert m["orthrus_verify_passes_total"] < m["orthrus_generated_tokens_total"]  # drafts accepted
    finally:
        srv.close()
