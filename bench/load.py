#!/usr/bin/env python3
"""Bounded load and fault generator for ``orthrus serve`` (issue 14: "Load and faults, measured").

Talks to 127.0.0.1 only (any other host is refused) and stops by itself:

1. solo reference: one greedy request per (prompt, max_tokens) pair, alone, before any phase;
2. load phases: N concurrent clients (default 1, 4, 16, 32), each for ``--seconds``, sending a mix
   of streamed and non-streamed chat completions (temperature 0, max_tokens from ``--lengths``);
   per phase: completion tokens/s, time to first token and inter-token latency p50/p99 (streamed),
   request latency p50/p99, errors by status, and exactness (each output == its solo reference);
3. fault phases: clients that disconnect after a few chunks, slow readers (sleep between chunks),
   and a flood of simultaneous requests past ``--max-queue`` (429s counted, each checked for
   ``Retry-After``);
4. afterwards: ``/health`` and ``/metrics``, checking that nothing is left in flight, queued or
   holding a slot (and, with ``--spawn``, the server's resident memory before and after).

Writes ``--out NAME`` as ``NAME.json`` and ``NAME.png`` (throughput and latency against concurrency).

    python3 bench/load.py --spawn --seconds 15 --concurrency 1,4,16,32 \\
        --out bench/results/cpu_load_smollm2 -- --max-queue 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

PROMPTS = [
    "Name three fruits and one fact about each.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "List the planets of the solar system in order.",
    "Give me a short haiku about autumn.",
    "What is the capital of France, and what is it known for?",
]
LENGTHS = (16, 48, 96)
ALLOWED_HOST = "127.0.0.1"


# ---- statistics ---------------------------------------------------------------------------------

def percentile(xs: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) of xs, linearly interpolated between order statistics; None if empty."""
    if not xs:
        return None
    s = sorted(xs)
    if len(s) == 1:
        return float(s[0])
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def summarize(samples: list[float]) -> dict[str, Any]:
    """{"n", "p50", "p99", "mean"} of a list of seconds (rounded to 0.1 ms)."""
    r = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return {"n": len(samples), "p50": r(percentile(samples, 50)), "p99": r(percentile(samples, 99)),
            "mean": r(sum(samples) / len(samples)) if samples else None}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name (with labels) : value}, without a parser dependency."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def check_local(url: str) -> str:
    """The base URL, refused unless it is http://127.0.0.1:PORT."""
    u = urlparse(url)
    if u.scheme != "http" or u.hostname != ALLOWED_HOST or not u.port:
        raise SystemExit(f"refusing {url!r}: the load generator only talks to http://{ALLOWED_HOST}:PORT")
    return f"http://{ALLOWED_HOST}:{u.port}"


# ---- one request --------------------------------------------------------------------------------

class Result:
    __slots__ = ("prompt", "max_tokens", "stream", "status", "text", "tokens", "latency", "ttft", "itl",
                 "retry_after", "error", "chunks", "start")

    def __init__(self, prompt: int, max_tokens: int, stream: bool) -> None:
        self.prompt, self.max_tokens, self.stream = prompt, max_tokens, stream
        self.status: int | str | None = None
        self.text = ""
        self.tokens = 0
        self.latency = self.ttft = None
        self.itl: list[float] = []
        self.retry_after: str | None = None
        self.error: str | None = None
        self.chunks = 0
        self.start = 0.0


