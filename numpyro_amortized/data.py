"""Observed data -> network input, and standardization statistics.

The observed sites of a model become either

* a **set**: every observed site sits in the same plate, so each dataset is a set of
  ``n`` observations (the plate's axis) with ``F`` features each (every other axis of
  every observed site, flattened and concatenated). Input ``(*batch, n, F)`` plus an
  optional mask ``(*batch, n)``; ``n`` may differ from the training data's. When a
  site sits in several plates, the outermost one is the set axis;
* **flat**: otherwise, every observed site flattened and concatenated:
  ``(*batch, F)``, with fixed shapes.

**Constrained observations** are mapped to the real line from their site's
support before anything else (``transforms``): ``log`` for positive data
(``LogNormal``, ``Gamma``, ``HalfNormal``, ...), ``logit`` for data in (0, 1)
(``Beta``). Skewed, bounded raw values make poor network inputs even after
standardization: on the ``choice_rt`` model (50 LogNormal response times) the
held-out ``log q(theta | x)`` after 30 epochs on 10^4 simulations was 4.65 nats
with raw response times and 4.94 with their logs. Values on the boundary are
clipped to the smallest/largest representable interior value first. Discrete
sites and other supports pass through unchanged.

All functions work on NumPy and JAX arrays alike (and inside ``jit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints

from numpyro_amortized.sites import SiteInfo
from numpyro_amortized.varying import mask_key

__all__ = ["INPUT_TRANSFORMS", "ObservationLayout", "Standardizer", "input_transform"]

_TINY = float(np.finfo(np.float32).tiny)
_BELOW_ONE = float(1.0 - np.finfo(np.float32).epsneg)


def _log(v: jax.Array) -> jax.Array:
    return jnp.log(jnp.maximum(v, _TINY))


def _logit(v: jax.Array) -> jax.Array:
    v = jnp.clip(v, _TINY, _BELOW_ONE)
    return jnp.log(v) - jnp.log1p(-v)


INPUT_TRANSFORMS = {"identity": lambda v: v, "log": _log, "logit": _logit}
"""Elementwise maps of observed values to the real line, by name."""


def input_transform(site: SiteInfo) -> str:
    """Name in :data:`INPUT_TRANSFORMS` for an observed site, from its support."""
    support = site.support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if site.is_discrete:
        return "identity"
    if support is constraints.positive:
        return "log"
    if support is constraints.unit_interval:
        return "logit"
    return "identity"


class ObservationLayout(NamedTuple):
    """How the observed sites map to network input.

    Attributes:
        names: observed site names, in order.
        kind: ``"set"`` or ``"flat"``.
        shapes: each site's shape for one dataset, as trained.
        set_axes: each site's set (plate) axis within its shape (``-1``: none).
        plate: name of the set plate (``""`` for flat).
        feature_dim: ``F``, features per observation (set) or in total (flat).
        transforms: each site's map to the real line (a key of
            :data:`INPUT_TRANSFORMS`); empty means ``"identity"`` for every site
            (files saved before transforms existed).
    """

    names: tuple[str, ...]
    kind: str
    shapes: tuple[tuple[int, ...], ...]
    set_axes: tuple[int, ...]
    plate: str
    feature_dim: int
    transforms: tuple[str, ...] = ()

    @classmethod
    def from_sites(cls, sites: Sequence[SiteInfo]) -> ObservationLayout:
        """Choose the layout from the observed sites' plates."""
        names = tuple(s.name for s in sites)
        shapes = tuple(s.shape for s in sites)
        transforms = tuple(input_transform(s) for s in sites)
        outer = [
            min(s.plates, key=lambda p: p.dim) if s.plates else None for s in sites
        ]
        same_plate = (
            all(p is not None for p in outer)
            and len({(p.name, p.size) for p in outer}) == 1
        )
        if same_plate:
            axes = tuple(
                len(s.batch_shape) + p.dim for s, p in zip(sites, outer, strict=True)
            )
            feats = sum(
                int(np.prod(s.shape, dtype=np.int64)) // s.shape[a]
                for s, a in zip(sites, axes, strict=True)
            )
            return cls(
                names, "set", shapes, axes, outer[0].name, int(feats), transforms
            )
        feats = sum(s.size for s in sites)
        return cls(
            names, "flat", shapes, (-1,) * len(sites), "", int(feats), transforms
        )

    def transform_of(self, name: str) -> str:
        """The input transform of observed site ``name``."""
        if not self.transforms:
            return "identity"
        return self.transforms[self.names.index(name)]

    @property
    def is_set(self) -> bool:
        """Whether datasets are sets of observations."""
        return self.kind == "set"

    def batch_shape(self, data: dict) -> tuple[int, ...]:
        """Leading (dataset) axes of ``data``; checks names and shapes.

        Raises:
            ValueError: a missing observed site, or a shape that cannot come from
                the trained model (the message names the site and both shapes).
        """
        missing = [n for n in self.names if n not in data]
        if missing:
            raise ValueError(
                f"Missing observed site(s) {missing} in the data; got keys "
                f"{sorted(data)}. Pass a dict {{site: array}} with every observed "
                f"site: {list(self.names)}."
            )
        batch = None
        for name, shape, axis in zip(
            self.names, self.shapes, self.set_axes, strict=True
        ):
            got = tuple(np.shape(data[name]))
            nb = len(got) - len(shape)
            ok = nb >= 0
            if ok:
                tail = got[nb:]
                ok = all(
                    g == s or i == axis
                    for i, (g, s) in enumerate(zip(tail, shape, strict=True))
                )
            if not ok:
                free = (
                    f" (axis {axis}, the '{self.plate}' plate, may have any size)"
                    if axis >= 0
                    else ""
                )
                raise ValueError(
                    f"Observed site '{name}' has shape {got}; the model was trained "
                    f"on shape {shape}{free}, optionally with leading dataset axes."
                )
            if batch is None:
                batch = got[:nb]
            elif got[:nb] != batch:
                raise ValueError(
                    f"Observed sites disagree on the dataset axes: '{self.names[0]}' "
                    f"has {batch}, '{name}' has {got[:nb]}."
                )
        return batch

    def to_network(
        self, data: dict, batch_ndim: int
    ) -> tuple[jax.Array, jax.Array | None]:
        """``(x, mask)``: ``x`` is ``(*batch, n, F)`` (set) or ``(*batch, F)``."""
        parts, sizes = [], []
        for name, axis in zip(self.names, self.set_axes, strict=True):
            v = jnp.asarray(data[name], dtype=jnp.float32)
            v = INPUT_TRANSFORMS[self.transform_of(name)](v)
            batch = v.shape[:batch_ndim]
            if self.is_set:
                v = jnp.moveaxis(v, batch_ndim + axis, batch_ndim)
                n = v.shape[batch_ndim]
                sizes.append(n)
                parts.append(v.reshape(*batch, n, -1))
            else:
                parts.append(v.reshape(*batch, -1))
        if self.is_set and len(set(sizes)) > 1:
            raise ValueError(
                f"Observed sites {list(self.names)} share the '{self.plate}' plate but "
                f"have different sizes along it: {sizes}."
            )
        x = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        mask = None
        if self.is_set:
            masks = [data[mask_key(n)] for n in self.names if mask_key(n) in data]
            for m in masks:
                m = jnp.asarray(m, dtype=bool)
                mask = m if mask is None else mask & m
        return x, mask

    def check_finite(self, data: dict) -> None:
        """Raise if an observed site holds NaN/inf, or a value outside its support
        (negative for positive sites, outside [0, 1] for unit-interval sites),
        where its mask (if any) is True."""
        for name in self.names:
            v = np.asarray(data[name])
            m = data.get(mask_key(name))
            if m is not None:
                m = np.asarray(m, dtype=bool)
                m = m.reshape(m.shape + (1,) * (v.ndim - m.ndim))
            bad = ~np.isfinite(v)
            if m is not None:
                bad &= m
            if bad.any():
                raise ValueError(
                    f"Observed site '{name}' contains {int(bad.sum())} NaN/inf "
                    "value(s). Remove them, or mark missing observations with a "
                    f"boolean '{mask_key(name)}' entry (True = present)."
                )
            kind = self.transform_of(name)
            if kind == "identity":
                continue
            outside = (v < 0) | (v > 1) if kind == "logit" else v < 0
            if m is not None:
                outside &= m
            if outside.any():
                support = "in [0, 1]" if kind == "logit" else "positive"
                raise ValueError(
                    f"Observed site '{name}' has {int(outside.sum())} value(s) "
                    f"outside its support (the model's distribution is {support}), "
                    f"e.g. {v[outside].flat[0]!r}. Check the data's units/sign, "
                    "or change the model's likelihood."
                )


