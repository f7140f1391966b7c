"""Simulation-based calibration (Talts et al., 2018; Säilynoja et al., 2022).

Draw ``theta ~ p(theta)``, ``x ~ p(x | theta)``, then ``S`` draws from the
posterior ``q(theta | x)``. If ``q`` is the true posterior, ``theta`` is just one
more draw from it, so its rank among the ``S`` draws is uniform on ``0..S`` for
every parameter. Deviations have a shape: ranks piled at both ends (ECDF
difference dips then rises, an S-shape mirrored) mean an over-confident
posterior; piled in the middle, an under-confident one; skewed to one side, a
biased one. The ECDF difference is judged against a simultaneous band
(:mod:`.ecdf`), so one look at the whole curve is a valid test at level
``alpha`` per parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from numpyro_amortized.diagnostics.coverage import coverage_from_ranks, ranks_of_truth
from numpyro_amortized.diagnostics.draws import as_flat, simulate_draws
from numpyro_amortized.diagnostics.ecdf import (
    band_statistic,
    ecdf_band,
    ecdf_difference,
)

__all__ = ["SBC", "sbc", "sbc_from_draws"]


class SBC(NamedTuple):
    """Result of simulation-based calibration.

    Attributes:
        ranks: ``(N, P)`` rank of the truth among the ``S`` draws, in ``0..S``.
        max_rank: ``S``.
        z: ``(K,)`` ECDF evaluation points.
        ecdf_diff: ``(K, P)`` ECDF of the ranks minus the uniform CDF.
        lower: ``(K,)`` lower edge of the simultaneous band of ``ecdf_diff``.
        upper: ``(K,)`` upper edge.
        in_band: ``(P,)`` whether the whole ECDF difference lies in the band.
        p_value: ``(P,)`` p-value of the simultaneous uniformity test.
        calibration_error: ``(P,)`` mean absolute coverage error over central
            intervals at levels 0.01..0.99 (see :mod:`.coverage`).
        alpha: the band's level.
        names: parameter names.
    """

    ranks: np.ndarray
    max_rank: int
    z: np.ndarray
    ecdf_diff: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    in_band: np.ndarray
    p_value: np.ndarray
    calibration_error: np.ndarray
    alpha: float
    names: tuple[str, ...]


def sbc_from_draws(
    truth: Any,
    draws: Any,
    names: Sequence[str] | None = None,
    *,
    alpha: float = 0.05,
    num_points: int | None = None,
) -> SBC:
    """SBC ranks, ECDF difference, band and calibration error from arrays.

    Args:
        truth: ``(N, P)`` prior draws that simulated each dataset, or
            ``{site: (N, *shape)}``.
        draws: ``(N, S, P)`` posterior draws, or ``{site: (N, S, *shape)}``.
        names: parameter names (default from the sites, or ``theta[i]``).
        alpha: level of the simultaneous band (per parameter).
        num_points: ECDF evaluation points (default ``min(S, 99)``).

    Returns:
        :class:`SBC`.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> result = sbc_from_draws(rng.normal(size=(300, 2)),
        ...                         rng.normal(size=(300, 100, 2)))
        >>> result.ranks.shape, result.ecdf_diff.shape
        ((300, 2), (99, 2))
    """
    truth, draws, names = as_flat(truth, draws, names)
    n, s = draws.shape[:2]
    ranks = ranks_of_truth(truth, draws)
    z, diff = ecdf_difference(ranks, s, num_points)
    band = ecdf_band(n, s, num_points=num_points, alpha=alpha)
    lower, upper = band.lower - z, band.upper - z
    in_band = ((diff >= lower[:, None] - 1e-12) & (diff <= upper[:, None] + 1e-12)).all(
        axis=0
    )
    t = band_statistic(ranks, s, num_points)
    null = band.null_statistics
    p_value = (1 + np.searchsorted(null, t, side="right")) / (len(null) + 1)
    error = coverage_from_ranks(ranks, s, names).calibration_error
    return SBC(ranks, s, z, diff, lower, upper, in_band, p_value, error, alpha, names)


def sbc(
    rng_key: jax.Array,
    posterior: Any,
    *,
    num_datasets: int = 200,
    num_samples: int = 100,
    alpha: float = 0.05,
    num_points: int | None = None,
) -> SBC:
    """Simulation-based calibration of a posterior on fresh simulations.

    Args:
        rng_key: JAX PRNG key.
        posterior: an :class:`~numpyro_amortized.AmortizedPosterior` (or any
            object with ``model`` and batched ``sample``, see
            :func:`~numpyro_amortized.diagnostics.simulate_draws`).
        num_datasets: simulated datasets ``N`` (ranks per parameter).
        num_samples: posterior draws per dataset ``S``.
        alpha: level of the simultaneous ECDF band.
        num_points: ECDF evaluation points.

    Returns:
        :class:`SBC`; ``result.in_band.all()`` is the pass/fail verdict at level
        ``alpha`` per parameter.

    Examples:
        >>> import jax, numpyro_amortized as na
        >>> result = na.diagnostics.sbc(  # doctest: +SKIP
        ...     jax.random.key(0), posterior, num_datasets=200, num_samples=100)
        >>> na.diagnostics.plots.plot_ecdf_difference(result)  # doctest: +SKIP
    """
    sims = simulate_draws(
        rng_key, posterior, num_datasets=num_datasets, num_samples=num_samples
    )
    return sbc_from_draws(*sims, alpha=alpha, num_points=num_points)
