"""Choosing the block size K by measurement: the K that maximises expected tokens per second.

One parallel cycle with block size K costs a draft pass and a verify pass of K tokens and emits
``a + 1`` tokens, where ``E[a + 1] = 1 + sum_{i < K-1} P(a >= i + 1)``. One AR step costs one
1-token pass and emits one token. So, on this device, at this batch size and context length::

    rate(K)  = E[a + 1](K) / t_cycle(K)        (t_cycle = draft + verify + consensus)
    rate(AR) = 1 / t_ar

Where the run verifies by tree (greedy rows, an adapter that records its rank rates: the
default), a cycle is a tree-verified one and ``E[a + 1]`` at K is measured by a calibration run
at that K, since a tree's acceptance depends on its K (its K - 1 nodes spread over depth and
width)::

    rate(tree, K) = E[a + 1](tree, K) / t_tree(K)

The one-pass schedule (an adapter trained on ``masked`` blocks) is another option: its cycle is
one pass over the verify segment and the candidate blocks, and its ``E[a + 1]`` is measured by its
own calibration run (its drafts are the harder, two-ahead kind)::

    rate(one-pass, K) = E[a + 1](one-pass, K) / t_onepass(K)

On a GPU a K-token pass costs about what a 1-token pass does (the weights are read once either
way) and a large K pays; on a CPU the cost grows with K, and with a weak adapter no K may pay, in
which case the answer is 1 (plain AR: parallel mode with K = 1 is the AR loop), so that auto never
makes a user slower than AR. ``P(a >= i + 1)`` is measured, not assumed: it is the fraction of
calibration cycles in which draft slot i was accepted (``DecodeStats.slot_accepts``).

Use it anywhere a block size is taken::

    choice = choose_block_size(engine)            # a few seconds: timed passes + a short calibration
    engine.generate(prompts, mode="parallel", block_size=choice.block_size)

:func:`decide_block_size` is the pure decision (timings and acceptance in, K out) and is what the
tests exercise; :func:`measure_pass_times` and :func:`acceptance_curve` supply its inputs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch

from orthrus.config import GenerationConfig
from orthrus.decoding.stats import DecodeStats
from orthrus.errors import OrthrusError

if TYPE_CHECKING:
    from orthrus.engine import Orthrus

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = (2, 4, 8, 16, 32)
# Short, mixed prompts for calibrating acceptance when the caller has none of its own.
CALIBRATION_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in a few sentences how a hash table works.",
    "List five tips for writing clear emails.",
    "What is 17 * 23? Show your steps.",
)


@dataclass(frozen=True)
class PassTimes:
    """Median seconds of one decoding cycle on one device, batch and context, as the decoder runs
    it (eager on a CPU, a replayed CUDA graph on a GPU), host sync included.

    Attributes:
        ar: one AR step (block size 1: one 1-token pass of the frozen model).
        cycle: K -> one parallel cycle (draft pass + K-token verify pass + consensus).
        onepass: K -> one one-pass cycle (empty when the schedule was not timed).
        tree: K -> one tree-verified cycle (draft pass as deep as the tree + K-row verify pass +
            acceptance + K/V moves; empty when not timed).
    """

    ar: float
    cycle: dict[int, float]
    onepass: dict[int, float] = field(default_factory=dict)
    tree: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"ar": self.ar, "cycle": {str(k): v for k, v in self.cycle.items()},
                "onepass": {str(k): v for k, v in self.onepass.items()},
                "tree": {str(k): v for k, v in self.tree.items()}}


@dataclass(frozen=True)
class BlockSizeChoice:
    """The chosen block size and the numbers behind it.

    Attributes:
        block_size: the chosen K; 1 means AR (no K was predicted to beat it by ``margin``).
        predicted: K -> predicted tokens per second (key 1: AR).
        expected_tokens: K -> predicted tokens per cycle ``E[a + 1]``.
        curve: ``P(a >= i + 1)`` per draft slot i, as measured (chain verification; empty when
            the choice was made for tree verification).
        verify: ``"tree"`` when the two-pass figures are of tree-verified cycles (their
            ``expected_tokens`` measured at each K), else ``"chain"``.
        times: the pass timings used (None when no timing was needed, e.g. no adapter).
        reason: one line for logs and reports.
    """

    block_size: int
    schedule: str = "two-pass"
    candidates: int = 0
    predicted: dict[int, float] = field(default_factory=dict)
    expected_tokens: dict[int, float] = field(default_factory=dict)
    curve: list[float] = field(default_factory=list)
    times: PassTimes | None = None
    margin: float = 0.0
    reason: str = ""
    onepass_predicted: dict[int, float] = field(default_factory=dict)
    onepass_curve: list[float] = field(default_factory=list)
    verify: str = "chain"

    def to_dict(self) -> dict:
        return {"block_size": self.block_size, "schedule": self.schedule, "candidates": self.candidates,
                "verify": self.verify,
                "reason": self.reason, "margin": self.margin,
                "onepass_predicted_tokens_per_second": {str(k): round(v, 4) for k, v in self.onepass_predicted.items()},
                "onepass_acceptance_curve": [round(p, 4) for p in self.onepass_curve],
                "predicted_tokens_per_second": {str(k): round(v, 4) for k, v in self.predicted.items()},
                "expected_tokens_per_cycle": {str(k): round(v, 4) for k, v in self.expected_tokens.items()},
                "acceptance_curve": [round(p, 4) for p in self.curve],
                "pass_seconds": self.times.to_dict() if self.times else None}


def acceptance_curve(stats: DecodeStats) -> list[float]:
    """``P(a >= i + 1)`` for each draft slot i: cycles in which slot i was accepted / drafting cycles.

    The curve is as long as the calibration's block size minus one; slots beyond it are unknown
    (and counted as never accepted by :func:`expected_tokens`, which errs towards smaller K).
    """
    # a one-pass (or n-gram) run has no draft passes: its drafting cycles are its verify passes
    cycles = stats.draft_passes or stats.verify_passes
    if cycles == 0 or not stats.slot_accepts:
        return []
    return [n / cycles for n in stats.slot_accepts]


def expected_tokens(curve: Sequence[float], k: int) -> float:
    """``E[a + 1]`` with block size ``k``: the bonus token plus each draft slot's acceptance."""
    return 1.0 + float(sum(curve[: max(0, k - 1)]))


