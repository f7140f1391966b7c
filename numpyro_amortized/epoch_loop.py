"""The epoch loop shared by every training mode: validation, early stopping,
checkpoints, restoring the best weights.

An epoch whose loss or weights are not finite is never kept: the loop stops,
keeps the last finite (best) weights and warns, or raises when no epoch of the
fit ended finite, so a posterior never holds NaN weights (every draw would be
NaN).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from numpyro_amortized.checkpoint import Checkpointer, Position
from numpyro_amortized.history import History
from numpyro_amortized.sharding import gather_to_host_device
from numpyro_amortized.train import TrainState, averaged_params

if TYPE_CHECKING:
    from numpyro_amortized.posterior import AmortizedPosterior

__all__ = ["all_finite", "diverged", "run_epochs"]


def run_epochs(
    post: AmortizedPosterior,
    rng_key: jax.Array,
    run_epoch: Callable,
    state: TrainState,
    val: Any,
    evaluate: Callable,
    history: History,
    start: float,
    *,
    max_epochs: int,
    patience: int | None,
    steps_per_epoch: int,
    progress: bool,
    unit: str = "epoch",
    checkpoint: Checkpointer | None = None,
    parallel: Any = None,
) -> None:
    """Epoch loop: validation, early stopping, restoring the best weights.

    With ``parallel`` (data-parallel training) the kept weights are gathered back
    to this process's default device at the end."""
    f = post._require()
    best_params, best_val, since_best = f.params, np.inf, 0
    offset, first = history.num_epochs, 0
    resumed = None if checkpoint is None else checkpoint.restore(post, state, history)
    if resumed is not None:  # continue exactly where the checkpoint was written
        state, best_params, pos = resumed
        best_val, since_best, offset = pos.best_val, pos.since_best, pos.offset
        first = max_epochs if pos.done else pos.epoch + 1
        start = time.perf_counter() - (history.wall_time or [0.0])[-1]
    bar = tqdm(range(first, max_epochs), desc="fit", unit=unit, disable=not progress)
    nonfinite = False
    for e in bar:
        improved = False
        key = jax.random.fold_in(rng_key, 2 + e)
        state, infos = run_epoch(state, key)
        train_loss = float(jnp.mean(infos.loss))
        history.train_loss.append(train_loss)
        history.num_steps += steps_per_epoch
        history.num_invalid += int(jnp.sum(infos.num_invalid))
        postfix = {"loss": f"{train_loss:.3f}"}
        nonfinite = not (np.isfinite(train_loss) and all_finite(averaged_params(state)))
        if val is not None:
            v = float(evaluate(averaged_params(state), val, jax.random.fold_in(key, 7)))
            history.val_loss.append(v)
            postfix["val_loss"] = f"{v:.3f}"
            if v < best_val and not nonfinite:
                best_val, since_best, improved = v, 0, True
                best_params = jax.tree.map(jnp.copy, averaged_params(state))
                history.best_epoch = offset + e
            else:
                since_best += 1
        elif not nonfinite:  # no validation: the last finite weights
            best_params, improved = averaged_params(state), True
            history.best_epoch = offset + e
        history.wall_time.append(time.perf_counter() - start)
        bar.set_postfix(postfix)
        stop = val is not None and patience is not None and since_best >= patience
        if nonfinite:  # raises, before any checkpoint, if nothing finite to keep
            bar.close()
            diverged(history, offset + e)
        if checkpoint is not None:
            history.stopped_early |= stop and not nonfinite
            done = stop or nonfinite or e == max_epochs - 1
            pos = Position(checkpoint.round, e, offset, best_val, since_best, done)
            checkpoint.save(post, state, best_params, pos, history, improved=improved)
        if nonfinite:
            break
        if stop:
            history.stopped_early = True
            break
    bar.close()
    if first < max_epochs and history.best_epoch < offset and not nonfinite:
        _nothing_kept(history, max_epochs - first)
    if parallel is not None:
        best_params = gather_to_host_device(best_params)
    post._fitted = f._replace(params=best_params)


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of ``tree`` is finite."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return bool(jnp.all(jnp.stack(leaves))) if leaves else True


def diverged(history: History, epoch: int) -> None:
    """Training became non-finite at ``epoch``: warn that the last finite (best)
    weights are kept, or raise if no epoch of this fit produced any."""
    if history.best_epoch < 0:
        raise RuntimeError(
            f"Training diverged: the loss or the weights became NaN/inf in epoch "
            f"{epoch + 1}, before any epoch ended with finite weights, so there are "
            "no trained weights to keep (the posterior keeps the weights it had "
            "before this fit). Try a smaller learning_rate, or check the "
            "simulations for extreme values."
        )
    warnings.warn(
        f"Training diverged: the loss or the weights became NaN/inf in epoch "
        f"{epoch + 1}; keeping the finite weights of epoch {history.best_epoch + 1}. "
        "Try a smaller learning_rate.",
        RuntimeWarning,
        stacklevel=4,
    )


def _nothing_kept(history: History, num_epochs: int) -> None:
    """No epoch of this fit was kept: the validation loss never improved on the
    best so far (a NaN/inf validation loss never does). Raise when no weights
    were ever kept (they are the untrained ones), else warn."""
    last = history.val_loss[-1] if history.val_loss else float("nan")
    what = (
        f"the validation loss was never finite (last: {last})"
        if not np.isfinite(min(history.val_loss[-num_epochs:], default=np.nan))
        else "the validation loss never improved on the best so far"
    )
    if history.best_epoch < 0:
        raise RuntimeError(
            f"Training kept no epoch: {what}, so the only weights to return are "
            "the untrained ones. Check the simulations for extreme values (a few "
            "in the validation split are enough), or pass validation_fraction=0."
        )
    warnings.warn(
        f"No epoch of this fit was kept: {what}; keeping the weights of epoch "
        f"{history.best_epoch + 1}.",
        RuntimeWarning,
        stacklevel=4,
    )
