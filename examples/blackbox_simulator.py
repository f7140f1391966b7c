"""A legacy NumPy simulator inside a NumPyro model, with a varying number of steps.

    python examples/blackbox_simulator.py [--quick]

Simulates a random walk with drift written in plain NumPy, wrapped in
``na.NumpySimulator``; the number of steps is drawn per batch, so the simulations
come back padded with a mask. The bank is saved and loaded back.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist

import numpyro_amortized as na


def random_walk(
    rng: np.random.Generator, drift: np.ndarray, noise: np.ndarray, *, num_steps: int
) -> np.ndarray:
    """A batch of random walks: ``drift``/``noise`` have shape ``(B,)``."""
    steps = rng.normal(drift[:, None], noise[:, None], size=(len(drift), num_steps))
    return np.cumsum(steps, axis=1)


@na.amortize(observed=["walk"])
def walk_model(num_steps: int = 30, walk=None):
    drift = numpyro.sample("drift", dist.Normal(0.0, 0.5))
    noise = numpyro.sample("noise", dist.HalfNormal(1.0))
    simulator = na.NumpySimulator(
        lambda rng, d, s: random_walk(rng, d, s, num_steps=num_steps),
        drift,
        noise,
        event_shape=(num_steps,),
    )
    numpyro.sample("walk", simulator, obs=walk)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    ns = parser.parse_args(argv)
    n = 2_000 if ns.quick else 50_000
    print(walk_model.summary())

    def draw_steps(key):
        return {"num_steps": int(jax.random.choice(key, np.array([10, 20, 30])))}

    sims, info = walk_model.simulate(
        jax.random.key(0),
        n,
        sample_kwargs=draw_steps,
        batch_size=500,
        return_info=True,
    )
    lengths = sims["walk_mask"].sum(axis=1)
    print(
        f"{info.num_valid} walks in {info.wall_time:.1f} s; lengths drawn: "
        f"{sorted(set(lengths.tolist()))}; walk array {sims['walk'].shape}"
    )
    final = sims["walk"][np.arange(len(lengths)), lengths - 1]
    ratio = np.corrcoef(final / lengths, sims["drift"])[0, 1]
    print(f"corr(final position / steps, drift) = {ratio:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        path = na.save_simulations(Path(tmp) / "walks", sims, walk_model)
        back = na.load_simulations(path, walk_model)
        print(
            f"bank {path.name}: {path.stat().st_size / 2**20:.1f} MB, "
            f"reloaded {len(back['drift'])} simulations"
        )


if __name__ == "__main__":
    main()
