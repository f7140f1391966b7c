"""Offline training on a bank larger than memory, streamed from disk in chunks.

Behind ``posterior.fit(rng_key, simulations=bank)`` when ``bank`` is a
:class:`~numpyro_amortized.DiskBank`. The bank's last rows are the validation set
(``validation_fraction`` of the bank, at most :data:`MAX_VALIDATION` rows, held
in memory); the rows before them are the training set, read in chunks of
``chunk_size`` consecutive rows.

An epoch (:func:`chunk_plan`): a random offset ``o`` and the chunks starting at
``o, o + C, o + 2C, ...`` (modulo the number of training rows, so a chunk may wrap
around), visited in a random order; within a chunk, the usual epoch of
:func:`~numpyro_amortized.train.make_epoch`: a random permutation, one jitted
``lax.scan`` over its minibatches. Every full chunk has the same shape, so the
scan compiles once. Each row is used at most once per epoch; the fewer than
``C`` rows an epoch leaves out change with the offset. Since the simulations are
independent draws, consecutive rows are as good a chunk as any.

While the device trains on a chunk (JAX dispatches asynchronously) the next
chunk is read from disk, so reading overlaps with training. Memory: two chunks
and the validation set, whatever the size of the bank.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from numpyro_amortized.history import History
from numpyro_amortized.train import (
    TrainState,
    default_batch_size,
    default_optimizer,
    make_epoch,
    make_evaluate,
    make_train_step,
)
from numpyro_amortized.validation import check_training_split

if TYPE_CHECKING:
    from numpyro_amortized.checkpoint import Checkpointer
    from numpyro_amortized.disk_bank import DiskBank
    from numpyro_amortized.posterior import AmortizedPosterior
    from numpyro_amortized.sharding import DataParallel

__all__ = ["CHUNK_BYTES", "MAX_VALIDATION", "chunk_plan", "fit_streaming"]

#: Default size of one streamed chunk (bytes of the bank's rows).
CHUNK_BYTES = 64 * 2**20
#: Largest validation set held in memory when streaming.
MAX_VALIDATION = 65_536
#: Rows the standardization statistics are computed from (first fit only).
STATS_ROWS = 100_000


def chunk_plan(rng_key: jax.Array, num_rows: int, chunk_size: int) -> np.ndarray:
    """First rows of one epoch's chunks, in the order they are visited.

    ``num_rows // chunk_size`` chunks of ``chunk_size`` consecutive rows (modulo
    ``num_rows``) start at a random offset, so no row is in two chunks; their
    order is a random permutation.

    Examples:
        >>> import jax
        >>> chunk_plan(jax.random.key(0), 10, 3).tolist()  # doctest: +SKIP
        [8, 2, 5]
    """
    if not 0 < chunk_size <= num_rows:
        raise ValueError(f"chunk_size={chunk_size} must be in 1..{num_rows}.")
    num_chunks = num_rows // chunk_size
    offset_key, order_key = jax.random.split(rng_key)
    offset = int(jax.random.randint(offset_key, (), 0, num_rows))
    starts = (offset + chunk_size * np.arange(num_chunks)) % num_rows
    return starts[np.asarray(jax.random.permutation(order_key, num_chunks))]


def default_chunk_rows(bank: DiskBank, batch_size: int, num_rows: int) -> int:
    """About :data:`CHUNK_BYTES` of rows, a multiple of ``batch_size``."""
    per_row = max(bank.nbytes // max(len(bank), 1), 1)
    rows = max(CHUNK_BYTES // per_row // batch_size, 1) * batch_size
    return int(min(rows, num_rows // batch_size * batch_size))


def make_prepare(post: AmortizedPosterior):
    """Jitted ``sims -> ((theta, x, mask), weights)``: standardized network input
    with the fitted statistics; rows with NaN/inf get weight 0 (and zeros)."""
    f = post._require()
    space, layout, theta_std, x_std = f.space, f.layout, f.theta_std, f.x_std

    def prepare(values):
        u, _ = space.unconstrain({n: values[n] for n in space.names})
        x, mask = layout.to_network(values, 1)
        ok = jnp.isfinite(u).all(-1) & jnp.isfinite(x).reshape(len(x), -1).all(-1)
        u = jnp.where(ok[:, None], u, 0.0)
        x = jnp.where(ok.reshape(-1, *(1,) * (x.ndim - 1)), x, 0.0)
        inputs = (
            theta_std(u).astype(jnp.float32),
            x_std(x).astype(jnp.float32),
            mask,
        )
        return inputs, ok.astype(jnp.float32)

    return jax.jit(prepare)


def fit_streaming(
    post: AmortizedPosterior,
    rng_key: jax.Array,
    bank: DiskBank,
    *,
    chunk_size: int | None,
    batch_size: int | None,
    max_epochs: int,
    learning_rate: float,
    validation_fraction: float,
    patience: int,
    progress: bool,
    checkpoint: Checkpointer | None = None,
    parallel: DataParallel | None = None,
) -> History:
    """Body of :meth:`AmortizedPosterior.fit` for a :class:`DiskBank`."""
    from numpyro_amortized.epoch_loop import run_epochs
    from numpyro_amortized.fitting import OFFLINE_EMA_DECAY

    history = History()
    start = time.perf_counter()
    if checkpoint is not None:
        checkpoint.begin_round(0)
    _, init_key, train_key = jax.random.split(jax.random.fold_in(rng_key, 0), 3)
    n = len(bank)
    num_val = 0
    if validation_fraction:
        num_val = min(int(round(n * validation_fraction)), MAX_VALIDATION)
    num_train = n - num_val
    # No rows left to train on: an error; a tiny validation set: a warning.
    check_training_split(n, num_val, validation_fraction, None)
    if batch_size is None:
        num_devices = 1 if parallel is None else parallel.num_devices
        batch_size = default_batch_size(num_train, num_devices)
    if num_train < batch_size:
        raise ValueError(
            f"The bank {bank} leaves {num_train} training rows, fewer than "
            f"batch_size={batch_size}."
        )
    if post._fitted is None:
        post._build(init_key, bank.read(0, min(num_train, STATS_ROWS)))
    chunk = default_chunk_rows(bank, batch_size, num_train)
    if chunk_size is not None:
        if not batch_size <= chunk_size <= num_train:
            raise ValueError(
                f"fit: chunk_size={chunk_size} must lie between batch_size="
                f"{batch_size} and the {num_train} training rows of {bank}."
            )
        chunk = chunk_size // batch_size * batch_size
    if parallel is not None:
        parallel.check_batch_size(batch_size, "fit")
    place = (lambda t: t) if parallel is None else parallel.replicate
    val = None
    if num_val:
        val, dropped = post._prepare(bank.read(num_train, n))
        history.num_invalid += dropped
        val = place(val)

    num_chunks = num_train // chunk
    steps_per_epoch = num_chunks * (chunk // batch_size)
    optimizer = default_optimizer(
        learning_rate, max_epochs * steps_per_epoch, ema_decay=OFFLINE_EMA_DECAY
    )
    loss_fn = post._loss_fn(num_simulations=num_train)
    epoch = make_epoch(
        make_train_step(loss_fn, optimizer),
        batch_size,
        parallel=parallel,
        weighted=True,
    )
    evaluate = make_evaluate(loss_fn, parallel=parallel)
    prepare = make_prepare(post)
    post._train_fns = (epoch, evaluate)
    post._validation = val
    num_calls = [0]

    def run_epoch(state: TrainState, key: jax.Array):
        plan = chunk_plan(jax.random.fold_in(key, 0), num_train, chunk)
        bar = tqdm(plan, desc="chunks", leave=False, disable=not progress)
        infos = []
        pending = place(bank.read_wrapped(int(plan[0]), chunk, num_train))
        for i in range(len(plan)):
            data = prepare(pending)
            state, info = epoch(place(state), data, jax.random.fold_in(key, i + 1))
            if i + 1 < len(plan):  # read the next chunk while this one trains
                pending = place(bank.read_wrapped(int(plan[i + 1]), chunk, num_train))
            infos.append(info)
            bar.update()
        bar.close()
        infos = jax.tree.map(lambda *a: jnp.concatenate(a), *infos)
        if num_calls[0]:  # count invalid rows once (each epoch sees them again)
            infos = infos._replace(num_invalid=jnp.zeros_like(infos.num_invalid))
        num_calls[0] += 1
        return state, infos

    f = post._require()
    state = TrainState.create(f.params, optimizer)
    history.num_simulations += n
    run_epochs(
        post,
        train_key,
        run_epoch,
        state,
        val,
        evaluate,
        history,
        start,
        max_epochs=max_epochs,
        patience=patience,
        steps_per_epoch=steps_per_epoch,
        progress=progress,
        checkpoint=checkpoint,
        parallel=parallel,
    )
    post.history = history
    return history
