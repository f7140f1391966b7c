"""Put a NumPy (non-JAX) simulator into a NumPyro model.

:class:`NumpySimulator` is a NumPyro distribution whose ``sample`` calls a NumPy
function through ``jax.pure_callback``. It works inside ``jit`` and ``vmap``: under
``model.simulate`` a whole chunk of simulations reaches the NumPy function in one
call (``vectorized=True``) or is looped over in Python inside that one callback.
It has no likelihood: amortized (simulation-based) inference needs none, while
NUTS and SVI do and get a clear error.

Randomness: each simulation's JAX key is turned into a 64-bit seed; the NumPy
function gets a ``numpy.random.Generator`` built from the seeds it is asked for,
so results are reproducible from the JAX key.
"""

from __future__ import annotations

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
            result must be ``(B, *event_shape)``; otherwise it is called once per
            simulation with the parameters' own shapes and returns
            ``event_shape``. ``rng`` is a ``numpy.random.Generator``.
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
    """The host function: flattens any vmap axes, runs the simulator, reshapes."""
    n, event = out_shape[0], out_shape[1:]

    def call(seeds: np.ndarray, *params: np.ndarray) -> np.ndarray:
        extra = seeds.shape[:-2]  # axes added by vmap (broadcast_all)
        seeds = np.asarray(seeds, dtype=np.uint64).reshape(-1, 2)
        seeds64 = (seeds[:, 0] << np.uint64(32)) | seeds[:, 1]
        flat = [
            np.asarray(p).reshape(-1, *p.shape[p.ndim - nd + 1 :])
            for p, nd in zip(params, param_ndims, strict=True)
        ]
        total = seeds.shape[0]
        if vectorized:
            rng = np.random.default_rng(np.random.SeedSequence(seeds64.tolist()))
            out = np.asarray(simulator(rng, *flat))
        else:
            out = np.asarray(
                [
                    simulator(
                        np.random.default_rng(int(seeds64[i])), *(p[i] for p in flat)
                    )
                    for i in range(total)
                ]
            )
        if out.shape != (total, *event):
            raise ValueError(
                f"NumpySimulator: the simulator returned shape {out.shape}, expected "
                f"{(total, *event)} (a batch of {total}, event_shape {event})."
            )
        return out.astype(dtype).reshape(*extra, n, *event)

    return call
