"""Encoder specs: loc-scale families (Normal, Laplace, StudentT) and discrete heads.

A spec is a frozen, serializable dataclass of hyperparameters (as in
:mod:`numpyro_amortized.networks`); ``spec.build(input_dim, site, *, rngs)`` makes
a plain ``nnx.Module`` for one local site (a :class:`~.structure.LocalSite`). The
module's call protocol, shared with users' own encoder modules, is::

    module(h) -> numpyro Distribution

where ``h`` has shape ``(B, input_dim)`` (one row per datapoint) and the
distribution has batch shape ``(B, *shape[:-event_ndim])`` and event shape
``shape[-event_ndim:]`` - the per-datapoint shape of the site. Continuous encoders
return their distribution in the **unconstrained** space of the site; the guide
maps it onto the support with ``biject_to(support)`` (nothing is added for a real
support, so the analytic KL of ``TraceMeanField_ELBO`` applies to a Normal encoder
of a Normal prior).

Loc-scale heads: an MLP maps ``h`` to ``(loc, raw)`` per unconstrained element and
``scale = min_scale + softplus(raw + softplus^{-1}(init_scale))`` - the offset makes
the initial scale about ``init_scale`` when ``raw`` is near zero.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from flax import nnx
from numpyro.distributions import biject_to, constraints

from numpyro_amortized.networks.mlp import DenseNetwork
from numpyro_amortized.networks.registry import SpecMixin, register_spec

from .structure import LocalSite

__all__ = [
    "BernoulliEncoder",
    "CategoricalEncoder",
    "DiscreteHeadModule",
    "LaplaceEncoder",
    "LocScaleModule",
    "NormalEncoder",
    "StudentTEncoder",
    "default_encoder",
    "unconstrained_shape",
]


def unconstrained_shape(site: LocalSite) -> tuple[int, ...]:
    """Per-datapoint shape of the site in its unconstrained space."""
    return tuple(int(d) for d in biject_to(site.support).inverse_shape(site.shape))


def _batch_event(shape: tuple[int, ...], event_ndim: int):
    split = len(shape) - event_ndim
    return shape[:split], shape[split:]


class LocScaleModule(nnx.Module):
    """``h -> family(loc(h), scale(h))``, elementwise over the unconstrained shape.

    Args:
        input_dim: width of ``h``.
        shape: per-datapoint unconstrained shape of the site.
        event_ndim: number of trailing event dimensions of ``shape``.
        spec: the loc-scale spec (its ``distribution(loc, scale)`` picks the family).
        rngs: ``nnx.Rngs`` for initialization.
    """

    def __init__(
        self,
        input_dim: int,
        shape: tuple[int, ...],
        event_ndim: int,
        spec: _LocScaleSpec,
        *,
        rngs: nnx.Rngs,
    ):
        self.shape = tuple(shape)
        self.event_ndim = event_ndim
        self.spec = spec
        size = math.prod(self.shape)
        self.net = DenseNetwork(
            input_dim,
            spec.hidden,
            2 * size,
            activation=spec.activation,
            zero_init_last=True,
            rngs=rngs,
        )

    def __call__(self, h: jax.Array) -> dist.Distribution:
        out = self.net(h).reshape(*h.shape[:-1], 2, *self.shape)
        offset = math.log(math.expm1(self.spec.init_scale))
        scale = self.spec.min_scale + jax.nn.softplus(
            jnp.take(out, 1, axis=h.ndim - 1) + offset
        )
        loc = jnp.take(out, 0, axis=h.ndim - 1)
        return self.spec.distribution(loc, scale).to_event(self.event_ndim)


@dataclasses.dataclass(frozen=True)
class _LocScaleSpec(SpecMixin):
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "silu"
    min_scale: float = 1e-3
    init_scale: float = 1.0

    def distribution(self, loc: jax.Array, scale: jax.Array) -> dist.Distribution:
        """The family's distribution with these parameters (elementwise)."""
        raise NotImplementedError

    def build(self, input_dim: int, site: LocalSite, *, rngs: nnx.Rngs):
        """Builds the module for one continuous local site."""
        if site.is_discrete:
            raise ValueError(
                f"{type(self).__name__} is for continuous sites; site '{site.name}' "
                f"has discrete support {site.support}. Use CategoricalEncoder or "
                "BernoulliEncoder for it (encoder={'" + site.name + "': ...})."
            )
        shape = unconstrained_shape(site)
        event_ndim = site.event_ndim - (len(site.shape) - len(shape))
        return LocScaleModule(input_dim, shape, event_ndim, self, rngs=rngs)


@register_spec
@dataclasses.dataclass(frozen=True)
class NormalEncoder(_LocScaleSpec):
    """Diagonal Normal ``q(z_i | x_i)`` (in the site's unconstrained space).

    Args:
        hidden: hidden widths of the MLP (``()`` gives a linear map).
        activation: activation name (see ``networks.mlp.ACTIVATIONS``).
        min_scale: lower bound added to every scale.
        init_scale: scale at initialization for a zero network output.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from numpyro.distributions import constraints
        >>> from numpyro_amortized.encoders import LocalSite, NormalEncoder
        >>> site = LocalSite("z", (2,), 1, constraints.real_vector, False, ())
        >>> module = NormalEncoder(hidden=(8,)).build(5, site, rngs=nnx.Rngs(0))
        >>> q = module(jnp.ones((3, 5)))
        >>> q.batch_shape, q.event_shape
        ((3,), (2,))
    """

    def distribution(self, loc: jax.Array, scale: jax.Array) -> dist.Distribution:
        """``Normal(loc, scale)``."""
        return dist.Normal(loc, scale)


