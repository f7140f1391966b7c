"""ECDF of SBC ranks with simultaneous confidence bands (Säilynoja et al., 2022).

With ``S`` posterior draws per dataset the rank of the truth among the draws,
``r = #{draws < truth}``, is uniform on ``{0, ..., S}`` when the posterior is
calibrated. We evaluate the ECDF of ``N`` ranks at ``K`` interior points
``z_k = c_k / (S + 1)`` with integer thresholds ``c_k``:

    F(z_k) = #{i : r_i < c_k} / N,   N F(z_k) ~ Binomial(N, z_k) under uniformity,

exactly, for discrete ranks. A pointwise band at level ``gamma`` is
``[q(gamma/2), q(1 - gamma/2)] / N`` with ``q`` the Binomial(N, z_k) quantile.
The *simultaneous* band (all ``K`` points inside with probability ``1 - alpha``)
uses the ``gamma`` found by simulation (Säilynoja, Bürkner and Vehtari, 2022,
"Graphical test for discrete uniformity", Section 2.2): draw ``M`` uniform
samples of size ``N``, compute for each the smallest two-sided binomial tail
probability over the ``K`` points,

    T = min_k 2 min(P[Bin <= N F(z_k)], P[Bin >= N F(z_k)]),

and take ``gamma`` as the ``alpha`` quantile of ``T``. The same null draws of
``T`` give a p-value for an observed ECDF. Counts at the ``K`` points are drawn
directly as cumulative multinomial counts, so the simulation is cheap and exact.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from scipy import stats

__all__ = [
    "ECDFBand",
    "band_statistic",
    "ecdf_band",
    "ecdf_difference",
    "ecdf_points",
]


class ECDFBand(NamedTuple):
    """Simultaneous band for the ECDF of ``num_ranks`` uniform ranks.

    Attributes:
        z: ``(K,)`` evaluation points in ``(0, 1)``.
        lower: ``(K,)`` lower band of the ECDF.
        upper: ``(K,)`` upper band of the ECDF.
        gamma: pointwise level that makes the band simultaneous at ``1 - alpha``.
        null_statistics: ``(M,)`` sorted null draws of the statistic ``T``.
    """

    z: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    gamma: float
    null_statistics: np.ndarray


def ecdf_points(max_rank: int, num_points: int | None = None) -> np.ndarray:
    """Integer thresholds ``c_k`` (``1 <= c_k <= max_rank``), ``z_k = c_k/(S+1)``.

    Args:
        max_rank: ``S``, the number of posterior draws (ranks lie in ``0..S``).
        num_points: ``K`` (default ``min(S, 99)``; at most ``S``).
    """
    if max_rank < 1:
        raise ValueError(f"Ranks need at least one posterior draw; got {max_rank}.")
    k = min(max_rank, 99) if num_points is None else int(num_points)
    if not 1 <= k <= max_rank:
        raise ValueError(
            f"num_points must be in 1..{max_rank} (the number of draws); got {k}."
        )
    return np.unique(np.rint(np.arange(1, k + 1) * (max_rank + 1) / (k + 1))).astype(
        np.int64
    )


def _min_tail(counts: np.ndarray, num_ranks: int, z: np.ndarray) -> np.ndarray:
    """``T``: smallest two-sided binomial tail probability over the last axis."""
    below = stats.binom.cdf(counts, num_ranks, z)
    above = stats.binom.sf(counts - 1, num_ranks, z)
    return np.minimum(1.0, 2 * np.minimum(below, above)).min(axis=-1)


@functools.lru_cache(maxsize=32)
def _band(
    num_ranks: int, max_rank: int, num_points: int | None, alpha: float, num_sim: int
) -> ECDFBand:
    z = ecdf_points(max_rank, num_points) / (max_rank + 1)
    rng = np.random.default_rng(20220101)  # fixed: the band is a pure function
    pvals = np.diff(np.concatenate([[0.0], z, [1.0]]))
    counts = rng.multinomial(num_ranks, pvals, size=num_sim).cumsum(axis=1)[:, :-1]
    null = np.sort(_min_tail(counts, num_ranks, z))
    gamma = float(np.quantile(null, alpha, method="lower"))
    lower = stats.binom.ppf(gamma / 2, num_ranks, z) / num_ranks
    upper = stats.binom.ppf(1 - gamma / 2, num_ranks, z) / num_ranks
    for a in (z, lower, upper, null):
        a.flags.writeable = False
    return ECDFBand(z, lower, upper, gamma, null)


def ecdf_band(
    num_ranks: int,
    max_rank: int,
    *,
    num_points: int | None = None,
    alpha: float = 0.05,
    num_simulations: int = 5000,
) -> ECDFBand:
    """Simultaneous ``1 - alpha`` band for the ECDF of ``num_ranks`` uniform ranks.

    Deterministic (a fixed internal seed) and cached.

    Args:
        num_ranks: ``N``, the number of ranks (simulated datasets).
        max_rank: ``S``, posterior draws per dataset.
        num_points: ``K`` evaluation points (see :func:`ecdf_points`).
        alpha: the band fails to hold all ``K`` points with probability ``alpha``.
        num_simulations: null samples used to calibrate ``gamma``.

    Examples:
        >>> band = ecdf_band(200, 100, alpha=0.05)
        >>> bool((band.lower <= band.z).all() and (band.z <= band.upper).all())
        True
    """
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1; got {num_ranks}.")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}.")
    return _band(
        int(num_ranks), int(max_rank), num_points, float(alpha), num_simulations
    )


def _ecdf(ranks: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``(K, P)`` share of ranks below each threshold."""
    return (np.asarray(ranks)[None, :, :] < thresholds[:, None, None]).mean(axis=1)


def ecdf_difference(
    ranks: np.ndarray, max_rank: int, num_points: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """ECDF minus the uniform CDF at the evaluation points.

    Args:
        ranks: ``(N, P)`` integer ranks in ``0..max_rank``.
        max_rank: ``S``.
        num_points: ``K`` (see :func:`ecdf_points`).

    Returns:
        ``(z, diff)``: ``(K,)`` points and ``(K, P)`` values of ``F(z) - z``.
    """
    c = ecdf_points(max_rank, num_points)
    z = c / (max_rank + 1)
    return z, _ecdf(ranks, c) - z[:, None]


def band_statistic(
    ranks: np.ndarray, max_rank: int, num_points: int | None = None
) -> np.ndarray:
    """The statistic ``T`` for each column of ``(N, P)`` ranks: ``(P,)``.

    Small values mean non-uniform ranks; compare with ``ECDFBand.gamma``.
    """
    ranks = np.asarray(ranks)
    c = ecdf_points(max_rank, num_points)
    counts = np.rint(_ecdf(ranks, c) * ranks.shape[0]).T  # (P, K)
    return _min_tail(counts, ranks.shape[0], c / (max_rank + 1))
