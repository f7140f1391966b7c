"""``fit_elbo``: amortized VI on fresh simulations (body of ``posterior.fit_elbo``).

Every optimizer step simulates ``batch_size`` datasets inside the jitted step and
takes a gradient of the loss of :func:`numpyro_amortized.elbo.elbo_loss_fn` (the
negative ELBO, optionally mixed with the NPE loss). Validation, early stopping
and keeping the best weights are those of ``fit_online``
(:func:`numpyro_amortized.epoch_loop.run_epochs`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_amortized.elbo import check_no_nuisance, elbo_loss_fn
from numpyro_amortized.epoch_loop import run_epochs
from numpyro_amortized.history import History
from numpyro_amortized.simulate import make_batch_simulator
from numpyro_amortized.train import (
    TrainState,
    default_optimizer,
    make_evaluate,
    make_train_step,
)

if TYPE_CHECKING:
    from numpyro_amortized.posterior import AmortizedPosterior

__all__ = ["fit_elbo"]


def fit_elbo(
    post: AmortizedPosterior,
    rng_key: jax.Array,
    num_steps: int = 2_000,
    *,
    num_particles: int = 1,
    npe_weight: float = 0.0,
    elbo_weight: float = 1.0,
    batch_size: int = 64,
    steps_per_epoch: int = 100,
    learning_rate: float = 1e-4,
    num_validation: int = 512,
    patience: int | None = None,
    progress: bool = True,
) -> History:
    """Train (or fine-tune) the posterior by the ELBO across simulated datasets.

    See :meth:`AmortizedPosterior.fit_elbo`. An unfitted posterior is built from
    a pilot bank of ``num_validation`` simulations (which sets the
    standardization), so amortized VI from scratch works too; the pilot bank is
    the validation set.
    """
    if elbo_weight < 0 or npe_weight < 0 or elbo_weight + npe_weight == 0:
        raise ValueError(
            f"Need elbo_weight >= 0 and npe_weight >= 0, not both 0; got "
            f"elbo_weight={elbo_weight}, npe_weight={npe_weight}."
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
    check_no_nuisance(post)
    f = post._require()
    space, layout, theta_std, x_std = f.space, f.layout, f.theta_std, f.x_std

    def preprocess(values):
        u, _ = space.unconstrain({n: values[n] for n in space.names})
        x, mask = layout.to_network(values, 1)
        obs = {n: values[n] for n in layout.names}
        ok = jnp.isfinite(u).all(-1) & jnp.isfinite(x).reshape(len(x), -1).all(-1)
        u = jnp.where(ok[:, None], u, 0.0)
        x = jnp.where(ok.reshape(-1, *(1,) * (x.ndim - 1)), x, 0.0)
        obs = {
            n: jnp.where(ok.reshape(-1, *(1,) * (v.ndim - 1)), v, 0.0)
            for n, v in obs.items()
        }
        return (theta_std(u), x_std(x), mask, obs), ok.astype(jnp.float32)

    val, val_ok = preprocess({k: jnp.asarray(v) for k, v in sims.items()})
    keep = np.asarray(val_ok) > 0
    val = jax.tree.map(lambda a: a[keep], val)
    simulate_batch = make_batch_simulator(
        post.model.fn,
        tuple(dict.fromkeys(space.names + layout.names)),
        post.model_args,
        post.model_kwargs,
    )
    num_epochs = -(-num_steps // steps_per_epoch)
    optimizer = default_optimizer(learning_rate, num_epochs * steps_per_epoch)
    loss_fn = elbo_loss_fn(
        post,
        num_particles=num_particles,
        elbo_weight=elbo_weight,
        npe_weight=npe_weight,
    )
    step = make_train_step(loss_fn, optimizer)

    @jax.jit
    def run_epoch(state, key):
        def body(state, k):
            sim_key, loss_key = jax.random.split(k)
            batch = preprocess(simulate_batch(sim_key, batch_size))
            return step(state, batch, loss_key)

        return jax.lax.scan(body, state, jax.random.split(key, steps_per_epoch))

    evaluate = make_evaluate(loss_fn)
    history.num_invalid += info.num_invalid + int((~keep).sum())
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
    )
    post.history = history
    return history
