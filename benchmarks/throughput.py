"""Training and sampling throughput on the quickstart task, side by side with peers.

Task: Gaussian means (D=4, 50 observations); DeepSet summary + neural spline flow
(library defaults), batch 128, a bank of 10^4 simulations. Measured in one run:

* numpyro_amortized: optimizer steps/s of ``fit`` (epochs after the first, which
  holds the compilation; validation passes included) and of ``fit_online``
  (simulation inside the step);
* sbi 0.27 and BayesFlow 2.0.12 (JAX backend): the scripts in
  ``benchmarks/peers/``, each run with its own venv (see ``benchmarks/peers/README.md``
  for how to create them; missing venvs are skipped);
* posterior draws/s for 1,000 datasets x 1,000 draws.

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
import numpy as np
from flax import nnx

import numpyro_amortized as na
from numpyro_amortized.models import gaussian_means

RESULTS = Path(__file__).parent / "results"
PEERS = Path(__file__).parent / "peers"
SBI_PY = Path(os.environ.get("SBI_VENV", "/work/peers/sbi-venv")) / "bin" / "python"
BF_PY = (
    Path(os.environ.get("BAYESFLOW_VENV", "/work/peers/bayesflow-venv")) / "bin/python"
)


def count_params(posterior: na.AmortizedPosterior) -> int:
    return int(sum(np.size(v) for v in jax.tree.leaves(posterior._fitted.params)))


def ours(num_epochs: int, batch_size: int) -> dict:
    sims = gaussian_means.simulate(jax.random.key(0), 10_000, progress=False)
    post = na.AmortizedPosterior(gaussian_means)
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

    online_post = na.AmortizedPosterior(gaussian_means)
    steps = 500
    h2 = online_post.fit_online(
        jax.random.key(2),
        num_steps=steps * num_epochs,
        steps_per_epoch=steps,
        batch_size=batch_size,
        progress=False,
    )
    online = steps / float(np.median(np.diff(h2.wall_time)))

    x = gaussian_means.simulate(jax.random.key(3), 1_000, progress=False)["x"]
    key = jax.random.key(4)
    jax.block_until_ready(post.sample(key, {"x": x}, 1_000))
    times = []
    for i in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(post.sample(jax.random.fold_in(key, i), {"x": x}, 1_000))
        times.append(time.perf_counter() - t0)
    draws_per_s = 1e6 / float(np.median(times))
    return {
        "peer": "numpyro_amortized",
        "steps_per_s": offline,
        "online_steps_per_s": online,
        "compile_and_first_epoch_s": float(hist.wall_time[0]),
        "batch_size": batch_size,
        "num_params_network": count_params(post),
        "draws_per_s_1000x1000": draws_per_s,
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
    rows = [ours(3 if ns.quick else 6, ns.batch_size)]
    print(json.dumps(rows[-1]), flush=True)
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
    print(f"\n{'library':20s} {'steps/s':>9s} {'params':>9s} {'ours / theirs':>14s}")
    for r in rows:
        ratio = me["steps_per_s"] / r["steps_per_s"]
        params = r.get("num_params_network", 0)
        print(f"{r['peer']:20s} {r['steps_per_s']:9.1f} {params:9,d} {ratio:13.1f}x")
    print(
        f"numpyro_amortized online (simulating in the step): "
        f"{me['online_steps_per_s']:.1f} steps/s"
    )
    print(
        f"posterior draws/s, 1,000 datasets x 1,000 draws: "
        f"{me['draws_per_s_1000x1000']:,.0f}"
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
                "ratios": {
                    r["peer"]: me["steps_per_s"] / r["steps_per_s"] for r in rows[1:]
                },
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
