"""Check an amortized posterior against NUTS, on one dataset and on many.

    python examples/compare_with_nuts.py [--quick] [--output DIR]

Trains an amortized posterior for ``choice_rt`` (response times and accuracy of a
participant: a real location, a positive scale and a probability), then

1. compares it with NumPyro NUTS on one dataset: metrics per parameter, wall
   clock of both, and an overlay of marginals and pairs (``vs_nuts_one.png``);
2. compares it with blackjax NUTS on a batch of datasets, all of them in one
   vmapped program: the joint C2ST per dataset (``vs_nuts_batch.png`` shows the
   worst dataset).

The figures go to ``--output`` (default: a new temporary folder, printed).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax

import numpyro_amortized as na
from numpyro_amortized.models import choice_rt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    ns = parser.parse_args(argv)
    out = ns.output or Path(tempfile.mkdtemp(prefix="compare_with_nuts_"))
    out.mkdir(parents=True, exist_ok=True)
    print(choice_rt.summary())

    posterior = na.AmortizedPosterior(choice_rt)
    posterior.fit(
        jax.random.key(0),
        num_simulations=2_000 if ns.quick else 20_000,
        max_epochs=5 if ns.quick else 200,
        progress=not ns.quick,
    )
    print(
        f"\ntrained in {posterior.history.wall_time[-1]:.1f} s "
        f"({posterior.history.num_epochs} epochs)"
    )
    num_datasets = 3 if ns.quick else 20
    sims = choice_rt.simulate(jax.random.key(1), num_datasets, progress=False)
    data = {n: sims[n] for n in choice_rt.observed}
    nuts = (
        {"num_samples": 300, "num_warmup": 300, "num_chains": 2}
        if ns.quick
        else {"num_samples": 1000, "num_warmup": 1000, "num_chains": 4}
    )

    # 1. One dataset, NumPyro NUTS (4 chains: R-hat and ESS are meaningful).
    one = na.compare_with_nuts(
        posterior,
        {n: v[0] for n, v in data.items()},
        rng_key=jax.random.key(2),
        backend="numpyro",
        **nuts,
    )
    print("\n== one dataset, numpyro NUTS")
    print(one.summary())
    one.plot(path=out / "vs_nuts_one.png")

    # 2. Many datasets, blackjax NUTS vmapped over all of them in one program.
    many = na.compare_with_nuts(
        posterior,
        data,
        rng_key=jax.random.key(3),
        backend="blackjax",
        c2st="joint",
        **nuts,
    )
    print(f"\n== {num_datasets} datasets, blackjax NUTS (vectorized)")
    print(many.joint.round(3))
    worst = int(many.joint["c2st"].idxmax())
    w = many.wall_time
    print(
        f"C2ST median {many.joint['c2st'].median():.3f}, worst {worst} "
        f"({many.joint['c2st'].max():.3f}); NUTS {w.nuts:.1f} s vs amortized "
        f"{w.amortized * 1e3:.1f} ms for all {num_datasets} datasets"
    )
    many.plot(dataset=worst, path=out / "vs_nuts_batch.png")
    print(f"\nfigures in {out}")


if __name__ == "__main__":
    main()
