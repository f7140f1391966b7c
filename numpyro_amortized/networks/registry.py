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

A user's own nnx module (e.g. a summary network passed as ``summary_net=``) is made
savable with :func:`register_module`: its constructor arguments are recorded and it
is rebuilt from them, by registered name, when a posterior is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import weakref
from typing import Any, TypeVar

from flax import nnx

__all__ = [
    "MODULES",
    "SPECS",
    "SpecMixin",
    "network_config",
    "network_from_config",
    "register_module",
    "register_spec",
    "spec_from_config",
]

SPECS: dict[str, type] = {}
"""Registered spec classes by name (filled by :func:`register_spec`)."""

MODULES: dict[str, type] = {}
"""Registered user nnx module classes by name (filled by :func:`register_module`)."""

_ARGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RNGS = {"__rngs__": True}

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


def register_module(cls: T) -> T:
    """Class decorator: makes a user's ``nnx.Module`` savable with a posterior.

    Each instance records the arguments it was constructed with; saving stores
    them (they must be JSON-able: numbers, strings, bools, None, lists, dicts, or
    registered specs; an ``nnx.Rngs`` argument is replaced by a fresh one on
    loading, then the saved weights are put in). Import the module that defines
    the class before loading.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> @register_module
        ... class MeanSummary(nnx.Module):
        ...     def __init__(self, features: int, *, rngs: nnx.Rngs):
        ...         self.linear = nnx.Linear(features, 2, rngs=rngs)
        ...     def __call__(self, x, mask=None):
        ...         return self.linear(x.mean(-2))
        >>> config = network_config(MeanSummary(3, rngs=nnx.Rngs(0)))
        >>> config["module"], config["kwargs"]["features"]
        ('MeanSummary', 3)
    """
    if not (isinstance(cls, type) and issubclass(cls, nnx.Module)):
        raise TypeError(f"register_module decorates nnx.Module classes; got {cls!r}.")
    name = cls.__name__
    if name in MODULES and MODULES[name].__qualname__ != cls.__qualname__:
        raise ValueError(f"A different module is already registered as {name!r}.")
    init = cls.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if type(self) is cls:
            bound = signature.bind(self, *args, **kwargs)
            _ARGS[self] = dict(list(bound.arguments.items())[1:])

    cls.__init__ = __init__
    MODULES[name] = cls
    return cls


def network_config(network: Any) -> dict[str, Any]:
    """JSON-able config of a spec or of a registered user module instance.

    Raises:
        TypeError: an unregistered module, or arguments that are not plain data.
    """
    if dataclasses.is_dataclass(network) and type(network).__name__ in SPECS:
        return network.to_config()
    if isinstance(network, nnx.Module) and network in _ARGS:
        kwargs = {k: _module_arg(k, v, network) for k, v in _ARGS[network].items()}
        return {"module": type(network).__name__, "kwargs": kwargs}
    raise TypeError(
        f"Cannot save the network {type(network).__name__}: decorate its class with "
        "@na.networks.register_module (an nnx module) or @register_spec (a spec)."
    )


def network_from_config(config: dict[str, Any]) -> Any:
    """Inverse of :func:`network_config`: a spec, or a freshly built user module."""
    if "spec" in config:
        return spec_from_config(config)
    name = config["module"]
    if name not in MODULES:
        raise KeyError(
            f"Unknown network module {name!r}; registered modules: {sorted(MODULES)}. "
            "Import the module that defines it (decorated with @register_module) "
            "before loading."
        )
    kwargs = {k: _module_arg_from(v) for k, v in config["kwargs"].items()}
    return MODULES[name](**kwargs)


def _module_arg(name: str, value: Any, network: Any) -> Any:
    if isinstance(value, nnx.Rngs):
        return _RNGS
    if dataclasses.is_dataclass(value) and type(value).__name__ in SPECS:
        return {"__spec__": value.to_config()}
    if isinstance(value, tuple | list):
        return [_module_arg(name, v, network) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _module_arg(name, v, network) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(
        f"Cannot save {type(network).__name__}: its argument {name!r} is a "
        f"{type(value).__name__}; registered modules take plain data (numbers, "
        "strings, lists, dicts, specs) so they can be rebuilt without pickles."
    )


def _module_arg_from(value: Any) -> Any:
    if value == _RNGS:
        return nnx.Rngs(0)
    if isinstance(value, dict) and set(value) == {"__spec__"}:
        return spec_from_config(value["__spec__"])
    if isinstance(value, dict):
        return {k: _module_arg_from(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_module_arg_from(v) for v in value)
    return value
