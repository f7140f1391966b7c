"""Built-in example models (used by the demo, tests and benchmarks)."""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from numpyro_amortized.model import amortize

__all__ = ["choice_rt", "gaussian_means", "gaussian_means_posterior"]


@amortize(observed=["x"])
def gaussian_means(n_obs: int = 50, dim: int = 4, x=None):
    """The quickstart model: ``mu ~ N(0, I_dim)``, ``x_i ~ N(mu, I_dim)``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0).expand([dim]).to_event(1))
    with numpyro.plate("obs", n_obs):
        numpyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)


def gaussian_means_posterior(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Exact posterior of :func:`gaussian_means`: mean and sd per dimension.

    With prior ``N(0, 1)`` and ``n`` unit-variance observations the posterior is
    ``N(sum(x) / (n + 1), 1 / (n + 1))`` independently per dimension.

    Args:
        x: data of shape ``(..., n_obs, dim)``.

    Returns:
        ``(mean, sd)``, each ``(..., dim)``.
    """
    n = x.shape[-2]
    mean = x.sum(axis=-2) / (n + 1)
    sd = jnp.full_like(mean, 1.0 / jnp.sqrt(n + 1.0))
    return mean, sd


@amortize(observed=["rt", "correct"])
def choice_rt(n_trials: int = 50, rt=None, correct=None):
    """Response times and accuracy of one participant: constrained parameters.

    ``log_rt_mean ~ N(-0.5, 0.5)``, ``rt_scale ~ HalfNormal(0.5)`` (positive),
    ``accuracy ~ Beta(2, 2)`` (a probability); per trial
    ``rt_i ~ LogNormal(log_rt_mean, rt_scale)`` and ``correct_i ~ Bernoulli(accuracy)``.
    """
    log_rt_mean = numpyro.sample("log_rt_mean", dist.Normal(-0.5, 0.5))
    rt_scale = numpyro.sample("rt_scale", dist.HalfNormal(0.5))
    accuracy = numpyro.sample("accuracy", dist.Beta(2.0, 2.0))
    with numpyro.plate("trials", n_trials):
        numpyro.sample("rt", dist.LogNormal(log_rt_mean, rt_scale), obs=rt)
        numpyro.sample("correct", dist.Bernoulli(accuracy), obs=correct)
