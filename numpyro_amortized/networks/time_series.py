"""Summary network for ordered observations (time series): 1-D conv + GRU.

The input ``(..., n_steps, obs_dim)`` gets one extra channel, the mask (1 = present),
and absent values are zeroed. A ``"SAME"``-padded 1-D convolution extracts local
patterns; its zero padding looks exactly like absent steps, so trailing padding plus
a mask reproduces the unpadded result. A GRU (``lax.scan`` over time) reads the conv
features and *skips* absent steps (its state is carried through unchanged). The
summary is an MLP of the final GRU state and the masked mean of the conv features.
The GRU makes the summary order-dependent (by design, not permutation invariant).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from .mlp import DenseNetwork, _activation
from .registry import SpecMixin, register_spec
from .summary import masked_mean

__all__ = ["TimeSeriesNetwork", "TimeSeriesModule"]


class TimeSeriesModule(nnx.Module):
    """``(..., n_steps, obs_dim)`` (+ mask ``(..., n_steps)``) -> ``(..., summary)``."""

    def __init__(self, input_dim: int, spec: TimeSeriesNetwork, *, rngs: nnx.Rngs):
        self.summary_dim = spec.summary_dim
        self.activation = spec.activation
        self.conv = nnx.Conv(
            input_dim + 1,
            spec.conv_features,
            kernel_size=(spec.kernel_size,),
            padding="SAME",
            rngs=rngs,
        )
        self.gru = nnx.GRUCell(spec.conv_features, spec.recurrent_dim, rngs=rngs)
        self.head = DenseNetwork(
            spec.recurrent_dim + spec.conv_features,
            spec.hidden,
            spec.summary_dim,
            activation=spec.activation,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        batch, (n, d) = x.shape[:-2], x.shape[-2:]
        if mask is None:
            mask = jnp.ones((*batch, n), bool)
        mask = jnp.broadcast_to(mask, (*batch, n))
        x = jnp.where(mask[..., None], x, 0.0)
        h = jnp.concatenate([x, mask[..., None].astype(x.dtype)], axis=-1)
        h = _activation(self.activation)(self.conv(h.reshape(-1, n, d + 1)))
        m = mask.reshape(-1, n)

        def step(carry, inputs):
            h_t, m_t = inputs
            new, _ = self.gru(carry, h_t)
            return jnp.where(m_t[:, None], new, carry), None

        carry0 = jnp.zeros((h.shape[0], self.gru.hidden_features), h.dtype)
        final, _ = jax.lax.scan(step, carry0, (jnp.swapaxes(h, 0, 1), m.T))
        feats = jnp.concatenate([final, masked_mean(h, m)], axis=-1)
        return self.head(feats).reshape(*batch, -1)


@register_spec
@dataclasses.dataclass(frozen=True)
class TimeSeriesNetwork(SpecMixin):
    """Spec of an order-aware summary for time series (1-D conv + GRU, masked).

    Args:
        summary_dim: output width (16 default; 2-4x the number of parameters).
        conv_features: channels of the 1-D convolution.
        kernel_size: convolution width (in time steps).
        recurrent_dim: GRU state size.
        hidden: hidden widths of the output MLP.
        activation: activation name.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> net = TimeSeriesNetwork(summary_dim=8).build(1, rngs=nnx.Rngs(0))
        >>> net(jnp.ones((4, 50, 1))).shape
        (4, 8)
    """

    summary_dim: int = 16
    conv_features: int = 32
    kernel_size: int = 3
    recurrent_dim: int = 64
    hidden: tuple[int, ...] = (64,)
    activation: str = "silu"

    def build(self, input_dim: int, *, rngs: nnx.Rngs) -> TimeSeriesModule:
        """Builds the module for observations with ``input_dim`` features per step."""
        return TimeSeriesModule(input_dim, self, rngs=rngs)
