"""Our own fp32 GEMM for passes of few rows on an x86 CPU: row-invariant and flat in the row count.

The kernel (``tiled_gemm.c`` beside this file, built with the machine's C compiler at first use
and kept under ``$ORTHRUS_CACHE/kernels``) reads a weight packed once into panels of a few dozen
outputs (:func:`pack`) and computes every output as the same chain of fused multiply-adds over the
input features, whatever the number of rows. Two properties follow:

* **Row invariance.** A row's outputs do not depend on the other rows of the pass, bit for bit
  (the vendor kernels round 1 row and 8 differently). Whole passes still differ in the last bits
  between 1 and K tokens: attention reduces over a different number of cache slots.
* **Few rows cost about one.** Each weight is streamed once per pass with software prefetch, and
  the arithmetic of up to 8 rows (AVX-512; 4 on AVX2) runs from registers while the next panel
  streams in.

The same library holds our attention for passes of few query rows (``attention.c``,
:func:`attention`): each row alone, over its own slots only, so that a query gets the same bits in a
1-token step as in a K-token pass; 1.5-1.9x faster than the library's SDPA at 1-16 rows with
AVX-512 (2 threads).

Where the kernels are used is measured per CPU (``Transformer.measure_tiled``, the GEMMs and the
attention together); ``ORTHRUS_TILED=off`` turns both off. No C compiler, no AVX2/FMA, or a failed
build: :func:`available` is False (logged once) and the vendor kernels serve every pass.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from orthrus.paths import cache_root

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(n) for n in ("tiled_gemm.c", "attention.c")]
# passes of at most this many query rows per sequence take our attention, by vector width (floats):
# AVX-512 won up to 64 rows (2 threads, a 320-slot cache, SmolLM2's heads), AVX2 up to 8
ATTENTION_ROWS = {16: 64, 8: 8}
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_lib: ctypes.CDLL | None = None
_tried = False
_width = 0
_attn_width = 0


def _cpu_key() -> str:
    from orthrus.models.quant import cpu_name

    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return f"{cpu_name()}|{flags}"


def _compiler() -> str | None:
    from shutil import which

    return os.environ.get("CC") or which("gcc") or which("cc")


def _build(cc: str) -> Path:
    """The shared library for this source, CPU and compiler, built once (atomically) into the cache."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout.split("\n")[0]
    parts = [*(src.read_text() for src in SOURCES), _cpu_key(), version, " ".join(FLAGS)]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    out = cache_root() / "kernels" / f"tiled_gemm-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(r.stderr or r.stdout).strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built the tiled GEMM kernel (%s)", out)
    return out


def available() -> bool:
    """Whether the kernel runs here (built and loaded at the first call; False on non-x86 CPUs,
    without AVX2 + FMA or a C compiler, or with ``ORTHRUS_TILED=off``)."""
    global _lib, _tried, _width, _attn_width
    if _tried:
        return _lib is not None
    _tried = True
    if os.environ.get("ORTHRUS_TILED", "").lower() in ("0", "off", "false", "no"):
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    cc = _compiler()
    if cc is None:
        log.info("no C compiler (gcc): the tiled GEMM kernel is not available; vendor kernels serve every pass")
        return False
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("the tiled GEMM kernel could not be built (%s); vendor kernels serve every pass", e)
        return False
    lib.orthrus_tiled_width.restype = ctypes.c_int
    for fn in (lib.orthrus_tiled_gemm, lib.orthrus_tiled_gemm_f16):
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_int]
    lib.orthrus_tiled_single_spells.restype = ctypes.c_int64
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.orthrus_decode_attention.restype = ctypes.c_int
    lib.orthrus_decode_attention.argtypes = ([ptr, i64, i64, i64] * 3 + [ptr, i64, i64] + [ptr, i64, i64, i64]
                                             + [i64] * 6 + [ctypes.c_float, ctypes.c_int])
    lib.orthrus_decode_attention_width.restype = ctypes.c_int
    _lib, _width, _attn_width = lib, lib.orthrus_tiled_width(), lib.orthrus_decode_attention_width()
    return True


