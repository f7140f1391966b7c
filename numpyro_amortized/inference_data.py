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

__all__ = ["import_arviz", "posterior_to_inference_data", "site_dims"]


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
