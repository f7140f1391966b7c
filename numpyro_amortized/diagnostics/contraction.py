"""Posterior z-scores and contraction (Schad, Betancourt and Vasishth, 2021).

Per dataset ``i`` and parameter, with posterior mean ``m_i`` and sd ``s_i``,

    z_i = (m_i - theta_i) / s_i,        c_i = 1 - s_i^2 / sigma_prior^2.

The z-score says how many posterior sds the posterior mean misses the truth by:
for a calibrated posterior ``z`` has mean 0 and sd about 1 across datasets; a
consistently shifted posterior gives a shifted mean of ``z``, an over-confident
one an sd of ``z`` above 1. Contraction says how much the data shrank the prior:
near 1, the parameter is learned; near 0, the posterior is the prior. Read the
scatter of ``z`` against ``c`` (BayesFlow's plot): the ideal cloud sits at high
contraction with ``|z|`` mostly below 2; high contraction with large ``|z|``
is over-fitting (confidently wrong); low contraction, poorly identified.
The prior variance defaults to the variance of the true values across datasets,
which are prior draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from numpyro_amortized.diagnostics.draws import as_flat

__all__ = ["ZScoreContraction", "z_score_contraction"]


class ZScoreContraction(NamedTuple):
    """Posterior z-scores and contraction per dataset and parameter.

    Attributes:
        z_score: ``(N, P)`` ``(posterior mean - truth) / posterior sd``.
        contraction: ``(N, P)`` ``1 - posterior var / prior var``.
        names: parameter names.
    """

    z_score: np.ndarray
    contraction: np.ndarray
    names: tuple[str, ...]


def z_score_contraction(
    truth: Any,
    draws: Any,
    names: Sequence[str] | None = None,
    *,
    prior_sd: Any = None,
) -> ZScoreContraction:
    """Posterior z-score and contraction for every dataset and parameter.

    Args:
        truth: ``(N, P)`` true values, or ``{site: (N, *shape)}``.
        draws: ``(N, S, P)`` posterior draws (``S >= 2``), or dicts of sites.
        names: parameter names (default from the sites, or ``theta[i]``).
        prior_sd: ``(P,)`` prior standard deviations (default: the sd of
            ``truth`` across datasets).

    Returns:
        :class:`ZScoreContraction`.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> truth = rng.normal(size=(200, 1))
        >>> draws = truth[:, None] + 0.5 * rng.normal(size=(200, 100, 1))
        >>> zc = z_score_contraction(truth, draws)
        >>> bool(abs(np.median(zc.contraction) - 0.75) < 0.05)  # 1 - 0.5**2
        True
    """
    truth, draws, names = as_flat(truth, draws, names)
    if draws.shape[1] < 2:
        raise ValueError("z_score_contraction needs at least 2 draws per dataset.")
    mean = draws.mean(axis=1)
    var = draws.var(axis=1, ddof=1)
    if prior_sd is None:
        prior_var = truth.var(axis=0, ddof=1)
    else:
        prior_var = np.broadcast_to(
            np.asarray(prior_sd, np.float64) ** 2, mean.shape[1:]
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (mean - truth) / np.sqrt(var)
        contraction = 1 - var / prior_var
    return ZScoreContraction(z, contraction, names)
