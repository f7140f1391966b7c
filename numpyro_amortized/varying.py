"""Simulation with model arguments drawn per batch (e.g. a varying ``n_obs``).

``sample_kwargs(rng_key) -> dict`` is called once per batch of ``batch_size``
simulations; the batch then runs as one compiled program with those arguments
fixed. Each distinct set of static values compiles once (draw from a modest set:
e.g. ``n_obs`` in 10..100 compiles at most 91 programs).

Sites whose shape changes between batches are zero-padded to the largest shape
drawn, and a boolean mask ``"<site>_mask"`` is added: ``True`` where the value is
real. The mask covers the site's leading dimensions up to the last one that varied
(for ``x`` of shape ``(n_obs, 4)`` it has shape ``(num_simulations, max_n_obs)``),
which is exactly what a set or time-series summary network takes.

A posterior trained on such simulations sees only the observed sites, so an
argument may vary only if it sets their shapes (``n_obs``: seen through the
padding and the mask); :func:`check_arguments_seen` refuses any other varying
argument (e.g. a design matrix drawn per batch), whose posterior would average
over it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from numpyro_amortized.simulate import (
    SimulationInfo,
    SimulatorCache,
    report_invalid,
    simulate_fixed,
)

__all__ = [
    "MASK_SUFFIX",
    "NUM_PROBES",
    "check_arguments_seen",
    "mask_key",
    "pad_and_mask",
    "simulate_varying",
    "unseen_arguments",
]

MASK_SUFFIX = "_mask"

NUM_PROBES = 16
"""Draws of ``sample_kwargs`` that :func:`check_arguments_seen` compares."""


def mask_key(name: str) -> str:
    """The key of a site's padding mask in a simulation dict."""
    return name + MASK_SUFFIX