@register_spec
@dataclasses.dataclass(frozen=True)
class LaplaceEncoder(_LocScaleSpec):
    """Laplace ``q(z_i | x_i)``: heavier tails than Normal (same arguments)."""

    def distribution(self, loc: jax.Array, scale: jax.Array) -> dist.Distribution:
        """``Laplace(loc, scale)``."""
        return dist.Laplace(loc, scale)


@register_spec
@dataclasses.dataclass(frozen=True)
class StudentTEncoder(_LocScaleSpec):
    """Student-t ``q(z_i | x_i)`` with fixed degrees of freedom ``df``."""

    df: float = 5.0

    def distribution(self, loc: jax.Array, scale: jax.Array) -> dist.Distribution:
        """``StudentT(df, loc, scale)``."""
        return dist.StudentT(self.df, loc, scale)


class DiscreteHeadModule(nnx.Module):
    """``h -> Categorical(logits)`` or ``Bernoulli(logits)`` over the site's shape."""

    def __init__(
        self,
        input_dim: int,
        site: LocalSite,
        num_categories: int | None,
        spec: CategoricalEncoder | BernoulliEncoder,
        *,
        rngs: nnx.Rngs,
    ):
        self.shape = tuple(site.shape)
        self.event_ndim = site.event_ndim
        self.num_categories = num_categories
        width = math.prod(self.shape) * (num_categories or 1)
        self.net = DenseNetwork(
            input_dim, spec.hidden, width, activation=spec.activation, rngs=rngs
        )

    def __call__(self, h: jax.Array) -> dist.Distribution:
        logits = self.net(h)
        if self.num_categories is None:
            q = dist.Bernoulli(logits=logits.reshape(*h.shape[:-1], *self.shape))
        else:
            logits = logits.reshape(*h.shape[:-1], *self.shape, self.num_categories)
            q = dist.Categorical(logits=logits)
        return q.to_event(self.event_ndim)


def _num_categories(support: constraints.Constraint) -> int | None:
    if support is constraints.boolean:
        return 2
    lower = getattr(support, "lower_bound", None)
    upper = getattr(support, "upper_bound", None)
    if isinstance(support, constraints.integer_interval) and lower == 0:
        return int(upper) + 1
    return None


@register_spec
@dataclasses.dataclass(frozen=True)
class CategoricalEncoder(SpecMixin):
    """Categorical ``q(z_i | x_i)`` for a site with support ``{0, ..., K-1}``.

    Train with ``TraceGraph_ELBO``: a discrete draw has no reparameterized
    gradient, and ``TraceGraph_ELBO`` adds the score-function term.

    Args:
        hidden: hidden widths of the MLP that outputs the logits.
        activation: activation name.
    """

    hidden: tuple[int, ...] = (64, 64)
    activation: str = "silu"

    def build(self, input_dim: int, site: LocalSite, *, rngs: nnx.Rngs):
        """Builds the logits head for one discrete local site."""
        k = _num_categories(site.support)
        if k is None or site.support is constraints.boolean:
            raise ValueError(
                f"CategoricalEncoder needs support integer_interval(0, K-1); site "
                f"'{site.name}' has {site.support}."
                + (" Use BernoulliEncoder." if k == 2 else "")
            )
        return DiscreteHeadModule(input_dim, site, k, self, rngs=rngs)


@register_spec
@dataclasses.dataclass(frozen=True)
class BernoulliEncoder(SpecMixin):
    """Bernoulli ``q(z_i | x_i)`` for a site with boolean support (train with
    ``TraceGraph_ELBO``; see :class:`CategoricalEncoder`)."""

    hidden: tuple[int, ...] = (64, 64)
    activation: str = "silu"

    def build(self, input_dim: int, site: LocalSite, *, rngs: nnx.Rngs):
        """Builds the logits head for one boolean local site."""
        if site.support is not constraints.boolean:
            raise ValueError(
                f"BernoulliEncoder needs boolean support; site '{site.name}' has "
                f"{site.support}. Use CategoricalEncoder for integer_interval(0, K-1)."
            )
        return DiscreteHeadModule(input_dim, site, None, self, rngs=rngs)


def default_encoder(site: LocalSite):
    """The spec used when none is given: Normal, Bernoulli or Categorical.

    Raises:
        ValueError: a discrete support other than boolean or ``{0..K-1}``.
    """
    if not site.is_discrete:
        return NormalEncoder()
    if site.support is constraints.boolean:
        return BernoulliEncoder()
    if _num_categories(site.support) is not None:
        return CategoricalEncoder()
    raise ValueError(
        f"EncoderGuide has no default encoder for site '{site.name}' with discrete "
        f"support {site.support}; pass encoder={{'{site.name}': module}} with an "
        "nnx module that returns a distribution over that support."
    )
