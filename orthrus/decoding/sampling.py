"""Per-row logit processing and counter-based sampling for the decoding hot path.

Everything here is vectorised over the batch and token dimensions with static
shapes and no host synchronisation, so a decoding cycle can be captured in a
CUDA graph. Randomness comes from a stateless hash of (seed, absolute position,
stream) rather than from a ``torch.Generator``: a row's random numbers then
depend only on its own seed and on where its tokens sit in the sequence, never
on which other requests share the batch or on how many cycles have run. A
seeded request therefore produces the same text alone or batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Stream ids keep the random numbers used for different purposes at the same
# position independent of each other.
STREAM_DRAFT = 1  # sampling the drafter's proposals
STREAM_ACCEPT = 2  # the accept/reject coin of each draft token
STREAM_RESIDUAL = 3  # sampling the correction token after a rejection
STREAM_BONUS = 4  # sampling the bonus token after all drafts were accepted

_M32 = 0xFFFFFFFF


def process_logits(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    *,
    use_filters: bool = True,
) -> Tensor:
    """Turn logits into per-row sampling distributions.

    Args:
        logits: ``[B, T, V]`` (any float dtype; any number of middle dims works).
        temperature: ``[B]`` float. ``<= 0`` means greedy: the row becomes a
            one-hot vector at ``torch.argmax`` of the raw logits (first index on ties).
        top_k: ``[B]`` int64, ``0`` = off. Keeps the k largest logits; ties at the
            boundary are broken by index (stable sort).
        top_p: ``[B]`` float, ``>= 1`` = off. Keeps the smallest set of most
            probable tokens whose mass reaches ``top_p`` (at least one token),
            computed on the distribution left after top-k.
        use_filters: the caller knows on the host whether any row uses top-k or
            top-p; if none does, pass False to skip the ``O(V log V)`` sort.

    Returns:
        ``[B, T, V]`` float32 probabilities; each row sums to 1.
    """
    logits = logits.float()
    V = logits.shape[-1]
    bshape = (-1,) + (1,) * (logits.dim() - 1)  # broadcast [B] over [B, T, V]
    greedy = (temperature <= 0).view(bshape)
    # Greedy rows still go through the softmax with temperature 1 (the result is
    # discarded by the final where); this keeps one code path with static shapes.
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits / temp.float().view(bshape)

    if use_filters:
        # Stable descending sort: equal logits keep index order, so boundary ties
        # are resolved deterministically and identically on every device.
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
        rank = torch.arange(V, device=logits.device)
        k = torch.where(top_k > 0, top_k, V).view(bshape)
        sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Keep token j while the mass strictly before it is still below top_p:
        # this is exactly the minimal nucleus, and rank 0 is always kept.
        mass_before = F.pad(sorted_probs.cumsum(-1)[..., :-1], (1, 0))
        p = top_p.float().view(bshape)
        drop = (mass_before >= p) & (rank > 0) & (p < 1)  # p >= 1: off, immune to rounding
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        sorted_probs = sorted_probs / sorted_probs.sum(-1, keepdim=True)
        probs = torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)
    else:
        probs = torch.softmax(scaled, dim=-1)

    # scatter_ instead of F.one_hot: one_hot validates indices with a host sync on CPU.
    one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy, one_hot, probs)


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` without int64 overflow.

    Splitting the constant into 16-bit halves keeps every product below 2**48,
    so the result does not rely on signed-overflow wrapping of any backend.
    """
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _rotl32(x: Tensor, r: int) -> Tensor:
    return ((x << r) | (x >> (32 - r))) & _M32


def _hash32(words: tuple[Tensor, ...], seed: int) -> Tensor:
    """MurmurHash3 (x86, 32-bit) of a sequence of 32-bit words held in int64."""
    h = torch.full_like(words[0], seed & _M32)
    for k in words:  # a fixed handful of words, not tokens
        k = _mul32(_rotl32(_mul32(k, 0xCC9E2D51), 15), 0x1B873593)
        h = (_rotl32(h ^ k, 13) * 5 + 0xE6546B64) & _M32
    h = h ^ (4 * len(words))
    # Final avalanche so that neighbouring counters give unrelated outputs.
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _bits_to_unit(h: Tensor) -> Tensor:
    """Map a 32-bit hash to float32 in the open interval (0, 1).

    Uses the top 23 bits: ``(x + 0.5) / 2**23`` is exact in float32 and lies in
    ``[2**-24, 1 - 2**-24]``. With 24 bits the largest value ``1 - 2**-25`` is
    not representable in float32 and would round to exactly 1.0.
    """
    return ((h >> 9).float() + 0.5) * (2.0**-23)


def uniform(seeds: Tensor, positions: Tensor, stream: int) -> Tensor:
    """Stateless uniform random numbers keyed by (seed, absolute position, stream).

    Args:
        seeds: ``[B]`` int64, one seed per request (all 64 bits are used).
        positions: ``[B, T]`` int64 absolute token positions.
        stream: one of the ``STREAM_*`` constants.

    Returns:
        ``[B, T]`` float32 in the open interval (0, 1).
    """
    s = seeds.view(-1, *([1] * (positions.dim() - 1))).expand_as(positions)
    # Arithmetic >> then masking yields the raw high word, also for negative values.
    words = (s & _M32, (s >> 32) & _M32, positions & _M32, (positions >> 32) & _M32)
    return _bits_to_unit(_hash32(words, stream))


def sample(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling with given uniforms.

    Args:
        probs: ``[B, T, V]`` non-negative weights (need not be normalised).
        u: ``[B, T]`` uniforms in (0, 1).

    Returns:
        ``[B, T]`` int64 tokens. A token of zero weight is never returned (for a
        row with positive total mass); a one-hot at ``i`` returns ``i`` for all u.
    """
    V = probs.shape[-1]
    cdf = probs.float().cumsum(-1)
    # A parallel (GPU) cumsum need not be monotone nor flat across zero-weight
    # entries. Giving zero-weight entries the previous value via an (exact)
    # running max makes the searched sequence sorted and makes every zero-weight
    # token an empty interval, so it cannot be hit; leading zeros get -1.
    cdf = torch.where(probs > 0, cdf, -1.0).cummax(-1).values
    total = cdf[..., -1:]
    # u < 1 ensures u * total <= total, so an index < V is always found; the
    # clamp only guards degenerate rows (zero or NaN mass).
    target = (u.unsqueeze(-1) * total).contiguous()
    token = torch.searchsorted(cdf.contiguous(), target, right=False)
    return token.squeeze(-1).clamp_(max=V - 1)
