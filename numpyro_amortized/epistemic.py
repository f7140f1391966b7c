"""Posteriors with Bayesian network weights: training loss, sampled networks,
and how unsure the amortizer is of itself (epistemic uncertainty).

Functions of an :class:`~numpyro_amortized.AmortizedPosterior` whose networks were
wrapped in :func:`na.networks.bayesian <numpyro_amortized.networks.bayesian>`;
the posterior's methods ``sample(..., num_networks=K)``, ``sample_network`` and
``epistemic`` are thin calls into this module.

Two kinds of uncertainty: the spread of the draws of *one* network is the
posterior uncertainty about the parameters given the data (what the amortizer
learned); the spread *across* networks drawn from the weight posterior is the
amortizer's uncertainty about its own answer, which shrinks with more training
simulations and grows for data unlike the training simulations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from numpyro_amortized.networks.bayesian import (
    BayesianNetwork,
    is_bayesian,
    sample_weights,
)

if TYPE_CHECKING:
    from numpyro_amortized.posterior import AmortizedPosterior

__all__ = [
    "EpistemicSummary",
    "bayesian_loss_fn",
    "epistemic_summary",
    "require_bayesian",
    "sample_network",
    "sample_networks",
    "spread_summary",
]


class EpistemicSummary(NamedTuple):
    """Spread of posterior summaries across networks drawn from ``q(w)``.

    All fields are ``{target site: array}``; ``K`` is ``num_networks`` and
    ``batch`` the data's dataset axes (none for one dataset).

    Attributes:
        means: posterior mean of each network, ``(K, *batch, *site_shape)``.
        sds: posterior sd of each network, same shape.
        mean_spread: sd across networks of the posterior means,
            ``(*batch, *site_shape)`` - the epistemic uncertainty of the estimate.
        sd_spread: sd across networks of the posterior sds.
        relative_spread: ``mean_spread`` divided by the average posterior sd: how
            large the amortizer's doubt is compared with the posterior's own width
            (unitless; near 0 when the networks agree).
    """

    means: dict[str, jax.Array]
    sds: dict[str, jax.Array]
    mean_spread: dict[str, jax.Array]
    sd_spread: dict[str, jax.Array]
    relative_spread: dict[str, jax.Array]


def require_bayesian(post: AmortizedPosterior, what: str) -> None:
    """Raise ``ValueError`` unless the posterior has Bayesian weights."""
    f = post._require()
    if not is_bayesian(nnx.merge(f.graphdef, f.params, f.rest)):
        raise ValueError(
            f"{what} needs Bayesian network weights, but this posterior's networks "
            "are point estimates. Build it with e.g. inference_net="
            "na.networks.bayesian(na.networks.NeuralSplineFlow()) and fit again."
        )


def bayesian_loss_fn(graphdef: Any, rest: Any, num_simulations: int) -> Callable:
    """Per-example negative ELBO ``loss(w) + KL(q || p) / num_simulations``.

    ``w`` is one draw per call (one per batch in training) with the first half of
    ``rng_key``; the network's own loss gets the second half.
    """
    if num_simulations is None or int(num_simulations) < 1:
        raise ValueError(
            "Bayesian weights scale KL(q || p) by the number of training "
            f"simulations; got num_simulations={num_simulations!r}."
        )
    scale = 1.0 / float(num_simulations)

    def loss_fn(params: Any, rng_key: jax.Array, batch: Any) -> jax.Array:
        theta, x, mask = batch
        weight_key, loss_key = jax.random.split(rng_key)
        net = nnx.merge(graphdef, params, rest)
        net, kl = sample_weights(weight_key, net, local_reparameterization=True)
        return net.loss(loss_key, theta, x, mask) + kl * scale

    return loss_fn


def sample_networks(
    post: AmortizedPosterior,
    rng_key: jax.Array,
    data: dict,
    num_samples: int,
    num_networks: int,
) -> dict[str, jax.Array]:
    """Body of ``posterior.sample(..., num_networks=K)``.

    Network ``k`` has its weights drawn with ``split(rng_key, K)[k]`` and draws
    as ``posterior.sample`` does with that network (a split of the same key).

    Returns:
        ``{target: (K, *batch, num_samples, *site_shape)}``.
    """
    from numpyro_amortized.posterior import draw_targets

    require_bayesian(post, "sample(..., num_networks=K)")
    if int(num_networks) < 1:
        raise ValueError(f"num_networks must be >= 1; got {num_networks}.")
    f = post._require()
    _, x, mask = post._data_arrays(data)
    graphdef, rest, space = f.graphdef, f.rest, f.space

    def draw(params, theta_std, x_std, key, x, mask, num_samples, num_networks):
        def one(k):
            weight_key, sample_key = jax.random.split(k)
            net, _ = sample_weights(weight_key, nnx.merge(graphdef, params, rest))
            return draw_targets(
                net, space, theta_std, x_std, sample_key, x, mask, num_samples
            )

        return jax.vmap(one)(jax.random.split(key, num_networks))

    fn = post._jit(
        f"sample_networks{x.ndim}",
        draw,
        static_argnames=("num_samples", "num_networks"),
    )
    return fn(
        f.params, f.theta_std, f.x_std, rng_key, x, mask, num_samples, num_networks
    )


def sample_network(post: AmortizedPosterior, rng_key: jax.Array) -> AmortizedPosterior:
    """Body of ``posterior.sample_network``: a point-estimate posterior whose
    weights are one draw from ``q(w)`` (plain specs, savable, deterministic)."""
    from numpyro_amortized.posterior import AmortizedPosterior

    require_bayesian(post, "sample_network")
    f = post._require()
    net, _ = sample_weights(rng_key, nnx.merge(f.graphdef, f.params, f.rest))
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    out = AmortizedPosterior(
        post.model,
        _plain(post.inference_net),
        _plain(post.summary_net),
        model_args=post.model_args,
        model_kwargs=post.model_kwargs,
    )
    out._fitted = f._replace(
        graphdef=graphdef,
        params=params,
        rest=rest,
        summary_net=_plain(f.summary_net),
    )
    out.history = post.history
    # Every sampled network has the structure (graphdef, rest) of the first one
    # and the compiled functions take the weights as arguments, so they share
    # one cache (plotting several sampled networks compiles once).
    out._jitted = post._jitted.setdefault("sample_network:shared", {})
    return out


def _plain(spec: Any) -> Any:
    return spec.spec if isinstance(spec, BayesianNetwork) else spec


def epistemic_summary(
    post: AmortizedPosterior,
    rng_key: jax.Array,
    data: dict,
    *,
    num_networks: int = 20,
    num_samples: int = 500,
) -> EpistemicSummary:
    """Body of ``posterior.epistemic`` (see :class:`EpistemicSummary`)."""
    draws = sample_networks(post, rng_key, data, num_samples, num_networks)
    batch_ndim = len(post._require().layout.batch_shape(data))
    axis = 1 + batch_ndim  # (K, *batch, S, *shape)
    means = {k: jnp.mean(v, axis=axis) for k, v in draws.items()}
    sds = {k: jnp.std(v, axis=axis) for k, v in draws.items()}
    return spread_summary(means, sds)


def spread_summary(
    means: dict[str, jax.Array], sds: dict[str, jax.Array]
) -> EpistemicSummary:
    """An :class:`EpistemicSummary` from per-network means and sds, ``(K, ...)``."""
    mean_spread = {k: jnp.std(v, axis=0) for k, v in means.items()}
    sd_spread = {k: jnp.std(v, axis=0) for k, v in sds.items()}
    relative = {
        k: mean_spread[k] / jnp.maximum(jnp.mean(sds[k], axis=0), 1e-30) for k in means
    }
    return EpistemicSummary(means, sds, mean_spread, sd_spread, relative)