def decide_block_size(times: PassTimes, curve: Sequence[float], candidates: Sequence[int] = DEFAULT_CANDIDATES,
                      margin: float = 0.05, onepass_curve: Sequence[float] = (),
                      onepass_candidates: int = 0, tree_tokens: Mapping[int, float] | None = None
                      ) -> BlockSizeChoice:
    """Pick the K (and schedule) with the highest predicted tokens per second, or 1 if none beats
    AR by ``margin``.

    Args:
        times: cycle timings; ``times.cycle`` must cover every candidate (and ``times.onepass``
            the one-pass ones, when any).
        curve: ``P(a >= i + 1)`` per draft slot (see :func:`acceptance_curve`).
        candidates: block sizes >= 2 to consider (smaller K wins ties; two-pass wins ties).
        margin: a K must be predicted faster than AR by this fraction (timing noise is a few %).
        onepass_curve: the one-pass schedule's curve, measured with ``onepass_candidates``
            candidate blocks per pass; one-pass is considered for the Ks in ``times.onepass``.
        tree_tokens: K -> measured tokens per tree-verified cycle: the two-pass cycles are
            tree-verified ones, timed by ``times.tree`` (which must cover every candidate), and
            ``curve`` is not used.
    """
    if times.ar <= 0:
        raise ValueError(f"AR pass time must be positive, got {times.ar}")
    predicted = {1: 1.0 / times.ar}
    expected = {1: 1.0}
    cycle = times.tree if tree_tokens is not None else times.cycle
    for k in sorted({int(k) for k in candidates if k >= 2}):
        if k not in cycle or (tree_tokens is not None and k not in tree_tokens):
            raise ValueError(f"no {'tree pass timing or tree acceptance' if tree_tokens is not None else 'pass timing'}"
                             f" for block size {k}")
        expected[k] = tree_tokens[k] if tree_tokens is not None else expected_tokens(curve, k)
        predicted[k] = expected[k] / cycle[k]
    one = {k: expected_tokens(onepass_curve, k) / t for k, t in times.onepass.items()} if onepass_curve else {}
    options = [(predicted[k], -k, 1, k) for k in predicted if k > 1] + [(v, -k, 0, k) for k, v in one.items()]
    rate, _, two, best = max(options, default=(0.0, 0, 1, 1))
    schedule = "two-pass" if two else "one-pass"
    if best > 1 and rate > predicted[1] * (1.0 + margin):
        tokens = expected[best] if two else expected_tokens(onepass_curve, best)
        reason = (f"K={best} {schedule}{', tree' if two and tree_tokens is not None else ''}: "
                  f"{rate:.2f} tok/s predicted vs AR {predicted[1]:.2f} "
                  f"({tokens:.2f} tokens per cycle)")
        chosen = best
    else:
        reason = (f"AR: no block size beats AR ({predicted[1]:.2f} tok/s) by {margin:.0%}"
                  + (f"; best was K={best} {schedule} at {rate:.2f}" if best > 1 else ""))
        chosen = 1  # (schedule: still the faster parallel one, for a caller whose K is fixed)
    return BlockSizeChoice(chosen, schedule, onepass_candidates if schedule == "one-pass" else 0, predicted,
                           expected, list(curve) if tree_tokens is None else [], times, margin, reason, one,
                           list(onepass_curve), "tree" if tree_tokens is not None else "chain")


