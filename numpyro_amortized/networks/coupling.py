"""Coupling flows: the shared machinery and the affine (RealNVP-style) spec.

A coupling layer splits the ``num_params`` coordinates into *transformed* indices
``T`` and *conditioning* indices ``C``. A conditioner MLP reads ``(x_C, context)`` and
outputs the parameters of an elementwise bijection applied to ``x_T``; ``x_C`` passes
through unchanged, so the Jacobian is triangular and
``log|det| = sum_T log|dy_t/dx_t|``.

Which coordinates are transformed changes from layer to layer (``permutation``):

* ``"alternate"``: even/odd coordinates alternate between ``T`` and ``C``.
* ``"random"``: layers come in pairs sharing a fixed random permutation (drawn with
  numpy from ``seed``); the first layer of a pair transforms its first half, the
  second layer the other half, so every coordinate is transformed in every pair.

**One parameter** (``num_params == 1``): there is nothing to condition on inside
``x``, so every layer transforms the single coordinate with a conditioner that sees
only the context. The flow is then a stack of context-dependent elementwise
bijections - a full conditional 1-D density, not an identity. (Without context the
conditioner gets a constant input, i.e. learns a fixed elementwise bijection.)

The conditioner's output layer is zero-initialized so every flow starts exactly at
the identity (a standard-normal density), which keeps early training stable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .base import FlowModule, broadcast_context
from .coupling_sample import can_sample_fast, sample_columns
from .mlp import DenseNetwork
from .registry import SpecMixin, register_spec

__all__ = [
    "ActNorm",
    "AffineTransform",
    "CouplingFlow",
    "CouplingFlowModule",
    "CouplingLayer",
    "coupling_partitions",
]

Partition = tuple[tuple[int, ...], tuple[int, ...]]


def coupling_partitions(
    num_params: int, num_layers: int, *, permutation: str = "random", seed: int = 0
) -> list[Partition]:
    """``(transformed, conditioning)`` index tuples for each layer (see module doc)."""
    if num_params < 1:
        raise ValueError(f"num_params must be >= 1, got {num_params}.")
    if num_params == 1:
        return [((0,), ())] * num_layers
    dims = np.arange(num_params)
    parts: list[Partition] = []
    for i in range(num_layers):
        if permutation == "alternate":
            first = tuple(int(d) for d in dims[dims % 2 == 0])
            second = tuple(int(d) for d in dims[dims % 2 == 1])
        elif permutation == "random":
            perm = np.random.default_rng(seed + i // 2).permutation(num_params)
            half = (num_params + 1) // 2
            first = tuple(sorted(int(d) for d in perm[:half]))
            second = tuple(sorted(int(d) for d in perm[half:]))
        else:
            raise ValueError(
                f"permutation must be 'alternate' or 'random', got {permutation!r}."
            )
        parts.append((first, second) if i % 2 == 0 else (second, first))
    return parts


@dataclasses.dataclass(frozen=True)
class AffineTransform:
    """Elementwise affine map ``y = x * exp(s) + t`` with a soft-clamped log-scale.

    ``s = clamp * tanh(s_raw / clamp)`` keeps ``|s| < clamp`` (smoothly, unlike a
    hard clip), which prevents exploding scales early in training.
    """

    clamp: float = 2.0

    @property
    def num_transform_params(self) -> int:
        """Raw parameters per transformed dimension: ``(s_raw, t)``."""
        return 2

    def __call__(
        self, x: jax.Array, params: jax.Array, *, inverse: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """``(y, log|dy/dx|)`` elementwise; ``params`` has shape ``(..., 2)``."""
        s = self.clamp * jnp.tanh(params[..., 0] / self.clamp)
        t = params[..., 1]
        if inverse:
            return (x - t) * jnp.exp(-s), -s
        return x * jnp.exp(s) + t, s

    def inverse_columns(self, y: jax.Array, params: jax.Array) -> jax.Array:
        """Inverse map only, ``params`` ``(2, ...)`` on axis 0 (fast sampling)."""
        s = self.clamp * jnp.tanh(params[0] / self.clamp)
        return (y - params[1]) * jnp.exp(-s)


class ActNorm(nnx.Module):
    """Learnable elementwise affine ``z = x * exp(log_scale) + shift``.

    Initialized at the identity (data-free): inputs are assumed standardized.
    """

    def __init__(self, num_params: int):
        self.shift = nnx.Param(jnp.zeros((num_params,)))
        self.log_scale = nnx.Param(jnp.zeros((num_params,)))

    def __call__(
        self, x: jax.Array, *, inverse: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """``(y, log|det|)`` of the map (or of its inverse)."""
        log_scale = self.log_scale[...]
        log_det = jnp.broadcast_to(jnp.sum(log_scale), x.shape[:-1])
        if inverse:
            return (x - self.shift[...]) * jnp.exp(-log_scale), -log_det
        return x * jnp.exp(log_scale) + self.shift[...], log_det


def _columns(x: jax.Array, idx: tuple[int, ...]) -> jax.Array:
    return jnp.stack([x[..., i] for i in idx], axis=-1)


class CouplingLayer(nnx.Module):
    """Coupling layer: ``y_T = g(x_T; conditioner(x_C, context))``, ``y_C = x_C``."""

    def __init__(
        self,
        partition: Partition,
        context_dim: int,
        transform: Any,
        *,
        hidden: Sequence[int],
        activation: str,
        rngs: nnx.Rngs,
    ):
        self.transformed, self.conditioning = partition
        self.transform = transform
        self.context_dim = context_dim
        in_features = len(self.conditioning) + context_dim
        self.constant_input = in_features == 0
        self.conditioner = DenseNetwork(
            max(in_features, 1),
            hidden,
            len(self.transformed) * transform.num_transform_params,
            activation=activation,
            zero_init_last=True,
            rngs=rngs,
        )

    def __call__(
        self, x: jax.Array, context: jax.Array, *, inverse: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """Maps ``x`` (broadcast with ``context``); returns ``(y, log|det|)``."""
        # Static index sets: plain slices + stack compile faster than gather/scatter.
        x_t = _columns(x, self.transformed)
        if self.constant_input:
            h = jnp.ones((*x.shape[:-1], 1), x.dtype)
        elif self.conditioning:
            h = jnp.concatenate([_columns(x, self.conditioning), context], axis=-1)
        else:
            h = context
        params = self.conditioner(h)
        params = params.reshape(*x.shape[:-1], len(self.transformed), -1)
        y_t, log_det = self.transform(x_t, params, inverse=inverse)
        position = {d: j for j, d in enumerate(self.transformed)}
        cols = [
            y_t[..., position[d]] if d in position else x[..., d]
            for d in range(x.shape[-1])
        ]
        return jnp.stack(cols, axis=-1), jnp.sum(log_det, axis=-1)


class CouplingFlowModule(FlowModule):
    """A stack of (optional ActNorm +) coupling layers with a given transform."""

    def __init__(
        self,
        num_params: int,
        context_dim: int,
        *,
        transform: Any,
        num_layers: int,
        hidden: Sequence[int],
        activation: str = "silu",
        permutation: str = "random",
        seed: int = 0,
        actnorm: bool = False,
        rngs: nnx.Rngs,
    ):
        self.num_params = num_params
        self.context_dim = context_dim
        parts = coupling_partitions(
            num_params, num_layers, permutation=permutation, seed=seed
        )
        self.couplings = nnx.List(
            [
                CouplingLayer(
                    p,
                    context_dim,
                    transform,
                    hidden=hidden,
                    activation=activation,
                    rngs=rngs,
                )
                for p in parts
            ]
        )
        self.actnorms = nnx.List(
            [ActNorm(num_params) for _ in parts] if actnorm else []
        )

    def forward_and_log_det(
        self, x: jax.Array, context: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Data ``x`` -> base ``z`` and ``log|det dz/dx|``."""
        x, context = broadcast_context(x, context, self.context_dim)
        total = jnp.zeros(x.shape[:-1], x.dtype)
        for i, layer in enumerate(self.couplings):
            if len(self.actnorms):
                x, ld = self.actnorms[i](x)
                total = total + ld
            x, ld = layer(x, context)
            total = total + ld
        return x, total

    def inverse_and_log_det(
        self, z: jax.Array, context: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Base ``z`` -> data ``x`` and ``log|det dx/dz|``."""
        z, context = broadcast_context(z, context, self.context_dim)
        total = jnp.zeros(z.shape[:-1], z.dtype)
        for i in reversed(range(len(self.couplings))):
            z, ld = self.couplings[i](z, context, inverse=True)
            total = total + ld
            if len(self.actnorms):
                z, ld = self.actnorms[i](z, inverse=True)
                total = total + ld
        return z, total

    def sample(
        self, rng_key: jax.Array, context: jax.Array | None = None, num_samples: int = 1
    ) -> jax.Array:
        """Draws ``(num_samples, *context.shape[:-1], num_params)`` samples.

        Uses the column layout of :mod:`.coupling_sample` (same draws, faster,
        no log-determinant) when every layer supports it.
        """
        if can_sample_fast(self):
            # Same errors as the generic path for a context of the wrong width.
            broadcast_context(jnp.zeros((self.num_params,)), context, self.context_dim)
            return sample_columns(self, rng_key, context, num_samples)
        return super().sample(rng_key, context, num_samples)


@register_spec
@dataclasses.dataclass(frozen=True)
class CouplingFlow(SpecMixin):
    """Spec of an affine coupling flow (RealNVP-style, soft-clamped log-scales).

    Args:
        num_layers: number of coupling layers.
        hidden: hidden widths of each conditioner MLP.
        activation: conditioner activation name.
        clamp: log-scales are soft-clamped to ``(-clamp, clamp)``.
        actnorm: put an identity-initialized ActNorm before each coupling layer.
        permutation: ``"random"`` or ``"alternate"`` split of coordinates per layer.
        seed: numpy seed of the random splits (part of the spec, so rebuilds agree).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> flow = CouplingFlow(num_layers=4).build(3, 5, rngs=nnx.Rngs(0))
        >>> flow.sample(jax.random.key(0), jnp.zeros((2, 5)), num_samples=10).shape
        (10, 2, 3)
    """

    num_layers: int = 6
    hidden: tuple[int, ...] = (128, 128)
    activation: str = "silu"
    clamp: float = 2.0
    actnorm: bool = True
    permutation: str = "random"
    seed: int = 0

    def build(
        self, num_params: int, context_dim: int, *, rngs: nnx.Rngs
    ) -> CouplingFlowModule:
        """Builds the flow for ``num_params`` dimensions and ``context_dim`` context."""
        return CouplingFlowModule(
            num_params,
            context_dim,
            transform=AffineTransform(self.clamp),
            num_layers=self.num_layers,
            hidden=self.hidden,
            activation=self.activation,
            permutation=self.permutation,
            seed=self.seed,
            actnorm=self.actnorm,
            rngs=rngs,
        )
