"""Fresh ``(truth, posterior draws)`` pairs, flattened into named parameters.

Every diagnostic in this package works on two arrays: ``truth`` of shape
``(num_datasets, num_params)`` (the parameter values that generated each dataset)
and ``draws`` of shape ``(num_datasets, num_samples, num_params)`` (posterior draws
for each dataset). Sites with a shape are flattened in row-major order into named
parameters: a site ``mu`` of shape ``(2,)`` becomes ``mu[0]``, ``mu[1]``; a site
``W`` of shape ``(2, 3)`` becomes ``W[0,0]`` ... ``W[1,2]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from numpyro_amortized.varying import mask_key

__all__ = ["PosteriorDraws", "flatten_sites", "simulate_draws"]


class PosteriorDraws(NamedTuple):
    """Truth and posterior draws for a set of simulated datasets.

    The field order lets the array diagnostics take it unpacked:
    ``na.diagnostics.recovery(*draws)``.

    Attributes:
        truth: ``(num_datasets, num_params)`` parameter values that simulated the data.
        draws: ``(num_datasets, num_samples, num_params)`` posterior draws.
        names: ``num_params`` parameter names (``"mu[0]"``, ...).
    """

    truth: np.ndarray
    draws: np.ndarray
    names: tuple[str, ...]


def _element_names(site: str, shape: tuple[int, ...]) -> list[str]:
    if not shape:
        return [site]
    return [f"{site}[{','.join(map(str, idx))}]" for idx in np.ndindex(*shape)]


def flatten_sites(
    values: Mapping[str, Any], batch_ndim: int
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Flatten ``{site: (*batch, *site_shape)}`` into ``(*batch, num_params)``.

    Args:
        values: arrays that share ``batch_ndim`` leading axes.
        batch_ndim: how many leading axes are batch axes (kept).

    Returns:
        ``(flat, names)``, sites concatenated in the mapping's order.

    Examples:
        >>> import numpy as np
        >>> flat, names = flatten_sites({"mu": np.zeros((5, 2)), "s": np.ones(5)}, 1)
        >>> flat.shape, names
        ((5, 3), ('mu[0]', 'mu[1]', 's'))
    """
    if not values:
        raise ValueError("No sites to flatten: got an empty mapping.")
    parts, names = [], []
    batch = None
    for site, value in values.items():
        value = np.asarray(value)
        if value.ndim < batch_ndim:
            raise ValueError(
                f"Site '{site}' has shape {value.shape}; expected at least "
                f"{batch_ndim} leading batch axes."
            )
        if batch is None:
            batch = value.shape[:batch_ndim]
        elif value.shape[:batch_ndim] != batch:
            raise ValueError(
                f"Site '{site}' has batch shape {value.shape[:batch_ndim]}, the "
                f"other sites {batch}."
            )
        names += _element_names(site, value.shape[batch_ndim:])
        parts.append(value.reshape(*batch, -1).astype(np.float64))
    return np.concatenate(parts, axis=-1), tuple(names)


def as_flat(
    truth: Any, draws: Any, names: Sequence[str] | None = None
) -> PosteriorDraws:
    """Accept arrays or dicts of sites; return checked flat arrays with names."""
    if isinstance(truth, Mapping) != isinstance(draws, Mapping):
        raise TypeError("truth and draws must both be arrays or both dicts of sites.")
    if isinstance(truth, Mapping):
        sites = [s for s in draws if s in truth]
        if not sites:
            raise ValueError(
                f"truth {sorted(truth)} and draws {sorted(draws)} share no site."
            )
        truth, names_t = flatten_sites({s: truth[s] for s in sites}, 1)
        draws, _ = flatten_sites({s: draws[s] for s in sites}, 2)
        names = names_t if names is None else names
    truth = np.asarray(truth, np.float64)
    draws = np.asarray(draws, np.float64)
    if truth.ndim == 1:
        truth, draws = truth[:, None], draws[..., None]
    if draws.ndim != 3 or truth.shape != (draws.shape[0], draws.shape[2]):
        raise ValueError(
            "Expected truth (num_datasets, num_params) and draws (num_datasets, "
            f"num_samples, num_params); got {truth.shape} and {draws.shape}."
        )
    if names is None:
        names = tuple(f"theta[{i}]" for i in range(truth.shape[1]))
    if len(names) != truth.shape[1]:
        raise ValueError(f"{len(names)} names for {truth.shape[1]} parameters.")
    bad = ~(np.isfinite(truth).all(axis=0) & np.isfinite(draws).all(axis=(0, 1)))
    if bad.any():
        which = [names[i] for i in np.flatnonzero(bad)]
        raise ValueError(
            f"NaN or inf in the truth or draws of {which}; drop those datasets "
            "before computing diagnostics."
        )
    return PosteriorDraws(truth, draws, tuple(names))


def simulate_draws(
    rng_key: jax.Array,
    posterior: Any,
    *,
    num_datasets: int = 200,
    num_samples: int = 500,
) -> PosteriorDraws:
    """Simulate fresh datasets from the model and draw their posteriors.

    ``posterior.model.simulate`` draws ``(theta, x)`` from the prior predictive
    (with the posterior's ``model_args`` / ``model_kwargs`` when it has them); one
    batched ``posterior.sample`` call then draws ``num_samples`` for every dataset.

    Args:
        rng_key: JAX PRNG key.
        posterior: an :class:`~numpyro_amortized.AmortizedPosterior`, or any object
            with ``model`` (an ``AmortizedModel``) and
            ``sample(rng_key, data, num_samples) -> {site: (B, S, *shape)}``.
        num_datasets: simulated datasets ``B``.
        num_samples: posterior draws per dataset ``S``.

    Returns:
        :class:`PosteriorDraws` over the sites the posterior returns.

    Examples:
        >>> import jax, numpyro_amortized as na
        >>> sims = na.diagnostics.simulate_draws(  # doctest: +SKIP
        ...     jax.random.key(0), posterior, num_datasets=100, num_samples=200)
        >>> sims.draws.shape  # doctest: +SKIP
        (100, 200, 4)
    """
    if num_datasets < 2 or num_samples < 1:
        raise ValueError(
            f"Need num_datasets >= 2 and num_samples >= 1; got {num_datasets} and "
            f"{num_samples}."
        )
    sim_key, draw_key = jax.random.split(rng_key)
    model = posterior.model
    args = tuple(getattr(posterior, "model_args", ()))
    kwargs = dict(getattr(posterior, "model_kwargs", {}) or {})
    sims = model.simulate(sim_key, num_datasets, *args, progress=False, **kwargs)
    data = {
        k: v
        for k, v in sims.items()
        if k in model.observed or k in {mask_key(o) for o in model.observed}
    }
    draws = posterior.sample(draw_key, data, num_samples)
    missing = [s for s in draws if s not in sims]
    if missing:
        raise ValueError(
            f"The posterior returns site(s) {missing} that the model's simulations "
            f"lack (simulated sites: {sorted(sims)})."
        )
    return as_flat({s: sims[s] for s in draws}, dict(draws))
