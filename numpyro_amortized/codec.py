"""Plain-data encodings of the library's objects, for saved files (no pickles).

* supports (numpyro constraints) <-> JSON: the module-level singletons by name
  (``"positive"``), parametrized ones by class and their pytree children
  (``Interval(lower_bound, upper_bound)``, ``IndependentConstraint(base, ndims)``);
* :class:`~numpyro_amortized.space.LatentSpace`,
  :class:`~numpyro_amortized.data.ObservationLayout`,
  :class:`~numpyro_amortized.sites.SiteInfo` <-> JSON;
* pytrees of arrays (network state, optimizer state) <-> named NumPy arrays plus a
  JSON index of their paths, shapes and dtypes, restored into a *template* tree of
  the same structure (so a file never decides what Python objects get built).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints

from numpyro_amortized.data import ObservationLayout
from numpyro_amortized.sites import PlateInfo, SiteInfo, support_repr
from numpyro_amortized.space import LatentSpace

__all__ = [
    "TreeMismatchError",
    "decode_layout",
    "decode_sites",
    "decode_space",
    "decode_support",
    "encode_layout",
    "encode_sites",
    "encode_space",
    "encode_support",
    "tree_from_arrays",
    "tree_to_arrays",
]

_SINGLETONS = {
    name: value
    for name, value in vars(constraints).items()
    if isinstance(value, constraints.Constraint)
}


class TreeMismatchError(ValueError):
    """Saved arrays do not fit the structure they are restored into."""


# ------------------------------------------------------------------- supports
def encode_support(support: constraints.Constraint) -> dict[str, Any]:
    """A numpyro constraint as JSON-able data.

    Raises:
        TypeError: a constraint that is neither a numpyro singleton nor a numpyro
            class with pytree children (user-defined constraints).
    """
    for name, value in _SINGLETONS.items():
        if value is support:
            return {"name": name, "repr": support_repr(support)}
    cls = type(support)
    if getattr(constraints, cls.__name__, None) is not cls:
        raise TypeError(
            f"Cannot save the support {support!r}: only numpyro's own constraints "
            "(numpyro.distributions.constraints) can be saved."
        )
    try:
        children, (keys, aux) = support.tree_flatten()
    except NotImplementedError as e:
        raise TypeError(f"Cannot save the support {support!r}.") from e
    return {
        "class": cls.__name__,
        "keys": list(keys),
        "children": [_encode_child(c) for c in children],
        "aux": {k: _plain(v) for k, v in aux.items()},
        "repr": support_repr(support),
    }


def decode_support(data: dict[str, Any]) -> constraints.Constraint:
    """Inverse of :func:`encode_support`."""
    if "name" in data:
        if data["name"] not in _SINGLETONS:
            raise ValueError(f"Unknown constraint {data['name']!r} ({data['repr']}).")
        return _SINGLETONS[data["name"]]
    cls = getattr(constraints, data["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, constraints.Constraint)):
        raise ValueError(f"Unknown constraint class {data['class']!r}.")
    children = [_decode_child(c) for c in data["children"]]
    return cls.tree_unflatten((tuple(data["keys"]), dict(data["aux"])), children)


def _encode_child(value: Any) -> Any:
    if isinstance(value, constraints.Constraint):
        return {"support": encode_support(value)}
    if isinstance(value, bool | int | float):
        return value
    a = np.asarray(value)
    return {"array": a.tolist(), "dtype": str(a.dtype)}


def _decode_child(value: Any) -> Any:
    if isinstance(value, dict) and "support" in value:
        return decode_support(value["support"])
    if isinstance(value, dict):
        return jnp.asarray(np.asarray(value["array"], dtype=value["dtype"]))
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ------------------------------------------------------------- site metadata
def encode_space(space: LatentSpace) -> list[dict[str, Any]]:
    """The target sites' names, shapes and supports, in flat order."""
    out = []
    for b in space.blocks:
        try:
            support = encode_support(b.support)
        except TypeError as e:
            raise TypeError(f"Target site '{b.name}': {e}") from e
        out.append(
            {
                "name": b.name,
                "shape": list(b.shape),
                "unconstrained_shape": list(b.unconstrained_shape),
                "support": support,
            }
        )
    return out


