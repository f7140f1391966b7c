"""Scale benchmark: throughput, memory, and amortized inference against NUTS.

Task: the quickstart model (``gaussian_means``: D=4, 50 observations) with the
library's default networks (DeepSet + neural spline flow). On whatever device
JAX picks (the JSON records ``jax.devices()[0].device_kind``):

* simulations/s of ``model.simulate``;
* training steps/s (and examples/s) at batch 128 and 4096, offline (a bank in
  memory) and online (simulation inside the step);
* posterior draws/s for 1,000 datasets x 1,000 draws, and a chunked ``sample``
  over 10^6 datasets (``chunk_size=``, progress bar);
* blackjax NUTS vmapped over 1,000 and 10,000 datasets (300 steps of window
  adaptation, then 500 draws) against the amortized posterior on the same
  datasets and device, with the error of each posterior mean against the exact
  (conjugate) one;
* with ``--big``: 10^7 simulations (~8.6 GB) simulated to disk in chunks and
  trained on by streaming, in a child process whose peak resident memory is
  reported (``ru_maxrss``).

Peak memory of the main process is reported after each section (it only grows).

    python benchmarks/scale.py [--quick] [--big] [--skip-nuts] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import numpyro_amortized as na
from numpyro_amortized.models import gaussian_means, gaussian_means_posterior

RESULTS = Path(__file__).parent / "results"


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - t0


def bench_simulate(num: int, chunk: int) -> dict:
    def simulate(key, n):
        return gaussian_means.simulate(key, n, batch_size=chunk, progress=False)

    simulate(jax.random.key(0), chunk)  # compile the chunk program
    _, wall = timed(simulate, jax.random.key(1), num)
    return {
        "num_simulations": num,
        "chunk_size": chunk,
        "wall_s": wall,
        "sims_per_s": num / wall,
    }


def bench_train(num_sims: int, batch_size: int, num_epochs: int) -> dict:
    sims = gaussian_means.simulate(jax.random.key(0), num_sims, progress=False)
    post = na.AmortizedPosterior(gaussian_means)
    hist = post.fit(
        jax.random.key(1),
        simulations=sims,
        batch_size=batch_size,
        max_epochs=num_epochs,
        patience=10**6,
        progress=False,
    )
    steps = hist.num_steps // hist.num_epochs
    epoch_s = float(np.median(np.diff(hist.wall_time)))
    online = na.AmortizedPosterior(gaussian_means)
    per_epoch = 20
    h2 = online.fit_online(
        jax.random.key(2),
        num_steps=per_epoch * num_epochs,
        steps_per_epoch=per_epoch,
        batch_size=batch_size,
        num_validation=1_000,
        progress=False,
    )
    online_s = float(np.median(np.diff(h2.wall_time)))
    return {
        "batch_size": batch_size,
        "bank": num_sims,
        "steps_per_epoch": steps,
        "first_epoch_s_incl_compile": hist.wall_time[0],
        "steps_per_s": steps / epoch_s,
        "examples_per_s": steps * batch_size / epoch_s,
        "online_steps_per_s": per_epoch / online_s,
        "online_examples_per_s": per_epoch * batch_size / online_s,
        "final_val_loss": hist.val_loss[-1],
        "note": "offline: median epoch after the first, validation pass included",
    }, post


def bench_sample(post, num_datasets: int, num_big: int, chunk: int) -> dict:
    x = gaussian_means.simulate(jax.random.key(3), num_datasets, progress=False)["x"]
    post.sample(jax.random.key(4), {"x": x}, 1_000)  # compile
    walls = [
        timed(post.sample, jax.random.key(5 + i), {"x": x}, 1_000)[1] for i in range(3)
    ]
    wall = float(np.median(walls))
    big = gaussian_means.simulate(jax.random.key(6), num_big, progress=False)["x"]
    t0 = time.perf_counter()
    draws = post.sample(jax.random.key(7), {"x": big}, 10, chunk_size=chunk)
    big_wall = time.perf_counter() - t0
    assert draws["mu"].shape == (num_big, 10, 4)
    return {
        "datasets": num_datasets,
        "draws_per_dataset": 1_000,
        "draws_per_s": num_datasets * 1_000 / wall,
        "chunked_datasets": num_big,
        "chunked_draws_per_dataset": 10,
        "chunk_size": chunk,
        "chunked_wall_s_incl_compile": big_wall,
        "chunked_datasets_per_s": num_big / big_wall,
        "chunked_draws_per_s": num_big * 10 / big_wall,
    }


def vmapped_nuts(num_warmup: int, num_samples: int):
    """Blackjax NUTS with window adaptation, one program vmapped over datasets.

    The potential is the model's, from ``numpyro.infer.util.potential_energy``
    (the latent ``mu`` is unconstrained already).
    """
    import blackjax
    from blackjax.adaptation.base import get_filter_adapt_info_fn
    from numpyro.infer.util import potential_energy

    def one(key, x):
        def logdensity(mu):
            return -potential_energy(gaussian_means, (), {"x": x}, {"mu": mu})

        warm_key, sample_key = jax.random.split(key)
        warmup = blackjax.window_adaptation(
            blackjax.nuts, logdensity, adaptation_info_fn=get_filter_adapt_info_fn()
        )
        (state, params), _ = warmup.run(warm_key, jnp.zeros(4), num_steps=num_warmup)
        step = blackjax.nuts(logdensity, **params).step

        def body(state, k):
            state, _ = step(k, state)
            return state, state.position

        _, draws = jax.lax.scan(body, state, jax.random.split(sample_key, num_samples))
        return draws

    return jax.jit(jax.vmap(one))


def bench_nuts(post, sizes: list[int], num_warmup: int, num_samples: int) -> list:
    run = vmapped_nuts(num_warmup, num_samples)
    rows = []
    for num in sizes:
        sims = gaussian_means.simulate(jax.random.key(10 + num), num, progress=False)
        x = sims["x"]
        keys = jax.random.split(jax.random.key(11), num)
        t0 = time.perf_counter()
        compiled = run.lower(keys, x).compile()
        compile_s = time.perf_counter() - t0
        nuts_draws, nuts_s = timed(compiled, keys, x)
        post.sample(jax.random.key(12), {"x": x}, num_samples)  # compile
        amortized, amortized_s = timed(
            post.sample, jax.random.key(13), {"x": x}, num_samples
        )
        mean, sd = gaussian_means_posterior(jnp.asarray(x))
        nuts_err = np.abs(np.asarray(nuts_draws.mean(1)) - mean) / sd
        amort_err = np.abs(np.asarray(amortized["mu"].mean(1)) - mean) / sd
        rows.append(
            {
                "datasets": num,
                "nuts_warmup": num_warmup,
                "draws_per_dataset": num_samples,
                "nuts_compile_s": compile_s,
                "nuts_s": nuts_s,
                "amortized_s": amortized_s,
                "speedup": nuts_s / amortized_s,
                "nuts_mean_err_over_sd": float(nuts_err.mean()),
                "amortized_mean_err_over_sd": float(amort_err.mean()),
                "note": "wall times after compilation; amortized excludes training",
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def big_child(num: int, batch_size: int, folder: str) -> dict:
    """10^7-scale run: simulate to disk, stream-train one epoch; own process."""
    path = Path(folder) / "bank"
    t0 = time.perf_counter()
    bank = na.simulate_to_disk(jax.random.key(0), gaussian_means, num, path)
    sim_s = time.perf_counter() - t0
    rss_after_sim = peak_rss_mb()
    post = na.AmortizedPosterior(gaussian_means)
    t0 = time.perf_counter()
    hist = post.fit(
        jax.random.key(1), simulations=bank, batch_size=batch_size, max_epochs=1
    )
    train_s = time.perf_counter() - t0
    return {
        "num_simulations": num,
        "bank_gb": bank.nbytes / 1e9,
        "simulate_to_disk_s": sim_s,
        "simulate_to_disk_per_s": num / sim_s,
        "peak_rss_mb_after_simulation": rss_after_sim,
        "batch_size": batch_size,
        "epochs": hist.num_epochs,
        "steps": hist.num_steps,
        "train_s": train_s,
        "train_examples_per_s": hist.num_steps * batch_size / train_s,
        "val_loss": hist.val_loss,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_big(num: int, batch_size: int) -> dict:
    folder = tempfile.mkdtemp(prefix="na_big_", dir=os.environ.get("BIG_DIR"))
    try:
        t0 = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--big-child",
                str(num),
                str(batch_size),
                folder,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        )
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s_total"] = wall
    return result


SECTIONS = ("simulate", "train", "sample", "nuts", "big")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--big", action="store_true", help="add the 10^7 streaming run (slow)"
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated sections among {SECTIONS}; results are merged "
        "into an existing JSON",
    )
    parser.add_argument("--big-size", type=int, default=10**7)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--big-child", nargs=3, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.big_child:
        num, batch, folder = ns.big_child
        print(json.dumps(big_child(int(num), int(batch), folder)))
        return 0
    sections = set(SECTIONS[:4] if ns.only is None else ns.only.split(","))
    if ns.big:
        sections.add("big")
    device = jax.devices()[0]
    q = ns.quick
    out = ns.out or RESULTS / f"scale_{device.platform}{'_quick' if q else ''}.json"
    result = json.loads(out.read_text()) if ns.only and out.exists() else {}
    result.update(
        {
            "benchmark": "scale",
            "task": "gaussian_means D=4 n_obs=50, default networks (DeepSet + NSF)",
            "device_kind": device.device_kind,
            "platform": device.platform,
            "num_devices": len(jax.devices()),
            "gpu_run": (
                "done"
                if device.platform == "gpu"
                else "not done: no GPU in this session; rerun on a GPU to fill in"
            ),
            "jax": jax.__version__,
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
            "quick": q,
        }
    )

    def record(name: str, value) -> None:
        result[name] = value
        result.setdefault("when", {})[name] = {
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "load_average": os.getloadavg(),
            "peak_rss_mb_so_far": peak_rss_mb(),
        }
        print(name, json.dumps(value), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))  # partial results survive

    if "simulate" in sections:
        num, chunk = (10**4, 8_192) if q else (10**6, 65_536)
        record("simulate", bench_simulate(num, chunk))
    post = None
    if sections & {"train", "sample", "nuts"}:
        rows = []
        for batch in (128, 4096) if "train" in sections else (128,):
            row, p = bench_train(2 * 10**4 if q else 2 * 10**5, batch, 3)
            post = p if batch == 128 else post
            rows.append(row)
        if "train" in sections:
            record("train", rows)
    if "sample" in sections:
        record(
            "sample",
            bench_sample(
                post, 100 if q else 1_000, 10**4 if q else 10**6, 4_096 if q else 65_536
            ),
        )
    if "nuts" in sections:
        sizes = [100] if q else [1_000, 10_000]
        record(
            "nuts_vs_amortized",
            bench_nuts(post, sizes, 100 if q else 300, 100 if q else 500),
        )
    if "big" in sections:
        record("big_streaming", run_big(10**5 if q else ns.big_size, 1_024))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
