"""Per-parameter and per-dataset metrics: amortized draws vs NUTS draws.

For one scalar parameter with NUTS mean ``m_N`` and sd ``s_N`` and amortized mean
``m_A`` and sd ``s_A`` (all draws):

    mean_diff = (m_A - m_N) / s_N        sd_diff = (s_A - s_N) / s_N

so ``mean_diff = 0.5`` means the amortized mean is half a posterior sd off, and
``sd_diff = -0.5`` that the amortized posterior is half as wide. Two-sample
metrics use at most ``num_metric_draws`` draws per side (NUTS draws thinned
evenly over the pooled chains, amortized draws taken in order): the classifier
two-sample test (:func:`~numpyro_amortized.diagnostics.c2st`, 0.5 = the same
distribution) and the squared MMD (:func:`~numpyro_amortized.diagnostics.mmd`),
per parameter (1-d marginals) and jointly over all targets per dataset.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["C2ST_MODES", "comparison_tables", "thin"]

C2ST_MODES = ("all", "joint", "none")


def thin(draws: np.ndarray, num: int) -> np.ndarray:
    """At most ``num`` rows of ``draws`` (``(n, ...)``), evenly spaced."""
    n = len(draws)
    if n <= num:
        return draws
    return draws[np.linspace(0, n - 1, num).round().astype(int)]


def comparison_tables(
    amortized: np.ndarray,
    nuts: np.ndarray,
    names: tuple[str, ...],
    *,
    convergence: dict[str, np.ndarray],
    divergences: np.ndarray,
    c2st: str = "all",
    num_metric_draws: int = 1000,
    seed: int = 1,
) -> tuple[Any, Any]:
    """The metrics tables of :class:`~numpyro_amortized.compare.NutsComparison`.

    Args:
        amortized: ``(B, S, P)`` amortized draws (flattened targets).
        nuts: ``(B, N, P)`` NUTS draws, chains pooled (chain-major).
        names: ``P`` parameter names (``"mu[0]"``, ...).
        convergence: ``{"r_hat" | "ess_bulk" | "ess_tail": (B, P)}`` from NUTS.
        divergences: ``(B,)`` divergent transitions after warmup.
        c2st: ``"all"`` (per parameter and joint), ``"joint"`` or ``"none"``.
        num_metric_draws: draws per side for C2ST and MMD.
        seed: C2ST seed.

    Returns:
        ``(metrics, joint)``: pandas DataFrames with one row per (dataset,
        parameter) and one row per dataset.
    """
    import pandas as pd

    from numpyro_amortized.diagnostics import c2st as c2st_test
    from numpyro_amortized.diagnostics import mmd

    if c2st not in C2ST_MODES:
        raise ValueError(f"c2st must be one of {C2ST_MODES}; got {c2st!r}.")
    if amortized.shape[0] != nuts.shape[0] or amortized.shape[2] != nuts.shape[2]:
        raise ValueError(
            f"Shapes disagree: amortized {amortized.shape}, NUTS {nuts.shape}."
        )
    num_datasets, num_params = nuts.shape[0], nuts.shape[2]
    mean_a, mean_n = amortized.mean(axis=1), nuts.mean(axis=1)
    sd_a, sd_n = amortized.std(axis=1, ddof=1), nuts.std(axis=1, ddof=1)
    rows, joint = [], []
    for b in range(num_datasets):
        a = thin(amortized[b], num_metric_draws).astype(np.float64)
        n = thin(nuts[b], num_metric_draws).astype(np.float64)
        for p in range(num_params):
            rows.append(
                {
                    "dataset": b,
                    "parameter": names[p],
                    "mean_amortized": mean_a[b, p],
                    "mean_nuts": mean_n[b, p],
                    "sd_amortized": sd_a[b, p],
                    "sd_nuts": sd_n[b, p],
                    "mean_diff": (mean_a[b, p] - mean_n[b, p]) / sd_n[b, p],
                    "sd_diff": (sd_a[b, p] - sd_n[b, p]) / sd_n[b, p],
                    "c2st": (
                        c2st_test(n[:, p], a[:, p], seed=seed).accuracy
                        if c2st == "all"
                        else np.nan
                    ),
                    "mmd": mmd(n[:, p], a[:, p]).mmd2,
                    "r_hat": convergence["r_hat"][b, p],
                    "ess_bulk": convergence["ess_bulk"][b, p],
                    "ess_tail": convergence["ess_tail"][b, p],
                    "divergences": int(divergences[b]),
                }
            )
        joint.append(
            {
                "dataset": b,
                "c2st": c2st_test(n, a, seed=seed).accuracy
                if c2st != "none"
                else np.nan,
                "mmd": mmd(n, a).mmd2,
                "max_abs_mean_diff": float(
                    np.max(np.abs(mean_a[b] - mean_n[b]) / sd_n[b])
                ),
                "max_r_hat": float(np.max(convergence["r_hat"][b])),
                "min_ess_bulk": float(np.min(convergence["ess_bulk"][b])),
                "divergences": int(divergences[b]),
            }
        )
    metrics = pd.DataFrame(rows).set_index(["dataset", "parameter"])
    return metrics, pd.DataFrame(joint).set_index("dataset")
