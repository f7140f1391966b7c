"""Check an amortized posterior before trusting it.

    python examples/diagnostics.py [--quick] [--output DIR]

Trains the quickstart posterior twice: properly (online, fresh simulations) and
deliberately under-trained (a few hundred steps). ``posterior.diagnose`` runs
simulation-based calibration, coverage, recovery and z-score/contraction on fresh
simulations for each and saves a figure panel; the table shows which one to trust.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax

import numpyro_amortized as na
from numpyro_amortized.models import gaussian_means


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget")
    parser.add_argument(
        "--output", type=Path, default=Path("examples_output/diagnostics")
    )
    ns = parser.parse_args(argv)
    ns.output.mkdir(parents=True, exist_ok=True)
    budgets = {"trained": 400 if ns.quick else 8_000, "under-trained": 100}
    num_datasets = 50 if ns.quick else 300

    for i, (label, num_steps) in enumerate(budgets.items()):
        posterior = na.AmortizedPosterior(gaussian_means)
        posterior.fit_online(
            jax.random.key(i),
            num_steps=num_steps,
            steps_per_epoch=min(500, num_steps),
            num_validation=500,
            progress=not ns.quick,
        )
        path = ns.output / f"{label}.png"
        report = posterior.diagnose(
            jax.random.key(10 + i), num_datasets=num_datasets, path=path
        )
        verdict = "calibrated" if report.calibrated else "NOT calibrated"
        print(f"\n{label} ({num_steps:,} steps): {verdict}; panel {path}")
        print(report.table())


if __name__ == "__main__":
    main()
