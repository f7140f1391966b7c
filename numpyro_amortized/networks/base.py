"""The conditional-flow contract shared by every flow module.

A flow is a bijection ``f(., context)`` from data space (``x``) to base space
(``z``) with a standard-normal base density. Subclasses implement two methods,
everything else derives from them (as in distrax / flowjax):

* ``forward_and_log_det(x, context) -> (z, log|det dz/dx|)``  (data -> base)
* ``inverse_and_log_det(z, context) -> (x, log|det dx/dz|)``  (base -> data)

Derived here:

* ``log_prob(x, context) = log N(f(x); 0, I) + log|det df/dx|``
* ``sample(rng_key, context, num_samples)`` with shape
  ``(num_samples, *context_batch_shape, num_params)`` - the sample axis comes
  **first**, then the context's leading axes (``(num_samples, num_params)`` when the
  context is None or has no leading axes).
* ``sample_and_log_prob`` with the same shapes.
* ``loss(rng_key, x, context)``: per-example training loss; here the negative
  log-likelihood. Flows trained otherwise (flow matching) override it, so a trainer
  treats every flow the same way.

All methods broadcast: ``x`` has shape ``(..., num_params)``, ``context`` has shape
``(..., context_dim)`` and its leading axes are broadcast against ``x``'s. ``context``
may be ``None`` when ``context_dim == 0``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "FlowModule",
    "broadcast_context",
    "is_flow_module",
    "standard_normal_log_prob",
]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
    """Log density of ``N(0, I)`` summed over the last axis."""
    return -0.5 * jnp.sum(z * z, axis=-1) - z.shape[-1] * _HALF_LOG_2PI


def broadcast_context(
    x: jax.Array, context: jax.Array | None, context_dim: int
) -> tuple[jax.Array, jax.Array]:
    """Broadcasts ``x (..., d)`` and ``context (..., c)`` to common leading axes.

    Returns ``(x, context)`` with equal leading shapes; a ``None`` context becomes an
    array of shape ``(..., 0)``.

    Raises:
        ValueError: if ``context`` is None but ``context_dim > 0``, or has the wrong
            width.
    """
    if context is None:
        if context_dim != 0:
            raise ValueError(
                f"This flow was built with context_dim={context_dim} but context=None."
            )
        return x, jnp.zeros((*x.shape[:-1], 0), x.dtype)
    if context.shape[-1] != context_dim:
        raise ValueError(
            f"context has last axis {context.shape[-1]}, expected {context_dim}."
        )
    batch = jnp.broadcast_shapes(x.shape[:-1], context.shape[:-1])
    x = jnp.broadcast_to(x, (*batch, x.shape[-1]))
    context = jnp.broadcast_to(context, (*batch, context.shape[-1])).astype(x.dtype)
    return x, context


def is_flow_module(obj: object) -> bool:
    """True if ``obj`` is an nnx module that follows the flow contract above."""
    return isinstance(obj, nnx.Module) and all(
        callable(getattr(obj, name, None))
        for name in ("forward_and_log_det", "inverse_and_log_det", "log_prob", "sample")
    )


class FlowModule(nnx.Module):
    """Base class: derives densities, sampling and the loss from the two maps.

    Subclasses set ``self.num_params`` and ``self.context_dim`` and implement
    ``forward_and_log_det`` and ``inverse_and_log_det``.
    """

    num_params: int
    context_dim: int

    def forward_and_log_det(
        self, x: jax.Array, context: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Data ``x`` -> base ``z`` and ``log|det dz/dx|``."""
        raise NotImplementedError

    def inverse_and_log_det(
        self, z: jax.Array, context: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Base ``z`` -> data ``x`` and ``log|det dx/dz|``."""
        raise NotImplementedError

    def log_prob(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """Log density of ``x`` given ``context``, shape ``x.shape[:-1]``."""
        z, log_det = self.forward_and_log_det(x, context)
        return standard_normal_log_prob(z) + log_det

    def _base_sample(
        self, rng_key: jax.Array, context: jax.Array | None, num_samples: int
    ) -> jax.Array:
        batch = () if context is None else context.shape[:-1]
        return jax.random.normal(rng_key, (num_samples, *batch, self.num_params))

    def sample(
        self, rng_key: jax.Array, context: jax.Array | None = None, num_samples: int = 1
    ) -> jax.Array:
        """Draws ``(num_samples, *context.shape[:-1], num_params)`` samples."""
        z = self._base_sample(rng_key, context, num_samples)
        x, _ = self.inverse_and_log_det(z, context)
        return x

    def sample_and_log_prob(
        self, rng_key: jax.Array, context: jax.Array | None = None, num_samples: int = 1
    ) -> tuple[jax.Array, jax.Array]:
        """Samples as in :meth:`sample` and their log densities (from the same pass)."""
        z = self._base_sample(rng_key, context, num_samples)
        x, log_det = self.inverse_and_log_det(z, context)
        return x, standard_normal_log_prob(z) - log_det

    def loss(
        self, rng_key: jax.Array, x: jax.Array, context: jax.Array | None = None
    ) -> jax.Array:
        """Per-example training loss, shape ``x.shape[:-1]``: ``-log_prob(x|context)``.

        ``rng_key`` is unused here; it is part of the signature so that every flow
        (including stochastic losses such as flow matching) is trained the same way.
        """
        del rng_key
        return -self.log_prob(x, context)
