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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from numpyro_amortized.simulate import (
    SimulationInfo,
    SimulatorCache,
    report_invalid,
    simulate_fixed,
)

__all__ = ["MASK_SUFFIX", "mask_key", "simulate_varying", "pad_and_mask"]

MASK_SUFFIX = "_mask"


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
