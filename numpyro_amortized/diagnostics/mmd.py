"""Maximum mean discrepancy with a Gaussian kernel (Gretton et al., 2012).

With ``k(x, y) = exp(-|x - y|^2 / (2 h^2))`` the unbiased estimate of the
squared MMD between samples ``a`` (size ``n``) and ``b`` (size ``m``) is

    MMD^2 = 1/(n(n-1)) sum_{i != j} k(a_i, a_j) + 1/(m(m-1)) sum_{i != j} k(b_i, b_j)
            - 2/(n m) sum_{i, j} k(a_i, b_j).

It is 0 in expectation when the distributions are equal (an estimate can be
slightly negative) and positive otherwise. The bandwidth ``h`` is the median
pairwise distance of the pooled sample (median heuristic; computed on at most
``2 * max_median_points`` evenly spaced draws). Kernel sums run blockwise in
JAX, so memory stays ``O((n + m) * block)``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_amortized.diagnostics._samples import as_two_samples

__all__ = ["MMD", "median_bandwidth", "mmd"]


class MMD(NamedTuple):
    """Maximum mean discrepancy result.

    Attributes:
        mmd2: unbiased estimate of the squared MMD.
        bandwidth: Gaussian kernel bandwidth ``h`` used.
    """

    mmd2: float
    bandwidth: float


def median_bandwidth(a: Any, b: Any, max_median_points: int = 1000) -> float:
    """Median pairwise Euclidean distance of the pooled samples."""
    a, b = as_two_samples(a, b, "median_bandwidth")

    def thin(x: np.ndarray) -> np.ndarray:
        if len(x) <= max_median_points:
            return x
        return x[np.linspace(0, len(x) - 1, max_median_points).astype(int)]

    pooled = np.concatenate([thin(a), thin(b)])
    sq = ((pooled[:, None, :] - pooled[None, :, :]) ** 2).sum(-1)
    dist = np.sqrt(sq[np.triu_indices(len(pooled), k=1)])
    h = float(np.median(dist))
    return h if h > 0 else 1.0


@functools.partial(jax.jit, static_argnames="block")
def _kernel_sum(x: jax.Array, y: jax.Array, inv_two_h2: jax.Array, block: int):
    """``sum_{i, j} k(x_i, y_j)``, one block of rows of ``x`` at a time."""
    y_sq = (y**2).sum(-1)

    def row(xi):
        d2 = (xi**2).sum() + y_sq - 2 * y @ xi
        return jnp.exp(-jnp.maximum(d2, 0.0) * inv_two_h2).sum()

    return jax.lax.map(row, x, batch_size=block).sum()


def mmd(a: Any, b: Any, *, bandwidth: float | None = None, block: int = 256) -> MMD:
    """Unbiased squared MMD between two samples, Gaussian kernel.

    Args:
        a: ``(n, d)`` draws, or ``(n,)``.
        b: ``(m, d)`` draws, or ``(m,)``.
        bandwidth: kernel bandwidth ``h`` (default: median heuristic).
        block: rows per block of the kernel sums.

    Returns:
        :class:`MMD`.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> same = mmd(rng.normal(size=(500, 2)), rng.normal(size=(500, 2)))
        >>> abs(same.mmd2) < 0.01
        True
    """
    a, b = as_two_samples(a, b, "mmd")
    h = median_bandwidth(a, b) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise ValueError(f"bandwidth must be positive; got {h}.")
    n, m = len(a), len(b)
    # Centre on the pooled mean: the distances are unchanged, float32 error is not.
    centre = np.concatenate([a, b]).mean(axis=0)
    xa = jnp.asarray(a - centre, jnp.float32)
    xb = jnp.asarray(b - centre, jnp.float32)
    c = jnp.float32(1.0 / (2.0 * h * h))
    kaa = (float(_kernel_sum(xa, xa, c, block)) - n) / (n * (n - 1))
    kbb = (float(_kernel_sum(xb, xb, c, block)) - m) / (m * (m - 1))
    kab = float(_kernel_sum(xa, xb, c, block)) / (n * m)
    return MMD(kaa + kbb - 2 * kab, h)
