"""Draft-only int8 weights: a cheaper draft pass on a CPU, with the verify pass untouched.

A draft never decides an output token (the frozen fp32 verify pass does; sampling corrects with
the draft's own distribution), so the draft pass may read a lower-precision copy of the frozen
weights. On a CPU a decoding pass of a small model is bound by streaming its weights, and fbgemm's
int8 GEMM (dynamic activation quantization, prepacked weights) streams a quarter of the bytes: 30
layers of SmolLM2-sized MLP and attention weights took 6.1 / 11.1 ms for 1 / 8 rows against
29.1 / 37.0 ms for the prepacked fp32 kernel (2-core EPYC, 1 thread, the other core busy).

fbgemm quantizes its input per *tensor*: one scale and zero point from the min and max of all rows,
so a row's draft would depend on the other rows of the batch (and a seeded sampled row would not
reproduce alone). :class:`Int8Linear` makes the quantization per row and batch-invariant: each row
is divided by its own absolute maximum, and two extra input columns holding +1 and -1 (their weight
columns are zero, so they add nothing) pin every row's range, hence the tensor's, to exactly
``[-1, 1]``; the output is scaled back per row. Integer accumulation is exact, so a row gives the
same bits alone or in any batch.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from orthrus.models import opaque

# input columns appended to every row: +1, -1, then zeros (8 keeps the reduction dimension a
# multiple of 8, as fbgemm's packed layout prefers)
PAD = 8


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line's value in ``/proc/cpuinfo`` (None where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_flags() -> set[str]:
    return set((_cpuinfo("flags") or "").split())


def cpu_name() -> str:
    """This CPU's model name (``/proc/cpuinfo``; elsewhere the platform's processor string)."""
    import platform

    return _cpuinfo("model name") or platform.processor() or platform.machine()


def device_name(device: torch.device | str = "cpu") -> str:
    """The name of the chip ``device`` runs on: the GPU's name, or this CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def machine_name(device: torch.device | str = "cpu") -> str:
    """The machine a job runs on, for records: ``a 2-core <CPU name> (x86_64)``, or the GPU's name."""
    import os
    import platform

    if torch.device(device).type == "cuda":
        return device_name(device)
    return f"a {os.cpu_count()}-core {cpu_name()} ({platform.machine()})"


def busy_cores(threads: int) -> float:
    """How many of the ``threads`` cores a timing would run on were busy with other work over the
    last minute: the 1-minute load average beyond the cores the timing leaves free (0.0 where the
    OS does not say). A kernel choice timed on busy cores measures the other work, not the kernels."""
    import os

    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0
    return max(0.0, load - max(0, (os.cpu_count() or 1) - threads))


# fbgemm's u8 x s8 products are summed in pairs into int16 on AVX2 (vpmaddubsw), which can saturate
# with 8-bit activations, so there they keep 7 bits (``reduce_range``); AVX-512 VNNI accumulates in
# int32, and 8 bits are safe and closer. Measured on an AVX-512 VNNI Xeon (shipped adapter, K = 4,
# 6 HumanEval + 6 MT-Bench prompts, 96 tokens): acceptance 2.31 / 2.19 with 7 bits, 2.37 / 2.31 with 8.
REDUCE_RANGE = "avx512_vnni" not in _cpu_flags()


def int8_available() -> bool:
    """Whether this torch has fbgemm's dynamic int8 linear (x86 CPUs; gone from some builds)."""
    try:
        return ("fbgemm" in torch.backends.quantized.supported_engines
                and hasattr(torch.ops.quantized, "linear_dynamic")
                and hasattr(torch.ops.quantized, "linear_prepack"))
    except (AttributeError, RuntimeError):
        return False


