"""The frozen base model: one compact module for the Llama family (llama, qwen2, qwen3, mistral).

Reads top to bottom: norm, rope, attention projections, attention kernels, MLP, block, model.
The model computes and nothing else: no sampling, no Python state, no flags. Every forward takes
explicit absolute ``positions`` per row and reads/writes a static :class:`~orthrus.cache.KVCache`,
so batches of uneven prompts, verify passes that write K tokens, and rollback by moving a length all
use the same code. Parity with transformers is a test (tests/test_parity.py).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orthrus.models import opaque, tiled

from orthrus.cache import KVCache
from orthrus.config import ModelConfig, RopeConfig
from orthrus.models.quant import Int8Linear, busy_cores, fp16_available, fp16_linear, int8_available, int8_linear

log = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as the reference implementations do."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one op instead of seven (~20 us less per norm on our CPU, 61 norms a pass), the same
            # bits (tests/test_parity.py); other dtypes keep the float32 upcast below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (float32), with linear / llama3 scaling applied."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        inv = inv / rope.factor
    elif rope.kind == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin ``[B, 1, T, head_dim]`` for absolute ``positions [B, T]`` (computed in float32)."""
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, T, D]`` (half-split convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def apply_rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate ``q [B, H, T, D]`` and ``k [B, Hkv, T, D]`` in one elementwise pass over both."""
    h = q.shape[1]
    qk = apply_rope(torch.cat((q, k), dim=1), cos, sin)  # [B, H + Hkv, T, D]
    return qk[:, :h], qk[:, h:]


# Passes of at least this many rows use the prepacked kernel (unless a model measured its own
# crossover, see ``Transformer.prepare_inference``). On our 2-core EPYC every pass did: the real
# model's 1-token AR step took 48.6 ms with the plain kernel and 27.7 ms prepacked (1 thread; 56.7 /
# 29.5 ms on 2 threads). On an AVX-512/AMX Xeon the plain kernel won for 1 row (30.8 vs 40.7 ms, 2
# threads) and lost from 4 rows on (45.7 vs 42.8 ms; 8 rows: 56.4 vs 48.9 ms).
PACKED_MIN_ROWS = 1
NEVER_PACKED = 1 << 30  # a min_rows that no pass reaches
CROSSOVER_ROWS = (1, 2, 4, 8)  # the row counts a measured crossover tries
CROSSOVER_CACHE = "crossover.json"  # measured crossovers, under $ORTHRUS_CACHE
MKL_ROWS = 8  # the row count an MKL pack is tried for: a batch-1 verify pass at the CPU default K = 8
MKL_MARGIN = 0.05  # ... and kept when passes of that many rows run at least this much faster with it
TILED_ROWS = 128  # passes of at most this many rows run the tiled kernel, where this CPU keeps it
BUSY_CORES = 0.75  # a crossover timed with more of its cores busy elsewhere is not kept (see busy_cores)


def packed_crossover(seconds: dict[int, tuple[float, float]]) -> int:
    """From ``{rows: (packed seconds, plain seconds)}``: the smallest row count from which the
    packed kernel is at least as fast for that count and every larger one, else ``NEVER_PACKED``."""
    best = NEVER_PACKED
    for rows in sorted(seconds, reverse=True):
        packed, plain = seconds[rows]
        if packed > plain:
            break
        best = rows
    return best


def packing_available() -> bool:
    """Whether this torch has oneDNN's prepacked fp32 linear (``torch.ops.mkldnn``; CPU only)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def mkl_packing_available() -> bool:
    """Whether this torch has MKL's prepacked fp32 GEMM (``torch.ops.mkl``; x86 CPU builds)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")


class InferenceLinear:
    """Frozen linear maps over one input, for decoding (not a module: no parameters, nothing saved).

    ``weights [N_i, C]`` (q/k/v, or gate/up, or one) map ``x [..., C]`` to a tuple of ``[..., N_i]``.
    With ``pack`` (fp32 on a CPU) they are also concatenated and reordered once into oneDNN's blocked
    layout, used for passes of at least ``min_rows`` rows. Why: eager PyTorch's small-M
    GEMM re-packs the weight on every call, so 8 rows cost ~2.5x one row on our CPU while their
    arithmetic is a fraction of the weight streaming; prepacked, 8 rows cost ~1.3x (measured on 30
    out-of-cache MLP-sized weights, 1 thread: 44 ms -> 24 ms), and even one row runs ~1.8x faster
    packed on that CPU (see ``PACKED_MIN_ROWS``; other CPUs differ, so a model measures its own
    crossover). Memory: the packed copy is as large as the
    weights; the dense ones stay (the parameters, for training and saving).
    """

    def __init__(self, weights: list[Tensor], biases: list[Tensor | None], pack: bool,
                 min_rows: int = PACKED_MIN_ROWS) -> None:
        self.min_rows = min_rows  # passes of fewer rows take the plain kernel
        self.weights = [w.detach() for w in weights]
        self.biases = [None if b is None else b.detach() for b in biases]
        self.sizes = [w.shape[0] for w in weights]
        self.packed: Tensor | None = None
        self.bias: Tensor | None = None
        # MKL's pack, for passes of exactly ``mkl_rows`` rows (see :meth:`pack_mkl`)
        self.mkl: Tensor | None = None
        self.mkl_rows = 0
        self.mkl_weight: Tensor | None = None
        # our row-invariant kernel's panels, for passes of at most ``tiled_rows`` rows (see :meth:`pack_tiled`)
        self.tiled: Tensor | None = None
        self.tiled_rows = 0
        self.handle = opaque.register(self._packed_gemm)  # the packed GEMM as an opaque op, for compiled graphs
        if pack:
            w = self._joined()
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous())
            self.bias = self._joined_bias()

    def _joined(self) -> Tensor:
        return torch.cat(self.weights) if len(self.weights) > 1 else self.weights[0]

    def _joined_bias(self) -> Tensor | None:
        if all(b is None for b in self.biases):
            return None
        return torch.cat([b if b is not None else self.weights[0].new_zeros(n) for b, n in zip(self.biases, self.sizes)])

    def pack_mkl(self, rows: int) -> None:
        """Also pack the weights for MKL's GEMM, which then serves every pass of exactly ``rows``
        rows (a pack is made for one row count; 0 drops it). On some CPUs it beats both other
        kernels for a verify pass (measured by ``scripts/gemmcosts.py``; the model decides per CPU,
        see :meth:`Transformer.measure_mkl`). Memory: as much as the weights (resident)."""
        if rows > 0 and self.mkl is not None and rows == self.mkl_rows:
            return  # packed for these rows already
        self.mkl, self.mkl_rows, self.mkl_weight = None, 0, None
        if rows > 0:
            w = self._joined()
            self.mkl = torch.ops.mkl._mkl_reorder_linear_weight(w.contiguous(), rows)
            # MKL's linear wants the dense weight only for other row counts, which never come here:
            # its shape, not a copy
            self.mkl_weight = w.new_zeros(()).expand(w.shape)
            self.mkl_rows = rows
            if self.bias is None:
                self.bias = self._joined_bias()

    def pack_tiled(self, rows: int) -> None:
        """Also pack the weights for our row-invariant kernel (:mod:`orthrus.models.tiled`), which
        then serves every pass of at most ``rows`` rows (0 drops it). Memory: as much as the
        weights (resident)."""
        if rows > 0 and self.tiled is None:
            self.tiled = tiled.pack(self._joined())
            if self.bias is None:
                self.bias = self._joined_bias()
        if rows <= 0:
            self.tiled = None
        self.tiled_rows = max(rows, 0)

    def _packed(self, x: Tensor) -> Tensor | None:
        """``x [..., C]`` -> all outputs side by side through a packed kernel, or None where this
        pass's row count takes the plain one (static shapes: no sync). Under ``torch.compile`` the
        packed kernel is one opaque op (:mod:`orthrus.models.opaque`)."""
        rows = x.numel() // x.shape[-1]
        if not ((self.tiled is not None and rows <= self.tiled_rows)
                or (self.mkl is not None and rows == self.mkl_rows)
                or (self.packed is not None and rows >= self.min_rows)):
            return None
        if opaque.compiling():
            return opaque.gemm(x, self.handle, sum(self.sizes))
        return self._packed_gemm(x)

    def _packed_gemm(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if self.tiled is not None and rows <= self.tiled_rows:
            y = tiled.gemm(x, self.tiled, sum(self.sizes))
            return y if self.bias is None else y + self.bias
        if self.mkl is not None and rows == self.mkl_rows:
            return torch.ops.mkl._mkl_linear(x, self.mkl, self.mkl_weight, self.bias, rows)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        """``x [..., C]`` -> one ``[..., N_i]`` per weight."""
        y = self._packed(x)
        if y is not None:
            return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (y,)
        return tuple(F.linear(x, w, b) for w, b in zip(self.weights, self.biases))

    def fused(self, x: Tensor) -> Tensor:
        """``x [..., C]`` -> all outputs side by side ``[..., sum N_i]`` (one GEMM when packed)."""
        y = self._packed(x)
        if y is not None:
            return y
        return torch.cat(self(x), dim=-1) if len(self.sizes) > 1 else self(x)[0]


def inference_linear(linears: list[nn.Module], pack: bool) -> InferenceLinear:
    """An :class:`InferenceLinear` of modules with ``weight`` and ``bias`` (an ``nn.Linear``, or a
    LoRA layer whose ``weight`` is its merged dense weight)."""
    return InferenceLinear([m.weight for m in linears], [m.bias for m in linears], pack)


class Attention(nn.Module):
    """The attention *projections* of one layer (q/k/v/o and, for qwen3, q/k norms).

    The kernels that combine q with cached keys live in free functions below, so that the diffusion
    view can reuse this class for its own projections and only change what q attends to.
    :meth:`prepare_inference` makes q/k/v one prepacked GEMM for decoding (the parameters, under
    their Hugging Face names, stay what training and saving use).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = h, kv, d
        self.q_proj = nn.Linear(c, h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(c, kv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(c, kv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * d, c, bias=cfg.o_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.qkv: InferenceLinear | None = None
        self.o: InferenceLinear | None = None

    def __getstate__(self) -> dict:
        # copies (the diffusion view starts as a deepcopy of these projections) and pickles leave
        # the decoding-only packed weights behind: they are derived, and oneDNN tensors have no storage
        state = self.__dict__.copy()
        state["qkv"] = state["o"] = None
        return state

    def prepare_inference(self, pack: bool) -> None:
        """q/k/v as one prepacked GEMM, o prepacked, for decoding; call again after the weights change."""
        self.qkv = inference_linear([self.q_proj, self.k_proj, self.v_proj], pack)
        self.o = inference_linear([self.o_proj], pack)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B, T, C]`` -> q ``[B, H, T, D]``, k and v ``[B, Hkv, T, D]`` (rope applied)."""
        q, k, v = self.linear_qkv(x)
        return self.heads(q, k, v, cos, sin, self.qk_norm)

    def fused_qkv(self, x: Tensor) -> Tensor:
        """q/k/v side by side ``[B, T, (H + 2 Hkv) * D]`` (split them with :meth:`split_qkv`)."""
        if self.qkv is not None:
            return self.qkv.fused(x)
        return torch.cat(self.linear_qkv(x), dim=-1)

    def split_qkv(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return y.split((self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim), dim=-1)

    def linear_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The q/k/v projections ``x [B, T, C]`` -> ``[B, T, H*D]``, ``[B, T, Hkv*D]`` twice (one
        prepacked GEMM when prepared)."""
        if self.qkv is not None:
            q, k, v = self.qkv(x)
            return q, k, v
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def qk_norm(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """The q/k norms (qwen3) of ``[B, T, H|Hkv, D]`` heads; identity without them."""
        if self.q_norm is None:
            return q, k
        return self.q_norm(q), self.k_norm(k)

    def heads(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
              norm: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        """Projections ``[B, T, *]`` -> heads ``[B, H|Hkv, T, D]``, q/k normed by ``norm`` and rotated."""
        b, t, _ = q.shape
        h, kv, d = self.n_heads, self.n_kv, self.head_dim
        q, k = norm(q.view(b, t, h, d), k.view(b, t, kv, d))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(b, t, kv, d).transpose(1, 2)
        q, k = apply_rope_qk(q, k, cos, sin)
        return q, k, v

    def out(self, y: Tensor) -> Tensor:
        """``y [B, H, T, D]`` -> ``[B, T, C]``."""
        return self.linear_o(merge_heads(y))

    def linear_o(self, y: Tensor) -> Tensor:
        """The output projection ``[B, T, H*D] -> [B, T, C]``."""
        return self.o(y)[0] if self.o is not None else self.o_proj(y)


def merge_heads(y: Tensor) -> Tensor:
    """``[B, H, T, D]`` -> ``[B, T, H*D]``."""
    b, _, t, _ = y.shape
    return y.transpose(1, 2).reshape(b, t, -1)


def causal_mask(positions: Tensor, kv_len: int) -> Tensor:
    """Boolean mask ``[B, 1, T, kv_len]``: query at absolute position p sees cache slot j iff j <= p.

    Slots beyond a row's own tokens are never seen, so stale K/V (padding, rejected drafts) is dead.
    No sliding window: a sliding-window model's context is capped at its window
    (``ModelConfig.max_context``), so a window would never mask anything.
    """
    j = torch.arange(kv_len, device=positions.device)
    return j <= positions[:, None, :, None]  # [B, 1, T, kv_len]


def cached_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, ours: bool = False) -> Tensor:
    """Attention of ``q [B, H, T, D]`` over cache slots ``k, v [B, Hkv, S, D]`` with ``mask [B, 1, T, S]``
    (bool, or additive float): SDPA, or (``ours``, an additive float mask) our kernel
    (:func:`orthrus.models.tiled.attention`: each row over its own slots only)."""
    if ours:
        return opaque.attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask as an additive float mask (0 / -inf), built once per forward: SDPA would
    convert a boolean mask again in every layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def cached_attend(cache: KVCache, positions: Tensor, kv_len: int, mask: Tensor,
                  ours: bool = False) -> Callable[[int, Tensor, Tensor, Tensor], Tensor]:
    """The ``attend`` of a pass that writes its K/V at ``positions [B, T]`` and attends over cache
    slots ``[0, kv_len)`` with ``mask [B, 1, T, kv_len]`` (bool; AR/verify: causal; draft: the
    cache below the block plus the whole block). The write index is built once for all layers.
    ``ours``: through our attention kernel (``Transformer.own_attention`` says when)."""
    idx = cache.index(positions)
    mask = additive(mask, cache.k[0].dtype)

    def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache.write_at(i, idx, k, v)
        kc, vc = cache.layer(i, kv_len)
        return cached_attention(q, kc, vc, mask, ours)

    return attend


def block_attention(q: Tensor, k1: Tensor, v1: Tensor, m1: Tensor, k2: Tensor, v2: Tensor,
                    block_size: int) -> Tensor:
    """Attention of ``N`` blocks of ``K`` queries over a shared key set and their own block, with
    one softmax, each block against its own keys only (the diffusion view in training).

    Query block ``n`` (rows ``n*K .. n*K+K-1``) sees the slots of set 1 that ``m1[:, :, n]``
    allows (the shared AR cache) and the ``K`` keys of set 2 in its own block, bidirectionally.
    The block part is ``[N, K, K]`` scores, not the ``[N*K, N*K]`` of a dense block-diagonal
    mask (of which ``N - 1`` blocks in ``N`` are masked away), and set 1 is read as a view.

    Args:
        q: ``[B, H, N*K, D]``.
        k1, v1: ``[B, Hkv, S, D]`` (a view of the cache); m1: ``[B, 1, N, S]`` bool, per block.
        k2, v2: ``[B, Hkv, N*K, D]``, the blocks' own K/V.
        block_size: ``K``.
    Returns:
        ``[B, H, N*K, D]``.
    """
    b, h, t, d = q.shape
    hkv, s = k1.shape[1], k1.shape[2]
    g, k, n = h // hkv, block_size, t // block_size
    qg = q.reshape(b, hkv, g * t, d) * (1.0 / math.sqrt(d))  # heads h = kv * g + i share kv
    s1 = (qg @ k1.transpose(-1, -2)).view(b, hkv, g, n, k, s)  # [B, Hkv, G, N, K, S]
    s2 = qg.view(b, hkv, g, n, k, d) @ k2.view(b, hkv, 1, n, k, d).transpose(-1, -2)  # [.., N, K, K]
    s1 = s1.float().masked_fill(~m1[:, :, None, :, None, :], float("-inf"))
    p = torch.softmax(torch.cat((s1, s2.float()), dim=-1), dim=-1).to(q.dtype)
    y = p[..., :s].reshape(b, hkv, g * t, s) @ v1  # [B, Hkv, G*N*K, D]
    y2 = p[..., s:] @ v2.view(b, hkv, 1, n, k, d)  # [B, Hkv, G, N, K, D]
    return (y + y2.reshape(b, hkv, g * t, d)).view(b, h, t, d)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(c, f, bias=bias)
        self.up_proj = nn.Linear(c, f, bias=bias)
        self.down_proj = nn.Linear(f, c, bias=bias)
        self.gate_up: InferenceLinear | None = None
        self.down: InferenceLinear | None = None

    def __getstate__(self) -> dict:  # as Attention's: copies leave the packed weights behind
        state = self.__dict__.copy()
        state["gate_up"] = state["down"] = None
        return state

    def prepare_inference(self, pack: bool) -> None:
        """gate/up as one prepacked GEMM, down prepacked, for decoding."""
        self.gate_up = inference_linear([self.gate_proj, self.up_proj], pack)
        self.down = inference_linear([self.down_proj], pack)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up is None or self.down is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return swiglu(self.gate_up, self.down, x)


def swiglu(gate_up: Callable[[Tensor], tuple[Tensor, ...]], down: Callable[[Tensor], tuple[Tensor, ...]],
           x: Tensor) -> Tensor:
    """SwiGLU through prepared linears: ``gate_up(x)`` gives gate and up (one GEMM), then down."""
    gate, up = gate_up(x)
    return down(F.silu(gate) * up)[0]


class DraftMLP:
    """A draft-only copy of one layer's MLP (int8 or fp16 weights, see ``orthrus.models.quant``):
    what a draft pass runs instead of the frozen fp32 MLP. Not a module: nothing is trained or saved."""

    def __init__(self, mlp: MLP, make: Callable[[list], Any] = int8_linear) -> None:
        self.gate_up = make([mlp.gate_proj, mlp.up_proj])
        self.down = make([mlp.down_proj])

    def __call__(self, x: Tensor) -> Tensor:
        return swiglu(self.gate_up, self.down, x)


class Block(nn.Module):
    """One decoder layer; names follow the Hugging Face state dict."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def ffn(self, h: Tensor, mlp: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """The residual MLP half of the layer, shared by both views: ``[B, T, C] -> [B, T, C]``
        (``mlp``: a draft-only copy of this layer's MLP, for a draft pass; None: the frozen one)."""
        return h + (mlp or self.mlp)(self.post_attention_layernorm(h))


class Inner(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class SelfDraft:
    """The frozen model's own layers with fp16 weights (``Transformer.prepare_self_draft``): a
    cheaper copy of the model that drafts for it, one token per step (self-drafting). Not a module:
    derived from the frozen weights, never trained or saved."""

    attns: list[Attention]  # shallow copies of the frozen projections whose q/k/v and o are fp16
    mlps: list[DraftMLP]
    head: Any  # Fp16Linear over the LM head


class Transformer(nn.Module):
    """The frozen causal LM (the AR view). State dict names match Hugging Face's ``*ForCausalLM``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Inner(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # a plain attribute, not a buffer: .to(dtype) must not round it (see _apply)
        self.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim)
        self.head: InferenceLinear | None = None  # set by prepare_inference
        # draft-only int8 copies of the MLPs and the LM head (set by prepare_draft)
        self.draft_mlps: list[DraftMLP] | None = None
        self.draft_head: Int8Linear | None = None
        self.self_draft: SelfDraft | None = None  # set by prepare_self_draft

    def __getstate__(self) -> dict:  # as Attention's: copies leave the packed LM head behind
        state = self.__dict__.copy()
        state["head"] = state["draft_mlps"] = state["draft_head"] = state["self_draft"] = None
        return state

    def _apply(self, fn, recurse=True):  # noqa: ANN001
        # .to(dtype) would round the rope frequencies; keep them float32 on the model's device
        # (a meta-device model, as built by the loader, gets real ones on its first move).
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config.rope, self.config.head_dim).to(self.lm_head.weight.device)
        return self

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A zeroed static cache for ``batch_size`` rows of up to ``max_len`` positions."""
        c = self.config
        return KVCache.empty(c.num_layers, batch_size, c.num_kv_heads, max_len, c.head_dim,
                             dtype=self.dtype, device=self.device)

    def prepare_inference(self, pack: bool | None = None, min_rows: int | None = None,
                          mkl_rows: int | None = None, tiled_rows: int | None = None) -> None:
        """Prepacked weights for decoding (fp32 on a CPU; see :class:`InferenceLinear`): q/k/v and
        gate/up as one GEMM each, the LM head packed. The parameters keep their Hugging Face names for parity and saving;
        training never calls this (no gradient flows through a packed GEMM).

        Args:
            pack: prepack (None: when the model is fp32 on a CPU and oneDNN packing exists). Without
                packing the projections stay separate GEMMs (no second copy of the weights).
            min_rows: passes of fewer rows keep the plain kernel. None: ``PACKED_MIN_ROWS`` when
                ``pack`` is given, else measured (:meth:`cached_kernel_choice`: once per CPU,
                thread count and model shape, 1-4 s for the default model): which kernel wins for
                few rows depends on the CPU.
            mkl_rows: also pack the layers for MKL's GEMM for passes of exactly this many rows (see
                :meth:`pack_mkl`; 0: no). None: 0 when ``pack`` is given, else measured with the
                crossover (``MKL_ROWS`` rows, kept where it wins by ``MKL_MARGIN``).
            tiled_rows: also pack every GEMM, the LM head too, for our row-invariant kernel
                (:mod:`orthrus.models.tiled`), which then serves every pass of at most this many
                rows (0: no). None: 0 when ``pack`` is given, else measured after the MKL choice
                (:meth:`measure_tiled`). MKL packs for a row count it serves are not made, and
                where it serves, oneDNN's packs are dropped (longer passes take the plain kernel).
        """
        auto = pack is None
        if pack is None:
            pack = self.device.type == "cpu" and self.dtype == torch.float32 and packing_available()
        for layer in self.model.layers:
            layer.self_attn.prepare_inference(pack)
            layer.mlp.prepare_inference(pack)
        self.head = inference_linear([self.lm_head], pack)
        if not pack:
            return
        if auto and (min_rows is None or mkl_rows is None or tiled_rows is None):
            measured, mkl, tl = self.cached_kernel_choice()
            min_rows = measured if min_rows is None else min_rows
            mkl_rows = mkl if mkl_rows is None else mkl_rows
            # a cached choice outlives the kernel (ORTHRUS_TILED=off, no compiler any more): vendor kernels
            tiled_rows = (tl if tiled.available() else 0) if tiled_rows is None else tiled_rows
        self._set_packed_min_rows(min_rows if min_rows is not None else PACKED_MIN_ROWS)
        tiled_rows = tiled_rows or 0
        # MKL packs serve their row count only where the tiled kernel does not (no idle copy)
        self.pack_mkl(mkl_rows if mkl_rows and mkl_rows > tiled_rows else 0)
        self.pack_tiled(tiled_rows)
        if tiled_rows:
            # longer passes (prefill) take the plain kernel: within 2-5% of oneDNN's packs at 256-512
            # rows on our Xeon, and their copy of the weights (+1x the model) is not kept
            for lin in self._inference_linears():
                lin.packed = None

    def _inference_linears(self) -> list[InferenceLinear]:
        out = [self.head] if self.head is not None else []
        for layer in self.model.layers:
            out += [x for x in (layer.self_attn.qkv, layer.self_attn.o, layer.mlp.gate_up, layer.mlp.down)
                    if x is not None]
        return out

    def pack_mkl(self, rows: int) -> None:
        """MKL packs of the layers' GEMMs (not the LM head, which it did not speed up) for passes
        of exactly ``rows`` rows (0: none); see :meth:`InferenceLinear.pack_mkl`. After
        :meth:`prepare_inference` with packing."""
        if rows and not mkl_packing_available():
            raise ValueError("MKL packing needs a torch built with MKL (an x86 CPU build)")
        for lin in self._layer_linears():
            lin.pack_mkl(rows)

    def pack_tiled(self, rows: int) -> None:
        """Panels of every GEMM, the LM head too, for our row-invariant kernel, which then serves
        every pass of at most ``rows`` rows (0: none); see :meth:`InferenceLinear.pack_tiled`.
        After :meth:`prepare_inference` with packing."""
        if rows and not tiled.available():
            raise ValueError("the tiled GEMM kernel is not available here (an x86 CPU with AVX2 and FMA, "
                             "a C compiler, ORTHRUS_TILED not off)")
        for lin in self._inference_linears():
            lin.pack_tiled(rows)

    def gemm_kernels(self) -> dict[str, int | None]:
        """Which GEMM kernel serves which passes, for reports: the tiled kernel up to ``tiled_rows``
        rows, MKL's packs for exactly ``mkl_rows``, oneDNN's packs from ``packed_min_rows`` (None:
        not prepacked), the plain kernel for the rest."""
        return {"tiled_rows": self.tiled_rows, "mkl_rows": self.mkl_rows, "packed_min_rows": self.packed_min_rows}

    def own_attention(self, rows: int) -> bool:
        """Whether a pass of ``rows`` query rows per sequence attends through our kernel
        (:func:`orthrus.models.tiled.attention`): where the tiled GEMMs serve such passes (their
        measurement, :meth:`measure_tiled`, times the two together), up to
        :func:`~orthrus.models.tiled.attention_rows`, on heads the kernel takes."""
        limit = self.head.tiled_rows if self.head is not None else 0
        c = self.config
        return (0 < rows <= min(limit, tiled.attention_rows()) and self.device.type == "cpu"
                and tiled.attention_takes(c.head_dim, c.num_heads, c.num_kv_heads, self.dtype))

    @property
    def tiled_rows(self) -> int:
        """Passes of at most this many rows run our row-invariant kernel (0: none)."""
        lins = self._inference_linears()
        return lins[0].tiled_rows if lins else 0

    def _layer_linears(self) -> list[InferenceLinear]:
        """:meth:`_inference_linears` without the LM head."""
        return [lin for lin in self._inference_linears() if lin is not self.head]

    @property
    def mkl_rows(self) -> int:
        """The row count the layers' MKL packs serve (0: none)."""
        lins = self._layer_linears()
        return lins[0].mkl_rows if lins else 0

    def _set_packed_min_rows(self, n: int) -> None:
        for lin in self._inference_linears():
            lin.min_rows = n

    @property
    def packed_min_rows(self) -> int | None:
        """Passes of at least this many rows use the prepacked kernel (None: not prepacked)."""
        lins = self._inference_linears()
        return lins[0].min_rows if lins and lins[0].packed is not None else None

    def cached_kernel_choice(self, path: str | None = None) -> tuple[int, int, int]:
        """``(min_rows, mkl_rows, tiled_rows)``: :meth:`measure_packed_min_rows`, then
        :meth:`measure_mkl` for ``MKL_ROWS`` rows, then :meth:`measure_tiled`, kept on disk
        (``$ORTHRUS_CACHE/crossover.json``, or ``path``) under this CPU's name and instruction set,
        the thread count, the torch version, the dtype and the model's shape: each later start of the same setup reads it instead of spending seconds
        timing passes. Delete the file (or an entry) to measure again.

        A choice timed while other work kept more than ``BUSY_CORES`` of the cores it runs on
        busy (the 1-minute load average, :func:`busy_cores`) serves this process only and is not
        kept: it measured the other work, and a cached answer would outlive it."""
        from pathlib import Path

        from orthrus.models.loading import cache_root, read_cache_entries, write_cache_entries
        from orthrus.models.quant import cpu_name

        c = self.config
        key = "|".join(str(x) for x in (
            cpu_name(), torch.backends.cpu.get_cpu_capability(), f"threads={torch.get_num_threads()}",
            f"torch={torch.__version__}", self.dtype, c.hidden_size, c.intermediate_size, c.num_layers,
            c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size))
        file = Path(path) if path is not None else cache_root() / CROSSOVER_CACHE
        entries = read_cache_entries(file)
        hit = entries.get(key)
        if (isinstance(hit, dict) and all(isinstance(hit.get(f), int) and hit[f] >= low for f, low in
                                          (("min_rows", 1), ("mkl_rows", 0), ("tiled_rows", 0)))):
            return hit["min_rows"], hit["mkl_rows"], hit["tiled_rows"]
        n = self.measure_packed_min_rows()
        self._set_packed_min_rows(n)
        mkl = MKL_ROWS if mkl_packing_available() and self.measure_mkl(MKL_ROWS) else 0
        tl = TILED_ROWS if tiled.available() and self.measure_tiled(TILED_ROWS) else 0
        busy = busy_cores(torch.get_num_threads())
        if busy > BUSY_CORES:
            log.info("the CPU was busy while timing (%.1f of %d cores, 1-minute load average): this "
                     "kernel choice serves this process only and is not cached", busy, torch.get_num_threads())
            return n, mkl, tl
        entries[key] = {"min_rows": n, "mkl_rows": mkl, "tiled_rows": tl, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "busy_cores": round(busy, 2)}
        write_cache_entries(file, entries, "the measured GEMM kernel choice")
        return n, mkl, tl

    @torch.inference_mode()
    def measure_tiled(self, rows: int, rounds: int = 3) -> bool:
        """Whether our row-invariant kernel (:meth:`pack_tiled` for passes of at most ``rows``
        rows) is at least as fast as the kernels chosen before it, over a 1-row AR pass plus a
        ``MKL_ROWS``-row verify pass (each with the LM head, 64-token context; the sum is what a
        decoding cycle pays), interleaved, median of ``rounds`` after a warm-up. The panels are
        made once and kept only where they win. Needs :meth:`prepare_inference` with packing."""
        cache = self.new_cache(1, 64 + MKL_ROWS)
        self.pack_tiled(rows)
        lins = self._inference_linears()
        seconds: dict[int, list[float]] = {}
        for r in range(rounds + 1):
            for limit in ((rows, 0) if r % 2 else (0, rows)):
                for lin in lins:  # 0 rows: the panels sit unused
                    lin.tiled_rows = limit
                total = 0.0
                for n in (1, MKL_ROWS):
                    tokens = torch.zeros(1, n, dtype=torch.long, device=self.device)
                    positions = (64 + torch.arange(n, device=self.device))[None]
                    t = time.perf_counter()
                    self.logits(self(tokens, positions, cache, kv_len=64 + n))
                    total += time.perf_counter() - t
                if r:  # round 0 warms up
                    seconds.setdefault(limit, []).append(total)
        med = {k: sorted(v)[len(v) // 2] for k, v in seconds.items()}
        wins = med[rows] <= med[0]
        self.pack_tiled(rows if wins else 0)
        log.info("tiled GEMMs for passes of up to %d rows: 1 + %d rows %.1f ms, other kernels %.1f ms: %s",
                 rows, MKL_ROWS, 1000 * med[rows], 1000 * med[0], "kept" if wins else "not kept")
        return wins

    @torch.inference_mode()
    def measure_mkl(self, rows: int, rounds: int = 3) -> bool:
        """Whether MKL packs of the layers (:meth:`pack_mkl`) make whole AR passes of ``rows`` rows
        with the LM head (64-token context) at least ``MKL_MARGIN`` faster than the kernels the
        crossover chose, both interleaved, median of ``rounds`` after a warm-up. The packs are
        made once, and kept only where they win; needs :meth:`prepare_inference` with packing."""
        cache = self.new_cache(1, 64 + rows)
        tokens = torch.zeros(1, rows, dtype=torch.long, device=self.device)
        positions = (64 + torch.arange(rows, device=self.device))[None]
        self.pack_mkl(rows)
        layer_linears = self._layer_linears()
        seconds: dict[int, list[float]] = {}
        for r in range(rounds + 1):
            for mkl in ((rows, 0) if r % 2 else (0, rows)):
                for lin in layer_linears:  # 0: no pass has 0 rows, so the packs sit unused
                    lin.mkl_rows = mkl
                t = time.perf_counter()
                self.logits(self(tokens, positions, cache, kv_len=64 + rows))
                if r:  # round 0 warms up
                    seconds.setdefault(mkl, []).append(time.perf_counter() - t)
        med = {k: sorted(v)[len(v) // 2] for k, v in seconds.items()}
        wins = med[rows] <= (1 - MKL_MARGIN) * med[0]
        for lin in layer_linears:
            lin.mkl_rows = rows
        self.pack_mkl(rows if wins else 0)  # kept packs are not made again by prepare_inference
        log.info("MKL packs for %d-row passes: %.1f ms, other kernels %.1f ms: %s", rows, 1000 * med[rows],
                 1000 * med[0], "kept" if wins else "not kept")
        return wins

    @torch.inference_mode()
    def measure_packed_min_rows(self, rounds: int = 3) -> int:
        """The smallest row count of ``CROSSOVER_ROWS`` from which the prepacked kernel is at least as
        fast as the plain one for every larger count tried (``NEVER_PACKED`` if it never is):
        whole AR passes with the LM head at a 64-token context, both kernels interleaved, median of
        ``rounds`` after a warm-up, at the current thread count. Needs :meth:`prepare_inference`
        with packing."""
        cache = self.new_cache(1, 64 + max(CROSSOVER_ROWS))
        seconds: dict[tuple[int, int], list[float]] = {}
        for r in range(rounds + 1):
            for rows in CROSSOVER_ROWS:
                tokens = torch.zeros(1, rows, dtype=torch.long, device=self.device)
                positions = (64 + torch.arange(rows, device=self.device))[None]
                for n in (1, NEVER_PACKED):
                    self._set_packed_min_rows(n)
                    t = time.perf_counter()
                    self.logits(self(tokens, positions, cache, kv_len=64 + rows))
                    if r:  # round 0 warms up
                        seconds.setdefault((rows, n), []).append(time.perf_counter() - t)
        med = {key: sorted(v)[len(v) // 2] for key, v in seconds.items()}
        best = packed_crossover({rows: (med[(rows, 1)], med[(rows, NEVER_PACKED)]) for rows in CROSSOVER_ROWS})
        log.info("prepacked GEMMs from %s rows on (ms, packed / plain: %s)",
                 best if best != NEVER_PACKED else "no number of", ", ".join(
                     f"{rows} rows {1000 * med[(rows, 1)]:.1f} / {1000 * med[(rows, NEVER_PACKED)]:.1f}"
                     for rows in CROSSOVER_ROWS))
        return best

    def prepare_draft(self) -> None:
        """Draft-only int8 copies of the MLPs and the LM head (a CPU with fbgemm; see
        ``orthrus.models.quant``): draft passes (``run_layers(..., mlps=self.draft_mlps)``,
        :meth:`draft_logits`) stream a quarter of the bytes. Verify and AR passes never use them,
        so outputs stay exact. Memory: +1/4 of the fp32 model."""
        if not int8_available() or self.device.type != "cpu":
            raise ValueError("int8 draft weights need a CPU build of torch with fbgemm")
        self.draft_mlps = [DraftMLP(layer.mlp) for layer in self.model.layers]
        self.draft_head = int8_linear([self.lm_head])

    def prepare_self_draft(self) -> None:
        """An fp16-weight copy of the whole model (fbgemm; a CPU) that drafts for it token by token
        (:meth:`self_draft_step`): each step streams half the bytes of an fp32 step, and its
        greedy tokens almost always equal the fp32 model's. Verify passes never use it, so outputs
        stay exact. Memory: +1/2 of the fp32 model. Idempotent."""
        if self.self_draft is not None:
            return
        # our tiled kernel with float16 panels where this CPU kept it for the model (it measured
        # faster here), else fbgemm's fp16 GEMM: the same arithmetic either way
        use_tiled = self.tiled_rows > 0
        if not (fp16_available() or use_tiled) or self.device.type != "cpu" or self.dtype != torch.float32:
            raise ValueError("self-drafting needs a float32 model on a CPU and a torch with fbgemm (x86) "
                             "or our tiled kernel")
        make = functools.partial(fp16_linear, tiled=use_tiled)
        attns = []
        for layer in self.model.layers:
            a = copy.copy(layer.self_attn)  # shares the parameters; only qkv / o are replaced
            a.qkv = make([a.q_proj, a.k_proj, a.v_proj])
            a.o = make([a.o_proj])
            attns.append(a)
        self.self_draft = SelfDraft(attns, [DraftMLP(layer.mlp, make) for layer in self.model.layers],
                                    make([self.lm_head]))

    def self_draft_step(self, tokens: Tensor, positions: Tensor, cache: KVCache, kv_len: int) -> Tensor:
        """One self-draft step (after :meth:`prepare_self_draft`): the fp16 copy reads ``tokens
        [B, 1]`` at ``positions [B, 1]``, writes their K/V there (slots that the verify pass of the
        same cycle overwrites) and attends causally; returns the draft logits ``[B, 1, V]``."""
        sd = self.self_draft
        assert sd is not None, "call prepare_self_draft first"
        mask = causal_mask(positions, kv_len)
        h = self.run_layers(self.model.embed_tokens(tokens), positions, sd.attns,
                            cached_attend(cache, positions, kv_len, mask, self.own_attention(1)), sd.mlps)
        return sd.head(h)[0]

    def release_inference(self) -> None:
        """Undo :meth:`prepare_inference`, :meth:`prepare_draft` and :meth:`prepare_self_draft`:
        the plain per-projection GEMMs again (packed, int8 and fp16 copies freed)."""
        for layer in self.model.layers:
            layer.self_attn.qkv = layer.self_attn.o = None
            layer.mlp.gate_up = layer.mlp.down = None
        self.head = self.draft_head = self.draft_mlps = self.self_draft = None

    @property
    def prepared(self) -> bool:
        """Whether :meth:`prepare_inference` is in effect."""
        return self.head is not None

    def forward(self, tokens: Tensor, positions: Tensor, cache: KVCache, kv_len: int | None = None,
                mask: Tensor | None = None, slots: Tensor | None = None) -> Tensor:
        """AR forward: write K/V of ``tokens`` at ``positions`` and attend causally over the cache.

        Args:
            tokens: ``[B, T]`` token ids.
            positions: ``[B, T]`` absolute positions (each row its own); K/V go to those slots.
            cache: static cache with ``B`` rows (a batch-slice view of a bigger cache is fine).
            kv_len: attend over slots ``[0, kv_len)`` only (must exceed every position); None: all.
                The decoder passes a tight bound on CPU and the full capacity under CUDA graphs.
            mask, slots: a tree verify pass (:mod:`orthrus.decoding.tree`): its own mask
                ``[B, 1, T, kv_len]`` (bool) and the cache slots ``[B, T]`` its K/V go to, which
                differ from the rope ``positions``; None: causal, at ``positions``.
        Returns:
            Final-normed hidden states ``[B, T, C]``; apply :meth:`logits` where needed.
        """
        kv_len = cache.capacity if kv_len is None else kv_len
        mask = causal_mask(positions, kv_len) if mask is None else mask  # [B, 1, T, S]
        return self.run_layers(self.model.embed_tokens(tokens), positions, [l.self_attn for l in self.model.layers],
                               cached_attend(cache, positions if slots is None else slots, kv_len, mask,
                                             self.own_attention(tokens.shape[1])))

    def run_layers(self, h: Tensor, positions: Tensor, attns: list[Attention],
                   attend: Callable[[int, Tensor, Tensor, Tensor], Tensor],
                   mlps: list[Callable[[Tensor], Tensor]] | None = None) -> Tensor:
        """The one layer loop of every pass (AR, verify, draft, training blocks).

        A pass differs only in whose attention projections it uses (``attns``: the frozen model's or
        the diffusion view's) and in ``attend(layer, q, k, v) -> [B, H, T, D]``, which decides what q
        sees (and whether k/v are written to the cache). Norms, MLPs and the final norm are shared
        (``mlps``: a draft pass may run draft-only int8 copies of the MLPs, :meth:`prepare_draft`).

        Args:
            h: ``[B, T, C]`` input embeddings; positions: ``[B, T]`` absolute positions (rope).
        Returns:
            Final-normed hidden states ``[B, T, C]``.
        """
        cos, sin = rope_cos_sin(positions, self.inv_freq, h.dtype)
        for i, (layer, attn) in enumerate(zip(self.model.layers, attns)):
            q, k, v = attn.project(layer.input_layernorm(h), cos, sin)
            h = layer.ffn(h + attn.out(attend(i, q, k, v)), mlps[i] if mlps is not None else None)
        return self.model.norm(h)

    def logits(self, hidden: Tensor) -> Tensor:
        """``[..., C] -> [..., V]`` (the LM head; float32 out for stable sampling)."""
        if self.head is not None:
            return self.head(hidden)[0].float()
        return self.lm_head(hidden).float()

    def draft_logits(self, hidden: Tensor) -> Tensor:
        """A draft pass's logits ``[..., C] -> [..., V]``: the int8 LM head after
        :meth:`prepare_draft`, else :meth:`logits`."""
        if self.draft_head is not None:
            return self.draft_head(hidden)[0]
        return self.logits(hidden)
