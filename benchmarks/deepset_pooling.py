"""A quickstart training step with the DeepSet's pooled-mean shortcut on and off.

With mean pooling, ``DeepSetModule`` applies ``phi``'s affine last layer after the
mean (``mean_i(W h_i + b) = W mean_i(h_i) + b``). This script times the library's
training step (default optimizer, batch 128, the quickstart model's 50
observations per dataset) both ways in one process, alternating the two compiled
functions so that host noise hits both alike, and checks that the losses agree.
The old path is forced by patching ``deep_set.is_plain_linear`` to return False.

    python benchmarks/deepset_pooling.py

Writes ``benchmarks/results/deepset_pooling_cpu.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import numpyro_amortized as na
from numpyro_amortized import train
from numpyro_amortized.models import gaussian_means
from numpyro_amortized.networks import deep_set

RESULTS = Path(__file__).parent / "results"
BATCH, STEPS, REPEATS = 128, 50, 7


def main() -> None:
    sims = gaussian_means.simulate(jax.random.key(0), 2_000, progress=False)
    post = na.AmortizedPosterior(gaussian_means)
    post.fit(jax.random.key(1), simulations=sims, max_epochs=1, progress=False)
    f = post._fitted
    optimizer = train.default_optimizer(1e-3, 10_000, ema_decay=0.998)
    step = train.make_train_step(post._loss_fn(2_000), optimizer)
    state = train.TrainState.create(f.params, optimizer)
    theta = jax.random.normal(jax.random.key(2), (STEPS, BATCH, 4))
    x = jax.random.normal(jax.random.key(3), (STEPS, BATCH, 50, 4))
    keys = jax.random.split(jax.random.key(5), STEPS)

    def compiled():
        def epoch(state):
            def body(s, xs):
                return step(s, ((xs[0], xs[1], None), None), xs[2])

            return jax.lax.scan(body, state, (theta, x, keys))[1].loss

        fn = jax.jit(epoch)
        return fn, jax.block_until_ready(fn(state))

    shortcut = deep_set.is_plain_linear
    deep_set.is_plain_linear = lambda layer: False
    try:
        per_observation, loss_old = compiled()
    finally:
        deep_set.is_plain_linear = shortcut
    pooled, loss_new = compiled()

    times = {"per_observation": [], "pooled_mean": []}
    for _ in range(REPEATS):
        for name, fn in (("per_observation", per_observation), ("pooled_mean", pooled)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(state))
            times[name].append((time.perf_counter() - t0) / STEPS * 1e3)
    ms = {k: float(np.median(v)) for k, v in times.items()}
    report = {
        "benchmark": "DeepSet pooled-mean shortcut, quickstart training step",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()),
        "batch_size": BATCH,
        "steps_per_call": STEPS,
        "ms_per_step_median": ms,
        "ms_per_step_all": times,
        "speedup": ms["per_observation"] / ms["pooled_mean"],
        "max_abs_loss_difference": float(jnp.max(jnp.abs(loss_old - loss_new))),
    }
    print(f"{'path':18s} ms/step  steps/s")
    for name, v in ms.items():
        print(f"{name:18s} {v:7.3f}  {1e3 / v:7.1f}")
    print(
        f"speedup {report['speedup']:.2f}x; largest loss difference over "
        f"{STEPS} steps {report['max_abs_loss_difference']:.1e}"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "deepset_pooling_cpu.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
