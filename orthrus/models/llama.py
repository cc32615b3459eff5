"""The frozen base model: one compact module for the Llama family (llama, qwen2, qwen3, mistral).

Reads top to bottom: norm, rope, attention projections, attention kernels, MLP, block, model.
The model computes and nothing else: no sampling, no Python state, no flags. Every forward takes
explicit absolute ``positions`` per row and reads/writes a static :class:`~orthrus.cache.KVCache`,
so batches of uneven prompts, verify passes that write K tokens, and rollback by moving a length all
use the same code. Parity with transformers is a test (tests/test_parity.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orthrus.cache import KVCache
from orthrus.config import ModelConfig, RopeConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as the reference implementations do."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
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


class Attention(nn.Module):
    """The attention *projections* of one layer (q/k/v/o and, for qwen3, q/k norms).

    The kernels that combine q with cached keys live in free functions below, so that the diffusion
    view can reuse this class for its own projections and only change what q attends to.
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

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B, T, C]`` -> q ``[B, H, T, D]``, k and v ``[B, Hkv, T, D]`` (rope applied)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, y: Tensor) -> Tensor:
        """``y [B, H, T, D]`` -> ``[B, T, C]``."""
        b, _, t, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


def causal_mask(positions: Tensor, kv_len: int, sliding_window: int | None = None) -> Tensor:
    """Boolean mask ``[B, 1, T, kv_len]``: query at absolute position p sees cache slot j iff j <= p.

    Slots beyond a row's own tokens are never seen, so stale K/V (padding, rejected drafts) is dead.
    """
    j = torch.arange(kv_len, device=positions.device)
    p = positions[:, None, :, None]  # [B, 1, T, 1]
    mask = j <= p
    if sliding_window is not None:
        mask = mask & (j > p - sliding_window)
    return mask


def cached_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """SDPA of ``q [B, H, T, D]`` over cache slots ``k, v [B, Hkv, S, D]`` with ``mask [B, 1, T, S]``."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def joint_attention(
    q: Tensor, k1: Tensor, v1: Tensor, m1: Tensor, k2: Tensor, v2: Tensor, m2: Tensor | None
) -> Tensor:
    """Attention over two key sets with one softmax, without concatenating (copying) the keys.

    Used by the diffusion view: set 1 is the shared AR cache, set 2 the block's own K/V.

    Args:
        q: ``[B, H, T, D]``.
        k1, v1: ``[B, Hkv, S, D]`` (a view of the cache, not copied); m1: ``[B, 1, T|1, S]`` bool.
        k2, v2: ``[B, Hkv, T2, D]``; m2: ``[B|1, 1, T, T2]`` bool or None (all visible).
    Returns:
        ``[B, H, T, D]``.
    """
    b, h, t, d = q.shape
    hkv = k1.shape[1]
    g = h // hkv
    qg = q.reshape(b, hkv, g * t, d) * (1.0 / math.sqrt(d))  # heads h = kv * g + i share kv
    s1 = (qg @ k1.transpose(-1, -2)).view(b, hkv, g, t, -1)  # [B, Hkv, G, T, S]
    s2 = (qg @ k2.transpose(-1, -2)).view(b, hkv, g, t, -1)  # [B, Hkv, G, T, T2]
    s1 = s1.float().masked_fill(~m1[:, :, None], float("-inf"))
    s2 = s2.float()
    if m2 is not None:
        s2 = s2.masked_fill(~m2[:, :, None], float("-inf"))
    p = torch.softmax(torch.cat((s1, s2), dim=-1), dim=-1).to(q.dtype)
    n1 = k1.shape[2]
    p1 = p[..., :n1].reshape(b, hkv, g * t, n1)
    p2 = p[..., n1:].reshape(b, hkv, g * t, -1)
    return (p1 @ v1 + p2 @ v2).view(b, h, t, d)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(c, f, bias=bias)
        self.up_proj = nn.Linear(c, f, bias=bias)
        self.down_proj = nn.Linear(f, c, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One decoder layer; names follow the Hugging Face state dict."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def ffn(self, h: Tensor) -> Tensor:
        """The residual MLP half of the layer, shared by both views: ``[B, T, C] -> [B, T, C]``."""
        return h + self.mlp(self.post_attention_layernorm(h))


class Inner(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


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

    def forward(self, tokens: Tensor, positions: Tensor, cache: KVCache, kv_len: int | None = None) -> Tensor:
        """AR forward: write K/V of ``tokens`` at ``positions`` and attend causally over the cache.

        Args:
            tokens: ``[B, T]`` token ids.
            positions: ``[B, T]`` absolute positions (each row its own); K/V go to those slots.
            cache: static cache with ``B`` rows (a batch-slice view of a bigger cache is fine).
            kv_len: attend over slots ``[0, kv_len)`` only (must exceed every position); None: all.
                The decoder passes a tight bound on CPU and the full capacity under CUDA graphs.
        Returns:
            Final-normed hidden states ``[B, T, C]``; apply :meth:`logits` where needed.
        """
        kv_len = cache.capacity if kv_len is None else kv_len
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.dtype)
        mask = causal_mask(positions, kv_len, self.config.sliding_window)  # [B, 1, T, S]
        h = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(h), cos, sin)
            cache.write(i, positions, k, v)
            kc, vc = cache.layer(i, kv_len)
            h = layer.ffn(h + attn.out(cached_attention(q, kc, vc, mask)))
        return self.model.norm(h)

    def logits(self, hidden: Tensor) -> Tensor:
        """``[..., C] -> [..., V]`` (the LM head; float32 out for stable sampling)."""
        return self.lm_head(hidden).float()
