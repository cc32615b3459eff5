"""Tests for orthrus.decoding.sampling (CPU, deterministic)."""

from __future__ import annotations

import struct

import torch

from orthrus.decoding.sampling import (
    STREAM_ACCEPT,
    STREAM_BONUS,
    STREAM_DRAFT,
    STREAM_RESIDUAL,
    _bits_to_unit,
    process_logits,
    sample,
    uniform,
)
from chi2 import chi2_critical  # tests/chi2.py: alpha = 1e-4 per test





def params(B: int, temperature=1.0, top_k=0, top_p=1.0):
    return (
        torch.full((B,), float(temperature)),
        torch.full((B,), int(top_k), dtype=torch.int64),
        torch.full((B,), float(top_p)),
    )


# ---------------------------------------------------------------- process_logits


def test_greedy_is_one_hot_at_argmax_with_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (16, 4, 10), generator=g).float()  # many ties
    for t in (0.0, -1.0):
        probs = process_logits(logits, *params(16, temperature=t, top_k=2, top_p=0.5))
        expected = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        assert torch.equal(probs, expected)
    probs = process_logits(torch.tensor([[[1.0, 3.0, 3.0, 0.0]]]), *params(1, 0.0), use_filters=False)
    assert probs.tolist() == [[[0.0, 1.0, 0.0, 0.0]]]


def test_plain_softmax_and_dtype():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 2, 50, generator=g).bfloat16()
    temp, k, p = params(3, temperature=0.7)
    ref = torch.softmax(logits.float() / 0.7, -1)
    for use_filters in (True, False):
        probs = process_logits(logits, temp, k, p, use_filters=use_filters)
        assert probs.dtype == torch.float32 and probs.shape == (3, 2, 50)
        torch.testing.assert_close(probs, ref)


def test_top_k_keeps_exactly_k():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 3, 40, generator=g)
    for k in (1, 3, 17, 40, 100):
        probs = process_logits(logits, *params(8, temperature=1.3, top_k=k))
        kk = min(k, 40)
        assert ((probs > 0).sum(-1) == kk).all()
        top = logits.topk(kk, -1).indices
        assert (probs.gather(-1, top) > 0).all()
        ref = torch.softmax(logits.gather(-1, top) / 1.3, -1)
        torch.testing.assert_close(probs.gather(-1, top), ref)
        torch.testing.assert_close(probs.sum(-1), torch.ones(8, 3))


def test_top_k_boundary_ties_keep_lowest_index():
    logits = torch.tensor([[[2.0, 1.0, 1.0, 1.0, 0.0]]])
    probs = process_logits(logits, *params(1, top_k=2))
    assert (probs[0, 0] > 0).tolist() == [True, True, False, False, False]


def test_top_p_is_minimal_nucleus():
    g = torch.Generator().manual_seed(3)
    B, V = 64, 30
    logits = torch.randn(B, 1, V, generator=g) * 2
    top_p = torch.rand(B, generator=g) * 0.98 + 0.01
    temp = torch.full((B,), 0.9)
    probs = process_logits(logits, temp, torch.zeros(B, dtype=torch.int64), top_p)
    full = torch.softmax(logits.double() / 0.9, -1)[:, 0]
    for b in range(B):
        kept = probs[b, 0] > 0
        m = int(kept.sum())
        order = full[b].argsort(descending=True)
        assert kept[order[:m]].all()  # the kept set is the m most probable tokens
        cum = full[b][order].cumsum(0)
        assert cum[m - 1] >= top_p[b] - 1e-6  # reaches top_p ...
        assert m == 1 or cum[m - 2] < top_p[b] + 1e-6  # ... and is minimal
        torch.testing.assert_close(probs[b, 0, kept].double(), full[b, kept] / full[b, kept].sum())


def test_top_p_tiny_keeps_top_token_and_top_k_then_top_p():
    logits = torch.tensor([[[0.0, 3.0, 2.9, 1.0, 2.95]]])
    probs = process_logits(logits, *params(1, top_p=1e-9))
    assert (probs[0, 0] > 0).tolist() == [False, True, False, False, False]
    # top-k=2 leaves {1, 4} with masses ~0.51/0.49; top_p=0.5 then keeps just 1.
    probs = process_logits(logits, *params(1, top_k=2, top_p=0.5))
    assert (probs[0, 0] > 0).tolist() == [False, True, False, False, False]
    probs = process_logits(logits, *params(1, top_k=2, top_p=0.6))
    assert (probs[0, 0] > 0).tolist() == [False, True, False, False, True]


def test_rows_are_independent():
    g = torch.Generator().manual_seed(4)
    B, T, V = 6, 3, 25
    logits = torch.randn(B, T, V, generator=g)
    temp = torch.tensor([0.0, 1.0, 0.5, 1.2, 0.8, 2.0])
    top_k = torch.tensor([5, 0, 3, 0, 7, 1])
    top_p = torch.tensor([0.5, 1.0, 1.0, 0.7, 0.9, 1.0])
    probs = process_logits(logits, temp, top_k, top_p)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, T))
    for b in range(B):
        alone = process_logits(logits[b : b + 1], temp[b : b + 1], top_k[b : b + 1], top_p[b : b + 1])
        assert torch.equal(alone[0], probs[b])


# ---------------------------------------------------------------- uniform


def _murmur3_ref(data: bytes, seed: int) -> int:
    """Plain scalar MurmurHash3_x86_32, to check the vectorised version."""
    M = 0xFFFFFFFF
    rotl = lambda x, r: ((x << r) | (x >> (32 - r))) & M  # noqa: E731
    h = seed & M
    for (k,) in struct.iter_unpack("<I", data):
        k = rotl((k * 0xCC9E2D51) & M, 15) * 0x1B873593 & M
        h = (rotl(h ^ k, 13) * 5 + 0xE6546B64) & M
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M
    return h ^ (h >> 16)


