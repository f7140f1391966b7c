"""Set Transformer summary network (Lee et al. 2019): ISAB blocks + PMA pooling.

* ``MAB(Q, K)``: pre-norm multi-head attention block,
  ``H = Q + Attn(LN(Q), LN(K))``, ``out = H + FF(LN(H))``.
* ``ISAB(X)``: ``m`` learned inducing points attend to the set,
  ``H = MAB(I, X)``, then the set attends to them, ``out = MAB(X, H)``; cost is
  ``O(n m)`` instead of ``O(n^2)``.
* ``PMA(X)``: ``k`` learned seeds attend to the set, ``MAB(S, X)``; flattened and
  projected to ``summary_dim``.

Masking: keys of absent observations get logit ``-1e9`` (an exact zero weight after the
softmax in float32) and the weights are multiplied by the mask, so absent rows never
reach a present row or the pooled output (an all-absent set gives zero attention
output). Rows themselves are processed independently, so the result is exactly
permutation invariant up to float summation order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from .mlp import DenseNetwork
from .registry import SpecMixin, register_spec

__all__ = ["SetTransformer", "SetTransformerModule"]


class MultiHeadAttention(nnx.Module):
    """Plain multi-head attention with an optional key mask ``(..., n_k)``."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(
                f"embed_dim={dim} must be divisible by num_heads={num_heads}."
            )
        self.num_heads = num_heads
        self.query = nnx.Linear(dim, dim, rngs=rngs)
        self.key = nnx.Linear(dim, dim, rngs=rngs)
        self.value = nnx.Linear(dim, dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, q_in: jax.Array, kv_in: jax.Array, mask: jax.Array | None):
        def heads(a):
            return a.reshape(*a.shape[:-1], self.num_heads, -1)

        q, k, v = (
            heads(self.query(q_in)),
            heads(self.key(kv_in)),
            heads(self.value(kv_in)),
        )
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(q.shape[-1])
        if mask is not None:
            m = mask[..., None, None, :]
            logits = jnp.where(m, logits, -1e9)
            weights = jax.nn.softmax(logits, axis=-1) * m
        else:
            weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("...hqk,...khd->...qhd", weights, v)
        return self.out(out.reshape(*out.shape[:-2], -1))


class MAB(nnx.Module):
    """Pre-norm multihead attention block ``MAB(Q, K)``."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        self.norm_q = nnx.LayerNorm(dim, rngs=rngs)
        self.norm_k = nnx.LayerNorm(dim, rngs=rngs)
        self.norm_h = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = MultiHeadAttention(dim, num_heads, rngs=rngs)
        self.ff = DenseNetwork(dim, (2 * dim,), dim, activation="gelu", rngs=rngs)

    def __call__(self, q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
        h = q + self.attention(self.norm_q(q), self.norm_k(k), mask)
        return h + self.ff(self.norm_h(h))


def _broadcast_rows(p: jax.Array, like: jax.Array) -> jax.Array:
    return jnp.broadcast_to(p, (*like.shape[:-2], *p.shape))


class ISAB(nnx.Module):
    """Induced set attention block with ``num_inducing`` learned points."""

    def __init__(self, dim: int, num_heads: int, num_inducing: int, *, rngs: nnx.Rngs):
        self.inducing = nnx.Param(
            jax.random.normal(rngs.params(), (num_inducing, dim)) / jnp.sqrt(dim)
        )
        self.mab_in = MAB(dim, num_heads, rngs=rngs)
        self.mab_out = MAB(dim, num_heads, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        h = self.mab_in(_broadcast_rows(self.inducing[...], x), x, mask)
        return self.mab_out(x, h, None)


class SetTransformerModule(nnx.Module):
    """``(..., n_obs, obs_dim)`` (+ mask ``(..., n_obs)``) -> ``(..., summary_dim)``."""

    def __init__(self, input_dim: int, spec: SetTransformer, *, rngs: nnx.Rngs):
        dim = spec.embed_dim
        self.summary_dim = spec.summary_dim
        self.embed = nnx.Linear(input_dim, dim, rngs=rngs)
        self.blocks = nnx.List(
            [
                ISAB(dim, spec.num_heads, spec.num_inducing, rngs=rngs)
                for _ in range(spec.num_blocks)
            ]
        )
        self.seeds = nnx.Param(
            jax.random.normal(rngs.params(), (spec.num_seeds, dim)) / jnp.sqrt(dim)
        )
        self.pool = MAB(dim, spec.num_heads, rngs=rngs)
        self.head = DenseNetwork(
            spec.num_seeds * dim, (dim,), spec.summary_dim, activation="gelu", rngs=rngs
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        if mask is not None:
            x = jnp.where(mask[..., None], x, 0.0)
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, mask)
        pooled = self.pool(_broadcast_rows(self.seeds[...], h), h, mask)
        return self.head(pooled.reshape(*pooled.shape[:-2], -1))


@register_spec
@dataclasses.dataclass(frozen=True)
class SetTransformer(SpecMixin):
    """Spec of a Set Transformer summary (ISAB blocks + PMA pooling, masked).

    Args:
        summary_dim: output width (16 default; 2-4x the number of parameters).
        embed_dim: attention width (divisible by ``num_heads``).
        num_heads: attention heads.
        num_inducing: inducing points per ISAB block.
        num_blocks: number of ISAB blocks.
        num_seeds: PMA seed vectors.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> net = SetTransformer(summary_dim=8, embed_dim=32).build(3, rngs=nnx.Rngs(0))
        >>> net(jnp.ones((2, 20, 3))).shape
        (2, 8)
    """

    summary_dim: int = 16
    embed_dim: int = 64
    num_heads: int = 4
    num_inducing: int = 16
    num_blocks: int = 2
    num_seeds: int = 1

    def build(self, input_dim: int, *, rngs: nnx.Rngs) -> SetTransformerModule:
        """Builds the module for observations with ``input_dim`` features."""
        return SetTransformerModule(input_dim, self, rngs=rngs)