def _body(model: str, prompt: int, max_tokens: int, stream: bool) -> dict:
    b = {"model": model, "messages": [{"role": "user", "content": PROMPTS[prompt]}],
         "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


async def request(client: httpx.AsyncClient, base: str, model: str, prompt: int, max_tokens: int,
                  stream: bool, *, close_after: int | None = None, read_delay: float = 0.0,
                  timeout: float = 600.0) -> Result:
    """One chat completion. ``close_after``: drop the connection after that many content chunks;
    ``read_delay``: sleep that long after each chunk (a slow reader)."""
    res = Result(prompt, max_tokens, stream)
    url = base + "/v1/chat/completions"
    t0 = res.start = time.perf_counter()
    try:
        if not stream:
            r = await client.post(url, json=_body(model, prompt, max_tokens, False), timeout=timeout)
            res.status = r.status_code
            res.latency = time.perf_counter() - t0
            if r.status_code == 200:
                j = r.json()
                res.text = j["choices"][0]["message"]["content"] or ""
                res.tokens = j["usage"]["completion_tokens"]
            else:
                res.retry_after = r.headers.get("retry-after")
                res.error = r.text[:300]
            return res
        async with client.stream("POST", url, json=_body(model, prompt, max_tokens, True),
                                 timeout=timeout) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.retry_after = r.headers.get("retry-after")
                res.error = (await r.aread()).decode(errors="replace")[:300]
                res.latency = time.perf_counter() - t0
                return res
            first = last = None
            parts: list[str] = []
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.status, res.error = "stream_error", str(obj["error"])[:300]
                    break
                if obj.get("usage"):
                    res.tokens = obj["usage"]["completion_tokens"]
                for ch in obj.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        now = time.perf_counter()
                        if first is None:
                            first = now
                            res.ttft = now - t0
                        last = now
                        parts.append(piece)
                        res.chunks += 1
                if close_after is not None and res.chunks >= close_after:
                    res.status = "closed_by_client"
                    break
                if read_delay:
                    await asyncio.sleep(read_delay)
            res.text = "".join(parts)
            res.latency = time.perf_counter() - t0
            # inter-token latency: the span between the first and last content delivery over the
            # tokens after the first (a chunk may bring several tokens in parallel mode)
            if first is not None and last is not None and res.tokens > 1 and res.status == 200:
                res.itl = [(last - first) / (res.tokens - 1)]
    except (httpx.HTTPError, OSError) as e:
        res.status = f"transport:{type(e).__name__}"
        res.error = str(e)[:300]
        res.latency = time.perf_counter() - t0
    return res


# ---- phases -------------------------------------------------------------------------------------

def phase_report(name: str, results: list[Result], wall: float, refs: dict | None,
                 concurrency: int | None = None) -> dict[str, Any]:
    ok = [r for r in results if r.status == 200]
    errors = Counter(str(r.status) for r in results if r.status != 200)
    mismatches = []
    checked = 0
    if refs is not None:
        for r in ok:
            ref = refs.get((r.prompt, r.max_tokens))
            if ref is None:
                continue
            checked += 1
            if r.text != ref:
                mismatches.append({"prompt": r.prompt, "max_tokens": r.max_tokens, "stream": r.stream,
                                   "got": r.text[:200], "want": ref[:200]})
    tokens = sum(r.tokens for r in ok)
    streamed = [r for r in ok if r.stream]
    return {
        "phase": name, "concurrency": concurrency, "wall_s": round(wall, 3),
        "requests": len(results), "ok": len(ok), "streamed_ok": len(streamed),
        "completion_tokens": tokens, "throughput_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_s": summarize([r.ttft for r in streamed if r.ttft is not None]),
        "itl_s": summarize([x for r in streamed for x in r.itl]),
        "request_latency_s": summarize([r.latency for r in ok]),
        "errors": dict(errors), "error_count": sum(errors.values()),
        "exactness": {"checked": checked, "mismatches": len(mismatches), "examples": mismatches[:3]},
    }


async def solo_refs(client: httpx.AsyncClient, base: str, model: str, prompts: list[int],
                    lengths: list[int]) -> dict:
    refs = {}
    for p in prompts:
        for n in lengths:
            r = await request(client, base, model, p, n, False)
            if r.status != 200:
                raise SystemExit(f"solo reference request failed: {r.status} {r.error}")
            refs[(p, n)] = r.text
    return refs


async def load_phase(client: httpx.AsyncClient, base: str, model: str, concurrency: int, seconds: float,
                     prompts: list[int], lengths: list[int], refs: dict, seed: int) -> dict:
    """``concurrency`` clients, each sending requests back to back until ``seconds`` have passed
    (a request started before the deadline is waited for, and counted)."""
    results: list[Result] = []
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def client_loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.perf_counter() < deadline:
            results.append(await request(client, base, model, rng.choice(prompts), rng.choice(lengths),
                                         stream=rng.random() < 0.5))

    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    return phase_report(f"load_c{concurrency}", results, time.perf_counter() - t0, refs, concurrency)


async def fault_phases(client: httpx.AsyncClient, base: str, model: str, args: argparse.Namespace,
                       prompts: list[int], lengths: list[int], refs: dict) -> list[dict]:
    out = []
    n = args.fault_clients
    # clients that drop the connection after a few chunks, while others decode normally alongside
    t0 = time.perf_counter()
    rs = await asyncio.gather(
        *(request(client, base, model, prompts[i % len(prompts)], max(lengths), True, close_after=3)
          for i in range(n)),
        *(request(client, base, model, prompts[i % len(prompts)], lengths[i % len(lengths)], i % 2 == 0)
          for i in range(n)))
    dropped, normal = rs[:n], rs[n:]
    rep = phase_report("disconnect_mid_stream", normal, time.perf_counter() - t0, refs, n)
    rep["disconnected"] = sum(r.status == "closed_by_client" for r in dropped)
    rep["disconnect_other_status"] = dict(Counter(str(r.status) for r in dropped if r.status != "closed_by_client"))
    out.append(rep)
    # slow readers: sleep between chunks; their output must still be exact, and others unaffected
    t0 = time.perf_counter()
    rs = await asyncio.gather(
        *(request(client, base, model, prompts[i % len(prompts)], lengths[1 % len(lengths)], True,
                  read_delay=args.slow_delay) for i in range(n)),
        *(request(client, base, model, prompts[i % len(prompts)], lengths[i % len(lengths)], i % 2 == 1)
          for i in range(n)))
    rep = phase_report("slow_readers", rs, time.perf_counter() - t0, refs, 2 * n)
    rep["read_delay_s"] = args.slow_delay
    out.append(rep)
    # a flood past the bounded queue: all at once
    t0 = time.perf_counter()
    rs = await asyncio.gather(*(request(client, base, model, prompts[i % len(prompts)], min(lengths), i % 2 == 0)
                                for i in range(args.flood)))
    rep = phase_report("flood", rs, time.perf_counter() - t0, refs, args.flood)
    busy = [r for r in rs if r.status == 429]
    rep["status_429"] = len(busy)
    rep["status_429_with_retry_after"] = sum(r.retry_after is not None and r.retry_after.isdigit() for r in busy)
    rep["retry_after_values"] = sorted({r.retry_after for r in busy if r.retry_after})
    out.append(rep)
    return out


async def settle(client: httpx.AsyncClient, base: str, wait_s: float = 30.0) -> dict:
    """/health and /metrics after the load, polled until nothing is in flight (or ``wait_s``)."""
    deadline = time.perf_counter() + wait_s
    while True:
        h = await client.get(base + "/health", timeout=30)
        m = parse_metrics((await client.get(base + "/metrics", timeout=30)).text)
        gauges = {k: m.get(f"orthrus_{k}") for k in ("requests_in_flight", "queue_depth", "active_requests")}
        clean = all(v == 0 for v in gauges.values())
        if clean or time.perf_counter() > deadline:
            break
        await asyncio.sleep(0.5)
    keep = ("orthrus_requests_total", "orthrus_generated_tokens_total", "orthrus_requests_rejected_total",
            "orthrus_requests_failed_total", "orthrus_tpf", "orthrus_acceptance_length", "orthrus_batch_slots",
            "orthrus_block_size")
    return {"health_status": h.status_code, "health": h.json(), "gauges": gauges, "nothing_left_in_flight": clean,
            "metrics": {k: v for k, v in m.items() if k.split("{")[0] in keep}}


def rss_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


async def run_load(base: str, args: argparse.Namespace, server_pid: int | None = None) -> dict:
    """Everything after the server is up: references, load phases, fault phases, the final check."""
    base = check_local(base)
    prompts = list(range(min(args.prompts, len(PROMPTS))))
    lengths = [int(x) for x in str(args.lengths).split(",")]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits) as client:
        model = (await client.get(base + "/v1/models", timeout=30)).json()["data"][0]["id"]
        t = time.perf_counter()
        refs = await solo_refs(client, base, model, prompts, lengths)
        ref_s = time.perf_counter() - t
        rss0 = rss_kib(server_pid)
        phases = []
        for i, c in enumerate(int(x) for x in str(args.concurrency).split(",")):
            phases.append(await load_phase(client, base, model, c, args.seconds, prompts, lengths, refs, args.seed + i))
            p = phases[-1]
            print(f"[load] c={c:3d} {p['throughput_tok_s']} tok/s, ttft p50/p99 {p['ttft_s']['p50']}/"
                  f"{p['ttft_s']['p99']} s, latency p50/p99 {p['request_latency_s']['p50']}/"
                  f"{p['request_latency_s']['p99']} s, errors {p['errors']}, "
                  f"mismatches {p['exactness']['mismatches']}/{p['exactness']['checked']}", flush=True)
        faults = [] if args.no_faults else await fault_phases(client, base, model, args, prompts, lengths, refs)
        for f in faults:
            print(f"[fault] {f['phase']}: ok {f['ok']}/{f['requests']}, errors {f['errors']}, mismatches "
                  f"{f['exactness']['mismatches']}" + (f", 429 {f['status_429']} (Retry-After on "
                                                       f"{f['status_429_with_retry_after']})" if 'status_429' in f else ""),
                  flush=True)
        after = await settle(client, base)
        # one more solo request: the server still answers exactly after the faults
        r = await request(client, base, model, prompts[0], lengths[-1], True)
        after["solo_after_faults_exact"] = r.status == 200 and r.text == refs[(prompts[0], lengths[-1])]
        after["server_rss_kib_before_load"] = rss0
        after["server_rss_kib_after"] = rss_kib(server_pid)
    print(f"[after] gauges {after['gauges']}, health {after['health_status']}, "
          f"solo exact after faults {after['solo_after_faults_exact']}", flush=True)
    return {"model": model, "prompts": [PROMPTS[p] for p in prompts], "lengths": lengths,
            "reference_requests": len(refs), "reference_s": round(ref_s, 2),
            "phases": phases, "faults": faults, "after": after,
            "totals": {"errors": sum(p["error_count"] for p in phases),
                       "mismatches": sum(p["exactness"]["mismatches"] for p in phases + faults)}}