class _DraftLinear:
    """Frozen linear maps ``x [..., C] -> [..., N_i]`` through one GEMM of a cheaper kernel (draft
    passes only). Same calling convention as :class:`~orthrus.models.llama.InferenceLinear`:
    ``weights [N_i, C]`` are concatenated; ``self(x)`` gives one output per weight, :meth:`fused`
    all side by side. Subclasses pack ``self.weight`` (float32 ``[sum N_i, C]``) in ``_pack`` and
    run it in ``_gemm``; the bias (if any) is added in float32 after."""

    def __init__(self, weights: list[Tensor], biases: list[Tensor | None]) -> None:
        with torch.no_grad():
            w = torch.cat([x.detach().float() for x in weights]) if len(weights) > 1 else weights[0].detach().float()
            self.sizes = [x.shape[0] for x in weights]
            self.in_features = w.shape[1]
            self.bias = (None if all(b is None for b in biases) else
                         torch.cat([b.detach().float() if b is not None else w.new_zeros(k)
                                    for b, k in zip(biases, self.sizes)]))
            self._pack(w.contiguous())
        self.handle = opaque.register(self._gemm)  # the GEMM as an opaque op, for compiled graphs

    def _pack(self, w: Tensor) -> None:
        raise NotImplementedError

    def _gemm(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def fused(self, x: Tensor) -> Tensor:
        """``x [..., C]`` (float32) -> ``[..., sum N_i]``."""
        y = opaque.gemm(x, self.handle, sum(self.sizes)) if opaque.compiling() else self._gemm(x)
        return y + self.bias if self.bias is not None else y

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        """``x [..., C]`` -> one ``[..., N_i]`` per weight."""
        y = self.fused(x)
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (y,)


class Int8Linear(_DraftLinear):
    """:class:`_DraftLinear` through fbgemm's int8 GEMM. Weights are quantized symmetrically per
    output channel (int8); activations per row (8 bits on CPUs with AVX-512 VNNI, else 7, see
    ``REDUCE_RANGE``), see the module docstring. Memory: a quarter of the fp32 weights."""

    def _pack(self, w: Tensor) -> None:
        n, c = w.shape
        wp = w.new_zeros(n, c + PAD)
        wp[:, :c] = w
        scale = (w.abs().amax(1) / 127.0).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # torch deprecates quantized tensors (the op stays)
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(wp, scale, torch.zeros(n, dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, None)
        self.pins = w.new_zeros(PAD)
        self.pins[0], self.pins[1] = 1.0, -1.0

    def _gemm(self, x: Tensor) -> Tensor:
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-30)  # [..., 1] each row's own scale
        xn = torch.cat((x / s, self.pins.expand(*x.shape[:-1], PAD)), dim=-1)  # every row spans [-1, 1]
        return torch.ops.quantized.linear_dynamic(xn, self.packed, REDUCE_RANGE) * s


class Fp16Linear(_DraftLinear):
    """:class:`_DraftLinear` through fbgemm's fp16-weight GEMM (fp32 activations and accumulation):
    half the bytes of fp32, with drafts that agree with the fp32 model almost always (on 762 greedy
    positions of the default model: 100% top-1 agreement, against 92% for :class:`Int8Linear`).
    For the self-draft (``Transformer.prepare_self_draft``), whose 1-token steps are bound by
    streaming the weights. Rows are independent (no activation quantization)."""

    def _pack(self, w: Tensor) -> None:
        self.packed = torch.ops.quantized.linear_prepack_fp16(w, None)

    def _gemm(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


class TiledFp16Linear(_DraftLinear):
    """:class:`_DraftLinear` through our tiled GEMM with float16 panels (:mod:`orthrus.models.tiled`):
    the same arithmetic as :class:`Fp16Linear` (float16 weights, float32 products and sums), with
    the streaming and prefetch of our kernel. Used for the self-draft where the model kept the
    tiled kernel (this CPU measured it faster)."""

    def _pack(self, w: Tensor) -> None:
        from orthrus.models import tiled

        self.packed = tiled.pack(w, half=True)

    def _gemm(self, x: Tensor) -> Tensor:
        from orthrus.models import tiled

        return tiled.gemm(x, self.packed, sum(self.sizes))


def fp16_available() -> bool:
    """Whether this torch has fbgemm's fp16-weight linear (x86 CPUs)."""
    return int8_available() and hasattr(torch.ops.quantized, "linear_prepack_fp16")


def fp16_linear(linears: list, tiled: bool = False) -> _DraftLinear:
    """An :class:`Fp16Linear` (``tiled``: a :class:`TiledFp16Linear`) of modules with ``weight`` and ``bias``."""
    return (TiledFp16Linear if tiled else Fp16Linear)([m.weight for m in linears], [m.bias for m in linears])


def int8_linear(linears: list) -> Int8Linear:
    """An :class:`Int8Linear` of modules with ``weight`` and ``bias`` (``nn.Linear`` or a LoRA layer
    whose ``weight`` is its merged dense weight)."""
    return Int8Linear([m.weight for m in linears], [m.bias for m in linears])
