"""Expected coverage of central posterior intervals (nominal vs empirical).

For a calibrated posterior, the central ``q`` interval of the posterior contains
the true parameter in a share ``q`` of datasets, for every ``q``. From the rank
``r`` of the truth among ``S`` draws, the mid-rank ``u = (r + 1/2) / (S + 1)`` is
(up to a ``1/(S+1)`` discretization) uniform under calibration, and the truth
lies inside the central ``q`` interval iff ``|u - 1/2| <= q / 2``.

    coverage(q) = #{datasets with |u - 1/2| <= q/2} / N

Too-narrow (over-confident) posteriors give ``coverage(q) < q``; too-wide ones
``coverage(q) > q``; a biased posterior falls below the diagonal too.
The *calibration error* of a parameter is the mean over levels of
``|coverage(q) - q|``; with ``N`` datasets, sampling noise alone gives about
``0.8 sqrt(q (1 - q) / N)`` per level (about 0.03 for ``N = 200``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import stats

from numpyro_amortized.diagnostics.draws import as_flat

__all__ = ["Coverage", "coverage", "coverage_from_ranks", "ranks_of_truth"]

DEFAULT_LEVELS = np.linspace(0.01, 0.99, 99)


class Coverage(NamedTuple):
    """Expected-coverage curve per parameter.

    Attributes:
        levels: ``(L,)`` nominal levels ``q``.
        empirical: ``(L, P)`` share of datasets whose central ``q`` interval holds
            the truth.
        lower: ``(L,)`` lower end of the pointwise ``band_level`` binomial band
            of a calibrated posterior.
        upper: ``(L,)`` upper end of that band.
        calibration_error: ``(P,)`` mean of ``|empirical - levels|`` over levels.
        names: parameter names.
    """

    levels: np.ndarray
    empirical: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    calibration_error: np.ndarray
    names: tuple[str, ...]


def ranks_of_truth(truth: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """``(N, P)`` ranks: the number of draws below the truth, in ``0..S``."""
    return (np.asarray(draws) < np.asarray(truth)[:, None, :]).sum(axis=1)


def coverage_from_ranks(
    ranks: np.ndarray,
    max_rank: int,
    names: Sequence[str],
    *,
    levels: Sequence[float] | None = None,
    band_level: float = 0.95,
) -> Coverage:
    """:func:`coverage` from precomputed ``(N, P)`` ranks in ``0..max_rank``."""
    levels = DEFAULT_LEVELS if levels is None else np.asarray(levels, np.float64)
    if levels.ndim != 1 or ((levels <= 0) | (levels >= 1)).any():
        raise ValueError("levels must be a 1-d sequence of values in (0, 1).")
    ranks = np.asarray(ranks)
    n = ranks.shape[0]
    u = (ranks + 0.5) / (max_rank + 1)
    inside = np.abs(u - 0.5)[None] <= levels[:, None, None] / 2  # (L, N, P)
    empirical = inside.mean(axis=1)
    tail = (1 - band_level) / 2
    lower = stats.binom.ppf(tail, n, levels) / n
    upper = stats.binom.ppf(1 - tail, n, levels) / n
    error = np.abs(empirical - levels[:, None]).mean(axis=0)
    return Coverage(levels, empirical, lower, upper, error, tuple(names))


def coverage(
    truth: Any,
    draws: Any,
    names: Sequence[str] | None = None,
    *,
    levels: Sequence[float] | None = None,
    band_level: float = 0.95,
) -> Coverage:
    """Expected coverage of central posterior intervals.

    Args:
        truth: ``(N, P)`` true values, or ``{site: (N, *shape)}``.
        draws: ``(N, S, P)`` posterior draws, or ``{site: (N, S, *shape)}``.
        names: parameter names (default from the sites, or ``theta[i]``).
        levels: nominal levels in ``(0, 1)`` (default 0.01, 0.02, ..., 0.99).
        band_level: level of the pointwise binomial band of a calibrated posterior.

    Returns:
        :class:`Coverage`.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> truth = rng.normal(size=(500, 1))
        >>> draws = rng.normal(size=(500, 200, 1))  # the truth is one more draw
        >>> cov = coverage(truth, draws)
        >>> bool(cov.calibration_error[0] < 0.05)
        True
    """
    truth, draws, names = as_flat(truth, draws, names)
    ranks = ranks_of_truth(truth, draws)
    return coverage_from_ranks(
        ranks, draws.shape[1], names, levels=levels, band_level=band_level
    )
