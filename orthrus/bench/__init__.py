"""Benchmarks: our AR and parallel decoding against transformers, on the same prompts and device.

>>> from orthrus.bench import BenchSettings, run_bench
>>> report = run_bench(engine, prompts, BenchSettings(modes=("ar", "parallel", "hf")), out="bench/results/x")

* :mod:`orthrus.bench.runner`: the modes and the measurement (interleaved rounds, warm-up apart).
* :mod:`orthrus.bench.report`: the per-mode summary, the table, JSON and the plot.
* :mod:`orthrus.bench.blocksize`: :func:`choose_block_size`, the block size chosen by measurement.

The ``orthrus bench`` command (``orthrus/commands/bench.py``) is a thin layer over :func:`run_bench`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from orthrus.bench.blocksize import (CALIBRATION_PROMPTS, DEFAULT_CANDIDATES, BlockSizeChoice, PassTimes,
                                     acceptance_curve, choose_block_size, decide_block_size, expected_tokens,
                                     measure_pass_times)
from orthrus.bench.report import SCHEMA, check_plotting, format_table, plot, summarize, write_json
from orthrus.bench.journal import BenchJournal, ids_digest, tensors_digest
from orthrus.bench.runner import (ADAPTER_MODES, MODES, PLD_TOKENS, Bench, BenchSettings, ModeResult, load_average,
                                  exact_match, parse_modes, peak_rss_bytes, rss_bytes)
from orthrus.decoding.ngram import NGRAM_BLOCK_SIZE
from orthrus.decoding.tree import verifies_by_tree
from orthrus.models.quant import device_name

if TYPE_CHECKING:
    from orthrus.engine import Orthrus

__all__ = [
    "ADAPTER_MODES", "Bench", "BenchSettings", "BlockSizeChoice", "CALIBRATION_PROMPTS", "DEFAULT_CANDIDATES", "MODES",
    "ModeResult", "PassTimes", "acceptance_curve", "choose_block_size", "decide_block_size", "exact_match",
    "expected_tokens", "format_table", "measure_pass_times", "parse_modes", "run_bench", "summarize",
]

log = logging.getLogger(__name__)

AUTO_CALIBRATION_PROMPTS = 4  # --block-size auto calibrates acceptance on this many of the prompts


def _versions() -> dict[str, str]:
    import transformers

    from orthrus import __version__ as ours

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "orthrus": ours}


def _pass_costs(engine: "Orthrus", bench: Bench, settings: BenchSettings, ids: list[list[int]]) -> dict[str, Any]:
    """Median milliseconds of one cycle per schedule (chain, tree, one-pass) at the run's K, batch
    and mean context, and each as a multiple of the AR step (what a cycle must emit to break even),
    as the engine decodes. A compiling engine's figures are those of the compiled graphs (each
    compiled before it is timed), with the eager ones beside them under ``eager``."""
    if not engine.compile:
        return _pass_cost_table(engine, bench, settings, ids, False)
    return (_pass_cost_table(engine, bench, settings, ids, True)
            | {"compile": engine.compile, "eager": _pass_cost_table(engine, bench, settings, ids, False)})


def _pass_cost_table(engine: "Orthrus", bench: Bench, settings: BenchSettings, ids: list[list[int]],
                     compiled: bool) -> dict[str, Any]:
    context = sum(len(x) for x in ids) // len(ids) + settings.max_new_tokens // 2
    k = bench.block if engine.adapter is not None and bench.block > 1 else 0
    from orthrus.decoding import generator

    cand = settings.candidates or generator.DEFAULT_CANDIDATES
    times = measure_pass_times(engine, [k] if k else [], batch_size=settings.batch_size, context=context,
                               repeats=9, warmup=2, onepass_candidates=cand if k else 0, trees=bool(k),
                               compiled=compiled)
    ms = lambda v: round(1e3 * v, 3)  # noqa: E731
    out: dict[str, Any] = {"context": context, "batch_size": settings.batch_size, "block_size": k or None,
                           "candidates": cand if k else None, "ar_ms": ms(times.ar)}
    for name, table in (("two_pass", times.cycle), ("tree", times.tree), ("one_pass", times.onepass)):
        for kk, v in table.items():
            out[f"{name}_k{kk}_ms"] = ms(v)
            out[f"{name}_k{kk}_x_ar"] = round(v / times.ar, 3)
    return out


def _journal_header(engine: "Orthrus", bench: Bench, ids: list[list[int]]) -> dict[str, Any]:
    """What must match for journaled rounds to be reused (see :class:`BenchJournal`)."""
    model = engine.model
    return {
        "machine": {"device_name": device_name(model.device), "cpu_count": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "model": engine.base.fingerprint, "adapter": tensors_digest(engine.adapter),
        "settings": dataclasses.asdict(bench.settings) | {
            "modes": list(bench.settings.modes), "block": bench.block, "ngram_block": bench.ngram_block,
            "self_block": bench.self_block, "dtype": str(model.dtype), "cuda_graphs": engine.uses_cuda_graphs,
            "compile": engine.compile, "draft_int8": engine.draft_int8},
        "prompts": {"n": len(ids), "ids_sha256": ids_digest(ids)},
    }


def run_bench(engine: "Orthrus", prompts: list[str], settings: BenchSettings, out: str | Path | None = None,
              block_size_auto: bool = False, prompt_source: str = "", limit: int | None = None,
              command: str = "", adapter_source: str | None = None, pass_costs: bool = False,
              journal: str | Path | None = None, max_minutes: float | None = None) -> dict[str, Any]:
    """Benchmark ``settings.modes`` on ``prompts``; print nothing, return (and write) the report.

    Args:
        engine: the loaded engine (its model also seeds the transformers baseline).
        prompts: user messages; each is chat-templated once and every mode gets the same ids.
        settings: modes, max new tokens, batch size, warm-up, block size.
        out: write ``<out>.json`` and ``<out>.png`` (a trailing ``.json`` is dropped); None: nothing.
        block_size_auto: choose the parallel block size with :func:`choose_block_size` (calibrated
            on the first few prompts, timed at the batch size and a typical context length).
        prompt_source, limit, command, adapter_source: recorded in the report as given.
        pass_costs: also time one decoding cycle of each schedule at the run's block size, batch
            and mean context (``measure_pass_times``, after the runs) into ``report["pass_costs"]``.
        journal: a JSONL path: rounds already journaled there (by the same machine, model,
            adapter, settings and prompts; checked) are not run again, and each new round is
            appended as it finishes (:mod:`orthrus.bench.journal`).
        max_minutes: no round starts once this many minutes have passed since the runs began
            (warm-up included; a ``block_size_auto`` calibration before them is not counted); the
            report then covers the prompts of the rounds done (``settings.complete`` False,
            ``settings.n_prompts`` of ``settings.n_prompts_planned``). With a journal, the same
            call later goes on from there.
    Returns:
        The report dict (schema :data:`orthrus.bench.report.SCHEMA`).
    """
    if out is not None:
        check_plotting()
    started = _dt.datetime.now(_dt.timezone.utc)
    load_start = load_average()
    ids = [engine.encode(p) for p in prompts]
    choice: BlockSizeChoice | None = None
    adapter_modes = [m for m in settings.modes if m in ADAPTER_MODES]
    if block_size_auto and adapter_modes:
        context = sum(len(x) for x in ids) // len(ids) + settings.max_new_tokens // 2
        # greedy runs: the parallel and hybrid modes verify as the decoder's default ("auto") does
        ranks = engine.adapter.config.draft_ranks if engine.adapter is not None else None
        tree = bool({"parallel", "hybrid"} & set(adapter_modes)) and verifies_by_tree(
            "auto", "two-pass", 0.0, ranks)
        choice = choose_block_size(engine, prompts[:AUTO_CALIBRATION_PROMPTS], batch_size=settings.batch_size,
                                   context=context, calibration_tokens=min(64, settings.max_new_tokens), tree=tree)
        # the measured K is the adapter's; n-gram drafts keep their own (no draft pass to pay for)
        settings = dataclasses.replace(settings, block_size=choice.block_size,
                                       ngram_block_size=settings.ngram_block_size or NGRAM_BLOCK_SIZE)
    bench = Bench(engine, settings)
    book = None if journal is None else BenchJournal(journal, _journal_header(engine, bench, ids))
    results = bench.run(ids, journal=book, max_seconds=None if max_minutes is None else 60 * max_minutes)
    planned = len(prompts)
    n = len(next(iter(results.values())).token_ids)
    prompts, ids = prompts[:n], ids[:n]
    summary = summarize(results)
    model = engine.model
    adapter = engine.adapter
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "date": started.isoformat(timespec="seconds"),
        "command": command,
        "environment": {
            "device": str(model.device), "device_name": device_name(model.device),
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), **_versions(),
            "load_average_start": load_start, "load_average_end": load_average(),
            "process_rss_bytes": rss_bytes(), "process_peak_rss_bytes": peak_rss_bytes(),
            "process_memory_note": "whole process: our model and the transformers model are both loaded",
        },
        "model": {"name": engine.base.name, "folder": str(engine.base.folder),
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "arch": model.config.arch, "fingerprint": engine.base.fingerprint},
        "adapter": None if adapter is None else {
            "source": adapter_source, "kind": adapter.config.kind,
            "trained_block_size": adapter.config.block_size,
            "parameters": sum(p.numel() for p in adapter.parameters())},
        "settings": {
            "prompts": prompt_source, "n_prompts": len(prompts), "limit": limit,
            "n_prompts_planned": planned, "complete": len(prompts) == planned, "max_minutes": max_minutes,
            "prompt_tokens_mean": round(sum(len(x) for x in ids) / len(ids), 1),
            "max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size,
            "warmup": settings.warmup, "modes": list(settings.modes),
            "block_size": bench.block if adapter_modes else None, "candidates": settings.candidates,
            "block_size_auto": block_size_auto, "dtype": str(model.dtype).removeprefix("torch."),
            "cuda_graphs": engine.uses_cuda_graphs, "compile": engine.compile,
            "draft_int8": engine.draft_int8, "gemm_kernels": model.gemm_kernels(), "greedy": True, "pld_tokens": PLD_TOKENS if "hf-pld" in settings.modes else None,
            "timing": "interleaved rounds of batch_size prompts, mode order rotated; warm-up excluded",
        },
        "journal": None if book is None else book.summary(),
        "block_size_choice": None if choice is None else choice.to_dict(),
        "pass_costs": _pass_costs(engine, bench, settings, ids) if pass_costs else None,
        "results": summary,
        "per_prompt": [
            {"index": i, "prompt_tokens": len(x), "preview": prompts[i][:80],
             "tokens": {m: len(r.token_ids[i]) for m, r in results.items()},
             "finish": {m: r.finish_reasons[i] for m, r in results.items()}}
            for i, x in enumerate(ids)],
    }
    if out is not None:
        base = Path(str(out).removesuffix(".json"))
        write_json(report, base.with_name(base.name + ".json"))
        plot(report, base.with_name(base.name + ".png"))
        log.info("wrote %s.json and %s.png", base, base)
    return report
