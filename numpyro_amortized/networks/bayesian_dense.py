r"""Local reparameterization for dense layers (Kingma, Salimans & Welling 2015).

For a dense layer :math:`y = x W + b` with independent Gaussian weights
:math:`W_{ij} \sim N(M_{ij}, V_{ij})`, :math:`b_j \sim N(m_j, v_j)`, each output
is Gaussian given the input row :math:`x`:

.. math::
    y_j \mid x \sim N\Big(\sum_i x_i M_{ij} + m_j,\;
                          \sum_i x_i^2 V_{ij} + v_j\Big).

Sampling :math:`y` from this marginal, with fresh noise per input row, instead of
sampling one :math:`W` for the whole batch gives the same expected loss with
lower-variance gradients (the noise of different examples is independent). It is
exact for a network applied once per example (a coupling conditioner, the flow's
whole forward or inverse pass); it ignores that rows of one *set* share weights
(a DeepSet's per-element embedding), so there it understates the weight noise of
pooled summaries.

Used only inside the training loss
(:meth:`~numpyro_amortized.networks.bayesian.BayesianModule.sample_weights` with
``local_reparameterization=True``); sampled networks for inference draw whole
weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .bayesian_paths import Path

__all__ = ["LocalReparamLinear", "local_linear_paths", "replace_child"]


class _Noise(nnx.Variable):
    """A PRNG key carried by a layer during one loss evaluation."""


class LocalReparamLinear(nnx.Module):
    """A dense layer whose outputs are drawn from their Gaussian marginal.

    Args:
        kernel_mean, kernel_var: ``(in, out)`` means and variances of the kernel.
        bias_mean, bias_var: ``(out,)`` means and variances of the bias (a zero
            variance for a point-estimate bias), or None without a bias.
        rng_key: noise key; every call draws ``N(0, 1)`` of the output's shape.
    """

    def __init__(
        self,
        kernel_mean: jax.Array,
        kernel_var: jax.Array,
        bias_mean: jax.Array | None,
        bias_var: jax.Array | None,
        rng_key: jax.Array,
    ):
        self.kernel_mean = nnx.Param(kernel_mean)
        self.kernel_var = nnx.Param(kernel_var)
        self.use_bias = bias_mean is not None
        if self.use_bias:
            self.bias_mean = nnx.Param(bias_mean)
            self.bias_var = nnx.Param(bias_var)
        self.noise = _Noise(rng_key)

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = x @ self.kernel_mean[...]
        var = (x * x) @ self.kernel_var[...]
        if self.use_bias:
            mean = mean + self.bias_mean[...]
            var = var + self.bias_var[...]
        eps = jax.random.normal(self.noise[...], mean.shape, mean.dtype)
        # The floor keeps d sqrt / d var finite where var == 0 (zero inputs).
        return mean + jnp.sqrt(var + 1e-20) * eps


def local_linear_paths(net: nnx.Module, selected: set[Path]) -> list[Path]:
    """Paths of the ``nnx.Linear`` layers of ``net`` whose kernel is selected."""
    return [
        tuple(path)
        for path, node in nnx.iter_graph(net)
        if isinstance(node, nnx.Linear) and (*path, "kernel") in selected
    ]


def replace_child(root: nnx.Module, path: Path, value: nnx.Module) -> None:
    """Set the node at ``path`` (non-empty) of ``root`` to ``value``, in place."""
    parent = root
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)
