"""The one module that talks to ArviZ (0.23, ``InferenceData``).

Dimension names: a site's axes that belong to plates are named after the plates;
other axes are ``<site>_dim_<i>``. Posterior variables have ``(chain, draw, ...)``
with one chain for amortized draws; a batch of datasets adds a ``dataset``
dimension right after ``draw`` (and first in ``observed_data``). Draws from several
networks sampled from Bayesian weights add a ``network`` dimension right after
``draw`` (before ``dataset``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from numpyro_amortized.sites import SiteInfo
from numpyro_amortized.varying import MASK_SUFFIX

__all__ = [
    "convergence",
    "import_arviz",
    "nuts_to_inference_data",
    "plot_overlay",
    "posterior_to_inference_data",
    "select_dataset",
    "site_dims",
]


def import_arviz() -> Any:
    """Import ArviZ without its import-time notice about the 1.x refactor."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ArviZ is undergoing")
        import arviz

    return arviz


def site_dims(site: SiteInfo, ndim: int | None = None) -> list[str]:
    """Dimension names of one draw of ``site`` (plates by name)."""
    ndim = len(site.shape) if ndim is None else ndim
    names = [f"{site.name}_dim_{i}" for i in range(ndim)]
    nb = len(site.batch_shape)
    for p in site.plates:
        axis = nb + p.dim
        if 0 <= axis < ndim:
            names[axis] = p.name
    return names


def posterior_to_inference_data(
    draws: dict[str, Any],
    observed: dict[str, Any],
    sites: dict[str, SiteInfo],
    batch_ndim: int,
    *,
    network_axis: bool = False,
) -> Any:
    """Amortized draws ``{site: (*batch, S, *shape)}`` -> ``InferenceData``.

    Args:
        draws: posterior draws per target site.
        observed: observed data per site (masks as ``<site>_mask``).
        sites: site metadata of the model.
        batch_ndim: number of leading dataset axes (0 or 1).
        network_axis: the draws have a leading axis of sampled networks,
            ``(K, *batch, S, *shape)``; it becomes the ``network`` dimension.
    """
    az = import_arviz()
    if batch_ndim > 1:
        raise ValueError(
            "to_inference_data supports one dataset axis; reshape the batch to 1-D."
        )
    posterior, dims = {}, {}
    lead = batch_ndim + int(network_axis)
    lead_dims = (["network"] if network_axis else []) + (
        ["dataset"] if batch_ndim else []
    )
    for name, v in draws.items():
        v = np.asarray(v)
        v = np.moveaxis(v, lead, 0)  # (S, [K], [B], *shape)
        posterior[name] = v[None]  # one chain
        dims[name] = lead_dims + site_dims(sites[name], v.ndim - 1 - lead)
    obs, obs_dims = {}, {}
    for name, v in observed.items():
        v = np.asarray(v)
        base = name[: -len(MASK_SUFFIX)] if name.endswith(MASK_SUFFIX) else name
        site_names = site_dims(sites[base], v.ndim - batch_ndim)
        obs[name] = v
        obs_dims[name] = (["dataset"] if batch_ndim else []) + site_names
    return az.from_dict(
        posterior=posterior,
        observed_data=obs,
        dims={**dims, **obs_dims},
    )


#: NUTS statistics -> ArviZ ``sample_stats`` names.
_STAT_NAMES = {
    "diverging": "diverging",
    "num_steps": "n_steps",
    "accept_prob": "acceptance_rate",
}


