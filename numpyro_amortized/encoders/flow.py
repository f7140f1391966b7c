"""Flow encoder: ``q(z_i | x_i)`` a conditional normalizing flow (full dependence).

An MLP embeds each datapoint ``x_i`` into a context ``c_i``; a conditional flow from
:mod:`numpyro_amortized.networks` (the same modules the amortized posterior uses)
gives a density over the site's flat unconstrained per-datapoint vector ``u_i``::

    u_i = f^{-1}(eps; c_i),   eps ~ N(0, I),
    log q(u_i | x_i) = log N(f(u_i; c_i); 0, I) + log|det df/du|.

Draws are reparameterized, so ``Trace_ELBO`` differentiates through them. Unlike
the loc-scale encoders, a flow captures correlations between the site's elements.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpyro.distributions as dist
from flax import nnx
from numpyro.distributions import constraints
from numpyro.distributions.transforms import ReshapeTransform

from numpyro_amortized.networks.coupling import CouplingFlow
from numpyro_amortized.networks.mlp import DenseNetwork
from numpyro_amortized.networks.registry import SpecMixin, register_spec

from .families import unconstrained_shape
from .structure import LocalSite

__all__ = ["ConditionalFlowDistribution", "FlowEncoder", "FlowEncoderModule"]


class ConditionalFlowDistribution(dist.Distribution):
    """A conditional flow as a numpyro distribution over flat vectors.

    Args:
        flow: a flow module (``sample_and_log_prob``, ``log_prob``; see
            :mod:`numpyro_amortized.networks.base`).
        context: ``(*batch, context_dim)``; its leading axes are the batch shape.

    Examples:
        >>> import jax.numpy as jnp
        >>> from numpyro_amortized.networks import CouplingFlow
        >>> flow = CouplingFlow(num_layers=2, hidden=(8,)).build(
        ...     3, 4, rngs=nnx.Rngs(0))
        >>> q = ConditionalFlowDistribution(flow, jnp.zeros((5, 4)))
        >>> u = q.sample(jax.random.key(0), (2,))
        >>> u.shape, q.log_prob(u).shape
        ((2, 5, 3), (2, 5))
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True
    reparametrized_params: list = []

    def __init__(self, flow: Any, context: jax.Array):
        self.flow = flow
        self.context = context
        super().__init__(
            batch_shape=tuple(context.shape[:-1]), event_shape=(flow.num_params,)
        )

    def sample_and_log_prob(
        self, key: jax.Array, sample_shape: tuple[int, ...] = ()
    ) -> tuple[jax.Array, jax.Array]:
        """Draws ``(*sample_shape, *batch, D)`` and their log densities."""
        num = math.prod(sample_shape)
        u, lp = self.flow.sample_and_log_prob(key, self.context, num)
        shape = (*sample_shape, *self.batch_shape)
        return u.reshape(*shape, self.event_shape[0]), lp.reshape(shape)

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        """Reparameterized draws ``(*sample_shape, *batch, D)``."""
        return self.sample_and_log_prob(key, sample_shape)[0]

    def rsample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        """Same as :meth:`sample`."""
        return self.sample(key, sample_shape)

    def log_prob(self, value: jax.Array) -> jax.Array:
        """``log q(value | context)``."""
        return self.flow.log_prob(value, self.context)


class FlowEncoderModule(nnx.Module):
    """``h -> flow(u; context = embed(h))``, reshaped to the site's event shape."""

    def __init__(
        self,
        input_dim: int,
        shape: tuple[int, ...],
        spec: FlowEncoder,
        *,
        rngs: nnx.Rngs,
    ):
        self.shape = tuple(shape)
        self.embed = DenseNetwork(
            input_dim,
            spec.hidden,
            spec.context_dim,
            activation=spec.activation,
            rngs=rngs,
        )
        self.flow = spec.flow.build(math.prod(self.shape), spec.context_dim, rngs=rngs)

    def __call__(self, h: jax.Array) -> dist.Distribution:
        q = ConditionalFlowDistribution(self.flow, self.embed(h))
        if len(self.shape) == 1:
            return q
        transform = ReshapeTransform(self.shape, (math.prod(self.shape),))
        return dist.TransformedDistribution(q, transform)


@register_spec
@dataclasses.dataclass(frozen=True)
class FlowEncoder(SpecMixin):
    """Conditional-flow ``q(z_i | x_i)`` over the site's whole per-datapoint value.

    Args:
        flow: a flow spec from :mod:`numpyro_amortized.networks`
            (``CouplingFlow``, ``NeuralSplineFlow``; not ``FlowMatching``, whose
            density needs an ODE solve per evaluation).
        context_dim: width of the embedding of ``x_i`` the flow is conditioned on.
        hidden: hidden widths of the embedding MLP.
        activation: activation name.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from numpyro.distributions import constraints
        >>> from numpyro_amortized.encoders import FlowEncoder, LocalSite
        >>> site = LocalSite("z", (2,), 1, constraints.real_vector, False, ())
        >>> spec = FlowEncoder(flow=CouplingFlow(num_layers=2, hidden=(8,)))
        >>> q = spec.build(5, site, rngs=nnx.Rngs(0))(jnp.ones((3, 5)))
        >>> q.batch_shape, q.event_shape
        ((3,), (2,))
    """

    flow: Any = CouplingFlow(num_layers=4, hidden=(64, 64))
    context_dim: int = 16
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "silu"

    def to_config(self) -> dict[str, Any]:
        """As ``SpecMixin.to_config`` with the inner flow spec nested."""
        config = super().to_config()
        config["kwargs"]["flow"] = self.flow.to_config()
        return config

    def __post_init__(self) -> None:
        if isinstance(self.flow, dict):  # rebuilt from a config
            from numpyro_amortized.networks.registry import spec_from_config

            object.__setattr__(self, "flow", spec_from_config(self.flow))

    def build(self, input_dim: int, site: LocalSite, *, rngs: nnx.Rngs):
        """Builds the module for one continuous local site.

        Raises:
            ValueError: a discrete site, or a site with inner plates (a flow couples
                all elements of a datapoint, so they must form its event).
        """
        if site.is_discrete:
            raise ValueError(
                f"FlowEncoder is for continuous sites; site '{site.name}' is discrete."
            )
        if site.inner_plates or site.event_ndim != len(site.shape):
            raise ValueError(
                f"FlowEncoder models site '{site.name}' jointly per datapoint, so its "
                f"per-datapoint value {site.shape} must be its event; it sits in "
                f"plates {[p[0] for p in site.inner_plates]} besides the data plate. "
                "Use .to_event(...) in the model or a loc-scale encoder."
            )
        return FlowEncoderModule(input_dim, unconstrained_shape(site), self, rngs=rngs)
