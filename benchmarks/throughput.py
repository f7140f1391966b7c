"""Training and sampling throughput on the quickstart task, side by side with peers.

Task: Gaussian means (D=4, 50 observations); DeepSet summary + neural spline flow
(library defaults), batch 128, a bank of 10^4 simulations. Measured in one run:

* numpyro_amortized: optimizer steps/s of ``fit`` (epochs after the first, which
  holds the compilation; validation passes included) and of ``fit_online``
  (simulation inside the step);
* sbi 0.27 and BayesFlow 2.0.12 (JAX backend): the scripts in
  ``benchmarks/peers/``, each run with its own venv (see ``benchmarks/peers/README.md``
  for how to create them; missing venvs are skipped);
* the same two network sizes as each peer (``SIZED_LIKE``): our flow and
  summary widened until the parameter count is within ~10% of the peer's, so the
  ratio is also reported at similar network sizes;
* posterior draws/s for 1,000 datasets x 1,000 draws, next to the generic
  inverse and the conditioner MLPs alone (see ``sampling``).

Reported as ratios, since the machine is shared and noisy.

    python benchmarks/throughput.py [--quick] [--peer-threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import numpyro_amortized as na
from numpyro_amortized import networks as nets
from numpyro_amortized.models import gaussian_means
from numpyro_amortized.networks.base import FlowModule
from numpyro_amortized.networks.coupling_sample import (
    _conditioner_columns as conditioner_columns,
)

RESULTS = Path(__file__).parent / "results"
PEERS = Path(__file__).parent / "peers"
SBI_PY = Path(os.environ.get("SBI_VENV", "/work/peers/sbi-venv")) / "bin" / "python"
BF_PY = (
    Path(os.environ.get("BAYESFLOW_VENV", "/work/peers/bayesflow-venv")) / "bin/python"
)


def count_params(posterior: na.AmortizedPosterior) -> int:
    return int(sum(np.size(v) for v in jax.tree.leaves(posterior._fitted.params)))


# Our flow and summary sized like each peer's network (parameter counts within
# about 10%; printed with each row), for the "similar network sizes" comparison.
SIZED_LIKE = {
    "sbi": dict(
        inference_net=nets.NeuralSplineFlow(hidden=(128, 128), num_bins=10),
        summary_net=nets.DeepSet(summary_dim=16),
    ),
    "bayesflow": dict(
        inference_net=nets.NeuralSplineFlow(
            num_layers=6, hidden=(192, 192), num_bins=10
        ),
        summary_net=nets.DeepSet(summary_dim=16, hidden=(128, 128)),
    ),
}


def ours(
    num_epochs: int,
    batch_size: int,
    sized_like: str | None = None,
    fit_only: bool = False,
) -> dict:
    sims = gaussian_means.simulate(jax.random.key(0), 10_000, progress=False)
    post = na.AmortizedPosterior(gaussian_means, **SIZED_LIKE.get(sized_like, {}))
    hist = post.fit(
        jax.random.key(1),
        simulations=sims,
        max_epochs=num_epochs,
        patience=10**6,
        batch_size=batch_size,
        progress=False,
    )
    steps_per_epoch = hist.num_steps // hist.num_epochs
    epoch_s = np.diff(hist.wall_time)
    offline = steps_per_epoch / float(np.median(epoch_s))
    row = {
        "peer": "numpyro_amortized" + (f" ({sized_like}-sized)" if sized_like else ""),
        "steps_per_s": offline,
        "compile_and_first_epoch_s": float(hist.wall_time[0]),
        "batch_size": batch_size,
        "num_params_network": count_params(post),
    }
    if sized_like or fit_only:
        return row

    online_post = na.AmortizedPosterior(gaussian_means)
    steps = 500
    h2 = online_post.fit_online(
        jax.random.key(2),
        num_steps=steps * num_epochs,
        steps_per_epoch=steps,
        batch_size=batch_size,
        progress=False,
    )
    row["online_steps_per_s"] = steps / float(np.median(np.diff(h2.wall_time)))
    row.update(sampling(post))
    return row


def _timed(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def sampling(post: na.AmortizedPosterior) -> dict:
    """Draws/s for 1,000 datasets x 1,000 draws, and where the time goes.

    ``post.sample`` (the library path) next to, in the same run: the generic
    inverse (``FlowModule.sample``, bins on the last axis) and the conditioner
    MLPs alone as the library path computes them (matrix products and
    activations, no splines). That row sums the conditioner outputs after they
    are moved to the parameters-first layout, so it also pays for reading them
    through that transpose: a loose floor, not the matrix products' cost alone
    (a profiler trace put those at about a quarter of a sampling call).
    """
    x = gaussian_means.simulate(jax.random.key(3), 1_000, progress=False)["x"]
    key = jax.random.key(4)
    library = _timed(lambda: post.sample(key, {"x": x}, 1_000))
    f = post._fitted
    net = nnx.merge(f.graphdef, f.params, f.rest)
    flow = net.flow
    ctx = jax.jit(lambda v: net.context(f.x_std(v), None))(x)

    def per_dataset(fn):
        return jax.jit(lambda k, c: jax.vmap(fn)(jax.random.split(k, c.shape[0]), c))

    generic = per_dataset(lambda k, c: FlowModule.sample(flow, k, c, 1_000))

    def mlps(k, c):  # the fast path's matrix products, without the splines
        z = flow._base_sample(k, c, 1_000)
        cols = [z[..., d] for d in range(z.shape[-1])]
        total = 0.0
        for layer in flow.couplings:
            cond = [cols[d] for d in layer.conditioning]
            total = total + jnp.sum(conditioner_columns(layer, cond, c))
        return total

    return {
        "draws_per_s_1000x1000": 1e6 / library,
        "draws_per_s_generic_inverse": 1e6 / _timed(generic, key, ctx),
        "draws_per_s_mlps_only": 1e6 / _timed(per_dataset(mlps), key, ctx),
    }


def peer(python: Path, script: str, args: list[str], env: dict) -> dict | None:
    if not python.exists():
        print(f"skipping {script}: {python} not found", file=sys.stderr)
        return None
    res = subprocess.run(
        [str(python), str(PEERS / script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    if res.returncode != 0:
        print(f"{script} failed:\n{res.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--peer-threads", type=int, default=1)
    ns = parser.parse_args()
    bs = str(ns.batch_size)
    epochs = 3 if ns.quick else 11
    rows = [ours(epochs, ns.batch_size)]
    print(json.dumps(rows[-1]), flush=True)
    sized = [ours(epochs, ns.batch_size, sized_like=p) for p in SIZED_LIKE]
    for r in sized:
        print(json.dumps(r), flush=True)
    threads = str(ns.peer_threads)
    sbi = peer(
        SBI_PY,
        "quickstart_sbi.py",
        [
            "--batch-size",
            bs,
            "--threads",
            threads,
            "--epochs",
            "2" if ns.quick else "4",
        ],
        {},
    )
    bf = peer(
        BF_PY,
        "quickstart_bayesflow.py",
        [
            "--batch-size",
            bs,
            "--threads",
            threads,
            "--steps",
            "60" if ns.quick else "150",
        ],
        {"KERAS_BACKEND": "jax"},
    )
    for r in (sbi, bf):
        if r is not None:
            rows.append(r)
            print(json.dumps(r), flush=True)
    me = rows[0]
    # Host noise moves our (2-thread) epochs by up to ~1.6x between runs of the
    # same code; the peers' 1-thread numbers move little. Measure ours twice
    # more after the peers and use the median of the three for every ratio.
    repeats = [me["steps_per_s"]]
    repeats += [ours(epochs, ns.batch_size, fit_only=True)["steps_per_s"] for _ in "ab"]
    me["steps_per_s_repeats"] = repeats
    me["steps_per_s"] = float(np.median(repeats))
    print(f"numpyro_amortized steps/s, three fits: {np.round(repeats, 1)}")
    matched = {r["peer"].split("(")[1].split("-")[0]: r for r in sized}
    print(
        f"\n{'library':34s} {'steps/s':>9s} {'params':>9s} {'ours / theirs':>14s} "
        f"{'same size':>10s}"
    )
    for r in [*rows, *sized]:
        ratio = me["steps_per_s"] / r["steps_per_s"]
        params = r.get("num_params_network", 0)
        same = matched.get(r["peer"])
        same_ratio = f"{same['steps_per_s'] / r['steps_per_s']:9.1f}x" if same else ""
        print(
            f"{r['peer']:34s} {r['steps_per_s']:9.1f} {params:9,d} "
            f"{ratio:13.1f}x {same_ratio:>10s}"
        )
    print(
        f"numpyro_amortized online (simulating in the step): "
        f"{me['online_steps_per_s']:.1f} steps/s"
    )
    print(
        f"posterior draws/s, 1,000 datasets x 1,000 draws: "
        f"{me['draws_per_s_1000x1000']:,.0f} (generic inverse: "
        f"{me['draws_per_s_generic_inverse']:,.0f}; the conditioner MLPs alone: "
        f"{me['draws_per_s_mlps_only']:,.0f})"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"throughput_{jax.default_backend()}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "throughput",
                "task": "gaussian_means D=4 n_obs=50, DeepSet + flow, batch "
                f"{ns.batch_size}",
                "device": str(jax.devices()[0]),
                "jax": jax.__version__,
                "flax_nnx_modules": nnx.__name__,
                "machine": platform.platform(),
                "load_average": os.getloadavg(),
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "rows": rows,
                "sized_like_peers": sized,
                "ratios": {
                    r["peer"]: me["steps_per_s"] / r["steps_per_s"] for r in rows[1:]
                },
                "ratios_same_size": {
                    r["peer"]: matched[r["peer"]]["steps_per_s"] / r["steps_per_s"]
                    for r in rows[1:]
                    if r["peer"] in matched
                },
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
