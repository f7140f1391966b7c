"""DeepSet summary network (Zaheer et al. 2017) for exchangeable observations.

``summary(x) = rho(pool_i phi(x_i))``: an MLP ``phi`` embeds every observation, the
embeddings are pooled over the observation axis with permutation-invariant
statistics (masked mean and max by default) and, optionally, ``log(1 + n)`` with
``n`` the number of present observations (so the summary knows the sample size, which
sets the posterior's width when ``n_obs`` varies), then an MLP ``rho`` maps the pool to
``summary_dim`` numbers. Masked (padded or missing) observations are excluded from
every pooled statistic, so padding + mask gives the unpadded result.

With mean pooling alone (the default) the last layer of ``phi`` is applied after
pooling: it is affine and the mean is linear, so
``mean_i(W h_i + b) = W mean_i(h_i) + b`` and the widest matrix product runs once
per dataset instead of once per observation. Same function, same parameters (up
to floating-point rounding); on the quickstart (50 observations per dataset) a
training step ran 1.7x faster.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from .mlp import DenseNetwork, is_plain_linear
from .registry import SpecMixin, register_spec
from .summary import masked_max, masked_mean

__all__ = ["DeepSet", "DeepSetModule"]

_POOLS = {"mean": masked_mean, "max": masked_max}


class DeepSetModule(nnx.Module):
    """``(..., n_obs, obs_dim)`` (+ mask ``(..., n_obs)``) -> ``(..., summary_dim)``."""

    def __init__(self, input_dim: int, spec: DeepSet, *, rngs: nnx.Rngs):
        for name in spec.pooling:
            if name not in _POOLS:
                raise ValueError(
                    f"Unknown pooling {name!r}; choose from {list(_POOLS)}."
                )
        self.pooling = tuple(spec.pooling)
        self.include_count = spec.include_count
        self.summary_dim = spec.summary_dim
        self.phi = DenseNetwork(
            input_dim,
            spec.hidden,
            spec.embed_dim,
            activation=spec.activation,
            rngs=rngs,
        )
        pooled = len(self.pooling) * spec.embed_dim + int(spec.include_count)
        self.rho = DenseNetwork(
            pooled, spec.hidden, spec.summary_dim, activation=spec.activation, rngs=rngs
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        if mask is not None:
            x = jnp.where(mask[..., None], x, 0.0)
        if self.pooling == ("mean",) and is_plain_linear(self.phi.output_layer):
            feats = [self._pooled_mean_of_phi(x, mask)]
        else:
            h = self.phi(x)
            feats = [_POOLS[name](h, mask) for name in self.pooling]
        if self.include_count:
            n = x.shape[-2] if mask is None else jnp.sum(mask, axis=-1)
            n = jnp.broadcast_to(jnp.asarray(n, x.dtype), x.shape[:-2])
            feats.append(jnp.log1p(n)[..., None])
        return self.rho(jnp.concatenate(feats, axis=-1))

    def _pooled_mean_of_phi(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """``masked_mean(phi(x), mask)`` with phi's affine last layer after the mean.

        ``masked_mean(h W + b) = masked_mean(h) W + b * masked_mean(1)``; the last
        factor is 1 when any observation is present and 0 when none is, as for
        the mean of the full embeddings.
        """
        h = self.phi.hidden(x)
        out = self.phi.output_layer
        present = masked_mean(jnp.ones_like(h[..., :1]), mask)
        return masked_mean(h, mask) @ out.kernel[...] + present * out.bias[...]


@register_spec
@dataclasses.dataclass(frozen=True)
class DeepSet(SpecMixin):
    """Spec of a permutation-invariant DeepSet summary network.

    Args:
        summary_dim: output width. The number of parameters is unknown when the spec
            is written; 16 suits up to ~8 parameters, use 2-4x the number of
            parameters beyond that.
        embed_dim: width of each observation's embedding ``phi(x_i)``.
        hidden: hidden widths of both ``phi`` and ``rho``.
        pooling: pooled statistics, any of ``"mean"``, ``"max"``.
        include_count: append ``log(1 + n_present)`` to the pooled features.
        activation: activation name.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> net = DeepSet(summary_dim=8).build(2, rngs=nnx.Rngs(0))
        >>> net(jnp.ones((5, 30, 2)), mask=jnp.ones((5, 30), bool)).shape
        (5, 8)
    """

    summary_dim: int = 16
    embed_dim: int = 64
    hidden: tuple[int, ...] = (64,)
    pooling: tuple[str, ...] = ("mean",)
    include_count: bool = True
    activation: str = "silu"

    def build(self, input_dim: int, *, rngs: nnx.Rngs) -> DeepSetModule:
        """Builds the module for observations with ``input_dim`` features."""
        return DeepSetModule(input_dim, self, rngs=rngs)
