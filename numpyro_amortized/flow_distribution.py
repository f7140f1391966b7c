"""The amortized flow as a ``numpyro.distributions.Distribution`` on the flat space.

:class:`FlowDistribution` is ``q(u | x)`` over the flat *unconstrained* target
vector ``u`` (see :mod:`numpyro_amortized.space`). The flow itself models the
standardized vector ``v = (u - m) / s``, so

    log q(u | x) = log q_v((u - m) / s | c(x)) - sum(log s),

with ``c(x)`` the flow's context (summary of the standardized data). Draws are
reparameterized: ``u = m + s * f^{-1}(z; c)`` with ``z ~ N(0, I)``, so gradients of
``E_q[g(u)]`` flow through the sample into the network weights (what
``Trace_ELBO`` needs).

Speed: the flow's passes run as jitted pure functions of ``(graphdef, state)``, so
eager use (``SVI.init``, ``Predictive`` without ``jit``) compiles each pass once
instead of dispatching (and compiling) every operation of the network separately;
inside an outer ``jit``/``grad``/``vmap`` they are simply inlined.

The constrained target sites are deterministic functions of ``u``; the guide
(:mod:`numpyro_amortized.guides`) emits them as ``Delta`` sites carrying
``-log|det dT(u)/du|``, so the guide's total log density is the exact
``log q(theta | x)`` in the constrained space.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from flax import nnx
from numpyro.distributions import constraints

__all__ = ["FlowDistribution"]


@functools.partial(jax.jit, static_argnums=(0, 4))
def _sample_and_log_prob(graphdef, state, key, context, num):
    return nnx.merge(graphdef, state).sample_and_log_prob(key, context, num)


@functools.partial(jax.jit, static_argnums=0)
def _log_prob(graphdef, state, v, context):
    return nnx.merge(graphdef, state).log_prob(v, context)


class FlowDistribution(dist.Distribution):
    """``q(u | context)`` of a conditional flow with an affine standardization.

    Args:
        flow: a flow module following :mod:`numpyro_amortized.networks.base`
            (``sample_and_log_prob``, ``log_prob``) with ``num_params = D``.
        context: the flow's context, shape ``(*batch, context_dim)`` (or None for
            an unconditional flow); its leading axes are the batch shape.
        shift: ``(D,)`` shift ``m`` of the standardization.
        scale: ``(D,)`` scale ``s`` of the standardization.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from numpyro_amortized import networks as nets
        >>> flow = nets.CouplingFlow(num_layers=2, hidden=(8,)).build(
        ...     2, 3, rngs=nnx.Rngs(0))
        >>> q = FlowDistribution(flow, jnp.zeros(3), jnp.zeros(2), jnp.ones(2))
        >>> u = q.sample(jax.random.key(0), (5,))
        >>> u.shape, q.log_prob(u).shape
        ((5, 2), (5,))
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True
    reparametrized_params = []

    def __init__(
        self,
        flow: nnx.Module,
        context: jax.Array | None,
        shift: jax.Array,
        scale: jax.Array,
        *,
        validate_args: bool | None = None,
    ):
        self.flow = flow
        self._graph = nnx.split(flow)
        self.context = context
        self.shift = jnp.asarray(shift)
        self.scale = jnp.asarray(scale)
        batch = () if context is None else jnp.shape(context)[:-1]
        super().__init__(
            batch_shape=batch,
            event_shape=(int(self.shift.shape[-1]),),
            validate_args=validate_args,
        )

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        """Reparameterized draws ``(*sample_shape, *batch, D)``."""
        return self.sample_and_log_prob(key, sample_shape)[0]

    def rsample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        """Same as :meth:`sample` (draws are always reparameterized)."""
        return self.sample(key, sample_shape)

    def sample_and_log_prob(
        self, key: jax.Array, sample_shape: tuple[int, ...] = ()
    ) -> tuple[jax.Array, jax.Array]:
        """Draws and their log densities from one pass through the flow."""
        num = math.prod(sample_shape)
        v, lp = _sample_and_log_prob(*self._graph[:2], key, self.context, num)
        u = self.shift + self.scale * v
        lp = lp - jnp.sum(jnp.log(self.scale))
        shape = (*sample_shape, *self.batch_shape)
        return u.reshape(*shape, self.event_shape[0]), lp.reshape(shape)

    def log_prob(self, value: jax.Array) -> jax.Array:
        """``log q(u | context)``, shape ``value.shape[:-1]`` broadcast with batch."""
        v = (value - self.shift) / self.scale
        lp = _log_prob(*self._graph[:2], v, self.context)
        return lp - jnp.sum(jnp.log(self.scale))
