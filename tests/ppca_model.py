"""Probabilistic PCA with known weights, shared by the encoder tests.

``z_i ~ N(0, I_K)``, ``x_i | z_i ~ N(W z_i + b, SIGMA^2 I_D)``, whose posterior is
``N(S W^T (x_i - b) / SIGMA^2, S)`` with ``S = (I + W^T W / SIGMA^2)^{-1}``; W has
orthogonal columns, so S is diagonal (``S_DIAG``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

D, K, SIGMA = 4, 2, 0.5
_Q = np.linalg.qr(np.random.default_rng(0).normal(size=(D, K)))[0]
W = jnp.asarray(_Q * np.array([2.0, 1.0]), jnp.float32)  # W^T W = diag(4, 1)
B_OFFSET = jnp.array([0.5, -1.0, 0.0, 1.0])
S_DIAG = 1.0 / (1.0 + jnp.diag(W.T @ W) / SIGMA**2)  # posterior variances


def ppca(x, batch_size=None):
    with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([K]).to_event(1))
        numpyro.sample(
            "x", dist.Normal(z @ W.T + B_OFFSET, SIGMA).to_event(1), obs=x[idx]
        )


def ppca_data(rng_key, n):
    kz, kx = jax.random.split(rng_key)
    z = jax.random.normal(kz, (n, K))
    return z @ W.T + B_OFFSET + SIGMA * jax.random.normal(kx, (n, D))


def posterior_mean(x):
    return S_DIAG * ((x - B_OFFSET) @ W) / SIGMA**2
