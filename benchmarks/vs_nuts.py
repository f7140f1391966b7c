"""Amortized posteriors vs NUTS: wall-clock for 1, 100, 1,000 datasets, and C2ST.

Models: the quickstart ``gaussian_means`` (D=4, 50 observations) and
``choice_rt`` (a real location, a positive scale and a probability; 50 trials of
response time + accuracy). For each model:

* **amortized**: ``AmortizedPosterior(model).fit(key, num_simulations=N)`` with the
  library defaults (training time = the whole ``fit``, simulation included), then
  ``posterior.sample`` of 1,000 draws for all B datasets in one call (compiled
  beforehand; median of 3 calls);
* **blackjax NUTS, vectorized**: ``run_nuts(..., backend="blackjax")``: all B
  datasets x chains in one jitted program, warmup included; timed including its
  compilation (one compile per B);
* **numpyro NUTS, looped**: ``run_nuts(..., backend="numpyro", vectorized=False)``
  (NumPyro's NUTS kernel; one compiled single-dataset program called B times).
  Datasets beyond ``--numpyro-max`` are **extrapolated** from the measured time per
  dataset (marked ``"extrapolated": true`` in the JSON and ``*`` in the table);
* **MCMC.run**: ``MCMC(NUTS(model)).run`` per dataset as usually written (one
  ``MCMC`` object, ``jit_model_args=True``), which recompiles NumPyro's sampling
  loop on every run; measured on ``--mcmc-datasets`` datasets and extrapolated;
* **C2ST** amortized vs NUTS (blackjax draws) per dataset on the first
  ``--c2st-datasets`` datasets: 1,000 draws per side, the sbibm protocol
  (:func:`numpyro_amortized.diagnostics.c2st`).

NUTS settings: 2 chains x (500 warmup + 500 draws) per dataset, NumPyro defaults
otherwise (target acceptance 0.8, diagonal mass matrix, max tree depth 10).

    python benchmarks/vs_nuts.py                      # 1, 100, 1000 datasets
    python benchmarks/vs_nuts.py --quick              # 1, 10 datasets, small fit
    python benchmarks/vs_nuts.py --datasets 1 100 1000 --models gaussian_means

Results: ``benchmarks/results/vs_nuts_cpu.json`` (``--quick``:
``vs_nuts_cpu_quick.json``), rewritten after every model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

import numpyro_amortized as na
from numpyro_amortized.diagnostics import c2st, flatten_sites
from numpyro_amortized.models import choice_rt, gaussian_means
from numpyro_amortized.nuts import conditioned_model, run_nuts

RESULTS = Path(__file__).parent / "results"
MODELS = {"gaussian_means": gaussian_means, "choice_rt": choice_rt}
NUTS = {"num_warmup": 500, "num_samples": 500, "num_chains": 2}
NUM_DRAWS = 1000


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def train(model, num_simulations: int, max_epochs: int, seed: int):
    posterior = na.AmortizedPosterior(model)
    _, seconds = timed(
        posterior.fit,
        jax.random.key(seed),
        num_simulations,
        max_epochs=max_epochs,
        progress=False,
    )
    return posterior, seconds


def amortized_time(posterior, data: dict, key) -> float:
    posterior.sample(key, data, NUM_DRAWS)  # compile for this B
    times = [
        timed(posterior.sample, jax.random.fold_in(key, i), data, NUM_DRAWS)[1]
        for i in range(3)
    ]
    return float(np.median(times))


def mcmc_run_time(model, data: dict, key, num_datasets: int) -> float:
    """Seconds per dataset of ``MCMC(NUTS(model)).run`` as usually written.

    One ``MCMC`` object, ``jit_model_args=True``, the data as the model argument:
    NumPyro still compiles its sampling loop again on every ``run``.
    """
    from numpyro.infer import MCMC
    from numpyro.infer import NUTS as NumpyroNUTS

    mcmc = MCMC(
        NumpyroNUTS(conditioned_model(model.fn)),
        chain_method="vectorized",
        progress_bar=False,
        jit_model_args=True,
        **NUTS,
    )
    times = []
    for b in range(num_datasets):
        one = {n: v[b] for n, v in data.items()}
        start = time.perf_counter()
        mcmc.run(jax.random.fold_in(key, b), one)
        jax.block_until_ready(mcmc.get_samples())
        times.append(time.perf_counter() - start)
    return float(np.mean(times))


def run_model(name: str, args: argparse.Namespace) -> dict:
    model = MODELS[name]
    sizes = sorted(args.datasets)
    print(f"\n== {name}: training ({args.num_simulations} simulations)", flush=True)
    posterior, train_s = train(model, args.num_simulations, args.max_epochs, args.seed)
    hist = posterior.history
    print(f"trained in {train_s:.1f} s ({hist.num_epochs} epochs)", flush=True)
    sims = model.simulate(jax.random.key(args.seed + 1), max(sizes), progress=False)
    data = {n: sims[n] for n in model.observed}
    targets = model.targets
    key = jax.random.key(args.seed + 2)
    rows, c2st_draws = [], {}
    per_numpyro = None
    per_mcmc = mcmc_run_time(model, data, key, args.mcmc_datasets)
    print(f"MCMC(NUTS).run: {per_mcmc:.1f} s per dataset", flush=True)
    for size in sizes:
        sub = {n: v[:size] for n, v in data.items()}
        row = {"num_datasets": size}
        row["amortized_s"] = amortized_time(posterior, sub, key)
        row["amortized_with_training_s"] = row["amortized_s"] + train_s
        ref = run_nuts(key, model, sub, backend="blackjax", **NUTS)
        row["blackjax_vectorized_s"] = ref.wall_time
        row["blackjax_divergences"] = int(ref.stats["diverging"].sum())
        if size >= args.c2st_datasets and not c2st_draws:
            c2st_draws = {t: ref.samples[t][: args.c2st_datasets] for t in targets}
        measured = min(size, args.numpyro_max)
        if measured == size or per_numpyro is None:
            nuts_np = run_nuts(
                key,
                model,
                {n: v[:measured] for n, v in sub.items()},
                backend="numpyro",
                vectorized=False,
                **NUTS,
            )
            if measured > 1:  # compiled by the B=1 run: pure sampling time
                per_numpyro = nuts_np.wall_time / measured
        if measured == size:
            row["numpyro_looped_s"] = nuts_np.wall_time
            row["numpyro_extrapolated"] = False
        else:
            row["numpyro_looped_s"] = per_numpyro * size
            row["numpyro_extrapolated"] = True
            row["numpyro_measured_datasets"] = measured
        row["mcmc_run_s"] = per_mcmc * size
        row["mcmc_run_extrapolated"] = size > args.mcmc_datasets
        fastest_nuts = min(row["blackjax_vectorized_s"], row["numpyro_looped_s"])
        row["speedup_after_training"] = fastest_nuts / row["amortized_s"]
        row["speedup_with_training"] = fastest_nuts / row["amortized_with_training_s"]
        row["speedup_vs_mcmc_run"] = row["mcmc_run_s"] / row["amortized_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    if not c2st_draws:  # fewer datasets than asked for: use what there is
        c2st_draws = {t: ref.samples[t] for t in targets}
    num_c2st = len(next(iter(c2st_draws.values())))
    sub = {n: v[:num_c2st] for n, v in data.items()}
    amortized = posterior.sample(jax.random.key(args.seed + 3), sub, NUM_DRAWS)
    a, _ = flatten_sites({t: amortized[t] for t in targets}, batch_ndim=2)
    n, names = flatten_sites(c2st_draws, batch_ndim=3)
    n = n.reshape(num_c2st, -1, n.shape[-1])
    accuracies = [c2st(n[b], a[b]).accuracy for b in range(num_c2st)]
    print(f"C2ST on {num_c2st} datasets: median {np.median(accuracies):.3f}")
    return {
        "model": name,
        "targets": list(names),
        "training_s": train_s,
        "training_epochs": hist.num_epochs,
        "num_simulations": args.num_simulations,
        "rows": rows,
        "mcmc_run_s_per_dataset": per_mcmc,
        "mcmc_run_measured_datasets": args.mcmc_datasets,
        "c2st": {
            "num_datasets": num_c2st,
            "per_dataset": accuracies,
            "median": float(np.median(accuracies)),
            "max": float(np.max(accuracies)),
        },
    }


def table(results: list[dict]) -> str:
    head = (
        f"{'model':15s} {'B':>5s} {'amortized':>10s} {'+training':>10s} "
        f"{'blackjax':>10s} {'numpyro':>10s} {'speedup':>10s} {'w/ train':>9s} "
        f"{'MCMC.run':>10s} {'speedup':>10s}"
    )
    lines = [head]
    for r in results:
        for row in r["rows"]:
            star = "*" if row["numpyro_extrapolated"] else " "
            star_mcmc = "*" if row["mcmc_run_extrapolated"] else " "
            lines.append(
                f"{r['model']:15s} {row['num_datasets']:5d} "
                f"{row['amortized_s'] * 1e3:8.1f}ms "
                f"{row['amortized_with_training_s']:9.1f}s "
                f"{row['blackjax_vectorized_s']:9.1f}s "
                f"{row['numpyro_looped_s']:9.1f}s{star}"
                f"{row['speedup_after_training']:9,.0f}x "
                f"{row['speedup_with_training']:8.2f}x "
                f"{row['mcmc_run_s']:9.1f}s{star_mcmc}"
                f"{row['speedup_vs_mcmc_run']:9,.0f}x"
            )
        c = r["c2st"]
        lines.append(
            f"{'':15s} C2ST amortized vs NUTS, {c['num_datasets']} datasets: median "
            f"{c['median']:.3f}, max {c['max']:.3f}"
        )
    lines.append(
        "speedup = fastest NUTS (blackjax vectorized or numpyro looped, compiled "
        "once) / amortized sampling for the same datasets; w/ train: amortized time "
        "includes training; MCMC.run = MCMC(NUTS(model)).run per dataset (recompiles "
        "each run); * = extrapolated from the measured time per dataset"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--datasets", nargs="+", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--num-simulations", type=int, default=None)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--numpyro-max", type=int, default=100)
    parser.add_argument("--c2st-datasets", type=int, default=None)
    parser.add_argument("--mcmc-datasets", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.datasets = args.datasets or ([1, 10] if args.quick else [1, 100, 1000])
    args.num_simulations = args.num_simulations or (2_000 if args.quick else 10_000)
    args.max_epochs = args.max_epochs or (10 if args.quick else 200)
    args.c2st_datasets = args.c2st_datasets or (3 if args.quick else 10)
    name = "vs_nuts_cpu_quick.json" if args.quick else "vs_nuts_cpu.json"
    out = args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "amortized vs NUTS (wall-clock, C2ST)",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(jax.devices()[0]),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "jax": jax.__version__,
        "settings": {
            "datasets": args.datasets,
            "num_simulations": args.num_simulations,
            "max_epochs": args.max_epochs,
            "nuts": NUTS,
            "amortized_draws_per_dataset": NUM_DRAWS,
            "numpyro_max_measured": args.numpyro_max,
            "c2st_datasets": args.c2st_datasets,
            "seed": args.seed,
        },
        "results": [],
    }
    for name in args.models:
        report["results"].append(run_model(name, args))
        report["load_average_end"] = os.getloadavg()
        out.write_text(json.dumps(report, indent=1) + "\n")
    print()
    print(table(report["results"]))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
