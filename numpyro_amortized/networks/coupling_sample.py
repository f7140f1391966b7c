"""Fast sampling for coupling flows: coordinates as separate arrays, bins unrolled.

``posterior.sample`` draws millions of points through the inverse of every
coupling layer; nothing is differentiated there. This module computes exactly
the same map as ``CouplingFlowModule.inverse_and_log_det`` (up to floating-point
rounding), laid out for the CPU rather than for gradients:

* every coordinate is its own array of shape ``(num_samples, *batch)`` and the
  conditioner's output is moved so its ``P`` parameters are on the *leading*
  axis, so the spline's per-bin quantities are whole arrays and ``K`` bins become
  ``K`` elementwise steps that XLA fuses into one loop (the generic version puts
  the bins on the last axis: short rows, one-hot tables and reductions);
* the context's share of each conditioner's first layer (``context @ W_c + b``)
  is computed once per context, not once per draw;
* the log-determinant is not computed.

Measured on the quickstart posterior (2 CPU cores, 1,000 datasets x 1,000
draws) this roughly halves the sampling time. Its gradients are correct but
slow to compile and run, so density-based and differentiated paths
(``sample_and_log_prob``, ``inverse_and_log_det``) keep the generic code.
:func:`can_sample_fast` says when a flow qualifies (``nnx.Linear`` conditioners
with a hidden layer, and a transform with an ``inverse_columns`` method);
otherwise ``sample`` uses the generic inverse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from .mlp import _activation, is_plain_linear

if TYPE_CHECKING:
    from .coupling import CouplingFlowModule, CouplingLayer

__all__ = ["can_sample_fast", "sample_columns"]


def can_sample_fast(flow: CouplingFlowModule) -> bool:
    """True if :func:`sample_columns` supports every layer of ``flow``."""
    for layer in flow.couplings:
        net = layer.conditioner
        linears = [*getattr(net, "hidden_layers", ()), getattr(net, "output_layer", 0)]
        if len(linears) < 2 or not all(is_plain_linear(m) for m in linears):
            return False
        if not hasattr(layer.transform, "inverse_columns"):
            return False
    return True


def _conditioner_columns(
    layer: CouplingLayer, cond: list[jax.Array], context: jax.Array | None
) -> jax.Array:
    """Conditioner output with the parameters on axis 0: ``(out, *sample_shape)``."""
    net = layer.conditioner
    act = _activation(net.activation)
    first, *rest = net.hidden_layers
    w, b = first.kernel[...], first.bias[...]
    num_cond = len(cond)
    if layer.constant_input:
        h = w[0] + b
    elif context is not None and layer.context_dim:
        h = context.astype(w.dtype) @ w[num_cond:] + b  # once per context
    else:
        h = b
    if num_cond:
        h = jnp.stack(cond, axis=-1) @ w[:num_cond] + h
    for lin in rest:
        h = act(h) @ lin.kernel[...] + lin.bias[...]
    out = net.output_layer
    # Computing the output layer row-major and then transposing measured faster
    # than writing it transposed with one einsum.
    return jnp.moveaxis(act(h) @ out.kernel[...] + out.bias[...], -1, 0)


def sample_columns(
    flow: CouplingFlowModule,
    rng_key: jax.Array,
    context: jax.Array | None,
    num_samples: int,
) -> jax.Array:
    """Draws of ``flow`` as ``flow.sample`` returns them (same keys, same draws).

    Args:
        flow: a coupling flow for which :func:`can_sample_fast` is True.
        rng_key: JAX PRNG key.
        context: ``(*batch, context_dim)`` or None.
        num_samples: draws per context.

    Returns:
        ``(num_samples, *batch, num_params)``.
    """
    z = flow._base_sample(rng_key, context, num_samples)
    cols = [z[..., d] for d in range(z.shape[-1])]
    if context is not None:
        context = context.astype(z.dtype)
    for i in reversed(range(len(flow.couplings))):
        layer = flow.couplings[i]
        params = _conditioner_columns(
            layer, [cols[d] for d in layer.conditioning], context
        )
        per = params.shape[0] // len(layer.transformed)
        for j, d in enumerate(layer.transformed):
            cols[d] = layer.transform.inverse_columns(
                cols[d], params[j * per : (j + 1) * per]
            )
        if len(flow.actnorms):
            norm = flow.actnorms[i]
            shift, log_scale = norm.shift[...], norm.log_scale[...]
            cols = [(c - shift[d]) * jnp.exp(-log_scale[d]) for d, c in enumerate(cols)]
    return jnp.stack(cols, axis=-1)
