"""Multi-layer perceptrons: the building block of every conditioner, and a summary.

:class:`DenseNetwork` is the plain nnx module used inside flows (coupling
conditioners, the flow-matching velocity field) and summaries. :class:`MLP` is the
*summary spec* for flat, unstructured observations of shape ``(..., input_dim)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .registry import SpecMixin, register_spec

__all__ = ["ACTIVATIONS", "MLP", "DenseNetwork", "MLPSummary"]

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "elu": jax.nn.elu,
}
"""Activation functions selectable by name in specs."""


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(
            f"Unknown activation {name!r}; choose from {list(ACTIVATIONS)}."
        )
    return ACTIVATIONS[name]


def is_plain_linear(layer: nnx.Module) -> bool:
    """An ``nnx.Linear`` with a bias and default numerics, so ``x @ kernel + bias``
    computes it exactly (not a Bayesian or otherwise customized layer)."""
    return (
        type(layer) is nnx.Linear
        and layer.bias is not None
        and layer.dot_general is jax.lax.dot_general
        and layer.precision is None
        and layer.dtype is None
    )


class DenseNetwork(nnx.Module):
    """A stack of ``nnx.Linear`` layers acting on the last axis.

    Args:
        in_features: input width (>= 1).
        hidden: widths of the hidden layers.
        out_features: output width.
        activation: name in :data:`ACTIVATIONS`.
        zero_init_last: if True the output layer starts at exactly zero (weights and
            bias), so a flow whose parameters come from this network starts at the
            identity.
        rngs: ``nnx.Rngs`` for parameter initialization.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        *,
        activation: str = "silu",
        zero_init_last: bool = False,
        rngs: nnx.Rngs,
    ):
        _activation(activation)
        widths = (in_features, *hidden)
        self.hidden_layers = nnx.List(
            [
                nnx.Linear(a, b, rngs=rngs)
                for a, b in zip(widths[:-1], widths[1:], strict=True)
            ]
        )
        init = (
            nnx.initializers.zeros
            if zero_init_last
            else nnx.initializers.lecun_normal()
        )
        self.output_layer = nnx.Linear(
            widths[-1], out_features, kernel_init=init, rngs=rngs
        )
        self.activation = activation
        self.in_features = in_features
        self.out_features = out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output_layer(self.hidden(x))

    def hidden(self, x: jax.Array) -> jax.Array:
        """The last hidden layer's activations (the output layer's input)."""
        act = _activation(self.activation)
        for layer in self.hidden_layers:
            x = act(layer(x))
        return x


class MLPSummary(nnx.Module):
    """Summary module for flat observations: ``(..., input_dim) -> (..., summary_dim)``.

    Call protocol (shared by every summary): ``module(x, mask=None)``. Here ``mask``
    has the shape of ``x`` (True = present); missing entries are set to zero before
    the network, so their values never affect the output.
    """

    def __init__(self, input_dim: int, spec: MLP, *, rngs: nnx.Rngs):
        self.net = DenseNetwork(
            input_dim,
            spec.hidden,
            spec.summary_dim,
            activation=spec.activation,
            rngs=rngs,
        )
        self.input_dim = input_dim
        self.summary_dim = spec.summary_dim

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        if mask is not None:
            x = jnp.where(mask, x, 0.0)
        return self.net(x)


@register_spec
@dataclasses.dataclass(frozen=True)
class MLP(SpecMixin):
    """Spec of an MLP summary network for flat (unstructured) observations.

    Args:
        summary_dim: output width. 16 is a good default for up to ~8 parameters;
            use 2-4x the number of parameters for more.
        hidden: hidden layer widths.
        activation: name in :data:`ACTIVATIONS`.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> net = MLP(summary_dim=8).build(5, rngs=nnx.Rngs(0))
        >>> net(jnp.ones((3, 5))).shape
        (3, 8)
    """

    summary_dim: int = 16
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "silu"

    def build(self, input_dim: int, *, rngs: nnx.Rngs) -> MLPSummary:
        """Builds the module for inputs of width ``input_dim``."""
        return MLPSummary(input_dim, self, rngs=rngs)