def pad_and_mask(chunks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """Concatenate arrays ``(n_i, *shape_i)`` whose ``shape_i`` may differ.

    Returns:
        ``(values, mask)``: zero-padded values and a boolean mask over the leading
        dims up to the last varying one, or ``mask=None`` when no shape varied.
    """
    shapes = np.array([c.shape[1:] for c in chunks])
    if (shapes == shapes[0]).all():
        return np.concatenate(chunks), None
    varying = np.nonzero((shapes != shapes[0]).any(axis=0))[0]
    mask_ndim = int(varying.max()) + 1
    full = tuple(int(d) for d in shapes.max(axis=0))
    total = sum(c.shape[0] for c in chunks)
    values = np.zeros((total, *full), dtype=chunks[0].dtype)
    mask = np.zeros((total, *full[:mask_ndim]), dtype=bool)
    start = 0
    for c in chunks:
        sl = (slice(start, start + c.shape[0]),) + tuple(
            slice(0, d) for d in c.shape[1:]
        )
        values[sl] = c
        mask[sl[: mask_ndim + 1]] = True
        start += c.shape[0]
    return values, mask


def simulate_varying(
    cache: SimulatorCache,
    rng_key: jax.Array,
    num_simulations: int,
    args: Sequence,
    kwargs: dict,
    sample_kwargs: Callable[[jax.Array], dict],
    shapes_for: Callable[[Sequence, dict], dict],
    *,
    batch_size: int,
    progress: bool | None = None,
    drop_invalid: bool = True,
) -> tuple[dict[str, np.ndarray], SimulationInfo]:
    """Simulate with keyword arguments drawn per batch; pad and mask.

    Args:
        cache: compiled simulators of the model.
        rng_key: JAX PRNG key; batch ``b`` draws its arguments with
            ``fold_in(fold_in(rng_key, 2**31), b)``, simulation ``i`` uses
            ``fold_in(rng_key, i)``.
        num_simulations: how many simulations.
        args: fixed positional model arguments.
        kwargs: fixed keyword model arguments.
        sample_kwargs: ``rng_key -> dict`` of keyword arguments for one batch.
        shapes_for: ``(args, kwargs) -> {site: (shape, dtype)}`` (traces the model).
        batch_size: simulations per drawn set of arguments.
        progress: show a progress bar (default: more than one batch).
        drop_invalid: drop simulations with NaN/inf values.

    Returns:
        ``(values, info)`` with ``"<site>_mask"`` entries for sites that varied.
    """
    start_time = time.perf_counter()
    num_batches = -(-num_simulations // batch_size)
    arg_key = jax.random.fold_in(rng_key, 2**31)
    parts: dict[str, list[np.ndarray]] = {}
    bad_by_site: dict[str, int] = {}
    num_valid = num_bad = 0
    show = num_batches > 1 if progress is None else progress
    bar = tqdm(total=num_simulations, unit="sim", desc="simulate", disable=not show)
    for b in range(num_batches):
        drawn = sample_kwargs(jax.random.fold_in(arg_key, b))
        if not isinstance(drawn, dict):
            raise TypeError(
                f"sample_kwargs must return a dict of keyword arguments, got {drawn!r}"
            )
        kw = {**kwargs, **drawn}
        m = min(batch_size, num_simulations - b * batch_size)
        values, info = simulate_fixed(
            cache,
            rng_key,
            m,
            args,
            kw,
            shapes_for(args, kw),
            chunk_size=batch_size,
            progress=False,
            drop_invalid=drop_invalid,
            index_offset=b * batch_size,
            report=False,
        )
        for n, v in values.items():
            parts.setdefault(n, []).append(v)
        for n, k in info.invalid_by_site.items():
            bad_by_site[n] = bad_by_site.get(n, 0) + k
        num_valid += info.num_valid
        num_bad += m - info.num_valid if drop_invalid else 0
        bar.update(m)
    bar.close()
    out: dict[str, np.ndarray] = {}
    for n, chunks in parts.items():
        values, mask = pad_and_mask(chunks)
        out[n] = values
        if mask is not None:
            out[mask_key(n)] = mask
    info = SimulationInfo(
        num_requested=num_simulations,
        num_valid=num_valid,
        num_invalid=num_bad,
        invalid_by_site=bad_by_site,
        wall_time=time.perf_counter() - start_time,
        chunk_size=batch_size,
    )
    report_invalid(info, num_bad if drop_invalid else sum(bad_by_site.values()))
    return out, info


def _same(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    try:
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    except TypeError:  # non-numeric values
        return bool(np.all(a == b))


def unseen_arguments(draws: Sequence[dict], seen: Sequence[Hashable]) -> list[str]:
    """Arguments whose value is not determined by what the networks see.

    Args:
        draws: several ``sample_kwargs`` draws.
        seen: for each draw, what the networks see of it: the observed sites'
            shapes (through padding and masks).

    Returns:
        Names of arguments that differ between two draws that look the same to
        the networks (same ``seen``), in order of first appearance.
    """
    names = list(dict.fromkeys(k for d in draws for k in d))
    first: dict[Hashable, dict] = {}
    unseen = []
    for d, s in zip(draws, seen, strict=True):
        ref = first.setdefault(s, d)
        for n in names:
            if n in unseen:
                continue
            if (n in d) != (n in ref) or (n in d and not _same(d[n], ref[n])):
                unseen.append(n)
    return unseen


def _changes_nothing_seen(
    name: str,
    draws: Sequence[dict],
    seen0: Hashable,
    observed_shapes: Callable[[dict], Hashable],
) -> bool:
    """Whether changing only ``name`` in the first draw (to another draw's value)
    leaves the observed shapes as they were (a run that fails counts as seen)."""
    d0 = draws[0]
    other = next((d for d in draws if not _same(d.get(name), d0.get(name))), None)
    if other is None or name not in d0 or name not in other:
        return False
    try:
        return observed_shapes({**d0, name: other[name]}) == seen0
    except Exception:
        return False


def check_arguments_seen(
    rng_key: jax.Array,
    sample_kwargs: Callable[[jax.Array], dict],
    observed_shapes: Callable[[dict], Hashable],
    *,
    observed: Sequence[str],
    num_probes: int = NUM_PROBES,
) -> None:
    """Refuse varying model arguments that the networks would not see.

    An amortized posterior sees only the observed sites. A varying argument that
    only sets their shapes (e.g. ``n_obs``) is seen, through the padding and the
    mask; any other (a design matrix, a noise level drawn per batch) is not, and
    the posterior learned averages over it: for a design matrix, the prior.
    ``sample_kwargs`` is called with ``num_probes`` keys and each draw's
    observed shapes are compared.

    Args:
        rng_key: key for the probe draws.
        sample_kwargs: ``rng_key -> dict`` of keyword arguments.
        observed_shapes: ``kwargs -> hashable`` description of the observed
            sites' shapes for those arguments (traces the model).
        observed: the observed site names (for the message).
        num_probes: how many draws to compare.

    Raises:
        ValueError: naming each argument that varies while the observed shapes
            stay the same, and what works instead.
        TypeError: ``sample_kwargs`` does not return a dict.
    """
    draws = []
    for k in jax.random.split(rng_key, num_probes):
        drawn = sample_kwargs(k)
        if not isinstance(drawn, dict):
            raise TypeError(
                f"sample_kwargs must return a dict of keyword arguments, got {drawn!r}"
            )
        draws.append(drawn)
    names = {n for d in draws for n in d}
    if all(all(n in d and _same(d[n], draws[0].get(n)) for n in names) for d in draws):
        return  # nothing varies
    seen = [observed_shapes(d) for d in draws]
    unseen = unseen_arguments(draws, seen)
    # Only a size is seen (through padding and the mask), and a size is a scalar:
    # a varying array (covariates whose length follows n_obs) is never seen, even
    # when no two probes happened to draw the same size.
    unseen += [
        n
        for n in sorted(names - set(unseen))
        if any(np.ndim(d.get(n)) > 0 for d in draws)
        and not all(_same(d.get(n), draws[0].get(n)) for d in draws)
    ]
    unseen += [
        n
        for n in sorted(names - set(unseen))
        if _changes_nothing_seen(n, draws, seen[0], observed_shapes)
    ]
    if not unseen:
        return
    first = unseen[0]
    raise ValueError(
        f"fit(sample_kwargs=...): model argument(s) {unseen} vary between "
        "simulations, but the networks never see them: they see only the observed "
        f"sites {list(observed)} (and their shapes, through the padding mask), so "
        f"the posterior learned would average over {unseen} (for a design matrix, "
        "it would be the prior). What works: make such an argument data, sampled "
        f"in the model as an observed site, e.g. numpyro.sample('{first}', "
        f"dist.Normal(0, 1).expand(shape), obs={first}), listed in "
        f"amortize(observed=[..., '{first}']) and passed with the data when "
        "sampling; or keep it fixed (model_kwargs). An argument that only sets the "
        "size of the observed data (such as n_obs) may vary."
    )
