"""Jitted, vectorized, chunked simulation of a NumPyro model.

Simulation ``i`` of a call uses the key ``fold_in(rng_key, i)``: the result does not
depend on the chunk size, so chunked and unchunked runs give identical arrays. A
chunk of simulations is one ``jit(vmap(...))`` program; chunks are written into
preallocated host (NumPy) arrays, so device memory stays bounded by one chunk and a
bank can be larger than device memory.

Model arguments are split into *static* leaves (Python scalars, strings, ``None``:
they may set shapes, e.g. ``n_obs=50``) and *dynamic* leaves (arrays: passed to
the compiled program as inputs). One compiled program is cached per static
configuration and chunk size, so calling again with the same shapes does not
recompile.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from tqdm.auto import tqdm

__all__ = [
    "InvalidSimulationWarning",
    "SimulationError",
    "SimulationInfo",
    "default_chunk_size",
    "simulate_fixed",
    "SimulatorCache",
]

#: Target size of one chunk's outputs, in bytes (bounds device memory).
CHUNK_BYTES = 32 * 2**20
MAX_CHUNK = 65_536


class InvalidSimulationWarning(UserWarning):
    """Some simulations produced NaN/inf and were dropped."""


class SimulationError(RuntimeError):
    """Too many simulations failed (NaN/inf) to continue."""


class SimulationInfo(NamedTuple):
    """What happened during a ``simulate`` call.

    Attributes:
        num_requested: simulations asked for.
        num_valid: simulations returned (finite in every floating site).
        num_invalid: simulations dropped for NaN/inf values.
        invalid_by_site: for each site, how many simulations had a NaN/inf in it.
        wall_time: seconds spent, compilation included.
        chunk_size: simulations per compiled program call.
    """

    num_requested: int
    num_valid: int
    num_invalid: int
    invalid_by_site: dict[str, int]
    wall_time: float
    chunk_size: int


def default_chunk_size(num_simulations: int, bytes_per_simulation: int) -> int:
    """Chunk size that keeps one chunk's output near ``CHUNK_BYTES``.

    Chunks are made even (so the last one wastes little work) and rounded up to a
    multiple of 256.
    """
    cap = int(np.clip(CHUNK_BYTES // max(bytes_per_simulation, 1), 256, MAX_CHUNK))
    num_chunks = -(-num_simulations // cap)
    chunk = -(-num_simulations // num_chunks)
    return int(min(-(-chunk // 256) * 256, max(num_simulations, 1)))


def _is_dynamic(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray)


def split_arguments(args: Sequence, kwargs: dict) -> tuple[Any, tuple, list]:
    """Split model arguments into a hashable static part and array leaves.

    Returns:
        ``(static_key, static_leaves, dynamic_leaves)`` where ``static_key`` is
        hashable and identifies the compiled program.
    """
    leaves, treedef = jax.tree.flatten((tuple(args), dict(kwargs)))
    static, dynamic = [], []
    for leaf in leaves:
        if _is_dynamic(leaf):
            static.append(_DYNAMIC)
            dynamic.append(leaf)
        else:
            static.append(leaf)
    static = tuple(static)
    try:
        hash(static)
    except TypeError as e:
        raise TypeError(
            "Model arguments must be arrays or hashable Python values (numbers, "
            f"strings, tuples); got an unhashable argument: {e}"
        ) from e
    return (treedef, static), static, dynamic


class _Dynamic:
    def __repr__(self) -> str:
        return "<array>"


_DYNAMIC = _Dynamic()


def _merge(static: tuple, dynamic: Sequence) -> list:
    it = iter(dynamic)
    return [next(it) if s is _DYNAMIC else s for s in static]


class SimulatorCache:
    """Compiled chunk simulators of one model, keyed by static arguments.

    Attributes:
        num_traces: how many times a chunk program was traced (compiled); a test
            hook for "no recompilation".
    """

    def __init__(self, fn: Callable, names: Sequence[str]):
        self.fn = fn
        self.names = tuple(names)
        self.num_traces = 0
        self._cache: dict[Any, Callable] = {}

    def get(self, static_key: Any) -> Callable:
        """The jitted ``(rng_key, indices, dynamic_leaves) -> (values, finite)``."""
        if static_key not in self._cache:
            self._cache[static_key] = self._build(static_key)
        return self._cache[static_key]

    def _build(self, static_key: Any) -> Callable:
        treedef, static = static_key
        fn, names = self.fn, self.names

        def one(key: jax.Array, dynamic: list) -> dict[str, jax.Array]:
            args, kwargs = jax.tree.unflatten(treedef, _merge(static, dynamic))
            trace = handlers.trace(handlers.seed(fn, key)).get_trace(*args, **kwargs)
            return {n: trace[n]["value"] for n in names}

        def chunk(rng_key: jax.Array, indices: jax.Array, dynamic: list):
            self.num_traces += 1
            keys = jax.vmap(lambda i: jax.random.fold_in(rng_key, i))(indices)
            values = jax.vmap(one, in_axes=(0, None))(keys, dynamic)
            finite = {
                n: jnp.all(jnp.isfinite(v).reshape(v.shape[0], -1), axis=1)
                for n, v in values.items()
                if jnp.issubdtype(v.dtype, jnp.inexact)
            }
            return values, finite

        return jax.jit(chunk)


def simulate_fixed(
    cache: SimulatorCache,
    rng_key: jax.Array,
    num_simulations: int,
    args: Sequence,
    kwargs: dict,
    shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
    *,
    chunk_size: int | None = None,
    progress: bool | None = None,
    drop_invalid: bool = True,
    index_offset: int = 0,
    report: bool = True,
) -> tuple[dict[str, np.ndarray], SimulationInfo]:
    """Simulate ``num_simulations`` runs with fixed model arguments.

    Args:
        cache: compiled simulators of the model.
        rng_key: JAX PRNG key.
        num_simulations: how many simulations.
        args: positional model arguments.
        kwargs: keyword model arguments.
        shapes: ``{site: (shape, dtype)}`` of one simulation (from a trace).
        chunk_size: simulations per compiled call (default from ``CHUNK_BYTES``).
        progress: show a progress bar (default: when there is more than one chunk).
        drop_invalid: drop simulations with NaN/inf in a floating site.
        index_offset: index of the first simulation (its key is
            ``fold_in(rng_key, index_offset)``).
        report: warn about (and raise on too many) invalid simulations.

    Returns:
        ``(values, info)``: NumPy arrays with a leading simulation axis, and a
        :class:`SimulationInfo`.
    """
    start_time = time.perf_counter()
    per_sim = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in shapes.values())
    chunk = chunk_size or default_chunk_size(num_simulations, per_sim)
    num_chunks = -(-num_simulations // chunk)
    static_key, _, dynamic = split_arguments(args, kwargs)
    run = cache.get(static_key)
    out = {n: np.empty((num_simulations, *s), dtype=d) for n, (s, d) in shapes.items()}
    bad_by_site = dict.fromkeys(shapes, 0)
    show = num_chunks > 1 if progress is None else progress
    bar = tqdm(total=num_simulations, unit="sim", desc="simulate", disable=not show)
    written = num_bad = 0

    def launch(c: int):
        idx = index_offset + jnp.arange(c * chunk, (c + 1) * chunk, dtype=jnp.uint32)
        return run(rng_key, idx, dynamic)

    pending = launch(0)
    for c in range(num_chunks):
        values, finite = pending
        if c + 1 < num_chunks:  # dispatch the next chunk before copying this one
            pending = launch(c + 1)
        m = min(chunk, num_simulations - c * chunk)
        ok = np.ones(m, dtype=bool)
        for n, f in finite.items():
            f = np.asarray(f)[:m]
            bad_by_site[n] += int(m - f.sum())
            ok &= f
        num_bad += int(m - ok.sum())
        keep = ok if drop_invalid else np.ones(m, dtype=bool)
        k = int(keep.sum())
        for n in shapes:
            v = np.asarray(values[n])[:m]
            out[n][written : written + k] = v if k == m else v[keep]
        written += k
        bar.update(m)
    bar.close()
    info = SimulationInfo(
        num_requested=num_simulations,
        num_valid=written,
        num_invalid=num_bad if drop_invalid else 0,
        invalid_by_site={n: b for n, b in bad_by_site.items() if b},
        wall_time=time.perf_counter() - start_time,
        chunk_size=chunk,
    )
    if report:
        report_invalid(info, num_bad)
    return {n: v[:written] for n, v in out.items()}, info


def report_invalid(info: SimulationInfo, num_bad: int) -> None:
    """Warn about simulations with NaN/inf; raise if more than half were dropped."""
    if not num_bad:
        return
    frac = num_bad / max(info.num_requested, 1)
    by_site = ", ".join(f"'{n}': {k}" for n, k in info.invalid_by_site.items())
    msg = (
        f"{num_bad} of {info.num_requested} simulations "
        f"({frac:.1%}) produced NaN/inf (per site: {by_site})"
    )
    if frac > 0.5 and info.num_invalid:
        raise SimulationError(
            msg + ". More than half of the simulations failed: check the priors "
            "(draws where the simulator is undefined) and the simulator itself."
        )
    if info.num_invalid:
        warnings.warn(
            msg + "; they were dropped.", InvalidSimulationWarning, stacklevel=3
        )
    else:
        warnings.warn(
            msg + "; they were kept because drop_invalid=False.",
            InvalidSimulationWarning,
            stacklevel=3,
        )


def make_batch_simulator(
    fn: Callable, names: Sequence[str], args: Sequence, kwargs: dict
) -> Callable[[jax.Array, int], dict[str, jax.Array]]:
    """A pure ``(rng_key, batch_size) -> {site: (batch_size, ...)}`` for use inside
    ``jit`` (e.g. fresh simulations in every training step).

    Simulation ``i`` uses ``fold_in(rng_key, i)``, as in ``simulate``.
    """

    def one(key: jax.Array) -> dict[str, jax.Array]:
        trace = handlers.trace(handlers.seed(fn, key)).get_trace(*args, **kwargs)
        return {n: trace[n]["value"] for n in names}

    def batch(rng_key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
        idx = jnp.arange(batch_size, dtype=jnp.uint32)
        keys = jax.vmap(lambda i: jax.random.fold_in(rng_key, i))(idx)
        return jax.vmap(one)(keys)

    return batch
