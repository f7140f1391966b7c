"""What a comparison against NUTS may claim: reference first, accuracy next, speed last.

A speed ratio means nothing next to a reference that did not converge, or next to
an amortized posterior that does not match it. :func:`assess` reads the tables of
:func:`~numpyro_amortized.compare_with_nuts` in that order:

1. **Reference.** NUTS converged on a dataset when every parameter has
   ``r_hat <= max_r_hat`` (1.01, Vehtari et al. 2021), bulk ESS ``>= min_ess``
   (100 draws) and there were no divergent transitions after warmup. A dataset
   that fails gives no verdict.
2. **Accuracy.** On the datasets whose reference converged, the amortized
   posterior matches when the joint C2ST is ``<= max_c2st`` (0.6; 0.5 is "the
   same distribution"), or, when no C2ST was run, when every mean is within
   ``max_mean_diff`` NUTS sds (0.3) and every sd within ``max_sd_diff`` (30%).
3. **Speed.** The "N x faster" claim is made only when every dataset has a
   converged reference and a matching amortized posterior.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = ["Verdict", "assess"]

MATCHES = "matches"
DIFFERS = "differs"
NO_REFERENCE = "no_verdict"


class Verdict(NamedTuple):
    """The conclusion of a comparison, dataset by dataset.

    Attributes:
        status: ``"matches"`` (every reference converged and every amortized
            posterior matches it), ``"differs"`` (every reference converged, some
            amortized posterior does not match) or ``"no_verdict"`` (NUTS did not
            converge on some dataset).
        unconverged: datasets whose NUTS reference did not converge.
        mismatched: datasets (with a converged reference) whose amortized
            posterior does not match.
        reasons: ``{dataset: "r_hat 1.29 > 1.01, ..."}`` for both lists.
        thresholds: the thresholds used.
    """

    status: str
    unconverged: tuple[int, ...]
    mismatched: tuple[int, ...]
    reasons: dict[int, str]
    thresholds: dict[str, float]

    @property
    def backs_speed(self) -> bool:
        """True when a speed ratio may be stated next to this comparison."""
        return self.status == MATCHES


def _reference_problems(row: Any, max_r_hat: float, min_ess: float) -> list[str]:
    problems = []
    if not np.isfinite(row["max_r_hat"]) or row["max_r_hat"] > max_r_hat:
        problems.append(f"r_hat {row['max_r_hat']:.3g} > {max_r_hat}")
    if not np.isfinite(row["min_ess_bulk"]) or row["min_ess_bulk"] < min_ess:
        problems.append(f"bulk ESS {row['min_ess_bulk']:.0f} < {min_ess:.0f}")
    if row["divergences"] > 0:
        problems.append(f"{int(row['divergences'])} divergent transitions")
    return problems


def _accuracy_problems(
    row: Any,
    params: Any,
    max_c2st: float,
    max_mean_diff: float,
    max_sd_diff: float,
) -> list[str]:
    if np.isfinite(row["c2st"]):
        if row["c2st"] > max_c2st:
            return [f"joint C2ST {row['c2st']:.3f} > {max_c2st}"]
        return []
    problems = []
    mean_diff = float(np.max(np.abs(params["mean_diff"])))
    sd_diff = float(np.max(np.abs(params["sd_diff"])))
    if not np.isfinite(mean_diff) or mean_diff > max_mean_diff:
        problems.append(f"a mean {mean_diff:.2f} NUTS sds off (> {max_mean_diff})")
    if not np.isfinite(sd_diff) or sd_diff > max_sd_diff:
        problems.append(f"an sd {sd_diff:.0%} off (> {max_sd_diff:.0%})")
    return problems


def assess(
    metrics: Any,
    joint: Any,
    *,
    max_r_hat: float = 1.01,
    min_ess: float = 100.0,
    max_c2st: float = 0.6,
    max_mean_diff: float = 0.3,
    max_sd_diff: float = 0.3,
) -> Verdict:
    """The verdict of a comparison's tables (see the module docstring).

    Args:
        metrics: the per-parameter table (index ``parameter``, or ``(dataset,
            parameter)`` for a batch).
        joint: the per-dataset table (index ``dataset``).
        max_r_hat: largest NUTS split-R-hat of a converged reference.
        min_ess: smallest NUTS bulk ESS of a converged reference.
        max_c2st: largest joint C2ST accuracy of a matching posterior.
        max_mean_diff: without C2ST, largest ``|mean_diff|`` (NUTS sds).
        max_sd_diff: without C2ST, largest ``|sd_diff|`` (relative).

    Returns:
        A :class:`Verdict`.

    Examples:
        >>> import pandas as pd
        >>> joint = pd.DataFrame({"c2st": [0.95], "max_r_hat": [1.29],
        ...     "min_ess_bulk": [6.0], "divergences": [312]})
        >>> params = pd.DataFrame({"mean_diff": [0.1], "sd_diff": [0.0]})
        >>> assess(params, joint).status
        'no_verdict'
    """
    unconverged, mismatched, reasons = [], [], {}
    for b in joint.index:
        row = joint.loc[b]
        problems = _reference_problems(row, max_r_hat, min_ess)
        if problems:
            unconverged.append(int(b))
            reasons[int(b)] = ", ".join(problems)
            continue
        params = metrics.loc[b] if metrics.index.nlevels > 1 else metrics
        problems = _accuracy_problems(row, params, max_c2st, max_mean_diff, max_sd_diff)
        if problems:
            mismatched.append(int(b))
            reasons[int(b)] = ", ".join(problems)
    status = NO_REFERENCE if unconverged else DIFFERS if mismatched else MATCHES
    thresholds = {
        "max_r_hat": max_r_hat,
        "min_ess": min_ess,
        "max_c2st": max_c2st,
        "max_mean_diff": max_mean_diff,
        "max_sd_diff": max_sd_diff,
    }
    return Verdict(status, tuple(unconverged), tuple(mismatched), reasons, thresholds)


def headline(verdict: Verdict, speed: str, speedup: float) -> str:
    """The first line of a comparison's summary: the verdict, then (only when
    the verdict backs it) the speed ratio."""
    if verdict.status == NO_REFERENCE:
        bad = "; ".join(
            f"dataset {b}: {verdict.reasons[b]}" for b in verdict.unconverged
        )
        return (
            "NO VERDICT: the NUTS reference did not converge "
            f"({bad}). Rerun with more num_warmup / num_samples, a higher "
            "target_accept_prob, or a reparameterized model before comparing. "
            f"Times: {speed}."
        )
    if verdict.status == DIFFERS:
        bad = "; ".join(
            f"dataset {b}: {verdict.reasons[b]}" for b in verdict.mismatched
        )
        return (
            f"DIFFERS from NUTS ({bad}): no speed claim. Train longer or on more "
            f"simulations, then compare again. Times: {speed}."
        )
    return f"Matches NUTS on every dataset; {speed}: {speedup:,.0f}x faster"
