"""The chi-square critical value shared by the statistical tests (fixed seeds make them deterministic)."""

from __future__ import annotations

import math

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
