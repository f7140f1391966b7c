r"""KL divergences between mean-field Gaussian weights and their prior.

The variational posterior of a selected weight :math:`w` is
:math:`q(w) = N(\mu, \sigma^2)` with :math:`\sigma^2 = \exp(\text{log\_var})`;
the prior :math:`p(w)` is the same scalar distribution for every weight.

**Gaussian prior** :math:`p = N(m, s^2)`, closed form, per weight:

.. math::
    KL(q \| p) = \log\frac{s}{\sigma} + \frac{\sigma^2 + (\mu - m)^2}{2 s^2}
                 - \frac{1}{2}.

**Any other prior** (Laplace, Student-t, a scale mixture, ...): the Monte Carlo
estimate at reparameterized draws :math:`w = \mu + \sigma \epsilon`,
:math:`\epsilon \sim N(0, 1)`:

.. math::
    \widehat{KL} = \log q(w) - \log p(w),

unbiased, and differentiable in :math:`(\mu, \text{log\_var})` through :math:`w`.

Priors are saved with a posterior as ``{"distribution": name, "kwargs": {...}}``
when they are a ``numpyro.distributions`` class with scalar float parameters.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

__all__ = [
    "default_prior",
    "gaussian_kl",
    "is_gaussian_prior",
    "monte_carlo_kl",
    "prior_from_config",
    "prior_to_config",
    "validate_prior",
]


def default_prior() -> dist.Distribution:
    """The default weight prior, ``N(0, 1)``."""
    return dist.Normal(0.0, 1.0)


def validate_prior(prior: Any) -> dist.Distribution:
    """Checks that ``prior`` is a scalar numpyro distribution over the reals.

    Raises:
        TypeError: not a numpyro distribution.
        ValueError: not scalar (it is applied to every weight elementwise).
    """
    if prior is None:
        return default_prior()
    if not isinstance(prior, dist.Distribution):
        raise TypeError(
            "prior must be a numpyro distribution such as dist.Normal(0.0, 1.0); "
            f"got {type(prior).__name__}."
        )
    if prior.batch_shape != () or prior.event_shape != ():
        raise ValueError(
            "The weight prior is applied to every selected weight elementwise, so "
            f"it must be scalar; got batch_shape={prior.batch_shape}, event_shape="
            f"{prior.event_shape}. Use e.g. dist.Normal(0.0, 0.5)."
        )
    return prior


def is_gaussian_prior(prior: dist.Distribution) -> bool:
    """True when the closed-form KL applies (a plain ``dist.Normal``)."""
    return type(prior) is dist.Normal


def gaussian_kl(
    mean: jax.Array, log_var: jax.Array, prior: dist.Distribution
) -> jax.Array:
    """Closed-form ``KL(N(mean, exp(log_var)) || prior)`` summed over all elements.

    Examples:
        >>> float(gaussian_kl(jnp.zeros(3), jnp.zeros(3), dist.Normal(0.0, 1.0)))
        0.0
    """
    if not is_gaussian_prior(prior):
        raise TypeError(
            f"gaussian_kl needs a dist.Normal prior; got {type(prior).__name__} "
            "(use monte_carlo_kl)."
        )
    m, s = prior.loc, prior.scale
    var = jnp.exp(log_var)
    kl = jnp.log(s) - 0.5 * log_var + (var + (mean - m) ** 2) / (2.0 * s**2) - 0.5
    return jnp.sum(kl)


def monte_carlo_kl(
    weights: jax.Array,
    mean: jax.Array,
    log_var: jax.Array,
    prior: dist.Distribution,
) -> jax.Array:
    """``sum(log q(weights) - log p(weights))``: one-sample KL estimate.

    ``weights`` are draws ``mean + exp(log_var / 2) * eps``; leading axes beyond
    the weights' shape are averaged (several draws), the rest summed.

    Examples:
        >>> w = jnp.array([0.3, -0.2])
        >>> float(monte_carlo_kl(w, jnp.zeros(2), jnp.zeros(2), dist.Normal(0.0, 1.0)))
        0.0
    """
    log_q = (
        -0.5 * (weights - mean) ** 2 / jnp.exp(log_var)
        - 0.5 * log_var
        - 0.5 * math.log(2.0 * math.pi)
    )
    log_p = prior.log_prob(weights)
    extra = weights.ndim - mean.ndim
    total = jnp.sum(log_q - log_p, axis=tuple(range(extra, weights.ndim)))
    return jnp.mean(total) if extra else total


def prior_to_config(prior: dist.Distribution) -> dict[str, Any]:
    """A prior as JSON-able data (for saving a posterior).

    Raises:
        TypeError: a prior that is not a ``numpyro.distributions`` class with
            scalar float parameters (e.g. a mixture): such a posterior cannot be
            saved; use ``posterior.sample_network`` for a savable point estimate.
    """
    cls = type(prior)
    name = cls.__name__
    kwargs: dict[str, float] = {}
    ok = getattr(dist, name, None) is cls and bool(cls.arg_constraints)
    if ok:
        for key in cls.arg_constraints:
            value = getattr(prior, key, None)
            if value is None or jnp.ndim(value) != 0:
                ok = False
                break
            kwargs[key] = float(value)
    if not ok:
        raise TypeError(
            f"Cannot save the Bayesian weight prior {prior!r}: only numpyro "
            "distributions with scalar parameters (dist.Normal, dist.Laplace, "
            "dist.StudentT, ...) can be saved. Save a point estimate instead "
            "(posterior.sample_network(key).save(path)) or use such a prior."
        )
    return {"distribution": name, "kwargs": kwargs}


def prior_from_config(config: dict[str, Any]) -> dist.Distribution:
    """Inverse of :func:`prior_to_config`."""
    cls = getattr(dist, config["distribution"], None)
    if not isinstance(cls, type) or not issubclass(cls, dist.Distribution):
        raise KeyError(f"Unknown prior distribution {config['distribution']!r}.")
    return cls(**config["kwargs"])
