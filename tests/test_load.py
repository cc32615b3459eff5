"""bench/load.py, the load and fault generator of ``orthrus serve``: its statistics helpers, its
refusal of any host but 127.0.0.1, and a short run (concurrency 2, two seconds, faults included)
against a tiny in-process server: every field is there, no errors, no exactness mismatch, 429s
with Retry-After in the flood, nothing left in flight."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from orthrus.serve.app import create_app  # noqa: E402
from test_serve import LiveServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_load", REPO / "bench" / "load.py")
load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load)


def test_percentile_and_summary() -> None:
    assert load.percentile([], 50) is None
    assert load.percentile([3.0], 99) == 3.0
    xs = [float(i) for i in range(1, 101)]  # 1..100
    assert load.percentile(xs, 50) == pytest.approx(50.5)
    assert load.percentile(xs, 99) == pytest.approx(99.01)
    assert load.percentile(list(reversed(xs)), 0) == 1.0 and load.percentile(xs, 100) == 100.0
    s = load.summarize([0.1, 0.2, 0.3])
    assert s == {"n": 3, "p50": 0.2, "p99": pytest.approx(0.298, abs=1e-4), "mean": 0.2}
    assert load.summarize([]) == {"n": 0, "p50": None, "p99": None, "mean": None}
    m = load.parse_metrics('# HELP x y\nfoo_total 3.0\nbar{a="b c"} 2\n')
    assert m == {"foo_total": 3.0, 'bar{a="b c"}': 2.0}


@pytest.mark.parametrize("url", ["http://localhost:8000", "http://10.0.0.1:8000", "https://127.0.0.1:8000",
                                 "http://127.0.0.1", "http://example.com:80"])
def test_refuses_other_hosts(url: str) -> None:
    with pytest.raises(SystemExit):
        load.check_local(url)
    assert load.check_local("http://127.0.0.1:8123/x") == "http://127.0.0.1:8123"


@pytest.fixture(scope="module")
def tiny_server(tiny_chat_engine: Any) -> Iterator[LiveServer]:
    srv = LiveServer(create_app(tiny_chat_engine, model_name="tiny", mode="parallel", max_batch_size=2,
                                max_seq_len=256, max_queue=2))
    yield srv
    srv.close()


def test_short_load_run(tiny_server: LiveServer, tmp_path: Path) -> None:
    args = load.build_parser().parse_args(["--url", tiny_server.url, "--concurrency", "2", "--seconds", "2",
                                           "--lengths", "4,8", "--prompts", "2", "--fault-clients", "2",
                                           "--slow-delay", "0.01", "--flood", "12"])
    res = asyncio.run(load.run_load(tiny_server.url, args))
    assert res["model"] == "tiny" and res["reference_requests"] == 4
    (p,) = res["phases"]
    assert p["concurrency"] == 2 and p["ok"] > 0 and p["requests"] == p["ok"]
    assert p["error_count"] == 0 and p["errors"] == {}
    assert p["exactness"]["checked"] == p["ok"] and p["exactness"]["mismatches"] == 0
    assert p["throughput_tok_s"] > 0 and p["completion_tokens"] > 0
    for key in ("ttft_s", "itl_s", "request_latency_s"):
        assert set(p[key]) == {"n", "p50", "p99", "mean"}
    assert p["ttft_s"]["n"] == p["streamed_ok"] > 0 and p["request_latency_s"]["p50"] <= p["request_latency_s"]["p99"]
    faults = {f["phase"]: f for f in res["faults"]}
    assert set(faults) == {"disconnect_mid_stream", "slow_readers", "flood"}
    dm = faults["disconnect_mid_stream"]  # a stream shorter than 3 chunks ends before the client closes
    assert dm["disconnected"] + dm["disconnect_other_status"].get("200", 0) == 2 and faults["disconnect_mid_stream"]["error_count"] == 0
    assert faults["slow_readers"]["error_count"] == 0
    fl = faults["flood"]
    assert fl["status_429"] > 0 and fl["status_429_with_retry_after"] == fl["status_429"]
    assert set(fl["errors"]) == {"429"} and fl["ok"] + fl["status_429"] == 12
    assert res["totals"] == {"errors": 0, "mismatches": 0}
    after = res["after"]
    assert after["nothing_left_in_flight"] and after["health_status"] == 200 and after["solo_after_faults_exact"]
    assert after["gauges"] == {"requests_in_flight": 0, "queue_depth": 0, "active_requests": 0}
    # the JSON and plot writer
    report = {"result": res, "environment": {"cpu_count": 2, "server_threads": 1}, "args": {"seconds": 2.0}}
    load.plot(report, tmp_path / "x.png")
    assert (tmp_path / "x.png").stat().st_size > 0
