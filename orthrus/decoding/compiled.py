"""The decoding cycle under ``torch.compile`` (Inductor), with caches that outlive the process.

What is compiled: the decoder's whole device cycle (draft pass, verify pass, acceptance, commit),
one graph per cycle shape (rows, block size, greedy or sampled, draft source). The GEMMs inside are
the eager prepacked kernels, called as opaque ops (:mod:`orthrus.models.opaque`), so compiling fuses
what lies between them (norms, rope, attention glue, activations, acceptance) and changes no GEMM.

Shapes: every size is static but the attended cache length, which grows every cycle: the cycle's
``kv_len`` argument is symbolic from the first compile (``torch.compiler.config.dynamic_sources``),
so one graph serves every length. Rows are rounded up to powers of two and the engine's cache
capacity too (``Decoder.cycle_shape``, ``Orthrus._take_decoder``), so few shapes ever compile.

Caches: Inductor's compiled kernels and graphs are kept under ``$ORTHRUS_CACHE/inductor`` (unless
``TORCHINDUCTOR_CACHE_DIR`` says otherwise; :func:`orthrus.paths.inductor_cache`). A first run
compiles each cycle shape in tens of seconds on a small CPU; a later process finds the compiled
graphs on disk and only traces (a few seconds per shape). Every compile is logged with its seconds.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import torch
from torch import Tensor

from orthrus.paths import inductor_cache

log = logging.getLogger(__name__)

DYNAMIC = "L['kv_len']"  # the one symbolic size: the cycle's attended cache length
TRIAL_ROUNDS = 5  # interleaved eager / compiled runs of a new shape's first cycle (--compile auto)
TRIAL_MARGIN = 0.02  # the compiled graph must be this much faster to be kept
CACHE_LIMIT = 64  # compiled variants per function (dynamo's default, 8, is below our shape count)


VEC_ISA_CACHE = "vec_isa.json"  # Inductor's vector-ISA probe results, under $ORTHRUS_CACHE


def configure() -> None:
    """Process-wide settings for compiled decoding (idempotent)."""
    import torch._dynamo as dynamo

    inductor_cache()
    _skip_known_vec_isa_probes()
    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, CACHE_LIMIT)
    sources = [x for x in torch.compiler.config.dynamic_sources.split(",") if x.strip()]
    if DYNAMIC not in sources:
        torch.compiler.config.dynamic_sources = ",".join(sources + [DYNAMIC])


def _skip_known_vec_isa_probes() -> None:
    """Inductor checks each vector instruction set this CPU reports by building a test library and
    loading it in a child process, in every process: ~1 s of a cached compiled start-up (about a
    tenth). Once a process has probed and found every candidate valid, that is recorded under
    ``$ORTHRUS_CACHE/vec_isa.json`` for this CPU, compiler and torch, and later processes with the
    same candidates skip the probes (``torch._inductor.config.cpp.vec_isa_ok``). A candidate that
    failed its probe is never recorded, so such a machine keeps probing."""
    import subprocess

    from torch._inductor import config as ic
    from torch._inductor import cpu_vec_isa

    from orthrus.models.loading import read_cache_entries, write_cache_entries
    from orthrus.models.tiled import _cpu_key
    from orthrus.paths import cache_root

    if ic.cpp.vec_isa_ok is not None:  # decided already (by us or the user)
        return
    cxx = ic.cpp.cxx[0] if isinstance(ic.cpp.cxx, tuple) else ic.cpp.cxx
    cxx = os.environ.get("CXX") or cxx or "g++"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        return
    key = f"{_cpu_key()}|{cxx}|{version}|torch={torch.__version__}"
    ic.cpp.vec_isa_ok = True  # the candidates, as the CPU reports them (no probe)
    try:
        candidates = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list.__wrapped__()]
    finally:
        ic.cpp.vec_isa_ok = None
    file = cache_root() / VEC_ISA_CACHE
    entries = read_cache_entries(file)
    if entries.get(key) == candidates:
        ic.cpp.vec_isa_ok = True
        return
    if [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()] == candidates:  # probes, once
        entries[key] = candidates
        write_cache_entries(file, entries, "Inductor's vector-ISA probes")
        ic.cpp.vec_isa_ok = True  # as later processes will (the setting is part of Inductor's cache keys)


class CompiledCycle:
    """``fn(rows, k, kv_len, *flags) -> Tensor`` through ``torch.compile``, ``kv_len`` symbolic.

    Args:
        fn: the eager cycle. It may mutate only the tensors ``state()`` returns plus cache slots
            that a rerun of the same cycle rewrites (a decoder's cycle: see ``Decoder._cycle``).
        state: the tensors ``fn`` mutates, to be restored between trial runs.
        trial: time each new shape compiled against eager (``TRIAL_ROUNDS`` interleaved runs of the
            same cycle, state restored after each) and keep the compiled graph for that shape only
            where it is at least ``TRIAL_MARGIN`` faster; False: always the compiled graph. Whether
            compiling pays depends on the CPU (on a memory-bound EPYC a symbolic cache length
            made the AR step slower than eager; README, "CPU fast path").

    Every call that compiled a graph is logged with its seconds and kept in :attr:`compiles`
    (``(rows, k, kv_len, *flags)``, seconds); each trial's verdict in :attr:`choice` and the log.
    """

    def __init__(self, fn: Callable[..., Tensor], state: Callable[[], tuple[Tensor, ...]] = tuple,
                 trial: bool = False) -> None:
        configure()
        self.eager = fn
        self.fn = torch.compile(fn, fullgraph=True, dynamic=False)
        self.state, self.trial = state, trial
        self.compiles: list[tuple[tuple, float]] = []
        self.choice: dict[tuple, bool] = {}  # shape (all but kv_len) -> the compiled graph runs it

    def __call__(self, *key: Any) -> Tensor:
        shape = key[:2] + key[3:]
        use = self.choice.get(shape)
        if use is None:
            use = self.choice[shape] = self._decide(key) if self.trial else True
        return self._compiled(key) if use else self.eager(*key)

    def _compiled(self, key: tuple) -> Tensor:
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        t = time.perf_counter()
        out = self.fn(*key)
        if counters["stats"]["unique_graphs"] != graphs:
            s = time.perf_counter() - t
            self.compiles.append((key, s))
            rows, k, kv_len = key[:3]
            log.info("compiled a decoding cycle (%d row(s), block %d, %d cache slots) in %.1f s; "
                     "cached in %s", rows, k, kv_len, s, inductor_cache())
        return out

    def _decide(self, key: tuple) -> bool:
        """Compile ``key``'s shape, then time it against eager on this very cycle (its state put
        back after each run): whether the compiled graph wins by ``TRIAL_MARGIN``."""
        saved = [t.clone() for t in self.state()]

        def restore() -> None:
            for t, s in zip(self.state(), saved):
                t.copy_(s)

        self._compiled(key)
        restore()
        self.eager(*key)
        restore()
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(TRIAL_ROUNDS):
            for compiled in (False, True):
                t = time.perf_counter()
                self.fn(*key) if compiled else self.eager(*key)
                times[compiled].append(time.perf_counter() - t)
                restore()
        eager_s, compiled_s = (sorted(v)[len(v) // 2] for v in (times[False], times[True]))
        win = compiled_s < eager_s * (1 - TRIAL_MARGIN)
        log.info("decoding cycle (%d row(s), block %d): compiled %.1f ms vs eager %.1f ms a cycle: %s",
                 key[0], key[1], 1000 * compiled_s, 1000 * eager_s,
                 "compiled" if win else "eager (compiling does not pay on this CPU)")
        return win
