"""GEMM kernels for few rows on this CPU: the default model's 30 layers of weights, timed per kernel.

    python3 scripts/gemmcosts.py [--threads N] [--rounds R] [--rows 1,2,4,8,16] [--out bench/results/NAME.json]

Times one pass over the GEMMs of all 30 layers of the default model's shape (q/k/v fused
``[960, 576]``, o ``[576, 576]``, gate/up fused ``[3072, 576]``, down ``[576, 1536]``; random
float32 weights, ~425 MB, so they stream from memory as in decoding) for ``M`` rows of input with:

* ``plain``: ``F.linear`` (eager PyTorch: MKL, which re-packs the weight on every call from ~4 rows);
* ``onednn``: oneDNN's prepacked weight (``torch.ops.mkldnn``, what ``prepare_inference`` uses);
* ``mkl``: MKL's prepacked weight (``torch.ops.mkl._mkl_linear``). A pack serves one row count
  only (other counts fall back to the plain kernel), so each ``M`` gets its own, and the script
  reports a pack's size against the weight's.

Kernels and row counts are interleaved round by round (this machine is noisy); the median after one
warm-up round is reported in ms. The LM head is left out: it stays in cache on large-L3 CPUs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from orthrus.models.quant import cpu_name

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30  # [N, C] per GEMM, 30 layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    torch.set_num_threads(args.threads)
    weights = [torch.randn(n, c) for n, c in SHAPES]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    has_mkl = hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    mkl = {m: [torch.ops.mkl._mkl_reorder_linear_weight(w, m) for w in weights] for m in rows} if has_mkl else {}
    pack_ratio = (mkl[rows[0]][2].numel() * 4 / (weights[2].numel() * 4)) if has_mkl else None
    inputs = {m: {c: torch.randn(m, c) for c in (576, 1536)} for m in rows}
    kernels = {
        "plain": lambda m: [F.linear(inputs[m][w.shape[1]], w) for w in weights],
        "onednn": lambda m: [torch.ops.mkldnn._linear_pointwise(inputs[m][w.shape[1]], p, None, "none", [], "")
                             for w, p in zip(weights, onednn)],
    }
    if has_mkl:
        kernels["mkl"] = lambda m: [torch.ops.mkl._mkl_linear(inputs[m][w.shape[1]], p, w, None, m)
                                    for w, p in zip(weights, mkl[m])]
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for r in range(args.rounds + 1):
            for m in rows:
                for name in (kernels if r % 2 else list(kernels)[::-1]):
                    t = time.perf_counter()
                    kernels[name](m)
                    if r:  # round 0 warms up
                        times.setdefault((name, m), []).append(time.perf_counter() - t)
    med = {key: 1000 * sorted(v)[len(v) // 2] for key, v in times.items()}
    print(f"{'rows':>5s}" + "".join(f" {k + ' ms':>10s}" for k in kernels))
    for m in rows:
        print(f"{m:5d}" + "".join(f" {med[(k, m)]:10.1f}" for k in kernels))
    if pack_ratio is not None:
        print(f"an MKL pack is {pack_ratio:.2f}x its weight's bytes, one pack per row count")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "machine": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
            "weights_mb": round(sum(w.numel() for w in weights) * 4 / 1e6, 1), "mkl_pack_x_weight": pack_ratio,
            "ms": [{"rows": m, **{k: round(med[(k, m)], 2) for k in kernels}} for m in rows]}, indent=1))


if __name__ == "__main__":
    main()