def _median_seconds(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure_pass_times(engine: "Orthrus", candidates: Sequence[int] = DEFAULT_CANDIDATES, batch_size: int = 1,
                       context: int = 256, repeats: int = 5, warmup: int = 2,
                       onepass_candidates: int = 0, trees: bool = False, compiled: bool = False) -> PassTimes:
    """Time one AR step and, per candidate K, one parallel cycle, with the engine's own decoder.

    ``batch_size`` rows of ``context`` prompt tokens are prefilled; then each cycle shape runs
    ``warmup + repeats`` times (on CUDA the first run captures its graph), each time from that same
    state (the commit is undone in between), and the median is kept. Every run ends with the
    decoder's host sync, so the time is the device's too. Acceptance does not change the cost.

    Args:
        batch_size: rows per cycle (B).
        context: committed cache length the cycles attend over (cost grows with it).
        repeats, warmup: timed and untimed repetitions.
        onepass_candidates: also time one-pass cycles with this many candidate blocks (0: not).
        trees: also time tree-verified cycles (the default for greedy rows with an adapter that
            records its rank rates).
        compiled: time compiled cycles (each shape compiled before it is timed); else eager ones,
            whatever the engine's setting (the block-size calibration compares eager cycles: compiling
            every candidate K would cost minutes).
    """
    if engine.adapter is None and any(k > 1 for k in candidates):
        raise OrthrusError("timing draft passes needs an adapter: pass --adapter PATH or --adapter init")
    ks = sorted({1, *(int(k) for k in candidates if k >= 2)})
    dec = engine.new_decoder(batch_size, context + 1 + max(ks), compile=compiled)
    gen = GenerationConfig(max_new_tokens=1, mode="parallel" if max(ks) > 1 else "ar")
    dec.add([(i, [0] * context, gen, max(ks)) for i in range(batch_size)])
    saved = dec.lengths.clone(), dec.x_t.clone()

    def one_cycle(key: tuple) -> None:
        dec.run_cycle(*key).tolist()  # the decoder's per-cycle host sync
        dec.lengths.copy_(saved[0])
        dec.x_t.copy_(saved[1])

    cycle: dict[int, float] = {}
    onepass: dict[int, float] = {}
    tree: dict[int, float] = {}
    for k in ks:
        rows, kv_len = dec.cycle_shape(batch_size, context + k)  # as Decoder.step would
        key = (rows, k, kv_len, True, False)
        cycle[k] = _median_seconds(functools.partial(one_cycle, key), repeats, warmup)
        if onepass_candidates and k > 1 and dec.scratch:
            dec._onepass_buffers(k, False)
            key = (rows, k, kv_len, True, False, "onepass", min(onepass_candidates, k))
            onepass[k] = _median_seconds(functools.partial(one_cycle, key), repeats, warmup)
        if trees and k > 1:
            dec.tree(k)
            key = (rows, k, kv_len, True, False, "tree")
            tree[k] = _median_seconds(functools.partial(one_cycle, key), repeats, warmup)
    times = PassTimes(ar=cycle.pop(1), cycle=cycle, onepass=onepass, tree=tree)
    log.info("cycle times (B=%d, context=%d%s): AR %.2f ms; %s", batch_size, context,
             ", CUDA graphs" if dec.cuda_graphs else "", 1e3 * times.ar,
             ", ".join(f"K={k} {1e3 * v:.2f} ms" for k, v in cycle.items())
             + "".join(f", one-pass K={k} {1e3 * v:.2f} ms" for k, v in onepass.items())
             + "".join(f", tree K={k} {1e3 * v:.2f} ms" for k, v in tree.items()))
    return times


def choose_block_size(engine: "Orthrus", prompts: Sequence[str | list[int]] | None = None,
                      candidates: Sequence[int] = DEFAULT_CANDIDATES, batch_size: int = 1,
                      context: int = 256, stats: DecodeStats | None = None, calibration_tokens: int = 64,
                      margin: float = 0.05, repeats: int = 5, tree: bool = False) -> BlockSizeChoice:
    """Measure, then pick the block size that maximises expected tokens per second (1 = AR).

    Args:
        engine: the engine whose model and adapter will decode.
        prompts: calibration prompts for the acceptance curve (default: :data:`CALIBRATION_PROMPTS`);
            ignored when ``stats`` is given.
        candidates: block sizes to consider; those above the adapter's own block size are dropped.
        batch_size, context: the decoding conditions to time the passes under.
        stats: acceptance statistics of an earlier greedy parallel run (its block size should be
            the largest candidate's); None: a short greedy calibration run at the largest candidate.
        calibration_tokens: new tokens per calibration prompt.
        margin: how much faster than AR a K must be predicted to be chosen.
        repeats: timed repetitions per pass.
        tree: the run verifies the drafts as trees (:func:`~orthrus.decoding.tree.verifies_by_tree`):
            one tree-verified calibration run per candidate K (``stats`` is not used) and timed
            tree cycles; else one chain-verified run at the largest K, whose per-slot curve holds
            for every smaller K.
    """
    if engine.adapter is None:
        return BlockSizeChoice(1, reason="AR: no adapter")
    cands = sorted({int(k) for k in candidates if 2 <= k <= engine.adapter.config.block_size})
    if not cands:
        return BlockSizeChoice(1, reason=f"AR: no candidate block size in 2..{engine.adapter.config.block_size}")
    from orthrus.engine import run_stats

    def calibrate(**kw: object) -> DecodeStats:  # a short greedy parallel run's summed counters
        runs = engine.generate(list(prompts or CALIBRATION_PROMPTS), mode="parallel",
                               max_new_tokens=calibration_tokens, batch_size=batch_size, **kw)
        return run_stats(runs, 0.0)

    tree_tokens: dict[int, float] | None = None
    if tree:
        tree_tokens = {}
        for k in cands:
            t0 = time.perf_counter()
            tree_tokens[k] = calibrate(block_size=k, verify="tree").acceptance_length
            log.info("tree calibration at K=%d: acceptance length %.2f (%.1f s)", k, tree_tokens[k],
                     time.perf_counter() - t0)
    elif stats is None:
        t0 = time.perf_counter()
        # a chain's top-token curve holds for every smaller K (a tree's depends on its K)
        stats = calibrate(block_size=max(cands), verify="chain")
        log.info("calibration at K=%d: acceptance length %.2f over %d cycles (%.1f s)", max(cands),
                 stats.acceptance_length, stats.verify_passes, time.perf_counter() - t0)
    onepass_curve: list[float] = []
    n_cand = 0
    if "masked" in engine.adapter.config.block_kinds:  # trained for the one-pass schedule: measure it too
        from orthrus.decoding import generator

        n_cand = generator.DEFAULT_CANDIDATES
        one = calibrate(block_size=max(cands), schedule="one-pass", candidates=n_cand)
        onepass_curve = acceptance_curve(one)
        log.info("one-pass calibration at K=%d: %.2f tokens per pass", max(cands), one.tpf)
    times = measure_pass_times(engine, cands, batch_size=batch_size, context=context, repeats=repeats,
                               onepass_candidates=n_cand, trees=tree)
    curve = acceptance_curve(stats) if stats is not None else []
    choice = decide_block_size(times, curve, cands, margin, onepass_curve, n_cand, tree_tokens)
    log.info("block size: %s", choice.reason)
    return choice


CACHE_FILE = "blocksize.json"


def _choice_key(engine: "Orthrus", batch_size: int, candidates: Sequence[int] = DEFAULT_CANDIDATES,
                tree: bool = False) -> str:
    """What a measured choice depends on: model, adapter weights, device, dtype, threads, batch,
    candidates, how drafts are verified."""
    from orthrus.models.quant import device_name

    h = hashlib.sha256()
    assert engine.adapter is not None
    for name, t in sorted(engine.adapter.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    model = engine.model
    return json.dumps({"model": engine.base.fingerprint, "adapter": h.hexdigest()[:16],
                       "device": device_name(model.device), "dtype": str(model.dtype),
                       "threads": torch.get_num_threads(), "batch": batch_size,
                       "cuda_graphs": engine.uses_cuda_graphs, "compile": engine.compile,
                       "draft_int8": engine.draft_int8, "block_kinds": list(engine.adapter.config.block_kinds),
                       "candidates": sorted(int(k) for k in candidates), "verify": "tree" if tree else "chain",
                       "torch": torch.__version__}, sort_keys=True)


def cached_block_size(engine: "Orthrus", batch_size: int = 1, path: str | Path | None = None,
                      candidates: Sequence[int] = DEFAULT_CANDIDATES, tree: bool = False) -> BlockSizeChoice:
    """:func:`choose_block_size` with its answer kept on disk (``$ORTHRUS_CACHE/blocksize.json``).

    The measurement takes seconds to a minute (on a CPU, mostly the calibration run); its answer
    holds for the same model, adapter weights, device, dtype, thread count and batch size, so it is
    stored under those (and ``tree``: whether the run verifies drafts as trees) and reused. Delete
    the file (or an entry) to measure again.
    """
    if engine.adapter is None:
        return BlockSizeChoice(1, reason="AR: no adapter")
    from orthrus.models.loading import cache_root, read_cache_entries, write_cache_entries

    path = Path(path) if path is not None else cache_root() / CACHE_FILE
    key = _choice_key(engine, batch_size, candidates, tree)
    entries = read_cache_entries(path)
    hit = entries.get(key)
    if isinstance(hit, dict) and isinstance(hit.get("block_size"), int) and hit["block_size"] >= 1:
        log.info("block size: %s (measured %s; cached in %s)", hit.get("reason", ""), hit.get("date", "?"), path)
        schedule = hit.get("schedule", "two-pass")
        if schedule not in ("two-pass", "one-pass"):
            schedule = "two-pass"
        return BlockSizeChoice(hit["block_size"], schedule, int(hit.get("candidates") or 0),
                               reason=f"{hit.get('reason', '')} (cached)", verify="tree" if tree else "chain")
    choice = choose_block_size(engine, batch_size=batch_size, candidates=candidates, tree=tree)
    entries[key] = {**choice.to_dict(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_cache_entries(path, entries, "the block size choice")
    return choice
