"""Amortized variational inference: train the posterior network by the ELBO.

When the model's likelihood is tractable, the amortized posterior ``q(theta | x)``
can be trained by the reverse KL instead of (or in addition to) neural posterior
estimation (NPE, forward KL). For datasets ``x ~ p(x)`` simulated from the model,
maximize the evidence lower bound

    ELBO(x) = E_{theta ~ q(.|x)}[log p(theta) + log p(x | theta) - log q(theta | x)]
            = log p(x) - KL(q(. | x) || p(. | x)),

with reparameterized draws (``theta = T(m + s * f^{-1}(z; c(x)))``,
``z ~ N(0, I)``) and ``log p(theta, x)`` from
:func:`numpyro.infer.util.log_density` on the model conditioned on ``theta`` and
``x``. The per-dataset loss is ``-ELBO(x)`` estimated with ``num_particles`` draws
(unbiased for the ELBO; its gradient is the gradient of the KL since ``log p(x)``
does not depend on the network).

The *mixed* objective adds the NPE loss on the simulated ``(theta, x)`` pairs,

    loss = elbo_weight * (-ELBO(x)) + npe_weight * (-log q_v(v | x)),

which keeps NPE's mass-covering behaviour while the ELBO term sharpens the fit
where the likelihood is informative. Both terms are in nats per dataset (the NPE
term in the standardized space, a constant away from the constrained one).

Loss functions follow :mod:`numpyro_amortized.train`:
``loss_fn(params, rng_key, batch) -> (B,)``, so ``make_train_step`` and
``make_epoch`` train them as they train NPE. Here ``batch`` is
``(theta, x, mask, obs)``: standardized unconstrained targets, standardized
network input, its mask (or None), and the raw observed sites ``{name: (B, ...)}``
the likelihood is evaluated at.

Limits: every latent site of the model must be a target (the ELBO needs a
density for each; nuisance sites are an error naming them), and the model's
arguments are the posterior's fixed ``model_args`` / ``model_kwargs`` (no padded,
varying-size datasets).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx
from numpyro import handlers
from numpyro.infer.util import log_density

from numpyro_amortized.space import LatentSpace

if TYPE_CHECKING:
    from numpyro_amortized.posterior import AmortizedPosterior

__all__ = ["check_no_nuisance", "elbo_loss_fn", "make_log_joint", "negative_elbo"]


def make_log_joint(
    model: Callable, model_args: tuple = (), model_kwargs: dict | None = None
) -> Callable[[dict, dict], jax.Array]:
    """``log_joint(theta, obs) = log p(theta, obs)`` of a NumPyro model.

    The model is conditioned on both dicts (latent and observed sites by name)
    and its joint log density summed by :func:`numpyro.infer.util.log_density`.

    Args:
        model: a NumPyro model function.
        model_args: positional model arguments.
        model_kwargs: keyword model arguments (not the observed data).

    Examples:
        >>> from numpyro_amortized.models import gaussian_means
        >>> log_joint = make_log_joint(gaussian_means.fn, (), {"n_obs": 3, "dim": 1})
        >>> lp = log_joint({"mu": jnp.zeros(1)}, {"x": jnp.zeros((3, 1))})
        >>> round(float(lp), 3)  # 4 * log N(0; 0, 1)
        -3.676
    """
    model_kwargs = dict(model_kwargs or {})

    def log_joint(theta: dict, obs: dict) -> jax.Array:
        conditioned = handlers.condition(model, data={**theta, **obs})
        return log_density(conditioned, tuple(model_args), model_kwargs, {})[0]

    return log_joint


def negative_elbo(
    rng_key: jax.Array,
    net: nnx.Module,
    x: jax.Array,
    mask: jax.Array | None,
    obs: dict[str, jax.Array],
    *,
    space: LatentSpace,
    theta_std: Any,
    log_joint: Callable[[dict, dict], jax.Array],
    num_particles: int = 1,
) -> jax.Array:
    """Per-dataset ``-ELBO``, estimated with ``num_particles`` reparameterized draws.

    Args:
        rng_key: JAX PRNG key.
        net: the amortizer network (``context``, ``flow``).
        x: standardized network input ``(B, ...)``.
        mask: its mask or None.
        obs: raw observed sites ``{name: (B, ...)}``.
        space: the targets' flat unconstrained space.
        theta_std: the targets' standardizer (``u = v * std + mean``).
        log_joint: ``(theta, obs) -> log p(theta, obs)`` for one dataset.
        num_particles: draws per dataset.

    Returns:
        ``(B,)``: ``mean_p [log q(theta_p | x) - log p(theta_p, x)]``.
    """
    ctx = net.context(x, mask)
    v, log_qv = net.flow.sample_and_log_prob(rng_key, ctx, num_particles)  # (P, B, .)
    theta, log_det = space.constrain(theta_std.inverse(v))
    log_q = log_qv - theta_std.log_scale - log_det
    per_dataset = jax.vmap(log_joint, in_axes=(0, 0))  # over B
    log_p = jax.vmap(per_dataset, in_axes=(0, None))(theta, obs)  # over P
    return jnp.mean(log_q - log_p, axis=0)


def elbo_loss_fn(
    post: AmortizedPosterior,
    *,
    num_particles: int = 1,
    elbo_weight: float = 1.0,
    npe_weight: float = 0.0,
) -> Callable[[Any, jax.Array, tuple], jax.Array]:
    """The (mixed) amortized-VI loss of a built posterior, for ``make_train_step``.

    Args:
        post: an ``AmortizedPosterior`` whose networks exist (fitted, or built by
            :func:`~numpyro_amortized.vi.fit_elbo`).
        num_particles: draws per dataset for the ELBO estimate.
        elbo_weight: weight of ``-ELBO(x)``.
        npe_weight: weight of the NPE loss ``-log q_v(v | x)`` (0: pure ELBO).

    Returns:
        ``loss_fn(params, rng_key, (theta, x, mask, obs)) -> (B,)``.

    Raises:
        ValueError: the model has latent sites that are not targets.
    """
    f = post._require()
    check_no_nuisance(post)
    graphdef, rest, space, theta_std = f.graphdef, f.rest, f.space, f.theta_std
    log_joint = make_log_joint(post.model.fn, post.model_args, post.model_kwargs)

    def loss_fn(params, rng_key, batch):
        theta, x, mask, obs = batch
        net = nnx.merge(graphdef, params, rest)
        elbo_key, npe_key = jax.random.split(rng_key)
        loss = jnp.zeros(x.shape[0])
        if elbo_weight:
            loss = loss + elbo_weight * negative_elbo(
                elbo_key,
                net,
                x,
                mask,
                obs,
                space=space,
                theta_std=theta_std,
                log_joint=log_joint,
                num_particles=num_particles,
            )
        if npe_weight:
            loss = loss + npe_weight * net.loss(npe_key, theta, x, mask)
        return loss

    return loss_fn


def check_no_nuisance(post: AmortizedPosterior) -> None:
    """Raise if the model has latent sites the ELBO would have no density for."""
    model = post.model
    sites = model.describe(*post.model_args, **post.model_kwargs)
    targets = set(post._require().space.names)
    nuisance = [n for n, s in sites.items() if not s.is_observed and n not in targets]
    if nuisance:
        raise ValueError(
            f"Amortized VI needs a density for every latent site, but the model has "
            f"latent site(s) {nuisance} that are not targets (targets: "
            f"{sorted(targets)}). Make them targets (AmortizedPosterior(..., "
            "targets=[...]); continuous sites only), sum them out in the model, "
            "or train by NPE (posterior.fit), which marginalizes them by simulation."
        )
