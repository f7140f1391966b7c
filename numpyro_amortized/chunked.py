"""Posterior draws for very many datasets, in chunks, into host memory.

Behind ``posterior.sample(rng_key, data, num_samples, chunk_size=...)``. The
datasets (any leading batch axes, flattened to ``B``) are processed
``chunk_size`` at a time by one compiled program (the last chunk is padded, so
nothing recompiles); each chunk's draws are copied into preallocated NumPy
arrays while the next chunk runs, so device memory holds one chunk.

Keys: dataset ``b`` (flat index) draws with ``jax.random.split(rng_key, B)[b]``,
exactly as the unchunked ``sample`` does, so chunked and unchunked draws agree
(up to floating-point differences between batch sizes) whatever the chunk size.

Draws: within a dataset, more than :data:`DRAW_BLOCK` draws are made in a loop
of blocks (:func:`sample_flow`), so that the flow's intermediates hold at most
``DRAW_BLOCK`` draws per dataset whatever ``num_samples`` is. One dataset, 10^7
draws of a 2-parameter model (80 MB of output; a 2-layer coupling flow): XLA
temporaries 92 MB instead of 3.0 GB, peak RSS 0.92 GB (0.73 GB before
sampling) instead of 3.7 GB, on CPU (``sample`` and ``sample(chunk_size=...)``
alike).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from numpyro_amortized.varying import mask_key

if TYPE_CHECKING:
    from numpyro_amortized.posterior import AmortizedPosterior

__all__ = ["DRAW_BLOCK", "sample_flow", "sample_in_chunks"]


def sample_in_chunks(
    post: AmortizedPosterior,
    rng_key: jax.Array,
    data: dict,
    num_samples: int,
    *,
    chunk_size: int,
    progress: bool | None = None,
) -> dict[str, np.ndarray]:
    """Draws for a batch of datasets, ``chunk_size`` datasets per program call.

    Args:
        post: a fitted :class:`~numpyro_amortized.AmortizedPosterior`.
        rng_key: JAX PRNG key.
        data: observed sites with leading dataset axes ``batch``.
        num_samples: draws per dataset.
        chunk_size: datasets per call.
        progress: progress bar (default: when there is more than one chunk).

    Returns:
        ``{target: np.ndarray (*batch, num_samples, *site_shape)}``.
    """
    f = post._require()
    if chunk_size < 1:
        raise ValueError(f"sample: chunk_size must be >= 1, got {chunk_size}.")
    batch = f.layout.batch_shape(data)
    if not batch:
        raise ValueError(
            "sample(chunk_size=...) needs a batch of datasets (leading axes); "
            "for one dataset call sample without chunk_size."
        )
    f.layout.check_finite(data, post._observed_supports())  # once, not per chunk
    num = int(np.prod(batch))
    names = [*f.layout.names, *(mask_key(n) for n in f.layout.names)]
    flat = {
        k: np.reshape(np.asarray(data[k]), (num, *np.shape(data[k])[len(batch) :]))
        for k in names
        if k in data
    }
    keys = jax.random.split(rng_key, num)
    size = min(chunk_size, num)
    num_chunks = -(-num // size)
    graphdef, rest, space = f.graphdef, f.rest, f.space

    def draw(params, theta_std, x_std, keys, x, mask, num_samples):
        net = nnx.merge(graphdef, params, rest)
        ctx = net.context(x_std(x), mask)
        v = jax.vmap(lambda k, c: sample_flow(net.flow, k, c, num_samples))(keys, ctx)
        return space.constrain(theta_std.inverse(v))[0]

    fn = post._jit("sample_chunk", draw, static_argnames="num_samples")

    def launch(c: int):
        lo, hi = c * size, min((c + 1) * size, num)
        idx = np.arange(lo, lo + size)
        idx[hi - lo :] = lo  # pad the last chunk with its first dataset
        chunk = {k: v[idx] for k, v in flat.items()}
        _, x, mask = post._data_arrays(chunk, check=False)
        return fn(f.params, f.theta_std, f.x_std, keys[idx], x, mask, num_samples)

    show = num_chunks > 1 if progress is None else progress
    bar = tqdm(total=num, unit="dataset", desc="sample", disable=not show)
    out: dict[str, np.ndarray] = {}
    pending = launch(0)
    for c in range(num_chunks):
        draws = pending
        if c + 1 < num_chunks:  # run the next chunk while this one is copied
            pending = launch(c + 1)
        lo, hi = c * size, min((c + 1) * size, num)
        for k, v in draws.items():
            if k not in out:
                out[k] = np.empty((num, *v.shape[1:]), v.dtype)
            out[k][lo:hi] = np.asarray(v)[: hi - lo]
        bar.update(hi - lo)
    bar.close()
    return {k: v.reshape(*batch, *v.shape[1:]) for k, v in out.items()}


DRAW_BLOCK = 65_536
"""Draws per flow pass and dataset in ``sample``: more draws are made in a loop
of blocks, so the flow's intermediates never hold more than this many draws per
dataset (block ``i`` uses ``jax.random.fold_in(key, i)``; up to this many draws
come from one pass with ``key`` itself, as before blocks existed)."""


def sample_flow(
    flow: Any, key: jax.Array, context: jax.Array, num_samples: int
) -> jax.Array:
    """Flow draws for one context, in blocks of :data:`DRAW_BLOCK`.

    Peak memory is bounded whatever ``num_samples`` is: a ``lax.map`` over blocks
    holds one block's intermediates at a time.

    Args:
        flow: a flow module (``flow.sample(key, context, n) -> (n, D)``).
        key: JAX PRNG key of this context's draws.
        context: ``(context_dim,)``.
        num_samples: number of draws.

    Returns:
        ``(num_samples, D)``; up to :data:`DRAW_BLOCK` draws exactly
        ``flow.sample(key, context, num_samples)``.
    """
    if num_samples <= DRAW_BLOCK:
        return flow.sample(key, context, num_samples)
    num_blocks = -(-num_samples // DRAW_BLOCK)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_blocks))
    v = jax.lax.map(lambda k: flow.sample(k, context, DRAW_BLOCK), keys)
    return v.reshape(num_blocks * DRAW_BLOCK, v.shape[-1])[:num_samples]
