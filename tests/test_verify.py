"""Tests for orthrus.decoding.verify (CPU, deterministic)."""

from __future__ import annotations

import pytest
import torch

from orthrus.decoding.sampling import (
    STREAM_ACCEPT,
    STREAM_BONUS,
    STREAM_DRAFT,
    STREAM_RESIDUAL,
    process_logits,
    sample,
    uniform,
)
from orthrus.decoding.verify import greedy_accept, rejection_accept
from chi2 import chi2_critical  # tests/chi2.py: alpha = 1e-4 per test





def logits_with_argmax(tokens: torch.Tensor, V: int) -> torch.Tensor:
    """[B, K] target tokens -> [B, K, V] random logits whose argmax is `tokens`."""
    g = torch.Generator().manual_seed(123)
    logits = torch.randn(*tokens.shape, V, generator=g)
    return logits.scatter(-1, tokens[..., None], 10.0)


def uniforms(seeds: torch.Tensor, start: torch.Tensor, K: int):
    """The per-cycle uniforms a generator would draw at absolute positions start + i."""
    pos = start[:, None] + torch.arange(K)
    return (
        uniform(seeds, pos[:, :-1], STREAM_ACCEPT),
        uniform(seeds, pos[:, -1:], STREAM_RESIDUAL)[:, 0],  # any fixed position works
        uniform(seeds, pos[:, -1:], STREAM_BONUS)[:, 0],
    )


# ---------------------------------------------------------------- greedy_accept


def test_greedy_accept_hand_made():
    V = 8
    target = torch.tensor(
        [
            [1, 2, 3, 4],  # all accepted -> bonus 4
            [1, 2, 3, 4],  # none accepted -> correction 1
            [1, 2, 3, 4],  # two accepted -> correction 3
            [5, 5, 5, 6],  # one accepted -> correction 5
        ]
    )
    drafts = torch.tensor([[1, 2, 3], [0, 2, 3], [1, 2, 7], [5, 0, 5]])
    n, nxt = greedy_accept(drafts, logits_with_argmax(target, V))
    assert n.tolist() == [3, 0, 2, 1]
    assert nxt.tolist() == [4, 1, 3, 5]
    assert n.dtype == nxt.dtype == torch.int64


def test_greedy_accept_k1():
    target = torch.tensor([[3], [0]])
    n, nxt = greedy_accept(torch.zeros(2, 0, dtype=torch.int64), logits_with_argmax(target, 5))
    assert n.tolist() == [0, 0] and nxt.tolist() == [3, 0]


def test_greedy_accept_tie_uses_first_index():
    logits = torch.tensor([[[0.0, 2.0, 2.0], [1.0, 1.0, 0.0]]])
    n, nxt = greedy_accept(torch.tensor([[1]]), logits)
    assert n.tolist() == [1] and nxt.tolist() == [0]
    n, nxt = greedy_accept(torch.tensor([[2]]), logits)
    assert n.tolist() == [0] and nxt.tolist() == [1]


# ---------------------------------------------------------------- rejection_accept


@pytest.mark.parametrize("K", [1, 2, 4, 6])
def test_rejection_with_one_hot_equals_greedy(K: int):
    g = torch.Generator().manual_seed(K)
    B, V = 512, 7
    target_logits = torch.randint(0, 4, (B, K, V), generator=g).float()  # ties included
    # Drafts that agree with the target for a random prefix, so all counts occur.
    draft_logits = target_logits[:, :-1].clone()
    flip = torch.rand(B, K - 1, generator=g) < 0.3
    draft_logits[flip] = torch.randn(int(flip.sum()), V, generator=g)
    greedy = torch.zeros(B)
    none_k, none_p = torch.zeros(B, dtype=torch.int64), torch.ones(B)
    p = process_logits(target_logits, greedy, none_k, none_p)
    q = process_logits(draft_logits, greedy, none_k, none_p)
    seeds = torch.arange(B) * 31 + 5
    drafts = sample(q, uniform(seeds, torch.arange(K - 1).expand(B, -1), STREAM_DRAFT))
    assert torch.equal(drafts, draft_logits.argmax(-1))
    u_acc, u_res, u_bon = uniforms(seeds, torch.zeros(B, dtype=torch.int64), K)
    n, nxt = rejection_accept(drafts, q, p, u_acc, u_res, u_bon)
    n_ref, nxt_ref = greedy_accept(drafts, target_logits)
    assert torch.equal(n, n_ref) and torch.equal(nxt, nxt_ref)
    if K > 2:
        assert len(set(n.tolist())) == K  # every acceptance count was exercised
    # Greedy target with a *sampled* (non-one-hot) drafter is still exact greedy,
    # even for drafts the drafter gives probability zero.
    q_soft = torch.softmax(torch.randn(B, K - 1, V, generator=g), -1)
    q_soft[:, :, 0] = 0.0
    n, nxt = rejection_accept(drafts, q_soft, p, u_acc, u_res, u_bon)
    assert torch.equal(n, n_ref) and torch.equal(nxt, nxt_ref)


