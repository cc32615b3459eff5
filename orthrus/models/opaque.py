"""Prepacked CPU GEMMs as one opaque op, so that ``torch.compile`` fuses everything around them.

On a CPU the decoding passes run their GEMMs through kernels chosen per machine: oneDNN's and
MKL's prepacked fp32 GEMMs (:class:`~orthrus.models.llama.InferenceLinear`) and fbgemm's int8 and
fp16 ones for drafts (:mod:`orthrus.models.quant`). Inductor lowers none of these weights unless it
froze them itself (then it bakes the weights into each compiled graph and picks its own kernels).
So under compilation each such GEMM goes through ``torch.ops.orthrus.packed_gemm(x, handle,
n_out)``: the graph holds an integer handle, not the packed weight, and the op calls the kernel
registered under it. Inductor fuses the norms, rope, attention glue and activations between the
GEMMs; the GEMMs are the eager ones, bit for bit, and the compiled graph reads no weight, so that
Inductor's on-disk cache serves any process that packed the same shapes.

Eager code never goes through the op: it calls the kernels directly.

Our attention kernel (:func:`orthrus.models.tiled.attention`) is an opaque op too,
``torch.ops.orthrus.decode_attention(q, k, v, mask)``, for the same reason: Inductor would
otherwise see a foreign call it cannot trace.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable

import torch
from torch import Tensor

_kernels: dict[int, weakref.WeakMethod] = {}

_lib = torch.library.Library("orthrus", "DEF")
_lib.define("packed_gemm(Tensor x, int handle, int n_out) -> Tensor")


def _packed_gemm(x: Tensor, handle: int, n_out: int) -> Tensor:
    fn = _kernels.get(handle)
    kernel = fn() if fn is not None else None
    if kernel is None:  # a compiled graph outlived the weights it was compiled for
        raise RuntimeError(f"orthrus.packed_gemm: no kernel under handle {handle} (its weights were released)")
    return kernel(x)


_lib.impl("packed_gemm", _packed_gemm, "CPU")


@torch.library.register_fake("orthrus::packed_gemm")
def _packed_gemm_fake(x: Tensor, handle: int, n_out: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], n_out)


_lib.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor")


def _decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    from orthrus.models import tiled

    return tiled.attention(q, k, v, mask)


_lib.impl("decode_attention", _decode_attention, "CPU")


@torch.library.register_fake("orthrus::decode_attention")
def _decode_attention_fake(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    b, h, t, d = q.shape
    return q.new_empty(b, t, h, d).transpose(1, 2)  # as the kernel lays it out


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Our attention kernel: called directly in eager code, as one opaque op in a compiled graph."""
    if compiling():
        return torch.ops.orthrus.decode_attention(q, k, v, mask)
    return _decode_attention(q, k, v, mask)


def register(kernel: Callable[[Tensor], Tensor]) -> int:
    """A handle for ``kernel`` (a bound method ``x [..., C] -> [..., n_out]``), held weakly: it
    lapses with the object the method is bound to.

    Handles are the lowest free numbers, so that a process that prepares the same model the same
    way gets the same handles, hence the same graphs, and Inductor's on-disk cache serves it. A
    handle freed and taken again is safe: a compiled graph reads each GEMM's handle from the object
    that holds it (dynamo guards on the value), and calls whatever kernel is registered under it."""
    handle = next(h for h in itertools.count(1) if h not in _kernels)
    _kernels[handle] = weakref.WeakMethod(kernel)
    weakref.finalize(kernel.__self__, _kernels.pop, handle, None)
    return handle


def gemm(x: Tensor, handle: int, n_out: int) -> Tensor:
    """``x [..., C] -> [..., n_out]`` through the kernel registered under ``handle``, as one op
    that a compiled graph calls without looking inside."""
    return torch.ops.orthrus.packed_gemm(x, handle, n_out)


def compiling() -> bool:
    """Whether this code is being traced by ``torch.compile`` (then packed GEMMs go through :func:`gemm`)."""
    return torch.compiler.is_compiling()