def test_uniform_matches_scalar_reference():
    seeds = torch.tensor([0, 1, -1, 2**40 + 7, -(2**62)])
    positions = torch.tensor([[0, 5], [1, 2**31], [3, 4], [2**33 + 1, 9], [0, 1]])
    u = uniform(seeds, positions, STREAM_ACCEPT)
    for b in range(5):
        for t in range(2):
            data = struct.pack("<qq", int(seeds[b]), int(positions[b, t]))
            h = _murmur3_ref(data, STREAM_ACCEPT)
            assert u[b, t].item() == ((h >> 9) + 0.5) / 2**23


def test_unit_map_open_interval():
    ends = _bits_to_unit(torch.tensor([0, 2**32 - 1]))
    assert ends[0] > 0 and ends[1] < 1 and ends.dtype == torch.float32


def test_uniform_deterministic_and_batch_invariant():
    seeds = torch.tensor([11, 12, 13, 14])
    positions = torch.arange(40).view(4, 10) + 100
    u = uniform(seeds, positions, STREAM_DRAFT)
    assert u.shape == (4, 10) and u.dtype == torch.float32
    assert torch.equal(u, uniform(seeds.clone(), positions.clone(), STREAM_DRAFT))
    for b in range(4):
        assert torch.equal(uniform(seeds[b : b + 1], positions[b : b + 1], STREAM_DRAFT)[0], u[b])
    # Only absolute positions matter, not which slice of a cycle they sit in.
    assert torch.equal(uniform(seeds, positions[:, 3:5], STREAM_DRAFT), u[:, 3:5])


def test_uniform_differs_across_streams_positions_seeds():
    seeds = torch.arange(1000)
    pos = torch.arange(10).expand(1000, 10)
    base = uniform(seeds, pos, STREAM_DRAFT)
    others = [
        uniform(seeds, pos, STREAM_ACCEPT),
        uniform(seeds, pos, STREAM_RESIDUAL),
        uniform(seeds, pos, STREAM_BONUS),
        uniform(seeds, pos + 1, STREAM_DRAFT),
        uniform(seeds + 1000, pos, STREAM_DRAFT),
        uniform(seeds + 2**32, pos, STREAM_DRAFT),  # high seed bits matter
    ]
    for o in others:
        assert (o == base).float().mean() < 1e-3
        # Neighbouring counters must not be correlated (|r| < 5 sigma).
        r = torch.corrcoef(torch.stack([o.flatten(), base.flatten()]))[0, 1]
        assert abs(r) < 5 / 100


def test_uniform_distribution_ks():
    seeds = torch.arange(1000) * 7919 - 3
    pos = torch.arange(100).expand(1000, 100)
    u = uniform(seeds, pos, STREAM_RESIDUAL).flatten().double().sort().values
    assert (u > 0).all() and (u < 1).all()
    n = u.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - u, u - (i - 1) / n).max()
    # Kolmogorov-Smirnov: P(sqrt(n) * D > 1.95) ~= 1e-3 for uniform samples.
    assert d * n**0.5 < 1.95


# ---------------------------------------------------------------- sample


def _grid_u(n: int) -> torch.Tensor:
    return torch.cat([torch.tensor([2.0**-24, 1 - 2.0**-24]), (torch.arange(n) + 0.5) / n])


def test_sample_one_hot():
    V = 9
    u = _grid_u(500)
    for i in range(V):
        probs = torch.zeros(u.numel(), 1, V)
        probs[..., i] = 1.0
        assert (sample(probs, u[:, None]) == i).all()


def test_sample_never_returns_zero_probability():
    g = torch.Generator().manual_seed(5)
    V = 12
    probs = torch.rand(20, V, generator=g) * (torch.rand(20, V, generator=g) < 0.4)
    probs[:, 0] = 0.0  # leading zeros
    probs[:, -3:] = 0.0  # trailing zeros (e.g. after top-k)
    probs[:, 5] = 1e-30  # tiny but positive
    probs[probs.sum(-1) == 0, 4] = 1.0
    u = _grid_u(2000)
    tok = sample(probs[:, None].expand(20, u.numel(), V), u.expand(20, -1))
    assert (probs.gather(-1, tok) > 0).all()
    # The same holds for filtered distributions straight from process_logits.
    logits = torch.randn(20, u.numel(), 50, generator=g)
    p = process_logits(logits, *params(20, temperature=0.8, top_k=4, top_p=0.6))
    assert (p.gather(-1, sample(p, u.expand(20, -1))[..., None]) > 0).all()


def test_sample_matches_distribution_chi_square():
    probs = torch.tensor([0.05, 0.3, 0.0, 0.15, 0.4, 0.1])
    n = 200_000
    u = uniform(torch.arange(n), torch.zeros(n, 1, dtype=torch.int64), STREAM_DRAFT)
    tok = sample(probs.expand(n, 1, 6), u).flatten()
    counts = torch.bincount(tok, minlength=6).double()
    assert counts[2] == 0
    keep = probs > 0
    expected = probs[keep].double() * n
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    assert stat < chi2_critical(int(keep.sum()) - 1)


def test_sample_unnormalised_weights():
    u = _grid_u(1000)[:, None]
    w = torch.tensor([0.0, 3.0, 1.0]).expand(u.shape[0], 1, 3)
    tok = sample(w, u)
    assert ((tok == 1).float().mean() - 0.75).abs() < 0.01
    assert (tok != 0).all()
