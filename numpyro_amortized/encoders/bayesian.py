"""Bayesian encoder weights: the encoder's selected weights as latent sites.

An encoder spec wrapped in ``na.networks.bayesian(...)`` gives the selected
encoder weights a mean-field Gaussian ``q(w)``. :class:`~.guide.EncoderGuide` then
registers, on every call,

* ``"<prefix>$params"``: the point-estimate weights (the unselected ones),
* ``"<prefix>$mean"``, ``"<prefix>$log_var"``: ``{path: array}`` of the selected
  weights (means at the encoder's usual initialisation, log-variances at the
  spec's ``init_logvar``),

and samples each selected weight at ``"<prefix>/<path>"`` from
``N(mean, exp(log_var))`` (reparameterized, one draw per guide call, outside the
data plate), the same site scheme as :class:`~numpyro_amortized.BayesianAmortizedGuide`
(``path`` is the weight's path in the guide's ``EncoderNetwork``,
``"sites.z.net.net.output_layer.kernel"``).

The model needs a prior site for each weight, added by
``guide.model_with_weight_prior()`` outside every plate; with the data term
scaled by ``N / B`` through the subsampled data plate the objective is the
minibatch estimate of the full-data ELBO

    E_q(w)[ sum_i E_q(z_i | x_i, w)[log p(x_i, z_i) - log q(z_i | x_i, w)] ]
        - KL(q(w) || p(w)),

the KL counted once per step (``kl_scale`` multiplies it).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpyro
from flax import nnx

from numpyro_amortized.bayesian_guide import BayesianWeight, sample_bayesian_weights
from numpyro_amortized.epistemic import EpistemicSummary, spread_summary

__all__ = ["bayesian_encoder_module", "encoder_epistemic"]


def bayesian_encoder_module(
    prefix: str,
    network: nnx.Module,
    weights: tuple[BayesianWeight, ...],
    *,
    kl_scale: float = 1.0,
) -> nnx.Module:
    """The encoder network with its Bayesian weights drawn as sample sites.

    The guide-side counterpart of ``numpyro.contrib.module.nnx_module`` for a
    network holding ``BayesianModule`` parts: the point weights are
    ``numpyro.param("<prefix>$params")`` (without the selected weights and the
    log-variances), the selected weights are drawn by
    :func:`~numpyro_amortized.bayesian_guide.sample_bayesian_weights`.

    Args:
        prefix: name prefix of the params and sites.
        network: the guide's encoder network (its current values initialise the
            params).
        weights: its Bayesian weights (``find_bayesian_weights(network)``).
        kl_scale: scale of the weight sites.

    Returns:
        A copy of ``network`` with this call's weights; calling a
        ``BayesianModule`` inside it evaluates the drawn weights.
    """
    graphdef, state, rest = nnx.split(network, nnx.Param, ...)
    flat = list(nnx.to_flat_state(state))
    bayes = {w.mean_path for w in weights} | {w.log_var_path for w in weights}
    point = [(path, v) for path, v in flat if path not in bayes]
    if point:
        values = numpyro.param(
            f"{prefix}$params", nnx.to_pure_dict(nnx.from_flat_state(point))
        )
        for i, (path, v) in enumerate(flat):
            if path not in bayes:
                flat[i] = (path, v.replace(jnp.asarray(_lookup(values, path))))
    state = sample_bayesian_weights(
        prefix, weights, nnx.from_flat_state(flat), kl_scale=kl_scale
    )
    return nnx.merge(graphdef, state, rest)


def encoder_epistemic(
    encode: Any, rng_key: jax.Array, *, num_networks: int
) -> EpistemicSummary:
    """Spread of the encoder's ``q(z_i | x_i)`` across weight draws.

    Args:
        encode: ``key -> {site: q}``: the encoder distributions (unconstrained
            space) of one weight draw.
        rng_key: key of the ``num_networks`` draws.
        num_networks: number of weight draws ``K``.

    Returns:
        An :class:`~numpyro_amortized.EpistemicSummary` whose ``means``/``sds``
        are the mean and sd of each draw's ``q(z_i | x_i)``, ``(K, B, ...)``.
    """

    def moments(key: jax.Array) -> tuple[dict, dict]:
        qs = encode(key)
        try:
            return (
                {k: q.mean for k, q in qs.items()},
                {k: jnp.sqrt(q.variance) for k, q in qs.items()},
            )
        except NotImplementedError as err:
            raise NotImplementedError(
                "EncoderGuide.epistemic needs encoder distributions with a mean "
                "and a variance (Normal, Laplace, StudentT, Bernoulli, "
                "Categorical heads); a flow encoder has neither: draw from "
                "guide.sample_posterior with different keys instead."
            ) from err

    # lax.map, not vmap: compiles one encoder draw (vmap's batched weight draws
    # took twice the compile time for tiny encoders)
    means, sds = jax.lax.map(moments, jax.random.split(rng_key, num_networks))
    return spread_summary(means, sds)


def _lookup(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree
