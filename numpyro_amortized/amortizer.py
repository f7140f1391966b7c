"""The amortizer network: summary network + conditional flow, as one nnx module.

Inputs are already standardized. For set-shaped data the context is the summary
network's output plus ``log(n) - log(n_train)`` (the number of observations present),
so one network serves datasets of any size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["AmortizerNetwork"]


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
