"""Compiled vs eager decoding (and our tiled GEMM vs the vendor kernels), end to end, in one process.

    python3 scripts/compiledcosts.py [--prompts humaneval] [--limit 20] [--max-new-tokens 128]
                                     [--modes ar,parallel,hybrid-self] [--engines eager,compiled]
                                     [--threads 2] [--out FILE.json]

Engines of the default model and adapter (this machine is noisy, so they run side by side):
``eager``; ``compiled`` (every decoding cycle compiled, ``compile=True``: no timing trial, so the
compiled graphs are what is timed); ``vendor`` (eager, without our tiled GEMM: oneDNN / MKL /
plain kernels as measured, ``orthrus.models.tiled``). Each mode first decodes one extra prompt on
every engine (compiling, or loading from Inductor's on-disk cache; the seconds are reported), then
every prompt, batch 1, greedy, the engines interleaved (their order rotating prompt by prompt).
Reports tokens per second per mode and engine, the ratio to the first engine, and how many
outputs are identical (each engine vs the first, and each mode vs AR on the same engine). Graphs
compiled inside the timed runs (a cycle shape the warm-up prompt did not reach, a decoder rebuilt
for a longer prompt) are counted and their seconds reported per mode and engine: they are in
the timed seconds, as a user would pay them once.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from orthrus.config import GenerationConfig
from orthrus.datasets import load_prompts
from orthrus.engine import Orthrus
from orthrus.models.quant import device_name


class CompileLog(logging.Handler):
    """Collects the compiled-cycle log records (``orthrus.decoding.compiled``) as they come."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("compiled a decoding cycle"):
            self.records.append(record)

    def seconds_since(self, n: int) -> tuple[int, float]:
        """(graphs compiled, their seconds) among the records after the first ``n``."""
        new = self.records[n:]
        return len(new), round(sum(float(r.args[-2]) for r in new), 2)


MODES = {"ar": dict(mode="ar"), "parallel": dict(mode="parallel", draft="diffusion"),
         "hybrid-self": dict(mode="parallel", draft="hybrid-self")}
ENGINES = ("eager", "compiled", "vendor")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--prompts", default="humaneval")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--modes", default="ar,parallel,hybrid-self")
    ap.add_argument("--engines", default="eager,compiled")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    modes, names = args.modes.split(","), args.engines.split(",")
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes: a comma-separated list of {', '.join(MODES)}; got {args.modes!r}")
    if len(names) < 2 or len(set(names)) < len(names) or any(n not in ENGINES for n in names):
        ap.error(f"--engines: two or more of {', '.join(ENGINES)}; got {args.engines!r}")
    torch.set_num_threads(args.threads)
    compiles = CompileLog()
    compiled_log = logging.getLogger("orthrus.decoding.compiled")
    compiled_log.addHandler(compiles)
    compiled_log.setLevel(logging.INFO)
    prompts = load_prompts(args.prompts, limit=args.limit + 1)
    warm, prompts = prompts[0], prompts[1:]
    engines = {n: Orthrus.from_pretrained(compile=n == "compiled") for n in names}
    if "vendor" in engines:
        engines["vendor"].model.prepare_inference(tiled_rows=0)
    kernels = {n: e.model.gemm_kernels() for n, e in engines.items()}
    print("kernels:", json.dumps(kernels), flush=True)
    gens = {m: GenerationConfig(max_new_tokens=args.max_new_tokens, **MODES[m]) for m in modes}
    first_s = {}
    for m in modes:
        for name, e in engines.items():
            t = time.perf_counter()
            e.generate([warm], gens[m], batch_size=1)
            first_s[f"{m}/{name}"] = round(time.perf_counter() - t, 2)
            print(f"first {m} {name}: {first_s[f'{m}/{name}']:.1f} s", flush=True)
    seconds = {(m, n): 0.0 for m in modes for n in engines}
    tokens = {(m, n): [] for m in modes for n in engines}
    timed_compiles = {(m, n): [0, 0.0] for m in modes for n in engines}
    for i, p in enumerate(prompts):
        for m in modes:
            for name in names[i % len(names):] + names[:i % len(names)]:
                seen = len(compiles.records)
                t = time.perf_counter()
                out = engines[name].generate([p], gens[m], batch_size=1)[0]
                seconds[(m, name)] += time.perf_counter() - t
                tokens[(m, name)].append(out.token_ids)
                n_graphs, s = compiles.seconds_since(seen)
                if n_graphs:
                    timed_compiles[(m, name)][0] += n_graphs
                    timed_compiles[(m, name)][1] += s
                    print(f"prompt {i} {m} {name}: {n_graphs} graph(s) compiled in the timed run ({s:.1f} s)",
                          flush=True)
    rows, ref = [], names[0]
    for m in modes:
        rate = {n: sum(map(len, tokens[(m, n)])) / seconds[(m, n)] for n in engines}
        row = {"mode": m, **{f"{n}_tok_s": round(rate[n], 2) for n in names},
               **{f"{n}_x_{ref}": round(rate[n] / rate[ref], 3) for n in names[1:]},
               **{f"identical_{n}_{ref}": sum(a == b for a, b in zip(tokens[(m, ref)], tokens[(m, n)]))
                  for n in names[1:]},
               "identical_to_ar": {n: sum(a == b for a, b in zip(tokens[(m, n)], tokens[("ar", n)]))
                                   for n in engines} if "ar" in modes else None,
               "compiled_in_timed_runs": {n: {"graphs": timed_compiles[(m, n)][0],
                                              "seconds": round(timed_compiles[(m, n)][1], 2)}
                                          for n in engines}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "machine": device_name(torch.device("cpu")), "threads": args.threads, "torch": torch.__version__,
            "prompts": args.prompts, "n": len(prompts), "max_new_tokens": args.max_new_tokens,
            "engines": names, "kernels": kernels, "first_call_seconds": first_s, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
