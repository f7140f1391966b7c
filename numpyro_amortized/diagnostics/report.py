"""``diagnose``: the default diagnostics on fresh simulations, in one call."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from numpyro_amortized.diagnostics.contraction import (
    ZScoreContraction,
    z_score_contraction,
)
from numpyro_amortized.diagnostics.coverage import Coverage, coverage
from numpyro_amortized.diagnostics.draws import simulate_draws
from numpyro_amortized.diagnostics.recovery import Recovery, recovery
from numpyro_amortized.diagnostics.sbc import SBC, sbc_from_draws

__all__ = ["DiagnosticReport", "diagnose"]


class DiagnosticReport(NamedTuple):
    """Everything :func:`diagnose` computed.

    Attributes:
        sbc: :class:`~numpyro_amortized.diagnostics.SBC`.
        coverage: :class:`~numpyro_amortized.diagnostics.Coverage`.
        recovery: :class:`~numpyro_amortized.diagnostics.Recovery`.
        z_score_contraction: :class:`~numpyro_amortized.diagnostics.ZScoreContraction`.
        figure_path: where the figure panel was saved (None: not drawn).
    """

    sbc: SBC
    coverage: Coverage
    recovery: Recovery
    z_score_contraction: ZScoreContraction
    figure_path: Path | None

    @property
    def calibrated(self) -> bool:
        """Whether every parameter's SBC ECDF stays inside its band."""
        return bool(np.all(self.sbc.in_band))

    def table(self) -> str:
        """Per parameter: R², calibration error, SBC p-value, z-score, contraction."""
        zc = self.z_score_contraction
        lines = [
            f"{'parameter':<14}{'R2':>8}{'cal.err':>9}{'SBC p':>8}{'in band':>9}"
            f"{'mean z':>8}{'sd z':>7}{'contr.':>8}"
        ]
        for i, name in enumerate(self.sbc.names):
            lines.append(
                f"{name:<14}{self.recovery.r2[i]:8.3f}"
                f"{self.coverage.calibration_error[i]:9.3f}"
                f"{self.sbc.p_value[i]:8.3f}{'yes' if self.sbc.in_band[i] else 'NO':>9}"
                f"{np.nanmean(zc.z_score[:, i]):8.2f}{np.nanstd(zc.z_score[:, i]):7.2f}"
                f"{np.nanmedian(zc.contraction[:, i]):8.3f}"
            )
        return "\n".join(lines)


def diagnose(
    rng_key: jax.Array,
    posterior: Any,
    *,
    num_datasets: int = 200,
    num_samples: int = 500,
    alpha: float = 0.05,
    path: str | Path | None = None,
) -> DiagnosticReport:
    """SBC, coverage, recovery and z-score/contraction on fresh simulations.

    Simulates ``num_datasets`` datasets from the model, draws ``num_samples``
    posterior draws for each in one batched call, computes the default
    diagnostics and, when ``path`` is given, saves a figure panel (training loss
    from ``posterior.history`` if present, SBC ECDF difference, coverage,
    recovery, z-score vs contraction, a summary table).

    Args:
        rng_key: JAX PRNG key.
        posterior: an :class:`~numpyro_amortized.AmortizedPosterior` (or any
            object with ``model`` and batched ``sample``).
        num_datasets: simulated datasets.
        num_samples: posterior draws per dataset.
        alpha: level of the SBC simultaneous band.
        path: image file for the figure panel (e.g. ``"diagnostics.png"``);
            None draws no figure.

    Returns:
        :class:`DiagnosticReport`; ``report.table()`` prints the metrics.

    Examples:
        >>> report = posterior.diagnose(  # doctest: +SKIP
        ...     jax.random.key(0), num_datasets=200, path="diagnostics.png")
        >>> print(report.table())  # doctest: +SKIP
    """
    sims = simulate_draws(
        rng_key, posterior, num_datasets=num_datasets, num_samples=num_samples
    )
    report = DiagnosticReport(
        sbc=sbc_from_draws(*sims, alpha=alpha),
        coverage=coverage(*sims),
        recovery=recovery(*sims),
        z_score_contraction=z_score_contraction(*sims),
        figure_path=None if path is None else Path(path),
    )
    if path is not None:
        from numpyro_amortized.diagnostics.plots import plot_panel

        plot_panel(report, getattr(posterior, "history", None), path)
    return report