def single_spells() -> int:
    """How often this process's kernel fell back to one thread for a while because its other
    threads kept arriving late (another process held their cores; see ``tiled_gemm.c``)."""
    return _lib.orthrus_tiled_single_spells() if available() else 0


def pack(w: Tensor, half: bool = False) -> Tensor:
    """``w [N, K]`` (CPU) -> panels ``[ceil(N / width), K, width]``, zero-padded outputs, in float32
    (``half``: float16, half the bytes to stream; products and sums stay float32)."""
    assert available(), "the tiled kernel is not available"
    n, k = w.shape
    pad = -n % _width
    w = w.detach().to(torch.float16 if half else torch.float32)
    if pad:
        w = torch.cat([w, w.new_zeros(pad, k)])
    return w.reshape(-1, _width, k).transpose(1, 2).contiguous()


def gemm(x: Tensor, packed: Tensor, n_out: int) -> Tensor:
    """``x [..., K]`` (fp32) -> ``x @ W^T`` ``[..., n_out]`` (fp32) with ``packed = pack(W[, half])``."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m, n = x2.shape[0], packed.shape[0] * packed.shape[2]
    y = torch.empty(m, n, dtype=torch.float32)
    fn = _lib.orthrus_tiled_gemm_f16 if packed.dtype == torch.float16 else _lib.orthrus_tiled_gemm
    fn(x2.data_ptr(), m, k, packed.data_ptr(), n, y.data_ptr(), torch.get_num_threads())
    if n != n_out:
        y = y[:, :n_out].contiguous()  # padded panels: the real outputs, dense
    return y.reshape(*x.shape[:-1], n_out)


def attention_takes(head_dim: int, heads: int, kv_heads: int, dtype: torch.dtype) -> bool:
    """Whether :func:`attention` takes such heads: float32, a head size that is a multiple of the
    vector width and at most 256, query heads a multiple of the KV heads (and the kernel built)."""
    return (available() and dtype == torch.float32 and head_dim % _attn_width == 0 and head_dim <= 256
            and heads % kv_heads == 0)


def attention_rows() -> int:
    """Passes of at most this many query rows per sequence are faster through :func:`attention`
    than through the library's SDPA (0: the kernel is not available)."""
    return ATTENTION_ROWS.get(_attn_width, 0) if available() else 0


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of ``q [B, H, T, D]`` over ``k, v [B, Hkv, S, D]`` (views of the cache are fine)
    with the additive float ``mask [B or 1, 1, T, S]`` (0 / -inf), scale ``1 / sqrt(D)``; returns
    ``[B, H, T, D]`` laid out as ``[B, T, H, D]`` (so merging the heads is a view). Each row reads
    only the slots up to its last unmasked one (:func:`attention_takes` must hold; a CPU)."""
    assert available(), "the tiled kernels are not available"
    b, h, t, d = q.shape
    s = k.shape[2]
    if mask.dtype != q.dtype or mask.stride(-1) != 1 or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("attention: float32 tensors with a contiguous last dimension and an additive float mask")
    y = torch.empty(b, t, h, d, dtype=q.dtype).transpose(1, 2)
    qs, ks, vs, ms, ys = q.stride(), k.stride(), v.stride(), mask.stride(), y.stride()  # one call each
    rc = _lib.orthrus_decode_attention(
        q.data_ptr(), qs[0], qs[1], qs[2], k.data_ptr(), ks[0], ks[1], ks[2], v.data_ptr(), vs[0], vs[1], vs[2],
        mask.data_ptr(), ms[0] if mask.shape[0] > 1 else 0, ms[2], y.data_ptr(), ys[0], ys[1], ys[2],
        b, h, k.shape[1], t, s, d, d ** -0.5, torch.get_num_threads())
    if rc != 0:
        raise MemoryError("attention: no memory for the scores")
    return y
