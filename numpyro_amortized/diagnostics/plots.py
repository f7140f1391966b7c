"""Plots for the diagnostics; matplotlib is imported inside each function.

Every ``plot_*`` function draws into ``ax`` (a new figure when None) and returns
the axes; :func:`plot_panel` draws the whole set into one figure. All parameters
share one axes per plot (coloured, with a legend up to 10 parameters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from numpyro_amortized.diagnostics.contraction import ZScoreContraction
from numpyro_amortized.diagnostics.coverage import Coverage
from numpyro_amortized.diagnostics.recovery import Recovery
from numpyro_amortized.diagnostics.sbc import SBC

__all__ = [
    "plot_coverage",
    "plot_ecdf_difference",
    "plot_loss",
    "plot_panel",
    "plot_recovery",
    "plot_z_score_contraction",
]

MAX_LEGEND = 10


def _axes(ax: Any) -> Any:
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(5, 3.5))
    return ax


def _legend(ax: Any, num_params: int) -> None:
    if num_params <= MAX_LEGEND:
        ax.legend(fontsize="small")


def plot_ecdf_difference(result: SBC, ax: Any = None) -> Any:
    """SBC: ECDF of the ranks minus the uniform CDF, with the simultaneous band.

    Inside the grey band everywhere: no evidence against calibration. A curve
    that dips below and then rises above zero (ranks piled at both ends) means an
    over-confident posterior; the mirror image, under-confident; a curve
    entirely above (below) zero means the posterior overestimates
    (underestimates) the parameter.
    """
    ax = _axes(ax)
    ax.fill_between(
        result.z,
        result.lower,
        result.upper,
        color="0.85",
        label=f"{1 - result.alpha:.0%} simultaneous band",
    )
    ax.axhline(0, color="0.5", lw=0.8)
    for i, name in enumerate(result.names):
        flag = "" if result.in_band[i] else "  (outside)"
        ax.plot(result.z, result.ecdf_diff[:, i], lw=1.2, label=name + flag)
    ax.set_xlabel("fractional rank")
    ax.set_ylabel("ECDF difference")
    ax.set_title(f"SBC ({len(result.ranks)} datasets, {result.max_rank} draws)")
    _legend(ax, len(result.names))
    return ax


def plot_coverage(result: Coverage, ax: Any = None) -> Any:
    """Empirical against nominal coverage of central intervals.

    On the diagonal (inside the grey pointwise band): calibrated. Below: intervals
    too narrow (over-confident) or shifted (biased); above: too wide.
    """
    ax = _axes(ax)
    ax.fill_between(result.levels, result.lower, result.upper, color="0.85")
    ax.plot([0, 1], [0, 1], color="0.5", lw=0.8, ls=":")
    for i, name in enumerate(result.names):
        label = f"{name} (err {result.calibration_error[i]:.3f})"
        ax.plot(result.levels, result.empirical[:, i], lw=1.2, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("nominal coverage")
    ax.set_ylabel("empirical coverage")
    ax.set_title("Coverage of central intervals")
    _legend(ax, len(result.names))
    return ax


def plot_recovery(
    result: Recovery, ax: Any = None, *, standardize: bool = False
) -> Any:
    """Posterior mean against the true value; the diagonal is perfect recovery.

    Args:
        result: :class:`~numpyro_amortized.diagnostics.Recovery`.
        ax: axes to draw into.
        standardize: z-score truth and mean with each parameter's prior mean and
            sd (the truths' mean and sd), so parameters on different scales share
            the axes. ``R^2`` does not change.
    """
    ax = _axes(ax)
    truth, mean = result.truth, result.mean
    if standardize:
        loc, scale = truth.mean(axis=0), truth.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        truth, mean = (truth - loc) / scale, (mean - loc) / scale
    for i, name in enumerate(result.names):
        ax.scatter(
            truth[:, i],
            mean[:, i],
            s=5,
            alpha=0.5,
            label=f"{name} R²={result.r2[i]:.3f}",
        )
    lo = float(min(truth.min(), mean.min()))
    hi = float(max(truth.max(), mean.max()))
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls=":")
    unit = " (standardized)" if standardize else ""
    ax.set_xlabel("true value" + unit)
    ax.set_ylabel("posterior mean" + unit)
    ax.set_title("Recovery")
    _legend(ax, len(result.names))
    return ax


def plot_z_score_contraction(result: ZScoreContraction, ax: Any = None) -> Any:
    """Posterior z-score against contraction, one point per dataset and parameter.

    Good: points at high contraction with ``|z| < 2`` (dotted lines). High
    contraction with large ``|z|``: confidently wrong (over-confident or biased).
    Low contraction: the data barely inform the parameter.
    """
    ax = _axes(ax)
    for i, name in enumerate(result.names):
        ax.scatter(
            result.contraction[:, i], result.z_score[:, i], s=5, alpha=0.5, label=name
        )
    for y in (-2, 2):
        ax.axhline(y, color="0.5", lw=0.8, ls=":")
    ax.set_xlim(min(0.0, float(np.nanmin(result.contraction))) - 0.02, 1.02)
    ax.set_xlabel("posterior contraction")
    ax.set_ylabel("posterior z-score")
    ax.set_title("z-score vs contraction")
    _legend(ax, len(result.names))
    return ax


def plot_loss(history: Any, ax: Any = None) -> Any:
    """Training and validation loss per epoch (:meth:`History.plot`)."""
    return history.plot(ax=_axes(ax))


def _summary_text(report: Any, max_rows: int = 16) -> str:
    lines = report.table().splitlines()
    if len(lines) > max_rows + 1:
        lines = [*lines[: max_rows + 1], f"... {len(lines) - 1 - max_rows} more"]
    return "\n".join(lines)


def plot_panel(report: Any, history: Any = None, path: str | Path | None = None) -> Any:
    """All diagnostics in one 2 x 3 figure; saved to ``path`` when given.

    Uses ``matplotlib.figure.Figure`` directly (no pyplot state, any backend).

    Args:
        report: a :class:`~numpyro_amortized.diagnostics.DiagnosticReport`.
        history: a :class:`~numpyro_amortized.History` for the loss panel.
        path: file to save the figure to (format from the suffix).

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = fig.subplots(2, 3)
    if history is not None and history.num_epochs:
        plot_loss(history, axes[0, 0])
    else:
        axes[0, 0].text(0.5, 0.5, "no training history", ha="center", va="center")
        axes[0, 0].set_axis_off()
    plot_ecdf_difference(report.sbc, axes[0, 1])
    plot_coverage(report.coverage, axes[0, 2])
    plot_recovery(report.recovery, axes[1, 0], standardize=len(report.sbc.names) > 1)
    plot_z_score_contraction(report.z_score_contraction, axes[1, 1])
    axes[1, 2].set_axis_off()
    axes[1, 2].text(
        0, 1, _summary_text(report), family="monospace", va="top", fontsize=7.5
    )
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
