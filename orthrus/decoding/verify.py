"""Verification of drafted tokens against the frozen model's distributions.

Both functions are branch-free over the batch (static shapes, no host sync) so
they can run inside a captured CUDA graph. ``rejection_accept`` reduces exactly
to ``greedy_accept`` when the target distributions are one-hot (temperature 0
rows from ``process_logits``), so greedy and sampled requests share one path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orthrus.decoding.sampling import sample


def greedy_accept(drafts: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Accept the longest prefix of drafts that matches the target argmax.

    Args:
        drafts: ``[B, K-1]`` int64 proposed tokens (K-1 may be 0).
        target_logits: ``[B, K, V]``; slot i scores the token after draft i-1.

    Returns:
        n_accepted ``[B]`` int64 and next_token ``[B]`` int64, the target argmax
        at slot ``n_accepted`` (the correction token, or the bonus token when
        all drafts were accepted).
    """
    target = target_logits.argmax(-1)  # [B, K]
    match = drafts == target[:, :-1]
    # cumprod zeroes everything after the first mismatch: sum = prefix length.
    n_accepted = match.long().cumprod(-1).sum(-1)
    next_token = target.gather(1, n_accepted.unsqueeze(1)).squeeze(1)
    return n_accepted, next_token


def rejection_accept(
    drafts: Tensor,
    q_probs: Tensor,
    p_probs: Tensor,
    u_accept: Tensor,
    u_residual: Tensor,
    u_bonus: Tensor,
) -> tuple[Tensor, Tensor]:
    """Speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023).

    The emitted tokens (accepted drafts followed by ``next_token``) are
    distributed exactly as sampling token by token from ``p``.

    Args:
        drafts: ``[B, K-1]`` int64 drafts, draft i sampled from ``q_probs[:, i]``.
        q_probs: ``[B, K-1, V]`` drafter distributions.
        p_probs: ``[B, K, V]`` target distributions (from ``process_logits``).
        u_accept: ``[B, K-1]`` uniforms in (0, 1) for the accept tests.
        u_residual: ``[B]`` uniform for the correction token.
        u_bonus: ``[B]`` uniform for the bonus token.

    Returns:
        n_accepted ``[B]`` int64 and next_token ``[B]`` int64.
    """
    B, n_drafts = drafts.shape
    V = p_probs.shape[-1]
    bonus = sample(p_probs[:, -1:], u_bonus.unsqueeze(1)).squeeze(1)
    if n_drafts == 0:  # K == 1: a static shape, so this branch is graph-safe
        return torch.zeros_like(bonus), bonus

    idx = drafts.unsqueeze(-1)
    p_d = p_probs[:, :-1].gather(-1, idx).squeeze(-1)  # [B, K-1]
    q_d = q_probs.gather(-1, idx).squeeze(-1)
    # Accept with probability min(1, p/q), written as u*q <= p so q == 0 cannot
    # give NaN. Requiring p > 0 rejects tokens the target rules out even when a
    # drafter proposed them with q == 0; with one-hot p this makes the test an
    # exact argmax comparison, matching greedy_accept.
    # A draft whose distribution is unusable (non-finite, or no mass: an overflowing adapter) is
    # rejected, and its correction comes from p alone: still exactly p's distribution.
    usable = torch.isfinite(q_probs).all(-1) & (q_probs.sum(-1) > 0)  # [B, K-1]
    accept = (u_accept * q_d <= p_d) & (p_d > 0) & usable
    n_accepted = accept.long().cumprod(-1).sum(-1)

    # Residual max(0, p_a - q_a) at the first rejected slot a. Rows that accepted
    # everything use a clamped index; their residual sample is discarded below.
    a = n_accepted.clamp(max=n_drafts - 1).view(B, 1, 1).expand(B, 1, V)
    p_a = p_probs.gather(1, a)
    usable_a = usable.gather(1, n_accepted.clamp(max=n_drafts - 1)[:, None])[:, :, None]  # [B, 1, 1]
    residual = torch.where(usable_a, (p_a - q_probs.gather(1, a)).clamp_min(0), p_a)
    # Zero residual mass only happens when p_a == q_a (then no rejection can
    # occur); fall back to p_a to stay NaN-free. sample() normalises itself.
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, p_a, residual)
    correction = sample(residual, u_residual.unsqueeze(1)).squeeze(1)

    next_token = torch.where(n_accepted == n_drafts, bonus, correction)
    return n_accepted, next_token
