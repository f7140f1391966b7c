"""The summary-network protocol, shared masking helpers, and user-module support.

**Call protocol.** A summary network is any ``flax.nnx.Module`` called as::

    module(x, mask=None) -> (..., summary_dim)

* set-like / sequential data: ``x`` has shape ``(..., n_obs, obs_dim)`` and ``mask``
  (optional, boolean, True = present) has shape ``(..., n_obs)``;
* flat data (:class:`~numpyro_amortized.networks.MLP`): ``x`` has shape
  ``(..., input_dim)`` and ``mask`` the same shape.

Positions where ``mask`` is False must not influence the output (padding datasets of
different sizes to one array, or missing observations). Library summary specs have
``spec.build(input_dim, *, rngs)`` where ``input_dim`` is ``obs_dim`` (last axis of
``x``); a user's own module is used as it is (:func:`build_summary`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "build_summary",
    "is_summary_module",
    "masked_max",
    "masked_mean",
    "summary_output_dim",
]


def is_summary_module(obj: object) -> bool:
    """True if ``obj`` can be used as a summary network: a callable nnx module.

    (A spec is *not* a module: build it first, or use :func:`build_summary`.)
    """
    return isinstance(obj, nnx.Module) and callable(obj)


def build_summary(summary: Any, input_dim: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """Turns a summary spec (or an already-built nnx module) into a module.

    Args:
        summary: a spec with ``build(input_dim, *, rngs)``, or a user nnx module
            following the call protocol (returned unchanged).
        input_dim: size of the last axis of the observations.
        rngs: initialization rngs (unused for a ready module).

    Raises:
        TypeError: for anything else, with a hint on the expected protocol.
    """
    if is_summary_module(summary):
        return summary
    if hasattr(summary, "build") and not isinstance(summary, type):
        return summary.build(input_dim, rngs=rngs)
    raise TypeError(
        f"Expected a summary spec (e.g. DeepSet()) or a flax.nnx.Module called as "
        f"module(x, mask=None) -> (..., summary_dim); got {type(summary).__name__}."
    )


def summary_output_dim(module: nnx.Module, x_shape: tuple[int, ...]) -> int:
    """Output width of ``module`` for inputs of shape ``x_shape`` (no FLOPs spent)."""
    graphdef, state = nnx.split(module)

    def call(state, x):
        return nnx.merge(graphdef, state)(x)

    out = jax.eval_shape(call, state, jax.ShapeDtypeStruct(x_shape, jnp.float32))
    return int(out.shape[-1])


def _as_weights(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.ones(x.shape[:-1], x.dtype)
    return mask.astype(x.dtype)


def masked_mean(h: jax.Array, mask: jax.Array | None, axis: int = -2) -> jax.Array:
    """Mean of ``h (..., n, f)`` over present rows; zeros if none is present."""
    w = _as_weights(h, mask)[..., None]
    total = jnp.sum(jnp.where(w > 0, h, 0.0), axis=axis)
    return total / jnp.maximum(jnp.sum(w, axis=axis), 1.0)


def masked_max(h: jax.Array, mask: jax.Array | None, axis: int = -2) -> jax.Array:
    """Max of ``h (..., n, f)`` over present rows; zeros if none is present."""
    if mask is None:
        return jnp.max(h, axis=axis)
    m = mask[..., None]
    out = jnp.max(jnp.where(m, h, -jnp.inf), axis=axis)
    return jnp.where(jnp.any(m, axis=axis), out, 0.0)
