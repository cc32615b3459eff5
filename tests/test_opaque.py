"""orthrus.models.opaque: prepacked GEMMs as one op that compiled graphs call by handle."""

from __future__ import annotations

import gc

import pytest
import torch

from orthrus.models import opaque


class Doubler:
    def __init__(self, scale: float = 2.0) -> None:
        self.scale = scale
        self.handle = opaque.register(self.gemm)

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, x), dim=-1) * self.scale


def test_the_op_calls_the_kernel_registered_under_its_handle() -> None:
    a, b = Doubler(2.0), Doubler(3.0)
    x = torch.arange(6.0).view(2, 3)
    assert a.handle != b.handle
    assert torch.equal(opaque.gemm(x, a.handle, 6), a.gemm(x))
    assert torch.equal(opaque.gemm(x, b.handle, 6), b.gemm(x))


def test_handles_lapse_with_their_object_and_are_reused_lowest_first() -> None:
    a, b = Doubler(), Doubler()
    freed = a.handle
    del a
    gc.collect()
    with pytest.raises(RuntimeError, match="weights were released"):
        opaque.gemm(torch.ones(1, 3), freed, 6)
    lowest = next(h for h in range(1, freed + 1) if h not in opaque._kernels)  # freed, or a lower free one
    c = Doubler(5.0)  # the lowest free number: a process preparing the same model gets the same handles
    assert c.handle == lowest and b.handle != c.handle
    assert torch.equal(opaque.gemm(torch.ones(1, 3), c.handle, 6), torch.full((1, 6), 5.0))


def test_a_compiled_graph_fuses_around_the_op_and_gives_the_eager_values() -> None:
    """Inductor sees only the op's output shape (its fake kernel); the graph calls the kernel."""
    k = Doubler(1.5)

    def f(x: torch.Tensor) -> torch.Tensor:
        y = opaque.gemm(x, k.handle, 2 * x.shape[-1]) if opaque.compiling() else k.gemm(x)
        return torch.relu(y) + 1

    x = torch.randn(4, 5)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))
