"""Support-based input transforms of observed data: with vs without, same budget.

On ``choice_rt`` (50 LogNormal response times + 50 Bernoulli accuracies per
dataset), train ``AmortizedPosterior(choice_rt)`` on the same 10^4 simulations
twice: with the library's default input transforms (``log`` of the positive
response times, :mod:`numpyro_amortized.data`) and with every observed site
passed raw (the transforms patched to ``"identity"``). Reports the held-out mean
``log q(theta | x)`` on 2,000 fresh simulations (higher is better; the
difference is the gain in expected log posterior density, in nats).

    python benchmarks/input_transforms.py [--max-epochs 30] [--seeds 0 1]

Results: ``benchmarks/results/input_transforms_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from unittest import mock

import jax
import numpy as np

import numpyro_amortized as na
from numpyro_amortized import data as data_module
from numpyro_amortized.models import choice_rt

RESULTS = Path(__file__).parent / "results"
TARGETS = ("log_rt_mean", "rt_scale", "accuracy")
OBSERVED = ("rt", "correct")


def held_out_log_q(seed: int, max_epochs: int, raw: bool) -> dict:
    sims = choice_rt.simulate(jax.random.key(seed), 12_000, progress=False)
    train = {k: v[:10_000] for k, v in sims.items()}
    test = {k: v[10_000:] for k, v in sims.items()}
    patch = mock.patch.object(data_module, "input_transform", lambda site: "identity")
    start = time.perf_counter()
    post = na.AmortizedPosterior(choice_rt)
    if raw:
        with patch:
            post.fit(
                jax.random.key(seed + 1),
                simulations=train,
                max_epochs=max_epochs,
                progress=False,
            )
    else:
        post.fit(
            jax.random.key(seed + 1),
            simulations=train,
            max_epochs=max_epochs,
            progress=False,
        )
    lq = post.log_prob({k: test[k] for k in TARGETS}, {k: test[k] for k in OBSERVED})
    return {
        "seed": seed,
        "inputs": "raw" if raw else "transformed",
        "transforms": list(post.layout.transforms),
        "held_out_log_q": float(np.mean(np.asarray(lq))),
        "fit_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        for raw in (True, False):
            rows.append(held_out_log_q(seed, args.max_epochs, raw))
            print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{'seed':>4s} {'raw inputs':>11s} {'transformed':>12s} {'gain (nats)':>12s}"
    )
    for seed in args.seeds:
        r, t = (
            next(x for x in rows if x["seed"] == seed and x["inputs"] == k)
            for k in ("raw", "transformed")
        )
        gain = t["held_out_log_q"] - r["held_out_log_q"]
        print(
            f"{seed:4d} {r['held_out_log_q']:11.3f} {t['held_out_log_q']:12.3f} "
            f"{gain:12.3f}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"input_transforms_{jax.default_backend()}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "input transforms (choice_rt, held-out log q)",
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "max_epochs": args.max_epochs,
                "num_simulations": 10_000,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
