"""Pure training pieces: train state, optimizer, one ``lax.scan`` per epoch.

Everything here works on ``(graphdef, params)`` pytrees and is jit-compiled once
per shape: a whole epoch is one call of a jitted function that permutes the
training set, slices it into batches and scans the optimizer step over them, so
nothing recompiles between epochs.

A *loss function* has the signature ``loss_fn(params, rng_key, batch) -> (B,)``
(per-example losses); ``batch`` is any pytree of arrays with a leading example axis
(``None`` leaves allowed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "TrainState",
    "StepInfo",
    "default_optimizer",
    "make_train_step",
    "make_epoch",
    "make_evaluate",
]


class TrainState(NamedTuple):
    """Parameters, optimizer state and step counter.

    Attributes:
        params: network parameters (an ``nnx.State`` or any pytree).
        opt_state: optax state.
        step: number of optimizer steps taken.
    """

    params: Any
    opt_state: Any
    step: jax.Array


class StepInfo(NamedTuple):
    """Diagnostics of one optimizer step.

    Attributes:
        loss: mean loss of the batch.
        grad_norm: global gradient norm before clipping.
        num_invalid: examples of the batch that were given zero weight.
    """

    loss: jax.Array
    grad_norm: jax.Array
    num_invalid: jax.Array


def default_optimizer(
    learning_rate: float, total_steps: int, *, clip_norm: float = 1.0
) -> optax.GradientTransformation:
    """Adam with cosine decay to 1% of ``learning_rate`` and global-norm clipping."""
    schedule = optax.cosine_decay_schedule(
        learning_rate, max(int(total_steps), 1), alpha=0.01
    )
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(schedule))


def _weighted_mean(losses: jax.Array, weights: jax.Array | None) -> jax.Array:
    if weights is None:
        return jnp.mean(losses)
    losses = jnp.where(weights > 0, losses, 0.0)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_train_step(
    loss_fn: Callable, optimizer: optax.GradientTransformation
) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, StepInfo]]:
    """A pure step ``(state, batch, rng_key) -> (state, info)``.

    ``batch`` is ``(inputs, weights)``: examples with weight 0 (invalid simulations)
    do not contribute; ``weights`` may be ``None``.
    """

    def objective(params, rng_key, batch):
        inputs, weights = batch
        return _weighted_mean(loss_fn(params, rng_key, inputs), weights)

    def step(state: TrainState, batch: Any, rng_key: jax.Array):
        loss, grads = jax.value_and_grad(objective)(state.params, rng_key, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        weights = batch[1]
        invalid = (
            jnp.zeros((), jnp.int32)
            if weights is None
            else jnp.sum(weights <= 0).astype(jnp.int32)
        )
        info = StepInfo(loss, optax.tree.norm(grads), invalid)
        return TrainState(params, opt_state, state.step + 1), info

    return step


def make_epoch(
    step: Callable, batch_size: int
) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, StepInfo]]:
    """One epoch as a single jitted ``lax.scan`` over shuffled minibatches.

    The returned ``epoch(state, data, rng_key)`` permutes the examples of ``data``
    (a pytree with a leading example axis), drops the last incomplete batch (a new
    permutation every epoch, so every example is used over epochs) and returns the
    final state and the stacked per-step infos.
    """

    def epoch(state: TrainState, data: Any, rng_key: jax.Array):
        n = jax.tree.leaves(data)[0].shape[0]
        num_batches = n // batch_size
        perm_key, step_key = jax.random.split(rng_key)
        perm = jax.random.permutation(perm_key, n)[: num_batches * batch_size]
        perm = perm.reshape(num_batches, batch_size)
        keys = jax.random.split(step_key, num_batches)

        def body(state, xs):
            idx, key = xs
            batch = jax.tree.map(lambda a: a[idx], data)
            return step(state, (batch, None), key)

        return jax.lax.scan(body, state, (perm, keys))

    return jax.jit(epoch)


def make_evaluate(loss_fn: Callable, chunk_size: int = 1024) -> Callable:
    """``evaluate(params, data, rng_key) -> mean loss`` over all of ``data``.

    Runs in chunks (``lax.map``) so memory stays bounded; the data are padded to a
    whole number of chunks and the padding is given zero weight.
    """

    def evaluate(params: Any, data: Any, rng_key: jax.Array) -> jax.Array:
        n = jax.tree.leaves(data)[0].shape[0]
        size = min(chunk_size, n)
        num = -(-n // size)
        pad = num * size - n

        def padded(a):
            a = jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]) if pad else a
            return a.reshape(num, size, *a.shape[1:])

        chunks = jax.tree.map(padded, data)
        weights = (jnp.arange(num * size) < n).reshape(num, size).astype(jnp.float32)
        keys = jax.random.split(rng_key, num)

        def one(xs):
            chunk, w, key = xs
            losses = loss_fn(params, key, chunk)
            return jnp.sum(jnp.where(w > 0, losses, 0.0))

        totals = jax.lax.map(one, (chunks, weights, keys))
        return jnp.sum(totals) / n

    return jax.jit(evaluate)