def _chi2_stat(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    keep = probs > 0
    assert counts[~keep].sum() == 0  # zero-probability tokens never emitted
    expected = probs[keep].double() * tokens.numel()
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


def test_rejection_distribution():
    """Emitted tokens must follow p, whatever the drafter q (V=5, K=3)."""
    V, K, B = 5, 3, 200_000
    g = torch.Generator().manual_seed(7)
    p = torch.softmax(torch.randn(K, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(K - 1, V, generator=g) * 1.5, -1)
    p[0, 2] = 0.0  # a token the target forbids but the drafter proposes
    q[1, 3] = 0.0  # a token the drafter never proposes but the target allows
    p = p / p.sum(-1, keepdim=True)
    seeds = torch.arange(B) * 2654435761 + 17  # distinct seed per trial
    start = torch.randint(0, 1000, (B,), generator=g)
    drafts = sample(q.expand(B, -1, -1), uniform(seeds, start[:, None] + torch.arange(K - 1), STREAM_DRAFT))
    u_acc, u_res, u_bon = uniforms(seeds, start, K)
    n, nxt = rejection_accept(drafts, q.expand(B, -1, -1), p.expand(B, -1, -1), u_acc, u_res, u_bon)
    assert torch.isin(n, torch.arange(K)).all()

    # Emitted sequence: drafts[:, :n] followed by nxt. p_i does not depend on the
    # previous tokens here, so the i-th emitted token, given that i-1 drafts were
    # accepted, must be distributed as p_i.
    emitted = torch.cat([drafts, torch.zeros(B, 1, dtype=torch.int64)], 1)
    emitted.scatter_(1, n[:, None], nxt[:, None])
    for i in range(K):
        reached = n >= i
        stat, dof = _chi2_stat(emitted[reached, i], p[i])
        assert stat < chi2_critical(dof), (i, stat)

    # Acceptance rate of the first draft is sum_x min(p0, q0) (binomial, 5 sigma).
    rate = torch.minimum(p[0], q[0]).sum()
    sigma = (rate * (1 - rate) / B) ** 0.5
    assert abs((n >= 1).double().mean() - rate) < 5 * sigma


def test_rejection_p_equals_q_accepts_all():
    g = torch.Generator().manual_seed(8)
    B, K, V = 64, 4, 6
    p = torch.softmax(torch.randn(B, K, V, generator=g), -1)
    p[:, :, 1] = 0.0
    p = p / p.sum(-1, keepdim=True)
    seeds = torch.arange(B)
    drafts = sample(p[:, :-1], uniform(seeds, torch.arange(K - 1).expand(B, -1), STREAM_DRAFT))
    u_acc, u_res, u_bon = uniforms(seeds, torch.zeros(B, dtype=torch.int64), K)
    n, nxt = rejection_accept(drafts, p[:, :-1].clone(), p, u_acc, u_res, u_bon)
    assert (n == K - 1).all()
    assert torch.equal(nxt, sample(p[:, -1:], u_bon[:, None])[:, 0])
    assert (p[:, -1].gather(1, nxt[:, None]) > 0).all()


def test_rejection_k1_and_determinism():
    g = torch.Generator().manual_seed(9)
    B, V = 32, 10
    p = torch.softmax(torch.randn(B, 1, V, generator=g), -1)
    seeds = torch.arange(B) + 100
    u_bon = uniform(seeds, torch.zeros(B, 1, dtype=torch.int64), STREAM_BONUS)
    empty = torch.zeros(B, 0)
    n, nxt = rejection_accept(empty.long(), torch.zeros(B, 0, V), p, empty, torch.rand(B), u_bon[:, 0])
    assert (n == 0).all() and torch.equal(nxt, sample(p, u_bon)[:, 0])

    # Same seeds -> same outputs; a row alone -> same output as in the batch.
    K = 4
    p = torch.softmax(torch.randn(B, K, V, generator=g), -1)
    q = torch.softmax(torch.randn(B, K - 1, V, generator=g), -1)

    def run(rows: slice):
        s = seeds[rows]
        pos = torch.full_like(s, 42)
        d = sample(q[rows], uniform(s, pos[:, None] + torch.arange(K - 1), STREAM_DRAFT))
        return rejection_accept(d, q[rows], p[rows], *uniforms(s, pos, K))

    first, second = run(slice(None)), run(slice(None))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for b in (0, 7, 31):
        alone = run(slice(b, b + 1))
        assert alone[0].item() == first[0][b] and alone[1].item() == first[1][b]


def test_unusable_draft_distribution_is_a_rejection_sampled_from_p():
    """A draft whose q is NaN / inf / all zero (an overflowing adapter) is rejected and the
    correction comes from p alone (exactly p's distribution); slots before it are unaffected."""
    g = torch.Generator().manual_seed(5)
    B, K, V = 3, 4, 11
    p = torch.softmax(torch.randn(B, K, V, generator=g), -1)
    drafts = p[:, :-1].argmax(-1)  # likely accepted when usable
    q = torch.softmax(torch.randn(B, K - 1, V, generator=g), -1)
    q[0, 0] = float("nan")
    q[1, 0] = float("inf")
    q[2, 1] = 0.0
    u_acc = torch.full((B, K - 1), 1e-6)  # accept every usable draft with p > 0
    u_res, u_bonus = torch.rand(B, generator=g), torch.rand(B, generator=g)
    n, nxt = rejection_accept(drafts, q, p, u_acc, u_res, u_bonus)
    assert n.tolist() == [0, 0, 1]
    for b in range(B):
        a = int(n[b])
        assert int(nxt[b]) == int(sample(p[b, a][None, None], u_res[b][None, None]))


def test_non_finite_verify_logits_fail_that_row_alone(monkeypatch):
    """A row whose verify logits are not finite ends with finish_reason 'error' and a message;
    its tokens so far are kept and the other rows decode exactly as alone."""
    from conftest import random_prompts, run_decoder, tiny_base
    from orthrus.config import GenerationConfig
    from orthrus.models.llama import Transformer

    model = tiny_base("llama")[1]
    prompts = random_prompts([5, 7, 4], model.config.vocab_size, seed=9)
    gen = GenerationConfig(max_new_tokens=12)
    ref, _ = run_decoder(model, None, prompts, gen)
    orig = Transformer.logits
    calls = {"n": 0}

    def poisoned(self, hidden):
        out = orig(self, hidden)
        calls["n"] += 1
        if calls["n"] == 4 and out.shape[0] == 3:  # the third decode cycle: row 1 overflows
            out = out.clone()
            out[1] = float("nan")
        return out

    monkeypatch.setattr(Transformer, "logits", poisoned)
    out, dec = run_decoder(model, None, prompts, gen)
    assert out[1].finish_reason == "error" and "non-finite" in out[1].error
    assert out[1].tokens == ref[1].tokens[: len(out[1].tokens)] and len(out[1].tokens) == 3
    assert [out[0].tokens, out[2].tokens] == [ref[0].tokens, ref[2].tokens]
    assert dec.free_slots() == [0, 1, 2]
    calls["n"] = 3  # the next call is the prefill: its logits overflow for row 1
    out, _ = run_decoder(model, None, prompts, gen)
    assert out[1].finish_reason == "error" and out[1].tokens == [] and "prompt" in out[1].error
    assert [out[0].tokens, out[2].tokens] == [ref[0].tokens, ref[2].tokens]
