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


def configure() -> None:
    """Process-wide settings for compiled decoding (idempotent)."""
    import torch._dynamo as dynamo

    inductor_cache()
    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, CACHE_LIMIT)
    sources = [x for x in torch.compiler.config.dynamic_sources.split(",") if x.strip()]
    if DYNAMIC not in sources:
        torch.compiler.config.dynamic_sources = ",".join(sources + [DYNAMIC])


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
