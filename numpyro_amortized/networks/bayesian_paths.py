"""Select network parameters by glob patterns over their nnx paths.

A parameter's path is the sequence of attribute names and list indices that leads
to it from the network's root, written with dots: the kernel of the output layer
of the first coupling layer's conditioner is
``couplings.0.conditioner.output_layer.kernel``. Patterns are matched component
by component:

* ``*`` matches exactly one component (and ``fnmatch`` wildcards work inside a
  component: ``kern*``, ``[01]``);
* ``**`` matches any number of components, including none;
* anything else matches itself.

So ``"**.bias"`` selects every bias, ``"couplings.*.conditioner.**"`` every weight of
every conditioner, and ``"**"`` everything.

Examples:
    >>> match_path("**.bias", ("couplings", 0, "conditioner", "output_layer", "bias"))
    True
    >>> match_path("couplings.*.bias", ("couplings", 0, "conditioner", "bias"))
    False
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from flax import nnx

__all__ = ["format_path", "match_path", "parameter_paths", "select_paths"]

Path = tuple[str | int, ...]


def format_path(path: Path) -> str:
    """``("a", 0, "b")`` -> ``"a.0.b"``."""
    return ".".join(str(k) for k in path)


def _match(parts: Sequence[str], keys: Sequence[str]) -> bool:
    if not parts:
        return not keys
    head, tail = parts[0], parts[1:]
    if head == "**":
        return any(_match(tail, keys[i:]) for i in range(len(keys) + 1))
    return bool(keys) and fnmatch.fnmatchcase(keys[0], head) and _match(tail, keys[1:])


def match_path(pattern: str, path: Path) -> bool:
    """Whether the dotted glob ``pattern`` matches the parameter ``path``."""
    return _match(pattern.split("."), [str(k) for k in path])


def parameter_paths(module: nnx.Module) -> list[Path]:
    """Paths of all ``nnx.Param`` leaves of ``module``, in state order."""
    state = nnx.state(module, nnx.Param)
    return [tuple(path) for path, _ in nnx.to_flat_state(state)]


def _check_pattern(pattern: str, where: str) -> str:
    if not isinstance(pattern, str) or not pattern or "" in pattern.split("."):
        raise ValueError(
            f"{where} pattern {pattern!r} is not a dotted glob such as '**.bias' "
            "or 'couplings.*.conditioner.**'."
        )
    return pattern


def _listing(paths: Sequence[Path], limit: int = 12) -> str:
    names = [format_path(p) for p in paths[:limit]]
    more = f", ... ({len(paths) - limit} more)" if len(paths) > limit else ""
    return ", ".join(names) + more


def select_paths(
    module: nnx.Module,
    include: Sequence[str] = ("**",),
    exclude: Sequence[str] = (),
    *,
    name: str = "network",
) -> tuple[Path, ...]:
    """Parameter paths of ``module`` matched by some ``include`` and no ``exclude``.

    Args:
        module: the (plain) network whose ``nnx.Param`` leaves are searched.
        include: dotted glob patterns of parameters to select.
        exclude: patterns removed from the selection.
        name: what to call the network in error messages.

    Returns:
        The selected paths, in state order.

    Raises:
        ValueError: a pattern that matches no parameter (a typo would otherwise
            silently change the model), or an empty selection. The message lists
            the network's parameter paths.
    """
    paths = parameter_paths(module)
    for where, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            _check_pattern(pattern, where)
            if not any(match_path(pattern, p) for p in paths):
                raise ValueError(
                    f"bayesian(..., {where}=[{pattern!r}]) matches no parameter of "
                    f"the {name}. Its parameter paths are: {_listing(paths)}. Use "
                    "'*' for one path level and '**' for any number of levels."
                )
    chosen = tuple(
        p
        for p in paths
        if any(match_path(q, p) for q in include)
        and not any(match_path(q, p) for q in exclude)
    )
    if not chosen:
        raise ValueError(
            f"include={list(include)} minus exclude={list(exclude)} selects no "
            f"parameter of the {name}; nothing would be Bayesian. Narrow exclude."
        )
    return chosen
