"""Registry of network specs: build specs back from plain, JSON-able configs.

A *spec* is a frozen dataclass that holds only hyperparameters (ints, floats,
strings, bools and tuples of those). ``spec.to_config()`` turns it into a plain dict
and :func:`spec_from_config` rebuilds it by registered class name, so a saved
posterior never needs pickles::

    >>> from numpyro_amortized.networks import NeuralSplineFlow, spec_from_config
    >>> spec = NeuralSplineFlow(num_layers=3)
    >>> config = spec.to_config()
    >>> config["spec"], config["kwargs"]["num_layers"]
    ('NeuralSplineFlow', 3)
    >>> spec_from_config(config) == spec
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["SPECS", "SpecMixin", "register_spec", "spec_from_config"]

SPECS: dict[str, type] = {}
"""Registered spec classes by name (filled by :func:`register_spec`)."""

T = TypeVar("T", bound=type)


def _to_plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


def _from_plain(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_from_plain(v) for v in value)
    return value


class SpecMixin:
    """Adds :meth:`to_config` to a frozen-dataclass spec."""

    def to_config(self) -> dict[str, Any]:
        """Returns ``{"spec": class name, "kwargs": constructor arguments}``.

        Tuples become lists so the dict round-trips through JSON unchanged.
        """
        kwargs = {
            f.name: _to_plain(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }
        return {"spec": type(self).__name__, "kwargs": kwargs}


def register_spec(cls: T) -> T:
    """Class decorator: registers a spec class in :data:`SPECS` under its name."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a (frozen) dataclass to be a spec.")
    name = cls.__name__
    if name in SPECS and SPECS[name] is not cls:
        raise ValueError(f"A different spec is already registered as {name!r}.")
    SPECS[name] = cls
    return cls


def spec_from_config(config: dict[str, Any]) -> Any:
    """Rebuilds a spec from the dict made by ``spec.to_config()``.

    Args:
        config: ``{"spec": name, "kwargs": {...}}``; lists in ``kwargs`` are turned
            back into tuples.

    Returns:
        The spec instance.

    Raises:
        KeyError: if the name is not registered.
    """
    name = config["spec"]
    if name not in SPECS:
        raise KeyError(
            f"Unknown network spec {name!r}; registered specs: {sorted(SPECS)}. "
            "Import the module that defines it (and decorates it with "
            "@register_spec) before loading."
        )
    kwargs = {k: _from_plain(v) for k, v in config.get("kwargs", {}).items()}
    return SPECS[name](**kwargs)
