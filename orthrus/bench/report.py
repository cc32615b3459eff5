"""The benchmark's fixed outputs: one summary per mode, a table for stdout, JSON and a PNG plot.

Definitions are METHOD.md's ("Metrics"):

* ``tokens``: generated tokens, all prompts (the first one, from the prefill, included);
  ``tokens_per_second`` = tokens / wall seconds of the measured rounds (prefill time included).
* ``tpf`` and ``acceptance_length`` for our modes come from the decoder's counters (prefill
  reported apart). ``hf`` makes one token per forward per row: 1 by definition. ``hf-pld``:
  generated tokens / forward calls of the model, counted with a hook; its first call reads the
  prompt *and* verifies the first lookup draft, so it is counted (drafting itself costs no
  forward), which makes its TPF slightly conservative next to ours.
* ``speedup_vs_ar`` / ``speedup_vs_hf``: tokens per second over that of ``ar`` / ``hf``.
* ``exact_match_vs_ar``: the fraction of prompts whose token ids equal ``ar``'s;
  ``first_divergence`` gives, per prompt, the first differing index (null: identical).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from orthrus.bench.runner import OURS, ModeResult, exact_match
from orthrus.errors import OrthrusError

log = logging.getLogger(__name__)

SCHEMA = "orthrus.bench/1"

TPF_SOURCES = {
    "ar": "decoder counters",
    "parallel": "decoder counters",
    "chain": "decoder counters",
    "ngram": "decoder counters (no draft passes)",
    "onepass": "decoder counters (one forward per cycle: no draft passes)",
    "hybrid": "decoder counters (n-gram cycles have no draft pass)",
    "self": "decoder counters (K-1 one-token draft passes of the fp16 copy per cycle)",
    "hybrid-self": "decoder counters (self cycles: K-1 fp16 draft passes; n-gram cycles: none)",
    "hf": "definition: one token per forward per row",
    "hf-pld": "generated tokens / model forward calls (the first, prompt+verify, call included)",
}


def _ratio(a: float, b: float | None) -> float | None:
    return round(a / b, 4) if b else None


def summarize(results: dict[str, ModeResult]) -> dict[str, dict[str, Any]]:
    """Per mode, the fixed set of measured numbers (see the module docstring)."""
    rate = {m: (r.tokens / r.seconds if r.seconds > 0 else 0.0) for m, r in results.items()}
    ref = results.get("ar")
    out: dict[str, dict[str, Any]] = {}
    for mode, r in results.items():
        st = r.stats
        if mode in OURS:
            tpf, accept = st.tpf, st.acceptance_length
        elif mode == "hf":
            tpf = accept = 1.0
        else:
            tpf = accept = r.tokens / r.forward_calls if r.forward_calls else 0.0
        match, div = exact_match(ref.token_ids, r.token_ids) if ref is not None else (None, None)
        cycles = sum(st.accept_hist)
        # cycles that verified drafts (the per-slot acceptance's denominator)
        drafted = (st.verify_passes if mode in ("ngram", "onepass", "hybrid", "self", "hybrid-self") and r.block_size > 1
                   else st.draft_passes)
        finish: dict[str, int] = {}
        for f in r.finish_reasons:
            finish[f] = finish.get(f, 0) + 1
        out[mode] = {
            "mode": mode, "batch_size": r.batch_size, "block_size": r.block_size,
            "prompts": len(r.token_ids), "tokens": r.tokens, "seconds": round(r.seconds, 4),
            "tokens_per_second": round(rate[mode], 3),
            "tpf": round(tpf, 4), "acceptance_length": round(accept, 4), "tpf_source": TPF_SOURCES[mode],
            "forward_passes": st.forward_passes if mode in OURS else r.forward_calls,
            "prefill_passes": st.prefill_passes, "draft_passes": st.draft_passes,
            "verify_passes": st.verify_passes,
            "speedup_vs_ar": _ratio(rate[mode], rate.get("ar")),
            "speedup_vs_hf": _ratio(rate[mode], rate.get("hf")),
            "exact_match_vs_ar": None if match is None else round(match, 4),
            "first_divergence": div,
            "accept_hist": list(st.accept_hist),
            "accept_hist_fraction": [round(n / cycles, 4) for n in st.accept_hist] if cycles else [],
            # per drafted cycle: n-gram cycles draft without a draft pass
            "slot_accept_rates": ([round(n / drafted, 4) for n in st.slot_accepts] if drafted else []),
            "finish_reasons": finish,
            "memory": r.memory,
        }
    return out


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """One fixed-width table: a row per mode, always the same columns."""
    head = (f"{'mode':<12}{'batch':>6}{'K':>4}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'TPF':>6}"
            f"{'accept':>7}{'vs AR':>7}{'vs HF':>7}{'exact':>7}{'peak MiB':>9}")
    lines = [head, "-" * len(head)]
    for s in summary.values():
        mem = s["memory"].get("peak_bytes")
        lines.append(
            f"{s['mode']:<12}{s['batch_size']:>6}{s['block_size']:>4}{s['tokens']:>8}{s['seconds']:>9.1f}"
            f"{s['tokens_per_second']:>8.2f}{s['tpf']:>6.2f}{s['acceptance_length']:>7.2f}"
            f"{_fmt(s['speedup_vs_ar'], '.2f', 'x'):>7}{_fmt(s['speedup_vs_hf'], '.2f', 'x'):>7}"
            f"{_fmt(None if s['exact_match_vs_ar'] is None else 100 * s['exact_match_vs_ar'], '.0f', '%'):>7}"
            f"{_fmt(None if mem is None else mem / 2**20, '.1f'):>9}")
    return "\n".join(lines)


def markdown_table(reports: dict[str, dict[str, Any]]) -> str:
    """A markdown table of saved reports (``{name: report JSON}``): a row per run and mode with
    tok/s, the ratios to our AR and to transformers, TPF, acceptance length, exactness and peak
    memory. A run stopped by ``--max-minutes`` is labelled with the prompts it covers."""
    lines = ["| run | mode | tok/s | vs our AR | vs HF | TPF | acceptance length | exact vs AR | peak memory |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, rep in reports.items():
        st = rep["settings"]
        done = (f"{st['prompts']} x {st['n_prompts']}" if st.get("complete", True)
                else f"{st['prompts']} x {st['n_prompts']} of {st['n_prompts_planned']}, INCOMPLETE")
        k = "" if st.get("block_size") is None else f", K = {st['block_size']}"
        label = f"`{name}` ({done}, {st['max_new_tokens']} tokens, {st['dtype']}{k})"
        for mode, r in rep["results"].items():
            mem = r.get("memory", {}).get("peak_bytes")
            exact = r.get("exact_match_vs_ar")
            cells = [label, mode, f"{r['tokens_per_second']:.2f}", _fmt(r.get("speedup_vs_ar"), ".2f", "x"),
                     _fmt(r.get("speedup_vs_hf"), ".2f", "x"), f"{r['tpf']:.2f}", f"{r['acceptance_length']:.2f}",
                     _fmt(None if exact is None else 100 * exact, ".0f", "%"),
                     _fmt(None if not mem else mem / 2**20, ".0f", " MiB")]
            lines.append("| " + " | ".join(cells) + " |")
            label = ""
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: Path) -> None:
    """Write ``report`` to ``path`` atomically (a temp file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def check_plotting() -> None:
    """Raise a clear error now, before a long run, if the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise OrthrusError("the bench plot needs matplotlib: run `pip install matplotlib` "
                           "(or `pip install 'orthrus-lm[bench]'`)") from e


def plot(report: dict[str, Any], path: Path) -> None:
    """Acceptance-length histogram (left) and tokens per second per mode (right), as a PNG."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    summary = report["results"]
    color = {m: f"C{i}" for i, m in enumerate(summary)}  # one colour per mode in both panels
    fig, (ax_h, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    hists = {m: s for m, s in summary.items() if s["accept_hist_fraction"] and s["block_size"] > 1}
    if hists:
        width = 0.8 / len(hists)
        for j, (m, s) in enumerate(hists.items()):
            xs = [i + 1 + (j - (len(hists) - 1) / 2) * width for i in range(len(s["accept_hist_fraction"]))]
            ax_h.bar(xs, s["accept_hist_fraction"], width=width, color=color[m],
                     label=f"{m} K={s['block_size']} (mean {s['acceptance_length']:.2f})")
        ax_h.set_xticks(range(1, 1 + max(len(s["accept_hist_fraction"]) for s in hists.values())))
        ax_h.set_xlabel("tokens per cycle (a + 1)")
        ax_h.set_ylabel("fraction of cycles")
        ax_h.legend(fontsize=8)
    else:
        ax_h.text(0.5, 0.5, "no parallel mode in this run", ha="center", va="center", transform=ax_h.transAxes)
        ax_h.set_xticks([])
        ax_h.set_yticks([])
    ax_h.set_title("acceptance length")
    modes = list(summary)
    rates = [summary[m]["tokens_per_second"] for m in modes]
    bars = ax_t.bar(modes, rates, color=[color[m] for m in modes])
    for bar, m in zip(bars, modes):
        sp = summary[m]["speedup_vs_ar"]
        label = f"{bar.get_height():.2f}" + (f"\n{sp:.2f}x AR" if sp is not None else "")
        ax_t.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                      va="bottom", fontsize=8)
    ax_t.set_ylabel("tokens / s")
    ax_t.set_ylim(0, max(rates + [1e-9]) * 1.3)
    ax_t.set_title("throughput")
    st, env = report["settings"], report["environment"]
    n = env["cpu_threads"]
    where = env["device_name"] + (f" ({n} thread{'s' * (n != 1)})" if env["device"] == "cpu" else "")
    fig.suptitle(f"{report['model']['name']} ({st['dtype']}) on {where} | {st['prompts']} x"
                 f"{st['n_prompts']}" + ("" if st.get("complete", True) else f" (INCOMPLETE: of {st['n_prompts_planned']})")
                 + f", {st['max_new_tokens']} new tokens, batch {st['batch_size']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
