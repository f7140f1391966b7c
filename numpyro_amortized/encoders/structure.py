"""The per-datapoint structure of a model: data plate, local and global latents.

An encoder guide needs to know, for a model such as::

    def model(x, batch_size=None):
        decoder = nnx_module("decoder", decoder_net)
        with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            z = numpyro.sample("z", dist.Normal(0, 1).expand([2]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1),
                           obs=x[idx])

which plate indexes the datapoints (``"data"``), which latent sites are *local*
(one value per datapoint, inside that plate: ``"z"``), which observed sites are
the encoder's input (``"x"``), and which latent sites are *global* (outside the
plate). :func:`find_local_structure` reads all of this from one trace of the model.

Shapes: a local site's value has the data axis **first** (``(B, *shape)``, with
``B`` the (sub)sample size); ``shape`` is the per-datapoint value shape, split into
``shape[:-event_ndim]`` (inner plates) and the event shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

__all__ = [
    "LocalSite",
    "LocalStructure",
    "encoder_features",
    "find_local_structure",
]


class LocalSite(NamedTuple):
    """One plate-local sample site, described per datapoint.

    Attributes:
        name: site name.
        shape: per-datapoint value shape (the site's value without the data axis).
        event_ndim: number of trailing event dimensions of ``shape``.
        support: the distribution's support.
        is_discrete: whether the support is discrete.
        inner_plates: ``(name, size, dim)`` of the site's plates other than the data
            plate, outermost first.
    """

    name: str
    shape: tuple[int, ...]
    event_ndim: int
    support: constraints.Constraint
    is_discrete: bool
    inner_plates: tuple[tuple[str, int, int], ...]


class LocalStructure(NamedTuple):
    """The per-datapoint structure of a model (see module docstring).

    Attributes:
        plate: name of the data plate.
        plate_dim: its (negative) batch dimension.
        local: the local latent sites, in trace order.
        observed: names of the observed sites in the data plate (encoder input).
        global_sites: names of the latent sites outside the data plate.
        input_dim: width of one datapoint's flattened, concatenated observations.
    """

    plate: str
    plate_dim: int
    local: tuple[LocalSite, ...]
    observed: tuple[str, ...]
    global_sites: tuple[str, ...]
    input_dim: int


def _frames(site: dict) -> list:
    return [f for f in site["cond_indep_stack"] if f.dim is not None]


def _is_factor(site: dict) -> bool:
    return isinstance(site["fn"], dist.Unit)


def _data_axis(site: dict, plate_dim: int) -> int:
    value_ndim = jnp.ndim(site["value"])
    event_ndim = len(site["fn"].event_shape)
    return value_ndim - event_ndim + plate_dim


def _check_axis_first(site: dict, plate: str, plate_dim: int) -> None:
    axis = _data_axis(site, plate_dim)
    if axis != 0:
        raise ValueError(
            f"EncoderGuide: site '{site['name']}' has shape "
            f"{tuple(jnp.shape(site['value']))} and sits in plate '{plate}' "
            f"(dim={plate_dim}), so its data axis is axis {axis}; the encoder needs "
            "the data axis first. Declare the data plate as the outermost plate of "
            "the site (e.g. a more negative `dim=`), or move other batch axes into "
            "the event with `.to_event(...)`."
        )


def _candidate_plates(trace: dict, observed: set[str]) -> dict[str, Any]:
    """Plates holding at least one observed and one latent sample site."""
    with_obs: dict[str, Any] = {}
    with_latent: set[str] = set()
    for name, site in trace.items():
        if site["type"] != "sample" or _is_factor(site):
            continue
        for frame in _frames(site):
            if name in observed:
                with_obs[frame.name] = frame
            else:
                with_latent.add(frame.name)
    return {n: f for n, f in with_obs.items() if n in with_latent}


def _describe_sites(trace: dict) -> str:
    rows = []
    for name, site in trace.items():
        if site["type"] != "sample" or _is_factor(site):
            continue
        plates = [f.name for f in _frames(site)] or ["no plate"]
        role = "observed" if site["is_observed"] else "latent"
        rows.append(f"'{name}' ({role}; {', '.join(plates)})")
    return ", ".join(rows) or "none"


def _resolve_observed(trace: dict, observed: Sequence[str] | None) -> set[str]:
    if observed is None:
        return {
            n
            for n, s in trace.items()
            if s["type"] == "sample" and s["is_observed"] and not _is_factor(s)
        }
    for name in observed:
        if name not in trace or trace[name]["type"] != "sample":
            raise ValueError(
                f"EncoderGuide: observed site '{name}' is not a sample site of the "
                f"model; its sample sites are {_describe_sites(trace)}."
            )
        if not trace[name]["is_observed"]:
            raise ValueError(
                f"EncoderGuide: site '{name}' is not observed in this call of the "
                f"model; pass its data (e.g. `{name}=...`) to the model arguments "
                "the guide is called with."
            )
    return set(observed)


def find_local_structure(
    trace: dict,
    *,
    observed: Sequence[str] | None = None,
    plate: str | None = None,
    local: Sequence[str] | None = None,
) -> LocalStructure:
    """Reads the data plate, local latents and observed inputs from a model trace.

    Args:
        trace: a NumPyro trace of the model called with data.
        observed: the encoder's input sites; default: every observed sample site
            in the data plate (``numpyro.factor`` sites excluded).
        plate: the data plate's name; default: the one plate that holds both an
            observed site and a latent site (a subsampled one if there are several).
        local: the local latent sites; default: every latent sample site in the
            data plate.

    Returns:
        The :class:`LocalStructure`.

    Raises:
        ValueError: no plate-local latent site (names what was expected), an
            ambiguous data plate, or a site whose data axis is not its first axis.
    """
    obs = _resolve_observed(trace, observed)
    candidates = _candidate_plates(trace, obs)
    if plate is None:
        if not candidates:
            raise ValueError(
                "EncoderGuide expected per-datapoint latent sites: a latent sample "
                "site and an observed site inside the same plate, e.g.\n"
                "    with numpyro.plate('data', N):\n"
                "        z = numpyro.sample('z', dist.Normal(0, 1))\n"
                "        numpyro.sample('x', dist.Normal(z, 1), obs=x)\n"
                f"but the model's sample sites are: {_describe_sites(trace)}. For a "
                "model with only global latents use an AutoGuide or "
                "na.AmortizedPosterior(...).as_guide()."
            )
        if len(candidates) > 1:
            sub = [n for n, f in candidates.items() if trace[n]["args"][1] is not None]
            if len(sub) != 1:
                raise ValueError(
                    f"EncoderGuide: several plates hold observed and latent sites "
                    f"({sorted(candidates)}); pass plate='...' to name the data plate."
                )
            plate = sub[0]
        else:
            plate = next(iter(candidates))
    elif plate not in candidates:
        raise ValueError(
            f"EncoderGuide: plate '{plate}' holds no observed and latent sample site "
            f"together; plates that do: {sorted(candidates) or 'none'}. Sites: "
            f"{_describe_sites(trace)}."
        )
    frame = candidates[plate]
    in_plate = {
        n
        for n, s in trace.items()
        if s["type"] == "sample"
        and not _is_factor(s)
        and any(f.name == plate for f in _frames(s))
    }
    latent_names = [
        n
        for n, s in trace.items()
        if s["type"] == "sample" and not s["is_observed"] and not _is_factor(s)
    ]
    if local is None:
        local = [n for n in latent_names if n in in_plate]
    else:
        for name in local:
            if name not in in_plate or name in obs:
                raise ValueError(
                    f"EncoderGuide: local site '{name}' is not a latent sample site "
                    f"inside plate '{plate}'; sites there: {sorted(in_plate)}."
                )
    observed_in = tuple(n for n in trace if n in obs and n in in_plate)
    sites = []
    for name in local:
        site = trace[name]
        _check_axis_first(site, plate, frame.dim)
        inner = tuple(
            (f.name, int(f.size), int(f.dim)) for f in _frames(site) if f.name != plate
        )
        sites.append(
            LocalSite(
                name=name,
                shape=tuple(int(d) for d in jnp.shape(site["value"])[1:]),
                event_ndim=len(site["fn"].event_shape),
                support=site["fn"].support,
                is_discrete=bool(site["fn"].support.is_discrete),
                inner_plates=inner,
            )
        )
    input_dim = 0
    for name in observed_in:
        _check_axis_first(trace[name], plate, frame.dim)
        input_dim += int(np.prod(jnp.shape(trace[name]["value"])[1:], dtype=np.int64))
    return LocalStructure(
        plate=plate,
        plate_dim=int(frame.dim),
        local=tuple(sites),
        observed=observed_in,
        global_sites=tuple(n for n in latent_names if n not in set(local)),
        input_dim=input_dim,
    )


def encoder_features(trace: dict, structure: LocalStructure) -> jax.Array:
    """The encoder's input ``(B, input_dim)``: observed values, flattened per datapoint.

    Observed sites in the data plate are flattened over their non-data axes and
    concatenated in trace order.
    """
    parts = []
    for name in structure.observed:
        value = jnp.asarray(trace[name]["value"])
        parts.append(value.reshape(value.shape[0], -1).astype(jnp.float32))
    return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
