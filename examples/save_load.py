"""Save a trained posterior, load it without the model, use its checkpoints.

    python examples/save_load.py [--quick] [--output DIR]

Trains the quickstart posterior with checkpoints, saves it, loads it back without
the model (sampling needs no model) and checks that the draws are identical; then
loads the best weights from the checkpoint folder and resumes from it.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import jax
import numpy as np

import numpyro_amortized as na
from numpyro_amortized.models import gaussian_means


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget")
    parser.add_argument("--output", type=Path, default=Path("examples_output/save"))
    ns = parser.parse_args(argv)
    ns.output.mkdir(parents=True, exist_ok=True)
    # A folder holding a checkpoint is refused by a new run: start clean.
    shutil.rmtree(ns.output / "checkpoints", ignore_errors=True)
    num_simulations, max_epochs = (1_000, 2) if ns.quick else (10_000, 30)

    posterior = na.AmortizedPosterior(gaussian_means)
    history = posterior.fit(
        jax.random.key(0),
        num_simulations=num_simulations,
        max_epochs=max_epochs,
        checkpoint_dir=ns.output / "checkpoints",
        progress=not ns.quick,
    )
    path = posterior.save(ns.output / "gauss.npa", overwrite=True)
    print(
        f"saved {path} ({path.stat().st_size / 1024:.0f} KiB) "
        f"after {history.num_epochs} epochs"
    )

    x_obs = gaussian_means.simulate(jax.random.key(1), 1)["x"][0]
    key = jax.random.key(2)
    before = posterior.sample(key, {"x": x_obs}, 1_000)["mu"]
    loaded = na.load(path)  # no model needed to sample
    after = loaded.sample(key, {"x": x_obs}, 1_000)["mu"]
    print(f"identical draws after loading: {bool(np.array_equal(before, after))}")

    # The checkpoint folder also holds the best weights as a posterior file.
    best = na.load(ns.output / "checkpoints" / "best.npa", model=gaussian_means)
    same = np.array_equal(best.sample(key, {"x": x_obs}, 1_000)["mu"], before)
    print(f"checkpoints/best.npa gives the same draws as the final posterior: {same}")

    # An interrupted run resumes with the same key and settings (a finished run,
    # as here, just completes at once with the same weights).
    again = na.AmortizedPosterior(gaussian_means)
    again.fit(
        jax.random.key(0),
        num_simulations=num_simulations,
        max_epochs=max_epochs,
        checkpoint_dir=ns.output / "checkpoints",
        resume_from=ns.output / "checkpoints",
        progress=not ns.quick,
    )
    same = np.array_equal(again.sample(key, {"x": x_obs}, 1_000)["mu"], before)
    print(f"resumed run ends with the same weights: {same}")


if __name__ == "__main__":
    main()
