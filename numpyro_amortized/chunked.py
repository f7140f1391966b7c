"""Posterior draws for very many datasets, in chunks, into host memory.

Behind ``posterior.sample(rng_key, data, num_samples, chunk_size=...)``. The
datasets (any leading batch axes, flattened to ``B``) are processed
``chunk_size`` at a time by one compiled program (the last chunk is padded, so
nothing recompiles); each chunk's draws are copied into preallocated NumPy
arrays while the next chunk runs, so device memory holds one chunk.

Keys: dataset ``b`` (flat index) draws with ``jax.random.split(rng_key, B)[b]``,
exactly as the unchunked ``sample`` does, so chunked and unchunked draws agree
(up to floating-point differences between batch sizes) whatever the chunk size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from numpyro_amortized.varying import mask_key

if TYPE_CHECKING:
    from numpyro_amortized.posterior import AmortizedPosterior

__all__ = ["sample_in_chunks"]


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
        v = jax.vmap(lambda k, c: net.flow.sample(k, c, num_samples))(keys, ctx)
        return space.constrain(theta_std.inverse(v))[0]

    fn = post._jit("sample_chunk", draw, static_argnames="num_samples")

    def launch(c: int):
        lo, hi = c * size, min((c + 1) * size, num)
        idx = np.arange(lo, lo + size)
        idx[hi - lo :] = lo  # pad the last chunk with its first dataset
        _, x, mask = post._data_arrays({k: v[idx] for k, v in flat.items()})
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
