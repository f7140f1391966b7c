"""Diagnostics for amortized posteriors: calibration, recovery, two-sample tests.

On fresh simulations from the model (posterior in, NamedTuple out):
:func:`sbc`, :func:`simulate_draws` and :func:`diagnose` (everything plus a figure
panel; also ``AmortizedPosterior.diagnose``).

On arrays ``truth (N, P)`` and ``draws (N, S, P)`` (or dicts of sites), pure:
:func:`sbc_from_draws`, :func:`coverage`, :func:`recovery`,
:func:`z_score_contraction`; ECDF bands in :func:`ecdf_band`.

Two-sample metrics on ``(n, d)`` draws: :func:`c2st`, :func:`mmd`.

Plots: :mod:`numpyro_amortized.diagnostics.plots` (matplotlib imported lazily).

Examples:
    >>> import jax, numpyro_amortized as na
    >>> report = na.diagnostics.diagnose(  # doctest: +SKIP
    ...     jax.random.key(0), posterior, num_datasets=200, path="diag.png")
"""

from numpyro_amortized.diagnostics import plots
from numpyro_amortized.diagnostics.c2st import C2ST, c2st
from numpyro_amortized.diagnostics.contraction import (
    ZScoreContraction,
    z_score_contraction,
)
from numpyro_amortized.diagnostics.coverage import Coverage, coverage
from numpyro_amortized.diagnostics.draws import (
    PosteriorDraws,
    flatten_sites,
    simulate_draws,
)
from numpyro_amortized.diagnostics.ecdf import ECDFBand, ecdf_band, ecdf_difference
from numpyro_amortized.diagnostics.mmd import MMD, mmd
from numpyro_amortized.diagnostics.recovery import Recovery, recovery
from numpyro_amortized.diagnostics.report import DiagnosticReport, diagnose
from numpyro_amortized.diagnostics.sbc import SBC, sbc, sbc_from_draws

__all__ = [
    "C2ST",
    "MMD",
    "SBC",
    "Coverage",
    "DiagnosticReport",
    "ECDFBand",
    "PosteriorDraws",
    "Recovery",
    "ZScoreContraction",
    "c2st",
    "coverage",
    "diagnose",
    "ecdf_band",
    "ecdf_difference",
    "flatten_sites",
    "mmd",
    "plots",
    "recovery",
    "sbc",
    "sbc_from_draws",
    "simulate_draws",
    "z_score_contraction",
]
