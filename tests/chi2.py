"""The chi-square critical value shared by the statistical tests (fixed seeds make them deterministic)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:
    from scipy.stats import chi2 as _chi2
except ImportError:  # pragma: no cover
    _chi2 = None

ALPHA = 1e-4  # false-alarm rate of each chi-square test


def chi2_critical(dof: int) -> float:
    """The ``1 - ALPHA`` quantile of the chi-square distribution with ``dof`` degrees of freedom."""
    if _chi2 is not None:
        return float(_chi2.ppf(1 - ALPHA, dof))
    # Wilson-Hilferty approximation (z at 1 - 1e-4 = 3.719), within 1% for dof >= 3
    z = 3.719016
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi2_stat(counts: Tensor, probs: Tensor) -> tuple[float, int]:
    """Pearson's statistic with cells of expected count < 5 pooled into one; returns (stat, dof)."""
    n = counts.sum()
    expected = probs.flatten() * n
    counts = counts.flatten().double()
    small = expected < 5
    assert (counts[probs.flatten() == 0] == 0).all(), "a token of zero probability was sampled"
    e = torch.cat((expected[~small], expected[small].sum()[None]))
    c = torch.cat((counts[~small], counts[small].sum()[None]))
    keep = e > 0
    e, c = e[keep], c[keep]
    return float(((c - e) ** 2 / e).sum()), int(keep.sum()) - 1


def assert_sequence_distribution(seqs: Tensor, probs: Tensor, vocab: int) -> None:
    """Sampled sequences ``seqs [rows, n]`` follow the exact distribution ``probs`` over all
    ``vocab ** n`` sequences (row-major), by Pearson's test at alpha = 1e-4."""
    rows, n = seqs.shape
    counts = torch.zeros(vocab ** n, dtype=torch.float64)
    counts.index_add_(0, (seqs * torch.tensor([vocab ** (n - 1 - i) for i in range(n)])).sum(1),
                      torch.ones(rows, dtype=torch.float64))
    stat, dof = chi2_stat(counts, probs)
    assert dof >= 20, "the test distribution is too concentrated to mean anything"
    assert stat < chi2_critical(dof), f"chi2 {stat:.1f} with {dof} dof (critical {chi2_critical(dof):.1f})"