def decode_space(data: list[dict[str, Any]]) -> LatentSpace:
    """Rebuild the space; checks the unconstrained shapes came out the same."""
    space = LatentSpace.from_shapes(
        {d["name"]: (tuple(d["shape"]), decode_support(d["support"])) for d in data}
    )
    for b, d in zip(space.blocks, data, strict=True):
        if list(b.unconstrained_shape) != d["unconstrained_shape"]:
            raise ValueError(
                f"Site '{b.name}': support {d['support']['repr']} now gives "
                f"unconstrained shape {b.unconstrained_shape}, the file says "
                f"{tuple(d['unconstrained_shape'])}."
            )
    return space


def encode_layout(layout: ObservationLayout) -> dict[str, Any]:
    """The observation layout as JSON-able data."""
    return {k: _plain(v) for k, v in layout._asdict().items()}


def decode_layout(data: dict[str, Any]) -> ObservationLayout:
    """Inverse of :func:`encode_layout`."""
    return ObservationLayout(
        names=tuple(data["names"]),
        kind=data["kind"],
        shapes=tuple(tuple(s) for s in data["shapes"]),
        set_axes=tuple(data["set_axes"]),
        plate=data["plate"],
        feature_dim=int(data["feature_dim"]),
        transforms=tuple(data.get("transforms", ())),
    )


def encode_sites(sites: dict[str, SiteInfo]) -> dict[str, dict[str, Any]]:
    """Site metadata; supports that cannot be encoded are kept as text only."""
    out = {}
    for name, s in sites.items():
        d = s.describe()
        try:
            d["support"] = encode_support(s.support)
        except TypeError:
            d["support"] = {"repr": support_repr(s.support)}
        out[name] = d
    return out


def decode_sites(data: dict[str, dict[str, Any]]) -> dict[str, SiteInfo]:
    """Inverse of :func:`encode_sites` (text-only supports become ``None``)."""
    return {
        name: SiteInfo(
            name=d["name"],
            shape=tuple(d["shape"]),
            event_shape=tuple(d["event_shape"]),
            dtype=d["dtype"],
            support=decode_support(d["support"]) if len(d["support"]) > 1 else None,
            is_discrete=d["is_discrete"],
            is_observed=d["is_observed"],
            plates=tuple(PlateInfo(*p) for p in d["plates"]),
        )
        for name, d in data.items()
    }


# --------------------------------------------------------------------- pytrees
def tree_to_arrays(
    group: str, tree: Any
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Leaves of ``tree`` as arrays named ``<group>/<i>`` and their JSON index.

    PRNG key leaves are stored as their key data (with the implementation name).
    """
    arrays, index = {}, []
    for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
        entry = {"path": jax.tree_util.keystr(path, simple=True, separator="/")}
        if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
            entry["key_impl"] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        a = np.asarray(leaf)
        entry.update(shape=list(a.shape), dtype=str(a.dtype))
        arrays[f"{group}/{i}"] = a
        index.append(entry)
    return arrays, index


def tree_from_arrays(
    group: str, template: Any, index: list[dict[str, Any]], arrays: dict
) -> Any:
    """Fill ``template``'s structure with the saved leaves of ``group``.

    Raises:
        TreeMismatchError: the saved leaves' paths, shapes or dtypes differ from
            the template's (the message names the first difference).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    saved = {e["path"]: e for e in index}
    paths = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves]
    if paths != [e["path"] for e in index]:
        missing = sorted(set(paths) - set(saved))[:3]
        extra = sorted(set(saved) - set(paths))[:3]
        raise TreeMismatchError(
            f"The saved '{group}' arrays do not match the rebuilt network: "
            f"{len(index)} saved vs {len(paths)} expected; missing {missing}, "
            f"unexpected {extra}."
        )
    out = []
    for i, ((_, leaf), entry) in enumerate(zip(leaves, index, strict=True)):
        a = arrays[f"{group}/{i}"]
        if "key_impl" in entry:
            out.append(jax.random.wrap_key_data(a, impl=entry["key_impl"]))
            continue
        want = (tuple(jnp.shape(leaf)), str(jnp.result_type(leaf)))
        if (a.shape, str(a.dtype)) != want:
            raise TreeMismatchError(
                f"Saved '{group}' array {entry['path']} has shape {a.shape} and "
                f"dtype {a.dtype}; the rebuilt network expects {want[0]} {want[1]}."
            )
        out.append(jnp.asarray(a))
    return jax.tree_util.tree_unflatten(treedef, out)