class Standardizer(NamedTuple):
    """Per-feature shift and scale: ``(v - mean) / std``.

    Attributes:
        mean: per-feature mean.
        std: per-feature standard deviation (floored so constants pass through).
    """

    mean: jax.Array
    std: jax.Array

    @classmethod
    def fit(cls, v: np.ndarray, mask: np.ndarray | None = None) -> Standardizer:
        """Statistics over every axis but the last (entries where ``mask`` holds)."""
        v = np.asarray(v, dtype=np.float64).reshape(-1, np.shape(v)[-1])
        if mask is not None:
            v = v[np.asarray(mask, dtype=bool).reshape(-1)]
        mean = v.mean(axis=0)
        std = v.std(axis=0)
        std = np.where(std > 1e-6 * (1 + np.abs(mean)), std, 1.0)
        return cls(jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32))

    @classmethod
    def identity(cls, dim: int) -> Standardizer:
        """No-op statistics."""
        return cls(jnp.zeros(dim), jnp.ones(dim))

    def __call__(self, v: jax.Array) -> jax.Array:
        return (v - self.mean) / self.std

    def inverse(self, v: jax.Array) -> jax.Array:
        """``v * std + mean``."""
        return v * self.std + self.mean

    @property
    def log_scale(self) -> jax.Array:
        """``sum(log std)``: log|det| of :meth:`inverse`."""
        return jnp.sum(jnp.log(self.std))
