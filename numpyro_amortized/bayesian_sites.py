"""Bayesian network weights as NumPyro latent sites (for ``SVI``, ``Predictive``).

In NumPyro terms the selected weights of a
:class:`~numpyro_amortized.networks.BayesianModule` are latent sites: the model
puts the prior on them and the guide the mean-field Gaussian. The two halves
share site names with numpyro's own
:func:`numpyro.contrib.module.random_nnx_module`, so either may be replaced by
numpyro's version:

* **model side** - :func:`random_bayesian_module` registers the network's
  parameters as ``numpyro.param("<name>$params")`` and samples each selected
  weight from the module's prior as ``numpyro.sample("<name>/<path>", ...)``;
* **guide side** - :func:`bayesian_nnx_module` registers the same
  ``"<name>$params"`` (it uses the point values of the unselected parameters),
  ``"<name>$mean"`` and ``"<name>$log_var"`` (dicts by path of the selected
  weights), and samples each selected weight from ``N(mean, exp(log_var))`` at
  the same site names.

Both return the network (an nnx module) with the drawn weights, so the same
pieces serve a Bayesian neural network inside a model (both sides) and a guide
whose own network has Bayesian weights (the guide uses the network; the model
only needs the prior sites, ``random_bayesian_module`` called for its effect).

With ``Trace_ELBO`` the ELBO then contains ``log p(w) - log q(w)`` for the
weights: the per-dataset version of the KL term of amortized training.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro.contrib.module import random_nnx_module

from numpyro_amortized.networks.bayesian import BayesianModule
from numpyro_amortized.networks.bayesian_paths import format_path

__all__ = ["bayesian_nnx_module", "random_bayesian_module"]


def _check(module: Any, where: str) -> BayesianModule:
    if not isinstance(module, BayesianModule):
        raise TypeError(
            f"{where} takes a network with Bayesian weights, e.g. "
            "na.networks.bayesian(spec).build(...) or "
            f"na.networks.BayesianModule(module); got {type(module).__name__}."
        )
    return module


def random_bayesian_module(name: str, module: BayesianModule) -> Any:
    """Model side: the prior over the selected weights as NumPyro sample sites.

    Equivalent to ``random_nnx_module(name, module.net, prior={path: prior})``
    for the selected paths: sites ``"<name>/<path>"`` with the module's prior
    (expanded to the weight's shape), the other parameters
    ``numpyro.param("<name>$params")``.

    Args:
        name: site-name prefix (the same as in the guide).
        module: a :class:`~numpyro_amortized.networks.BayesianModule`.

    Returns:
        A callable: the network with the drawn weights (call it like the module).

    Examples:
        >>> import numpyro_amortized as na  # doctest: +SKIP
        >>> def model(x, y=None):  # doctest: +SKIP
        ...     net = na.random_bayesian_module("net", module)
        ...     numpyro.sample("y", dist.Normal(net(x)[..., 0], 1.0), obs=y)
    """
    module = _check(module, "random_bayesian_module")
    prior = {format_path(p): module.prior for p in module.paths}
    return random_nnx_module(name, module.net, prior=prior)


def bayesian_nnx_module(name: str, module: BayesianModule) -> nnx.Module:
    """Guide side: mean-field Gaussian weights as NumPyro params and sample sites.

    Registers ``"<name>$params"`` (pure dict of the network's parameters, of
    which the unselected ones are used), ``"<name>$mean"`` and
    ``"<name>$log_var"`` (``{path: array}`` for the selected weights), then
    samples each selected weight at ``"<name>/<path>"`` from
    ``N(mean, exp(log_var))`` (reparameterized).

    Args:
        name: site-name prefix (the same as in the model).
        module: a :class:`~numpyro_amortized.networks.BayesianModule`; its
            current means and log-variances are the initial values.

    Returns:
        The network with the drawn weights (a plain nnx module).

    Examples:
        >>> def guide(x, y=None):  # doctest: +SKIP
        ...     na.bayesian_nnx_module("net", module)
    """
    module = _check(module, "bayesian_nnx_module")
    graphdef, state, rest = nnx.split(module.net, nnx.Param, ...)
    flat = list(nnx.to_flat_state(state))
    where = {path: i for i, (path, _) in enumerate(flat)}
    names = [format_path(p) for p in module.paths]
    # numpyro's random_nnx_module replaces the sampled entries of "$params" by
    # shape placeholders, so the means live in their own param.
    params = numpyro.param(f"{name}$params", nnx.to_pure_dict(state))
    selected = set(module.paths)
    for i, (path, variable) in enumerate(flat):
        if path not in selected:
            flat[i] = (path, variable.replace(jnp.asarray(_lookup(params, path))))
    means = numpyro.param(
        f"{name}$mean", {n: m for n, m in zip(names, module.means(), strict=True)}
    )
    log_vars = numpyro.param(
        f"{name}$log_var",
        {n: v[...] for n, v in zip(names, module.log_variances, strict=True)},
    )
    for path, n in zip(module.paths, names, strict=True):
        mean, log_var = means[n], log_vars[n]
        q = dist.Normal(mean, jnp.exp(0.5 * log_var)).to_event(jnp.ndim(mean))
        i = where[path]
        flat[i] = (path, flat[i][1].replace(numpyro.sample(f"{name}/{n}", q)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def _lookup(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree
