"""Training loops behind ``AmortizedPosterior.fit`` and ``fit_online``.

Functions of the posterior object: they simulate or take a bank, build the networks
on first use (``post._build``), standardize (``post._prepare``) and run jitted epochs
from :mod:`numpyro_amortized.train`, keeping the best weights by validation loss.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_amortized.checkpoint import Checkpointer
from numpyro_amortized.disk_bank import DiskBank
from numpyro_amortized.epoch_loop import run_epochs
from numpyro_amortized.history import History
from numpyro_amortized.sharding import data_parallel
from numpyro_amortized.simulate import make_batch_simulator
from numpyro_amortized.train import (
    TrainState,
    default_batch_size,
    default_optimizer,
    make_epoch,
    make_evaluate,
    make_train_step,
)
from numpyro_amortized.validation import (
    check_count,
    check_fit_call,
    check_model_structure,
    check_online_options,
    check_training_split,
)

if TYPE_CHECKING:
    from numpyro_amortized.posterior import AmortizedPosterior

__all__ = ["fit_offline", "fit_online", "train_round"]

# The arguments that determine a fit's result: a checkpoint records them and a
# resume must repeat them (see numpyro_amortized.checkpoint).
_OFFLINE = (
    "num_simulations",
    "simulations",
    "sample_kwargs",
    "num_rounds",
    "batch_size",
    "max_epochs",
    "learning_rate",
    "validation_fraction",
    "patience",
)
_ONLINE = (
    "num_steps",
    "batch_size",
    "steps_per_epoch",
    "learning_rate",
    "num_validation",
    "patience",
    "num_effective_simulations",
)

OFFLINE_EMA_DECAY = 0.998
"""Offline training validates and keeps an EMA of the weights: on a fixed bank the
raw iterate starts fitting the bank's noise within a few epochs (sbibm
gaussian_linear, 10^4 simulations: expected KL to the exact posterior 0.30 nats
with the raw weights, 0.22 with the average). Online training sees fresh
simulations every step, so it keeps the raw weights."""


def fit_offline(
    post: AmortizedPosterior,
    rng_key: jax.Array,
    num_simulations: int | None,
    *,
    simulations: dict[str, np.ndarray] | None,
    sample_kwargs: Callable[[jax.Array], dict] | None,
    num_rounds: int,
    batch_size: int | None,
    max_epochs: int,
    learning_rate: float,
    validation_fraction: float,
    patience: int,
    progress: bool,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume_from: str | os.PathLike | None = None,
    devices: Any = None,
    chunk_size: int | None = None,
) -> History:
    """Body of :meth:`AmortizedPosterior.fit` (see its docstring)."""
    if (num_simulations is None) == (simulations is None):
        raise ValueError("Pass exactly one of num_simulations= or simulations=.")
    check_fit_call(
        post.model,
        post.summary_net,
        post.model_args,
        post.model_kwargs,
        rng_key,
        first_fit=post._fitted is None,
        simulations=simulations,
        disk_bank=isinstance(simulations, DiskBank),
        sample_kwargs=sample_kwargs,
        options=dict(
            num_simulations=num_simulations,
            num_rounds=num_rounds,
            batch_size=batch_size,
            max_epochs=max_epochs,
            learning_rate=learning_rate,
            validation_fraction=validation_fraction,
            patience=patience,
            checkpoint_every=checkpoint_every,
            chunk_size=chunk_size,
        ),
    )
    settings = {
        "fit": "offline",
        **{k: v for k, v in locals().items() if k in _OFFLINE},
    }
    parallel = data_parallel(devices)
    if isinstance(simulations, DiskBank):
        from numpyro_amortized.streaming import fit_streaming

        if num_rounds != 1 or sample_kwargs is not None:
            raise ValueError(
                "fit(simulations=DiskBank) trains on the bank as it is: "
                "num_rounds and sample_kwargs do not apply (simulate a new bank "
                "with na.simulate_to_disk for another round)."
            )

        settings["simulations"] = simulations.fingerprint()
        settings["chunk_size"] = chunk_size
        checkpoint = Checkpointer.create(
            post, rng_key, checkpoint_dir, checkpoint_every, resume_from, settings
        )
        return fit_streaming(
            post,
            rng_key,
            simulations,
            chunk_size=chunk_size,
            batch_size=batch_size,
            max_epochs=max_epochs,
            learning_rate=learning_rate,
            validation_fraction=validation_fraction,
            patience=patience,
            progress=progress,
            checkpoint=checkpoint,
            parallel=parallel,
        )
    checkpoint = Checkpointer.create(
        post, rng_key, checkpoint_dir, checkpoint_every, resume_from, settings
    )
    history = History()
    start = time.perf_counter()
    for r in range(num_rounds if simulations is None else 1):
        if checkpoint is not None and not checkpoint.begin_round(r):
            continue
        key = jax.random.fold_in(rng_key, r)
        sim_key, init_key, train_key = jax.random.split(key, 3)
        if simulations is None:
            sims, info = post.model.simulate(
                sim_key,
                num_simulations,
                *post.model_args,
                sample_kwargs=sample_kwargs,
                return_info=True,
                progress=progress,
                **post.model_kwargs,
            )
            history.num_invalid += info.num_invalid
        else:
            sims = {k: np.asarray(v) for k, v in simulations.items()}
        if post._fitted is None:
            post._build(init_key, sims)
        arrays, dropped = post._prepare(sims)
        history.num_invalid += dropped
        train_round(
            post,
            train_key,
            arrays,
            history,
            start,
            batch_size=batch_size,
            max_epochs=max_epochs,
            learning_rate=learning_rate,
            validation_fraction=validation_fraction,
            patience=patience,
            progress=progress,
            checkpoint=checkpoint,
            parallel=parallel,
        )
    post.history = history
    return history


def train_round(
    post: AmortizedPosterior,
    rng_key: jax.Array,
    arrays: tuple,
    history: History,
    start: float,
    *,
    batch_size: int | None,
    max_epochs: int,
    learning_rate: float,
    validation_fraction: float,
    patience: int,
    progress: bool,
    checkpoint: Checkpointer | None = None,
    parallel: Any = None,
) -> None:
    f = post._require()
    n = arrays[0].shape[0]
    num_val = int(round(n * validation_fraction)) if validation_fraction else 0
    check_training_split(n, num_val, validation_fraction, batch_size)
    if batch_size is None:
        num_devices = 1 if parallel is None else parallel.num_devices
        batch_size = default_batch_size(n - num_val, num_devices)
    if n - num_val < batch_size:
        batch_size = max(1, n - num_val)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(rng_key, 1), n))
    train = jax.tree.map(lambda a: a[perm[num_val:]], arrays)
    val = jax.tree.map(lambda a: a[perm[:num_val]], arrays) if num_val else None
    history.num_simulations += n
    steps_per_epoch = (n - num_val) // batch_size
    optimizer = default_optimizer(
        learning_rate, max_epochs * steps_per_epoch, ema_decay=OFFLINE_EMA_DECAY
    )
    loss_fn = post._loss_fn(num_simulations=n - num_val)
    epoch = make_epoch(
        make_train_step(loss_fn, optimizer), batch_size, parallel=parallel
    )
    evaluate = make_evaluate(loss_fn, parallel=parallel)
    state = TrainState.create(f.params, optimizer)
    place = (lambda t: t) if parallel is None else parallel.replicate
    if parallel is not None:
        parallel.check_batch_size(batch_size, "fit")
        train, val = place(train), place(val)
    post._train_fns = (epoch, evaluate)
    post._validation = val
    run_epochs(
        post,
        rng_key,
        lambda state, key: epoch(place(state), train, key),
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


def fit_online(
    post: AmortizedPosterior,
    rng_key: jax.Array,
    num_steps: int,
    *,
    batch_size: int,
    steps_per_epoch: int,
    learning_rate: float,
    num_validation: int,
    patience: int | None,
    progress: bool,
    num_effective_simulations: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume_from: str | os.PathLike | None = None,
    devices: Any = None,
) -> History:
    """Body of :meth:`AmortizedPosterior.fit_online` (see its docstring)."""
    check_online_options(
        "fit_online",
        num_steps=num_steps,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        learning_rate=learning_rate,
        num_validation=num_validation,
        patience=patience,
    )
    check_count(checkpoint_every, "checkpoint_every", "fit_online")
    check_count(
        num_effective_simulations,
        "num_effective_simulations",
        "fit_online",
        allow_none=True,
    )
    if post._fitted is None:
        check_model_structure(
            post.model, post.summary_net, post.model_args, post.model_kwargs
        )
    settings = {"fit": "online", **{k: v for k, v in locals().items() if k in _ONLINE}}
    checkpoint = Checkpointer.create(
        post, rng_key, checkpoint_dir, checkpoint_every, resume_from, settings
    )
    history = History()
    start = time.perf_counter()
    pilot_key, init_key, train_key = jax.random.split(rng_key, 3)
    sims, info = post.model.simulate(
        pilot_key,
        num_validation,
        *post.model_args,
        return_info=True,
        progress=False,
        **post.model_kwargs,
    )
    if post._fitted is None:
        post._build(init_key, sims)
    val, dropped = post._prepare(sims)
    f = post._require()
    space, layout, theta_std, x_std = f.space, f.layout, f.theta_std, f.x_std
    simulate_batch = make_batch_simulator(
        post.model.fn,
        tuple(dict.fromkeys(space.names + layout.names)),
        post.model_args,
        post.model_kwargs,
    )

    def preprocess(values):
        u, _ = space.unconstrain({n: values[n] for n in space.names})
        x, mask = layout.to_network(values, 1)
        ok = jnp.isfinite(u).all(-1) & jnp.isfinite(x).reshape(len(x), -1).all(-1)
        u = jnp.where(ok[:, None], u, 0.0)
        x = jnp.where(ok.reshape(-1, *(1,) * (x.ndim - 1)), x, 0.0)
        return (theta_std(u), x_std(x), mask), ok.astype(jnp.float32)

    num_epochs = -(-num_steps // steps_per_epoch)
    optimizer = default_optimizer(learning_rate, num_epochs * steps_per_epoch)
    num_kl = num_effective_simulations or num_epochs * steps_per_epoch * batch_size
    loss_fn = post._loss_fn(num_simulations=num_kl)
    step = make_train_step(loss_fn, optimizer)
    parallel = data_parallel(devices)
    if parallel is not None:
        parallel.check_batch_size(batch_size, "fit_online")
        val = parallel.replicate(val)

    @jax.jit
    def run_epoch(state, key):
        def body(state, k):
            sim_key, loss_key = jax.random.split(k)
            values = simulate_batch(sim_key, batch_size)
            if parallel is not None:  # each device simulates its own shard
                values = parallel.shard(values)
            inputs, weights = preprocess(values)
            if parallel is not None:
                inputs, weights = parallel.shard((inputs, weights))
            state, info = step(state, (inputs, weights), loss_key)
            if parallel is not None:
                state = parallel.keep_replicated(state)
            return state, info

        return jax.lax.scan(body, state, jax.random.split(key, steps_per_epoch))

    evaluate = make_evaluate(loss_fn, parallel=parallel)
    post._train_fns = (run_epoch, evaluate)
    post._validation = val
    if parallel is not None:
        epoch_fn = run_epoch
        run_epoch = lambda state, key: epoch_fn(parallel.replicate(state), key)  # noqa: E731
    history.num_invalid += info.num_invalid + dropped
    history.num_simulations = num_epochs * steps_per_epoch * batch_size
    state = TrainState.create(f.params, optimizer)
    run_epochs(
        post,
        train_key,
        run_epoch,
        state,
        val,
        evaluate,
        history,
        start,
        max_epochs=num_epochs,
        patience=patience,
        steps_per_epoch=steps_per_epoch,
        progress=progress,
        checkpoint=checkpoint,
        parallel=parallel,
    )
    post.history = history
    return history
