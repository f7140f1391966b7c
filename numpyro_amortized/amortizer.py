"""The amortizer network: summary network + conditional flow, as one nnx module.

Inputs are already standardized. For set-shaped data the context is the summary
network's output plus ``log(n) - log(n_train)`` (the number of observations present),
so one network serves datasets of any size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from numpyro_amortized import networks as nets
from numpyro_amortized.data import ObservationLayout

__all__ = ["AmortizerNetwork", "build_amortizer"]


class AmortizerNetwork(nnx.Module):
    """``q(theta | x) = flow(theta; context = summary(x))``.

    Args:
        flow: a conditional flow module (see :mod:`numpyro_amortized.networks`).
        summary: a summary module called as ``summary(x, mask=None)``, or None to
            use the (flat) data itself as context.
        is_set: whether ``x`` is a set ``(..., n, F)``: then ``log(n / n_ref)`` is
            appended to the context.
        n_ref: the training datasets' number of observations.
    """

    def __init__(
        self,
        flow: nnx.Module,
        summary: nnx.Module | None,
        *,
        is_set: bool,
        n_ref: int,
    ):
        self.flow = flow
        self.summary = summary
        self.is_set = is_set
        self.log_n_ref = float(jnp.log(max(n_ref, 1)))

    def context(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """The flow's conditioning vector for (standardized) data ``x``."""
        h = x if self.summary is None else self.summary(x, mask=mask)
        if self.is_set:
            n = (
                jnp.full(x.shape[:-2], x.shape[-2], x.dtype)
                if mask is None
                else mask.sum(axis=-1).astype(x.dtype)
            )
            h = jnp.concatenate(
                [h, (jnp.log(jnp.maximum(n, 1.0)) - self.log_n_ref)[..., None]], -1
            )
        return h

    def loss(
        self,
        rng_key: jax.Array,
        theta: jax.Array,
        x: jax.Array,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Per-example training loss of the flow given the data."""
        return self.flow.loss(rng_key, theta, self.context(x, mask))


def build_amortizer(
    rng_key: jax.Array,
    inference_net: Any,
    summary_net: Any,
    num_params: int,
    layout: ObservationLayout,
) -> AmortizerNetwork:
    """Build the networks once the model's dimensions are known.

    Args:
        rng_key: initialization key (split between summary and flow).
        inference_net: a flow spec with ``build(num_params, context_dim, *, rngs)``.
        summary_net: a summary spec, a user nnx module (used as is), or None.
        num_params: dimension of the flat unconstrained targets.
        layout: how observed sites become network input.
    """
    init_key, flow_key = jax.random.split(rng_key)
    summary = None
    n_ref = layout.shapes[0][layout.set_axes[0]] if layout.is_set else 1
    if summary_net is not None:
        summary = nets.build_summary(
            summary_net,
            layout.feature_dim,
            rngs=nnx.Rngs(int(jax.random.randint(init_key, (), 0, 2**31 - 1))),
        )
        x_shape = (2, n_ref) if layout.is_set else (2,)
        ctx_dim = nets.summary_output_dim(summary, (*x_shape, layout.feature_dim))
    else:
        ctx_dim = layout.feature_dim
    ctx_dim += int(layout.is_set)
    flow = inference_net.build(
        num_params,
        ctx_dim,
        rngs=nnx.Rngs(int(jax.random.randint(flow_key, (), 0, 2**31 - 1))),
    )
    return AmortizerNetwork(flow, summary, is_set=layout.is_set, n_ref=n_ref)
