"""Pass costs of the default model on this machine: plain kernels vs the prepared fast path.

    python3 scripts/passcosts.py [--threads N] [--rounds R] [--context C]
                                 [--setups plain,prepared,vendor,sdpa,tiled,int8,compiled]
                                 [--out bench/results/NAME.json]

Times, in one process and interleaved round by round (this machine is noisy), the AR step (1 token
with the LM head), the verify pass over K tokens and the draft pass of the shipped adapter over K
tokens (LM head over K-1 slots), every GEMM of an AR step alone (``ar GEMMs only``: the floor
that streaming the weights sets; prepared setups), and the one-pass schedule's fused pass (verify K + 2 candidate
blocks of K, LM head over K + 2(K-1) rows), batch 1, at a ``--context``-token cache, for a model with plain
kernels (``plain``), one prepared by ``prepare_inference`` (``prepared``: prepacked weights) and one
the prepared one without our tiled GEMM (``vendor``: oneDNN / MKL / plain kernels as measured) and
with it for every pass it serves (``tiled``: ``orthrus.models.tiled``, with our attention kernel
for the passes of few rows; ``sdpa``: the same GEMMs with the library's attention), one
prepared with draft-only int8 weights (``int8``: ``prepare_draft``; its verify and AR passes are the
prepared ones, its draft pass reads the int8 copies; it also times a self-drafting step, one token
through the fp16 copy of ``prepare_self_draft``), and the prepared model under ``torch.compile``
(``compiled``: Inductor around the same prepacked GEMMs, called as opaque ops as compiled decoding
does, ``orthrus.models.opaque``; one static-shape graph per pass, AR, verify and draft at K = 8
only; the seconds each first call took to compile are reported, and a second run of the script
shows Inductor's on-disk cache at work). The first two rounds are warm-up; the median of
the rest is reported, in ms and as a multiple of each setup's own AR step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from orthrus.adapter import DiffusionAdapter
from orthrus.models.quant import device_name
from orthrus.engine import DEFAULT_ADAPTERS, DEFAULT_MODEL
from orthrus.models.llama import TILED_ROWS
from orthrus.models.loading import load_base


SETUPS = ("plain", "prepared", "vendor", "sdpa", "tiled", "int8", "compiled")
COMPILED = ("ar", "verify K=8", "draft K=8")  # each shape compiles for tens of seconds: the cycle's passes


def compiled_passes(fns: dict, compile_s: dict) -> dict:
    """``fns`` with each pass through its own ``torch.compile`` (Inductor, static shapes, the
    prepacked GEMMs opaque), compiled here by a first call whose seconds go to ``compile_s``."""
    from orthrus.decoding.compiled import configure

    configure()  # the decoder's settings and on-disk cache
    out = {}
    for name, fn in fns.items():
        if name in COMPILED:
            c = torch.compile(fn, dynamic=False)
            t = time.perf_counter()
            with torch.no_grad():  # as the decoder: dynamo does not trace in-place writes under inference mode
                c()
            compile_s[name] = round(time.perf_counter() - t, 2)
            print(f"compiled {name}: {compile_s[name]:.1f} s", flush=True)
            out[name] = c
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--setups", default="plain,prepared,int8",
                    help="comma-separated, from " + ", ".join(SETUPS) + " (default: plain,prepared,int8)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    setups = args.setups.split(",")
    if not setups or any(s not in SETUPS for s in setups):
        ap.error(f"--setups: a comma-separated list of {', '.join(SETUPS)}; got {args.setups!r}")
    torch.set_num_threads(args.threads)
    ctx = args.context
    passes: dict[str, dict] = {}
    compile_s: dict[str, float] = {}
    for setup in setups:
        base = load_base(DEFAULT_MODEL)
        m = base.model
        ad = DiffusionAdapter.load(DEFAULT_ADAPTERS[DEFAULT_MODEL], m, base.fingerprint).eval().requires_grad_(False)
        if setup != "plain":
            # vendor: the kernel choice without our tiled kernel; tiled: with it wherever it serves
            m.prepare_inference(tiled_rows={"vendor": 0, "tiled": TILED_ROWS, "sdpa": TILED_ROWS}.get(setup))
            if setup == "sdpa":
                m.own_attention = lambda rows: False
            if setup == "int8":
                m.prepare_draft()
                m.prepare_self_draft()
            ad.prepare_inference(int8=setup == "int8")
        cache = m.new_cache(1, ctx + 64)
        x = torch.randint(0, 1000, (1, ctx))
        with torch.inference_mode():
            m(x, torch.arange(ctx)[None], cache, kv_len=ctx)

        def verify(k: int, m=m, cache=cache, x=x) -> None:
            m.logits(m(x[:, :k], (ctx + torch.arange(k))[None], cache, kv_len=ctx + 64))

        def draft(k: int, m=m, ad=ad, cache=cache, x=x) -> None:
            m.draft_logits(ad.draft(m, x[:, 0], (ctx + torch.arange(k))[None], cache, ctx + 64)[:, :-1])

        def onepass(k: int, c: int, m=m, ad=ad, cache=cache, x=x) -> None:
            hv, hc = ad.verify_and_draft(m, x[:, :k], (ctx + torch.arange(k))[None], torch.arange(c), cache, ctx + 16)
            m.logits(torch.cat((hv, hc[:, :, : k - 1].flatten(1, 2)), 1))

        fns = {"ar": lambda v=verify: v(1)}
        if m.prepared:  # every GEMM of an AR step and nothing else: what streaming the weights costs
            lins = m._inference_linears()
            xs = {lin.weights[0].shape[1]: torch.randn(1, 1, lin.weights[0].shape[1]) for lin in lins}
            fns["ar GEMMs only"] = lambda lins=lins, xs=xs: [lin.fused(xs[lin.weights[0].shape[1]]) for lin in lins]
        for k in (4, 8, 16):
            fns[f"verify K={k}"] = lambda k=k, v=verify: v(k)
            fns[f"draft K={k}"] = lambda k=k, d=draft: d(k)
        for k in (4, 8):
            fns[f"one-pass K={k} C=2"] = lambda k=k, o=onepass: o(k, 2)
        if m.self_draft is not None:  # a self-drafting step: 1 token through the fp16 copy
            fns["self-draft step"] = lambda m=m, cache=cache, x=x: m.self_draft_step(
                x[:, :1], torch.tensor([[ctx]]), cache, ctx + 64)
        passes[setup] = compiled_passes(fns, compile_s) if setup == "compiled" else fns
    times: dict[tuple[str, str], list[float]] = {}
    with torch.no_grad():
        names = list(dict.fromkeys(n for s in setups for n in passes[s]))
        for r in range(args.rounds):
            for name in names:
                for setup in [s for s in (setups if r % 2 else setups[::-1]) if name in passes[s]]:
                    t = time.perf_counter()
                    passes[setup][name]()
                    times.setdefault((setup, name), []).append(time.perf_counter() - t)
    med = {key: 1000 * sorted(v[2:])[len(v[2:]) // 2] for key, v in times.items()}
    rows = []
    print(f"{'pass':18s}" + "".join(f" {s + ' ms':>12s} {'x AR':>6s}" for s in setups))
    for name in names:
        row: dict = {"pass": name}
        for s in setups:
            if (s, name) in med:
                row[f"{s}_ms"] = med[(s, name)]
                row[f"{s}_x_ar"] = med[(s, name)] / med[(s, "ar")]
        rows.append(row)
        print(f"{name:18s}" + "".join(f" {row[s + '_ms']:12.1f} {row[s + '_x_ar']:6.2f}" if s + "_ms" in row
                                      else f" {'-':>12s} {'-':>6s}" for s in setups))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": device_name(torch.device("cpu")),
                                        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                        "threads": args.threads, "context": ctx, "rounds": args.rounds,
                                        "torch": torch.__version__, "passes": rows,
                                        "compile_seconds": compile_s}, indent=1))


if __name__ == "__main__":
    main()
