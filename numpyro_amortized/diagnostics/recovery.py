"""Parameter recovery: posterior mean against the true value.

For each parameter, across ``N`` simulated datasets,

    R^2 = 1 - sum_i (theta_i - mean_i)^2 / sum_i (theta_i - mean(theta))^2,

with ``mean_i`` the posterior mean for dataset ``i``. ``R^2`` near 1 means the
data pin the parameter down and the network extracts that information; near 0,
the posterior mean is no better than the prior mean (uninformative data, or a
network that ignores them); negative, worse than the prior mean. Even the exact
posterior has ``R^2 < 1``: its expected value is the share of prior variance the
data explain, about ``1 - E[posterior var] / prior var``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from numpyro_amortized.diagnostics.draws import as_flat

__all__ = ["Recovery", "recovery"]


class Recovery(NamedTuple):
    """Posterior means against the truth.

    Attributes:
        truth: ``(N, P)`` true values.
        mean: ``(N, P)`` posterior means.
        sd: ``(N, P)`` posterior standard deviations.
        r2: ``(P,)`` coefficient of determination of the mean for the truth.
        names: parameter names.
    """

    truth: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    r2: np.ndarray
    names: tuple[str, ...]


def recovery(truth: Any, draws: Any, names: Sequence[str] | None = None) -> Recovery:
    """Posterior mean vs truth with ``R^2`` per parameter.

    Args:
        truth: ``(N, P)`` true values, or ``{site: (N, *shape)}``.
        draws: ``(N, S, P)`` posterior draws, or ``{site: (N, S, *shape)}``.
        names: parameter names (default from the sites, or ``theta[i]``).

    Returns:
        :class:`Recovery`.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> truth = rng.normal(size=(100, 1))
        >>> draws = truth[:, None] + 0.1 * rng.normal(size=(100, 50, 1))
        >>> bool(recovery(truth, draws).r2[0] > 0.95)
        True
    """
    truth, draws, names = as_flat(truth, draws, names)
    mean = draws.mean(axis=1)
    sd = draws.std(axis=1, ddof=1) if draws.shape[1] > 1 else np.zeros_like(mean)
    sse = ((truth - mean) ** 2).sum(axis=0)
    sst = ((truth - truth.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(sst > 0, 1 - sse / sst, np.nan)
    return Recovery(truth, mean, sd, r2, names)