# ---- output -------------------------------------------------------------------------------------

def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ph = report["result"]["phases"]
    c = [p["concurrency"] for p in ph]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(c, [p["throughput_tok_s"] for p in ph], "o-")
    a.set(xscale="log", xlabel="concurrent clients", ylabel="completion tokens / s", title="throughput")
    a.set_xticks(c, [str(x) for x in c])
    for key, label, color in (("request_latency_s", "request latency", "C0"), ("ttft_s", "time to first token", "C1"),
                              ("itl_s", "inter-token latency", "C2")):
        b.plot(c, [p[key]["p50"] for p in ph], "o-", color=color, label=f"{label} p50")
        b.plot(c, [p[key]["p99"] for p in ph], "s--", color=color, label=f"{label} p99")
    b.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="seconds", title="latency")
    b.set_xticks(c, [str(x) for x in c])
    b.legend(fontsize=7)
    env = report["environment"]
    fig.suptitle(f"orthrus serve under load: {report['result']['model']}, {env.get('cpu_count')} CPUs, "
                 f"server threads {env.get('server_threads')}, {report['args']['seconds']:g} s per phase", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((ALLOWED_HOST, 0))
        return s.getsockname()[1]


def spawn(server_args: list[str], threads: int, port: int, log: Path, startup_s: float) -> subprocess.Popen:
    for flag in ("--host", "--port"):
        if flag in server_args:
            raise SystemExit(f"{flag} is set by --spawn (127.0.0.1 and a free port)")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    argv = ["orthrus", "serve", "--host", ALLOWED_HOST, "--port", str(port), *server_args]
    print("[spawn]", " ".join(argv), f"(OMP_NUM_THREADS={threads}, log {log})", flush=True)
    proc = subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://{ALLOWED_HOST}:{port}/health"
    deadline = time.monotonic() + startup_s
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"orthrus serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"orthrus serve did not answer /health in {startup_s} s")
        time.sleep(0.5)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Arguments after -- go to `orthrus serve` "
                                "(with --spawn).", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server, http://127.0.0.1:PORT only (else use --spawn)")
    p.add_argument("--spawn", action="store_true", help="start `orthrus serve` on 127.0.0.1 (a free port) with "
                   "the arguments after --, and stop it (SIGTERM) at the end")
    p.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS of the spawned server (default 1)")
    p.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for /health (default 600)")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma list of concurrent clients per phase")
    p.add_argument("--seconds", type=float, default=20, help="duration of each load phase (default 20)")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="max_tokens values drawn per request")
    p.add_argument("--prompts", type=int, default=4, help=f"how many built-in prompts to use (1..{len(PROMPTS)})")
    p.add_argument("--seed", type=int, default=0, help="seed of the clients' choices")
    p.add_argument("--fault-clients", type=int, default=4, help="clients per fault phase (default 4)")
    p.add_argument("--slow-delay", type=float, default=0.2, help="slow readers' sleep per chunk, s (default 0.2)")
    p.add_argument("--flood", type=int, default=96, help="simultaneous requests of the flood (default 96; "
                   "must exceed --max-batch-size + --max-queue to see 429s)")
    p.add_argument("--no-faults", action="store_true", help="skip the fault phases")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. what else ran on the machine)")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python3", "bench/load.py", *argv])
    server_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, server_args = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    if args.spawn == bool(args.url):
        raise SystemExit("give exactly one of --spawn or --url")
    proc = None
    log = Path(tempfile.mkstemp(prefix="orthrus-serve-", suffix=".log")[1])
    started = time.time()
    loadavg_start = os.getloadavg()
    try:
        if args.spawn:
            port = free_port()
            base = f"http://{ALLOWED_HOST}:{port}"
            t = time.perf_counter()
            proc = spawn(server_args, args.server_threads, port, log, args.startup_timeout)
            startup = time.perf_counter() - t
        else:
            base, startup = check_local(args.url), None
        result = asyncio.run(run_load(base, args, proc.pid if proc else None))
    finally:
        drain = None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                drain = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                drain = "killed"
    import torch

    report = {
        "command": command,
        "args": vars(args), "server_args": server_args,
        "environment": {"cpu_count": os.cpu_count(), "server_threads": args.server_threads if args.spawn else None,
                        "torch": torch.__version__, "python": platform.python_version(),
                        "platform": platform.platform(), "note": args.note,
                        "loadavg_1_5_15_start": [round(x, 2) for x in loadavg_start],
                        "loadavg_1_5_15_end": [round(x, 2) for x in os.getloadavg()],
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))},
        "server_startup_s": None if startup is None else round(startup, 1),
        "server_exit": drain, "result": result,
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        plot(report, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    ok = result["totals"]["errors"] == 0 and result["totals"]["mismatches"] == 0 and result["after"]["nothing_left_in_flight"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
