"""Throughput of every flow: log_prob + gradient, training loss + gradient, sampling.

For each flow spec in ``networks.FLOW_SPECS`` (default hyperparameters) at 2 and 10
parameters, with a context of width 8 and batch 256, on the default JAX device:

* ``logp_grad_ms``: one jitted ``value_and_grad`` of ``mean(log_prob)`` w.r.t. the
  network state (for flow matching this needs the ODE with exact divergence);
* ``loss_grad_ms``: the same for ``mean(loss)`` - what a trainer actually runs (equal
  to the above for maximum-likelihood flows, the cheap regression loss for flow
  matching);
* ``samples_per_s``: ``sample`` for 256 contexts x 1 draw, and 256 x 64 draws.

Timings are medians over repeats after a warm-up call (compilation excluded, and
reported separately), each ended by ``block_until_ready``. Run::

    python benchmarks/flows.py [--repeats 20] [--max-seconds 10]

Prints a table and writes ``benchmarks/results/flows_<platform>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from numpyro_amortized import networks

BATCH = 256
CONTEXT_DIM = 8
DIMS = (2, 10)
MANY_DRAWS = 64


def _time(fn, *args, repeats: int, max_seconds: float) -> tuple[float, float]:
    """(compile+first-call seconds, median seconds of later calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times: list[float] = []
    budget_start = time.perf_counter()
    while len(times) < repeats and (
        len(times) < 3 or time.perf_counter() - budget_start < max_seconds
    ):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def bench_flow(spec, num_params: int, *, repeats: int, max_seconds: float) -> dict:
    flow = spec.build(num_params, CONTEXT_DIM, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(flow)
    kx, kc, kl = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (BATCH, num_params))
    c = jax.random.normal(kc, (BATCH, CONTEXT_DIM))

    @jax.jit
    def logp_grad(state, x, c):
        return jax.value_and_grad(
            lambda s: jnp.mean(nnx.merge(graphdef, s).log_prob(x, c))
        )(state)

    @jax.jit
    def loss_grad(state, key, x, c):
        return jax.value_and_grad(
            lambda s: jnp.mean(nnx.merge(graphdef, s).loss(key, x, c))
        )(state)

    @jax.jit
    def sample_one(state, key, c):
        return nnx.merge(graphdef, state).sample(key, c, 1)

    @jax.jit
    def sample_many(state, key, c):
        return nnx.merge(graphdef, state).sample(key, c, MANY_DRAWS)

    opts = {"repeats": repeats, "max_seconds": max_seconds}
    logp_compile, logp_t = _time(logp_grad, state, x, c, **opts)
    loss_compile, loss_t = _time(loss_grad, state, kl, x, c, **opts)
    s1_compile, s1_t = _time(sample_one, state, kl, c, **opts)
    sm_compile, sm_t = _time(sample_many, state, kl, c, **opts)
    return {
        "flow": type(spec).__name__,
        "spec": spec.to_config(),
        "num_params": num_params,
        "num_weights": sum(p.size for p in jax.tree.leaves(state)),
        "logp_grad_ms": 1e3 * logp_t,
        "loss_grad_ms": 1e3 * loss_t,
        "samples_per_s_256": BATCH / s1_t,
        f"samples_per_s_{BATCH}x{MANY_DRAWS}": BATCH * MANY_DRAWS / sm_t,
        "compile_s": {
            "logp_grad": logp_compile,
            "loss_grad": loss_compile,
            "sample_256": s1_compile,
            f"sample_{BATCH}x{MANY_DRAWS}": sm_compile,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    backend = jax.default_backend()
    started = datetime.datetime.now(datetime.UTC).isoformat()
    load_before = os.getloadavg()
    rows = []
    for spec_cls in networks.FLOW_SPECS:
        for dim in DIMS:
            row = bench_flow(
                spec_cls(), dim, repeats=args.repeats, max_seconds=args.max_seconds
            )
            rows.append(row)
            print(
                f"{row['flow']:>17} D={dim:<3} logp+grad {row['logp_grad_ms']:9.2f} ms"
                f"  loss+grad {row['loss_grad_ms']:8.2f} ms"
                f"  sample {row['samples_per_s_256']:12,.0f}/s"
                f"  sample 256x{MANY_DRAWS} "
                f"{row[f'samples_per_s_{BATCH}x{MANY_DRAWS}']:12,.0f}/s",
                flush=True,
            )
    result = {
        "benchmark": "flows",
        "platform": backend,
        "device": str(jax.devices()[0].device_kind),
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "python": platform.python_version(),
        "started_utc": started,
        "finished_utc": datetime.datetime.now(datetime.UTC).isoformat(),
        "config": {
            "batch": BATCH,
            "context_dim": CONTEXT_DIM,
            "dims": list(DIMS),
            "draws_per_context_many": MANY_DRAWS,
            "repeats": args.repeats,
            "max_seconds_per_timing": args.max_seconds,
            "statistic": "median",
        },
        "results": rows,
    }
    out = args.out or Path(__file__).parent / "results" / f"flows_{backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