def nuts_to_inference_data(
    samples: dict[str, Any],
    stats: dict[str, Any],
    observed: dict[str, Any],
    sites: dict[str, SiteInfo],
    batch_ndim: int,
) -> Any:
    """NUTS draws ``{site: (*batch, chain, draw, *shape)}`` -> ``InferenceData``.

    Same layout as :func:`posterior_to_inference_data` (``dataset`` right after
    ``draw``), with every chain, plus ``sample_stats`` (``diverging``,
    ``n_steps``, ``acceptance_rate``; ``(chain, draw[, dataset])``).

    Args:
        samples: NUTS draws per latent site.
        stats: ``{"diverging", "num_steps", "accept_prob"}`` of shape
            ``(*batch, chain, draw)``.
        observed: observed data per site.
        sites: site metadata of the model.
        batch_ndim: number of leading dataset axes (0 or 1).
    """
    az = import_arviz()
    if batch_ndim > 1:
        raise ValueError("nuts_to_inference_data supports one dataset axis.")

    def to_chain_draw(v: Any) -> np.ndarray:
        v = np.asarray(v)
        return np.moveaxis(v, 0, 2) if batch_ndim else v  # (C, S, B, ...)

    lead = ["dataset"] if batch_ndim else []
    posterior, dims = {}, {}
    for name, v in samples.items():
        v = to_chain_draw(v)
        posterior[name] = v
        dims[name] = lead + site_dims(sites[name], v.ndim - 2 - batch_ndim)
    sample_stats = {_STAT_NAMES[k]: to_chain_draw(v) for k, v in stats.items()}
    for k in sample_stats:
        dims[k] = list(lead)
    obs, obs_dims = {}, {}
    for name, v in observed.items():
        v = np.asarray(v)
        obs[name] = v
        obs_dims[name] = lead + site_dims(sites[name], v.ndim - batch_ndim)
    return az.from_dict(
        posterior=posterior,
        sample_stats=sample_stats,
        observed_data=obs,
        dims={**dims, **obs_dims},
    )


def convergence(idata: Any, var_names: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Split R-hat and bulk/tail ESS per site (ArviZ's rank-normalized versions).

    Returns:
        ``{"r_hat" | "ess_bulk" | "ess_tail": {site: array}}``, each array with the
        site's non-sample dimensions (``[dataset,] *site_dims``).
    """
    az = import_arviz()
    out = {
        "r_hat": az.rhat(idata, var_names=var_names),
        "ess_bulk": az.ess(idata, var_names=var_names, method="bulk"),
        "ess_tail": az.ess(idata, var_names=var_names, method="tail"),
    }
    return {k: {n: np.asarray(v[n].values) for n in var_names} for k, v in out.items()}


def select_dataset(idata: Any, index: int) -> Any:
    """One dataset of a batched ``InferenceData`` (drops the ``dataset`` dim)."""
    return idata.isel(dataset=index)


def plot_overlay(
    idatas: dict[str, Any],
    var_names: list[str],
    *,
    colors: tuple[str, ...] = ("C0", "C1"),
    max_draws: int = 1000,
) -> Any:
    """Overlaid marginals and pairs of several ``InferenceData`` (one dataset).

    With two or more scalar parameters: ArviZ pair plots (scatter below the
    diagonal, KDE marginals on it), one call per ``InferenceData`` on the same
    axes; with one: overlaid densities. Draws are thinned to ``max_draws`` per
    ``InferenceData`` for the scatter.

    Returns:
        The matplotlib ``Figure``.
    """
    az = import_arviz()
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    thinned = {}
    for label, idata in idatas.items():
        post = idata.posterior[var_names]
        total = post.sizes["chain"] * post.sizes["draw"]
        flat = post.stack(sample=("chain", "draw")).transpose("sample", ...)
        flat = flat.isel(sample=slice(None, None, max(1, total // max_draws)))
        flat = flat.drop_vars(["sample", "chain", "draw"]).rename(sample="draw")
        thinned[label] = flat.expand_dims("chain").transpose("chain", "draw", ...)
    first = next(iter(thinned.values()))
    num_params = sum(
        int(np.prod([n for d, n in v.sizes.items() if d not in ("chain", "draw")]))
        for v in first.data_vars.values()
    )
    size = 2.3 * max(num_params, 1) + 0.5
    if num_params >= 2:
        fig = Figure(figsize=(size, size), layout="constrained")
        ax = fig.subplots(num_params, num_params, squeeze=False)
        for post, color in zip(thinned.values(), colors, strict=False):
            az.plot_pair(
                post,
                var_names=var_names,
                marginals=True,
                ax=ax,
                scatter_kwargs={"color": color, "alpha": 0.35, "s": 6},
                marginal_kwargs={"color": color},
            )
    else:
        fig = Figure(figsize=(5, 3.5), layout="constrained")
        ax = fig.subplots(1, 1, squeeze=False)
        az.plot_density(
            list(thinned.values()),
            var_names=var_names,
            data_labels=list(thinned),
            colors=list(colors[: len(thinned)]),
            shade=0.1,
            ax=ax,
        )
    handles = [
        Line2D([], [], color=c, label=label)
        for label, c in zip(thinned, colors, strict=False)
    ]
    fig.legend(handles=handles, loc="upper right")
    return fig
