"""``compare_with_nuts``: check an amortized posterior against NUTS on real data.

NUTS runs on the same NumPyro model conditioned on the same data (the posterior's
model arguments passed through; :mod:`numpyro_amortized.nuts`), and both sets of
draws come back as ``arviz.InferenceData`` with metrics per parameter and per
dataset (:mod:`numpyro_amortized.compare_metrics`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from numpyro_amortized.compare_metrics import C2ST_MODES, comparison_tables
from numpyro_amortized.diagnostics.draws import flatten_sites
from numpyro_amortized.nuts import run_nuts
from numpyro_amortized.verdict import Verdict, assess, headline

__all__ = ["NutsComparison", "WallTime", "compare_with_nuts"]


class WallTime(NamedTuple):
    """Seconds spent by each side of a comparison.

    Attributes:
        amortized: one ``posterior.sample`` call for all datasets, compiled.
        amortized_first: the first such call (compilation included, unless the
            shapes were compiled before).
        nuts: the NUTS run for all datasets, compilation included unless the
            program was cached from an earlier call with the same shapes.
        training: the posterior's training time (``history.wall_time[-1]``), or
            None when unknown.
    """

    amortized: float
    amortized_first: float
    nuts: float
    training: float | None

    @property
    def speedup(self) -> float:
        """``nuts / amortized``: how many times faster the amortized posterior is."""
        return self.nuts / self.amortized


@dataclass(frozen=True)
class NutsComparison:
    """The result of :func:`compare_with_nuts`.

    Attributes:
        amortized: ``InferenceData`` of the amortized draws (``posterior`` with one
            chain, ``observed_data``).
        nuts: ``InferenceData`` of NUTS (``posterior`` with every latent
            continuous site, nuisance included; ``sample_stats`` with
            ``diverging``, ``n_steps``, ``acceptance_rate``; ``observed_data``).
            A batch of datasets adds a ``dataset`` dimension after ``draw``.
        metrics: one row per parameter (index ``parameter``; ``(dataset,
            parameter)`` for a batch): ``mean_amortized``, ``mean_nuts``,
            ``sd_amortized``, ``sd_nuts``, ``mean_diff`` and ``sd_diff`` (in NUTS sd
            units), ``c2st`` and ``mmd`` of the 1-d marginals, NUTS ``r_hat``,
            ``ess_bulk``, ``ess_tail``, ``divergences``.
        joint: one row per dataset: ``c2st`` and ``mmd`` over all targets jointly,
            ``max_abs_mean_diff``, ``max_r_hat``, ``min_ess_bulk``, ``divergences``.
        wall_time: :class:`WallTime`.
        targets: the compared sites.
        backend: the NUTS backend used.
    """

    amortized: Any
    nuts: Any
    metrics: Any
    joint: Any
    wall_time: WallTime
    targets: tuple[str, ...]
    backend: str

    @property
    def num_datasets(self) -> int | None:
        """Datasets compared (None for a single, unbatched dataset)."""
        return self.nuts.posterior.sizes.get("dataset")

    @property
    def verdict(self) -> Verdict:
        """Whether NUTS converged and the amortized posterior matches it, with the
        default thresholds (:func:`~numpyro_amortized.verdict.assess`; call it
        on ``metrics`` and ``joint`` for others)."""
        return assess(self.metrics, self.joint)

    def summary(self) -> str:
        """The verdict first, then the metrics as text.

        The first line says whether the NUTS reference converged and whether the
        amortized posterior matches it; "N x faster" appears only when both
        hold (:mod:`numpyro_amortized.verdict`)."""
        import pandas as pd

        w = self.wall_time
        train = "" if w.training is None else f", training {w.training:.1f} s"
        speed = (
            f"amortized {w.amortized * 1e3:.1f} ms (first call "
            f"{w.amortized_first:.2f} s{train}) vs NUTS ({self.backend}) "
            f"{w.nuts:.1f} s"
        )
        head = headline(self.verdict, speed, w.speedup)
        with pd.option_context("display.width", 120, "display.max_columns", 20):
            return f"{head}\n{self.metrics.round(3)}\n{self.joint.round(3)}"

    def __repr__(self) -> str:
        return f"NutsComparison({self.summary()})"

    def plot(
        self,
        *,
        dataset: int = 0,
        var_names: Sequence[str] | None = None,
        max_draws: int = 1000,
        path: str | Path | None = None,
    ) -> Any:
        """Overlaid marginals and pairs (ArviZ): amortized in blue, NUTS in orange.

        Args:
            dataset: which dataset of a batch.
            var_names: sites to show (default: all targets).
            max_draws: draws per side in the scatter plots.
            path: save the figure there (format from the suffix).

        Returns:
            A ``matplotlib.figure.Figure``.
        """
        from numpyro_amortized.inference_data import plot_overlay, select_dataset

        names = list(self.targets if var_names is None else var_names)
        amortized, nuts = self.amortized, self.nuts
        if self.num_datasets is not None:
            amortized = select_dataset(amortized, dataset)
            nuts = select_dataset(nuts, dataset)
        fig = plot_overlay(
            {"amortized": amortized, f"NUTS ({self.backend})": nuts},
            names,
            max_draws=max_draws,
        )
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig


def compare_with_nuts(
    posterior: Any,
    data: dict,
    *,
    rng_key: jax.Array,
    num_samples: int = 1000,
    num_warmup: int = 1000,
    num_chains: int = 4,
    backend: str = "numpyro",
    vectorized: bool | None = None,
    model_args: Sequence | None = None,
    model_kwargs: dict | None = None,
    num_amortized_samples: int | None = None,
    c2st: str = "all",
    num_metric_draws: int = 1000,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    progress: bool = False,
) -> NutsComparison:
    """Run NUTS on the posterior's model and data and compare the two posteriors.

    Args:
        posterior: a fitted :class:`~numpyro_amortized.AmortizedPosterior` (or any
            object with ``model``, ``sample(rng_key, data, num_samples)`` and
            optional ``model_args`` / ``model_kwargs``).
        data: ``{observed site: array}`` for one dataset, or with one leading
            dataset axis for a batch.
        rng_key: JAX PRNG key (split into one key per side).
        num_samples: NUTS draws per chain.
        num_warmup: NUTS adaptation steps per chain.
        num_chains: NUTS chains per dataset.
        backend: ``"numpyro"`` or ``"blackjax"`` NUTS.
        vectorized: batch of datasets in one vmapped program (default: True for
            blackjax, a loop of one compiled program for numpyro).
        model_args: positional model arguments (default: the posterior's).
        model_kwargs: keyword model arguments (default: the posterior's).
        num_amortized_samples: amortized draws per dataset (default
            ``num_chains * num_samples``).
        c2st: ``"all"`` (per parameter and joint), ``"joint"`` (only the joint
            test per dataset; faster) or ``"none"``.
        num_metric_draws: draws per side for C2ST and MMD.
        target_accept_prob: NUTS step-size adaptation target.
        max_tree_depth: NUTS maximum tree depth.
        progress: progress bar over datasets (numpyro loop).

    Returns:
        A :class:`NutsComparison`.

    Examples:
        >>> report = na.compare_with_nuts(posterior, {"x": x_obs},  # doctest: +SKIP
        ...                               rng_key=jax.random.key(0))
        >>> print(report.summary())  # doctest: +SKIP
        >>> report.plot(path="vs_nuts.png")  # doctest: +SKIP
    """
    from numpyro_amortized.inference_data import (
        convergence,
        nuts_to_inference_data,
        posterior_to_inference_data,
    )

    if c2st not in C2ST_MODES:
        raise ValueError(f"c2st must be one of {C2ST_MODES}; got {c2st!r}.")
    model = posterior.model
    args = tuple(
        getattr(posterior, "model_args", ()) if model_args is None else model_args
    )
    kwargs = dict(
        getattr(posterior, "model_kwargs", {}) if model_kwargs is None else model_kwargs
    )
    targets = tuple(model.target_names(*args, **kwargs))
    sites = model.describe(*args, **kwargs)
    key_amortized, key_nuts = jax.random.split(rng_key)
    ref = run_nuts(
        key_nuts,
        model,
        data,
        model_args=args,
        model_kwargs=kwargs,
        num_samples=num_samples,
        num_warmup=num_warmup,
        num_chains=num_chains,
        backend=backend,
        vectorized=vectorized,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
        progress=progress,
    )
    batch_ndim = int(ref.stats["diverging"].ndim - 2)
    num_amortized = num_amortized_samples or num_chains * num_samples
    times = []
    for _ in range(2):  # the first call may compile; the second is the timing
        start = time.perf_counter()
        draws = jax.block_until_ready(
            posterior.sample(key_amortized, data, num_amortized)
        )
        times.append(time.perf_counter() - start)
    draws = {n: np.asarray(draws[n]) for n in targets}
    observed = {n: np.asarray(data[n]) for n in model.observed}
    amortized_id = posterior_to_inference_data(draws, observed, sites, batch_ndim)
    nuts_id = nuts_to_inference_data(
        ref.samples, ref.stats, observed, sites, batch_ndim
    )

    # Everything as (B, ..., P) with B = 1 for one dataset; NUTS chains pooled.
    def flat(values: dict, extra: int) -> tuple[np.ndarray, tuple[str, ...]]:
        arr, names = flatten_sites(values, batch_ndim=batch_ndim + extra)
        return (arr if batch_ndim else arr[None]), names

    a, names = flat(draws, 1)
    n, _ = flat({t: ref.samples[t] for t in targets}, 2)
    n = n.reshape(n.shape[0], -1, n.shape[-1])
    conv = {k: flat(v, 0)[0] for k, v in convergence(nuts_id, list(targets)).items()}
    divergences = ref.stats["diverging"].reshape(n.shape[0], -1).sum(axis=1)
    metrics, joint = comparison_tables(
        a,
        n,
        names,
        convergence=conv,
        divergences=divergences,
        c2st=c2st,
        num_metric_draws=num_metric_draws,
    )
    if not batch_ndim:
        metrics = metrics.loc[0]
    history = getattr(posterior, "history", None)
    training = (
        float(history.wall_time[-1])
        if history is not None and history.wall_time
        else None
    )
    return NutsComparison(
        amortized=amortized_id,
        nuts=nuts_id,
        metrics=metrics,
        joint=joint,
        wall_time=WallTime(times[-1], times[0], ref.wall_time, training),
        targets=targets,
        backend=backend,
    )
