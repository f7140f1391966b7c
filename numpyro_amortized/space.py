"""The latent space: a dict of target sites <-> one flat unconstrained vector.

Each target site ``s`` with support ``S`` gets the bijection
``T_s = biject_to(S): R^{k_s} -> S`` (numpyro's registry: real, positive, interval,
simplex, ordered, correlation-Cholesky, ...). A flat vector ``u`` of size
``sum_s k_s`` is split into blocks, each block reshaped to the site's
*unconstrained* shape and mapped through ``T_s``.

Log-Jacobians: ``constrain`` returns ``log|det dT(u)/du|`` summed over sites, so a
density ``q_u`` on the flat space gives the density of the constrained values

    log q(theta) = log q_u(u) - log|det dT(u)/du|,   u = T^{-1}(theta).

For supports whose constrained value has more coordinates than ``u`` (simplex,
correlation-Cholesky), numpyro's convention applies: the Jacobian is taken with
respect to the free coordinates (the first ``K-1`` simplex entries, the strictly
lower-triangular Cholesky entries).

All functions are batched over any number of leading axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints
from numpyro.distributions.transforms import Transform, biject_to

from numpyro_amortized.sites import SiteInfo

__all__ = ["LatentSpace", "SiteBlock"]


class SiteBlock(NamedTuple):
    """One target site's place in the flat vector.

    Attributes:
        name: site name.
        shape: constrained value shape of one draw.
        unconstrained_shape: shape of the site's unconstrained value.
        offset: start index in the flat vector.
        size: number of flat entries.
        support: the site's support.
    """

    name: str
    shape: tuple[int, ...]
    unconstrained_shape: tuple[int, ...]
    offset: int
    size: int
    support: constraints.Constraint

    @property
    def transform(self) -> Transform:
        """``biject_to(support)``: unconstrained -> constrained."""
        return biject_to(self.support)


class LatentSpace(NamedTuple):
    """Flat unconstrained coordinates for a set of target sites.

    Examples:
        >>> import jax.numpy as jnp
        >>> from numpyro.distributions import constraints
        >>> space = LatentSpace.from_shapes(
        ...     {"sigma": ((), constraints.positive), "w": ((3,), constraints.simplex)}
        ... )
        >>> space.dim  # 1 + 2 free simplex coordinates
        3
        >>> theta, log_det = space.constrain(jnp.zeros((5, 3)))
        >>> theta["w"].shape, log_det.shape
        ((5, 3), (5,))
    """

    blocks: tuple[SiteBlock, ...]

    @classmethod
    def from_sites(cls, sites: Sequence[SiteInfo]) -> LatentSpace:
        """Build from site metadata (in the given order)."""
        return cls.from_shapes({s.name: (s.shape, s.support) for s in sites})

    @classmethod
    def from_shapes(
        cls, shapes: dict[str, tuple[tuple[int, ...], constraints.Constraint]]
    ) -> LatentSpace:
        """Build from ``{name: (shape, support)}``."""
        blocks, offset = [], 0
        for name, (shape, support) in shapes.items():
            shape = tuple(int(d) for d in shape)
            if support.is_discrete:
                raise ValueError(
                    f"Site '{name}' has a discrete support ({support!r}) and cannot "
                    "be part of the continuous latent space."
                )
            try:
                t = biject_to(support)
            except NotImplementedError as e:
                raise ValueError(
                    f"Site '{name}': numpyro has no bijection to its support "
                    f"{support!r} (biject_to failed). Reparameterize the site with "
                    "a supported constraint."
                ) from e
            ushape = tuple(int(d) for d in t.inverse_shape(shape))
            size = int(np.prod(ushape, dtype=np.int64))
            blocks.append(SiteBlock(name, shape, ushape, offset, size, support))
            offset += size
        return cls(tuple(blocks))

    @property
    def dim(self) -> int:
        """Length of the flat unconstrained vector."""
        return sum(b.size for b in self.blocks)

    @property
    def names(self) -> tuple[str, ...]:
        """Site names, in flat order."""
        return tuple(b.name for b in self.blocks)

    def _batch_shape(self, values: dict[str, jax.Array], unconstrained: bool):
        b = self.blocks[0]
        shape = b.unconstrained_shape if unconstrained else b.shape
        v = jnp.shape(values[b.name])
        return v[: len(v) - len(shape)]

    def flatten(self, values: dict[str, jax.Array]) -> jax.Array:
        """Unconstrained values ``{name: (*batch, *ushape)}`` -> ``(*batch, dim)``."""
        self._check_names(values)
        batch = self._batch_shape(values, unconstrained=True)
        parts = []
        for b in self.blocks:
            v = jnp.asarray(values[b.name])
            if v.shape[len(batch) :] != b.unconstrained_shape:
                raise ValueError(
                    f"Site '{b.name}': expected unconstrained shape "
                    f"(*batch, {b.unconstrained_shape}) with batch {batch}, got "
                    f"{v.shape}."
                )
            parts.append(v.reshape(*batch, b.size))
        return jnp.concatenate(parts, axis=-1)

    def unflatten(self, flat: jax.Array) -> dict[str, jax.Array]:
        """``(*batch, dim)`` -> unconstrained values ``{name: (*batch, *ushape)}``."""
        flat = jnp.asarray(flat)
        if flat.shape[-1:] != (self.dim,):
            raise ValueError(
                f"Expected a flat vector with last axis {self.dim} (sites "
                f"{list(self.names)}), got shape {flat.shape}."
            )
        batch = flat.shape[:-1]
        return {
            b.name: flat[..., b.offset : b.offset + b.size].reshape(
                *batch, *b.unconstrained_shape
            )
            for b in self.blocks
        }

    def constrain(self, flat: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
        """Flat unconstrained ``(*batch, dim)`` -> constrained values and log|J|.

        Returns:
            ``(values, log_det)`` with ``log_det = log|det dT(u)/du|`` of shape
            ``batch``.
        """
        u = self.unflatten(flat)
        batch = jnp.shape(flat)[:-1]
        out, log_det = {}, jnp.zeros(batch, dtype=jnp.result_type(flat))
        for b in self.blocks:
            t = b.transform
            x = t(u[b.name])
            out[b.name] = x
            log_det = log_det + _sum_to_batch(
                t.log_abs_det_jacobian(u[b.name], x), len(batch)
            )
        return out, log_det

    def unconstrain(self, values: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Constrained values -> flat unconstrained ``(*batch, dim)`` and log|J|.

        Returns:
            ``(flat, log_det)`` with ``log_det = log|det dT^{-1}(x)/dx|``
            ``= -log|det dT(u)/du|`` of shape ``batch``.
        """
        self._check_names(values)
        batch = self._batch_shape(values, unconstrained=False)
        u, log_det = {}, jnp.zeros(batch)
        for b in self.blocks:
            x = jnp.asarray(values[b.name])
            if x.shape[len(batch) :] != b.shape:
                raise ValueError(
                    f"Site '{b.name}': expected shape (*batch, {b.shape}) with batch "
                    f"{batch}, got {x.shape}."
                )
            t = b.transform
            u[b.name] = t.inv(x)
            log_det = log_det - _sum_to_batch(
                t.log_abs_det_jacobian(u[b.name], x), len(batch)
            )
        return self.flatten(u), log_det

    def in_support(self, values: dict[str, jax.Array]) -> jax.Array:
        """Whether each draw lies in every site's support, shape ``batch``.

        A draw holding NaN counts as inside (its density stays NaN, not -inf).
        """
        self._check_names(values)
        batch = self._batch_shape(values, unconstrained=False)
        ok = jnp.ones(batch, dtype=bool)
        for b in self.blocks:
            x = jnp.asarray(values[b.name])
            inside = _all_to_batch(b.support(x), len(batch))
            nan = _all_to_batch(~jnp.isnan(x), len(batch))
            ok = ok & (inside | ~nan)
        return ok

    def _check_names(self, values: dict) -> None:
        missing = [n for n in self.names if n not in values]
        if missing:
            raise ValueError(
                f"Missing target site(s) {missing}; expected {list(self.names)}, got "
                f"{list(values)}."
            )


def _sum_to_batch(x: jax.Array, batch_ndim: int) -> jax.Array:
    """Sum all axes after the first ``batch_ndim``."""
    x = jnp.asarray(x)
    return x.sum(axis=tuple(range(batch_ndim, x.ndim))) if x.ndim > batch_ndim else x


def _all_to_batch(x: jax.Array, batch_ndim: int) -> jax.Array:
    """``all`` over every axis after the first ``batch_ndim``."""
    x = jnp.asarray(x, dtype=bool)
    return x.all(axis=tuple(range(batch_ndim, x.ndim))) if x.ndim > batch_ndim else x
