"""Simulation throughput: ``model.simulate`` vs ``numpyro.infer.Predictive`` vs a loop.

The quickstart model (Gaussian means, D=4, 50 observations) at 10^5 and 10^6
simulations. Every configuration runs in its own subprocess so its peak resident
memory (``ru_maxrss``) is its own; each does a cold call (compilation included)
and a warm call. The Python loop (an eager ``handlers.seed`` + ``trace`` per
simulation) runs 1,000 simulations and its rate is reported as is.

    python benchmarks/simulate.py            # full run, writes benchmarks/results/
    python benchmarks/simulate.py --quick    # 10^4 and 10^5 only
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def worker(method: str, n: int) -> dict:
    import jax
    import numpy as np
    from numpyro import handlers
    from numpyro.infer import Predictive

    from numpyro_amortized.models import gaussian_means as model

    def run(key):
        if method == "numpyro_amortized":
            return model.simulate(key, n, progress=False)
        if method.startswith("predictive"):
            pred = Predictive(model, num_samples=n, parallel=method.endswith("vmap"))
            return jax.device_get(pred(key))
        if method == "python_loop":
            out = []
            for i in range(n):
                tr = handlers.trace(
                    handlers.seed(model.fn, jax.random.fold_in(key, i))
                ).get_trace()
                out.append(np.asarray(tr["x"]["value"]))
            return {"x": np.stack(out)}
        raise ValueError(method)

    t0 = time.perf_counter()
    out = run(jax.random.key(0))
    cold = time.perf_counter() - t0
    nbytes = sum(np.asarray(v).nbytes for v in out.values())
    del out
    t0 = time.perf_counter()
    out = run(jax.random.key(1))
    warm = time.perf_counter() - t0
    assert out["x"].shape == (n, 50, 4)
    return {
        "method": method,
        "num_simulations": n,
        "cold_s": cold,
        "warm_s": warm,
        "sims_per_s": n / warm,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "output_mb": nbytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "N"))
    ns = parser.parse_args()
    if ns.worker:
        print(json.dumps(worker(ns.worker[0], int(ns.worker[1]))))
        return
    sizes = [10_000, 100_000] if ns.quick else [100_000, 1_000_000]
    configs = [("python_loop", 1_000)]
    for n in sizes:
        configs += [
            ("numpyro_amortized", n),
            ("predictive", n),
            ("predictive_vmap", n),
        ]
    rows = []
    for method, n in configs:
        cmd = [sys.executable, __file__, "--worker", method, str(n)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{method} {n}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            rows.append({"method": method, "num_simulations": n, "failed": True})
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{method:18s} {n:>9,d}  cold {r['cold_s']:7.2f} s  warm {r['warm_s']:7.2f}"
            f" s  {r['sims_per_s']:>11,.0f} sim/s  peak RSS {r['peak_rss_mb']:7.0f} MB"
            f"  (output {r['output_mb']:.0f} MB)",
            flush=True,
        )
    for n in sizes:
        ours = next(
            r
            for r in rows
            if r["method"] == "numpyro_amortized" and r["num_simulations"] == n
        )
        for other in ("predictive", "predictive_vmap", "python_loop"):
            o = [
                r
                for r in rows
                if r["method"] == other
                and not r.get("failed")
                and (r["num_simulations"] == n or other == "python_loop")
            ]
            if o and not ours.get("failed"):
                print(
                    f"N={n:,}: numpyro_amortized / {other} warm throughput = "
                    f"{ours['sims_per_s'] / o[0]['sims_per_s']:.1f}x"
                )
    import jax

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"simulate_{jax.default_backend()}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "simulate",
                "model": "gaussian_means (D=4, n_obs=50)",
                "device": str(jax.devices()[0]),
                "jax": jax.__version__,
                "machine": platform.platform(),
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
