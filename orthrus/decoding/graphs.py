"""CUDA graphs for the decoding cycle: capture each cycle shape once, then replay it.

On a GPU a forward of a small model is bound by kernel launches (one eager pass of the 135M default
model costs 20-40 ms of host time whatever its length, see ../shared/device/README.md); a replayed
graph launches the whole cycle -- draft, verify, consensus and commit -- as one unit. This needs the
cycle to have static shapes and no host synchronisation, which the decoder guarantees
(``Decoder._cycle``): everything it reads and writes lives in buffers allocated once (the KV cache
and the per-slot state tensors), so a replay sees the values of the moment.

A *shape* is ``(rows, block size, kv_len, greedy, filters)``; the decoder rounds rows and kv_len up
to powers of two in graph mode, so a handful of graphs serves a whole server lifetime. All graphs
share one memory pool: their intermediates may alias each other (replays never overlap), while each
graph's output tensor stays allocated for as long as the graph lives.
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch
from torch import Tensor


class CycleGraphs:
    """Lazily captured CUDA graphs of one function, keyed by its (hashable) static arguments.

    Args:
        fn: ``fn(*key) -> Tensor``; must be capturable (static shapes, no host sync) and may mutate
            only the tensors in ``state`` plus storage whose writes are harmless when repeated
            (the decoder's verify writes K/V into not-yet-committed cache slots).
        state: tensors ``fn`` mutates; they are restored after each warm-up run, so capturing a
            new shape leaves the decoder exactly as it was.
        warmup: eager runs on a side stream before a capture (lazy cuBLAS / kernel initialisation).
    """

    def __init__(self, fn: Callable[..., Tensor], state: tuple[Tensor, ...], warmup: int = 2) -> None:
        self.fn, self.state, self.warmup = fn, state, warmup
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = None

    def __len__(self) -> int:
        return len(self.graphs)

    def run(self, *key: Hashable) -> Tensor:
        """Replay the graph for ``key`` (capturing it first if new); returns its output tensor.

        The output is the graph's own static tensor: read it (the decoder's one host sync) before
        the next replay of the same key overwrites it.
        """
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(key)
        entry[0].replay()
        return entry[1]

    def _capture(self, key: tuple) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        saved = [t.clone() for t in self.state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*key)
                for t, s in zip(self.state, saved):  # undo the warm-up's commit
                    t.copy_(s)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):  # records kernels; runs nothing
            out = self.fn(*key)
        return graph, out
