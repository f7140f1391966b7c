"""Put a NumPy (non-JAX) simulator into a NumPyro model.

:class:`NumpySimulator` is a NumPyro distribution whose ``sample`` calls a NumPy
function through ``jax.pure_callback``. It works inside ``jit`` and ``vmap``: under
``model.simulate`` a whole chunk of simulations reaches the host in one callback,
which loops over them in Python (a ``vectorized=True`` function gets each as a
batch of one, see Randomness).
It has no likelihood: amortized (simulation-based) inference needs none, while
NUTS and SVI do and get a clear error.

Randomness: each simulation's JAX key is turned into a 64-bit seed and the NumPy
function is called once per simulation with a ``numpy.random.Generator`` built
from that seed (a vectorized function gets a batch of one), so results are
reproducible from the JAX key and do not depend on how simulations are chunked
(``batch_size``); vectorized and per-simulation versions of the same simulator
give the same simulations. One call per chunk with one generator would tie each
simulation's noise to its chunk's composition.

Failures: a simulation whose NumPy function raises an ``Exception`` counts as
failed: its output is NaN, so ``model.simulate`` and ``fit`` drop and count it
like any NaN simulation, and one ``RuntimeWarning`` names the simulator, the
parameters of the first failure and the error. (Stopping instead would lose a
whole bank for one bad parameter set, which simulators often have at the edges
of the prior.) Integer outputs have no NaN, so there the error propagates.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import Distribution, constraints

__all__ = ["NumpySimulator"]


class NumpySimulator(Distribution):
    """A black-box NumPy simulator as the distribution of an observed site.

    Args:
        simulator: ``simulator(rng, *params) -> array``. With ``vectorized=True``
            every parameter has a leading batch axis ``(B, *param.shape)`` and the
            result must be ``(B, *event_shape)`` (it is called with ``B = 1``,
            once per simulation); otherwise it gets the parameters' own shapes
            and returns ``event_shape``. ``rng`` is a ``numpy.random.Generator``
            seeded for that one simulation. A simulator that raises makes that
            simulation NaN (a failed simulation; one warning).
        *params: JAX arrays (e.g. sampled latent values) passed to the simulator.
        event_shape: shape of one simulated dataset.
        dtype: dtype of the simulated data.
        vectorized: whether ``simulator`` takes a batch of parameter sets.
        support: support of the data (default real).

    Examples:
        >>> import numpy as np, numpyro, numpyro.distributions as dist
        >>> import numpyro_amortized as na
        >>> def walk(rng, drift):  # a legacy NumPy simulator
        ...     steps = rng.normal(drift[:, None], 1.0, size=(drift.shape[0], 20))
        ...     return np.cumsum(steps, axis=1)
        >>> @na.amortize(observed=["x"])
        ... def model(x=None):
        ...     drift = numpyro.sample("drift", dist.Normal(0, 1))
        ...     numpyro.sample("x", na.NumpySimulator(walk, drift, event_shape=(20,)),
        ...                    obs=x)
        >>> model.simulate(jax.random.key(0), 100)["x"].shape
        (100, 20)
    """

    pytree_data_fields = ("params",)
    pytree_aux_fields = ("simulator", "vectorized", "out_dtype", "_support")

    def __init__(
        self,
        simulator: Callable[..., np.ndarray],
        *params: Any,
        event_shape: Sequence[int] = (),
        dtype: Any = jnp.float32,
        vectorized: bool = True,
        support: constraints.Constraint = constraints.real,
    ):
        self.simulator = simulator
        self.params = tuple(jnp.asarray(p) for p in params)
        self.vectorized = vectorized
        self.out_dtype = jnp.dtype(dtype)
        self._support = (
            constraints.independent(support, len(event_shape))
            if len(event_shape) and support.event_dim == 0
            else support
        )
        super().__init__(batch_shape=(), event_shape=tuple(event_shape))

    @property
    def support(self) -> constraints.Constraint:
        return self._support

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        n = int(np.prod(sample_shape, dtype=np.int64))
        seeds = jax.random.bits(key, (n, 2), dtype=jnp.uint32)
        params = [jnp.broadcast_to(p, (n, *p.shape)) for p in self.params]
        out_shape = (n, *self.event_shape)
        param_ndims = [p.ndim for p in params]
        call = _make_callback(
            self.simulator, self.vectorized, out_shape, self.out_dtype, param_ndims
        )
        result = jax.pure_callback(
            call,
            jax.ShapeDtypeStruct(out_shape, self.out_dtype),
            seeds,
            *params,
            vmap_method="broadcast_all",
        )
        return result.reshape(*sample_shape, *self.event_shape)

    def log_prob(self, value: jax.Array) -> jax.Array:
        raise NotImplementedError(
            "NumpySimulator is a black-box simulator with no likelihood. Amortized "
            "inference (simulation-based) does not need one; NUTS, SVI and other "
            "likelihood-based methods do: write the likelihood as a NumPyro "
            "distribution to use them."
        )


def _make_callback(
    simulator: Callable,
    vectorized: bool,
    out_shape: tuple[int, ...],
    dtype: np.dtype,
    param_ndims: Sequence[int],
) -> Callable:
    """The host function: flattens any vmap axes, runs the simulator once per
    simulation with its own generator, reshapes."""
    n, event = out_shape[0], out_shape[1:]
    failed = np.dtype(dtype).kind == "f"  # a failure can be NaN (else: raise)
    warned = []

    def call(seeds: np.ndarray, *params: np.ndarray) -> np.ndarray:
        extra = seeds.shape[:-2]  # axes added by vmap (broadcast_all)
        seeds = np.asarray(seeds, dtype=np.uint64).reshape(-1, 2)
        seeds64 = (seeds[:, 0] << np.uint64(32)) | seeds[:, 1]
        flat = [
            np.asarray(p).reshape(-1, *p.shape[p.ndim - nd + 1 :])
            for p, nd in zip(params, param_ndims, strict=True)
        ]
        out = np.empty((len(seeds64), *event), dtype)
        failures = []
        for i, seed in enumerate(seeds64.tolist()):
            args = [p[i : i + 1] if vectorized else p[i] for p in flat]
            try:
                value = simulator(np.random.default_rng(seed), *args)
            except Exception as error:
                if not failed:  # no NaN to mark it with: stop, naming the cause
                    raise RuntimeError(
                        f"NumpySimulator: simulator {_name(simulator)!r} raised for "
                        f"parameters ({_shown(args)}): {type(error).__name__}: "
                        f"{error}. Its output dtype ({np.dtype(dtype)}) has no NaN "
                        "to mark a failed simulation: catch the error in the "
                        "simulator, or return floats."
                    ) from error
                failures.append((args, error))
                out[i] = np.nan
                continue
            out[i] = _one_output(value, vectorized, event)
        if failures and not warned:
            warned.append(True)
            _warn_failures(simulator, failures, len(seeds64))
        return out.reshape(*extra, n, *event)

    return call


def _one_output(value: Any, vectorized: bool, event: tuple[int, ...]) -> np.ndarray:
    """One simulation's output (a batch of one when ``vectorized``), checked."""
    value = np.asarray(value)
    want = (1, *event) if vectorized else event
    if value.shape != want:
        got = "a batch of 1" if vectorized else "one parameter set"
        raise ValueError(
            f"NumpySimulator: the simulator returned shape {value.shape} for {got}, "
            f"expected {want} (event_shape {event})."
        )
    return value[0] if vectorized else value


def _warn_failures(simulator: Callable, failures: list, total: int) -> None:
    """One warning naming the simulator and the first failed parameters."""
    args, error = failures[0]
    warnings.warn(
        f"NumpySimulator: simulator {_name(simulator)!r} raised for "
        f"{len(failures)} of {total} simulation(s) in this call; they count as "
        "failed (NaN, dropped and counted as invalid). First failure, with "
        f"parameters ({_shown(args)}): "
        f"{type(error).__name__}: {error}",
        RuntimeWarning,
        stacklevel=2,
    )


def _name(simulator: Callable) -> str:
    return getattr(simulator, "__qualname__", repr(simulator))


def _shown(args: Sequence) -> str:
    return ", ".join(np.array2string(np.asarray(a), threshold=10) for a in args)
