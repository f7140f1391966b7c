"""Neural spline flow: rational-quadratic spline coupling (Durkan et al. 2019).

The library's default inference network. Each coupling layer transforms half the
coordinates with a monotone rational-quadratic spline on ``[-bound, bound]`` whose
knots and interior slopes come from a conditioner MLP of the other half and the
context; outside the interval the map is the identity (see :mod:`.splines` for the
math). Inputs are standardized upstream, so ``bound=5`` covers essentially all the
mass while keeping the tails exactly Gaussian. With ``num_params == 1`` every layer
is a context-conditioned spline of the single coordinate (see :mod:`.coupling`).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from .coupling import CouplingFlowModule
from .registry import SpecMixin, register_spec
from .splines import SplineTransform

__all__ = ["NeuralSplineFlow"]


@register_spec
@dataclasses.dataclass(frozen=True)
class NeuralSplineFlow(SpecMixin):
    """Spec of a rational-quadratic neural spline flow (the default posterior net).

    Args:
        num_layers: number of spline coupling layers.
        hidden: hidden widths of each conditioner MLP.
        activation: conditioner activation name.
        num_bins: spline bins per transformed coordinate.
        bound: splines act on ``[-bound, bound]``; identity tails outside.
        min_bin_width: smallest bin width, as a fraction of the interval.
        min_bin_height: smallest bin height, as a fraction of the interval.
        min_derivative: smallest knot derivative.
        actnorm: put an identity-initialized ActNorm before each coupling layer.
        permutation: ``"random"`` or ``"alternate"`` split of coordinates per layer.
        seed: numpy seed of the random splits.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> flow = NeuralSplineFlow(num_layers=2).build(2, 3, rngs=nnx.Rngs(0))
        >>> flow.log_prob(jnp.zeros((4, 2)), jnp.ones((4, 3))).shape
        (4,)
    """

    num_layers: int = 5
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "silu"
    num_bins: int = 8
    bound: float = 5.0
    min_bin_width: float = 1e-3
    min_bin_height: float = 1e-3
    min_derivative: float = 1e-3
    actnorm: bool = False
    permutation: str = "random"
    seed: int = 0

    def build(
        self, num_params: int, context_dim: int, *, rngs: nnx.Rngs
    ) -> CouplingFlowModule:
        """Builds the flow for ``num_params`` dimensions and ``context_dim`` context."""
        transform = SplineTransform(
            num_bins=self.num_bins,
            bound=self.bound,
            min_bin_width=self.min_bin_width,
            min_bin_height=self.min_bin_height,
            min_derivative=self.min_derivative,
        )
        return CouplingFlowModule(
            num_params,
            context_dim,
            transform=transform,
            num_layers=self.num_layers,
            hidden=self.hidden,
            activation=self.activation,
            permutation=self.permutation,
            seed=self.seed,
            actnorm=self.actnorm,
            rngs=rngs,
        )
