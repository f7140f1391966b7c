"""One network for any number of observations.

    python examples/varying_observations.py [--quick] [--output DIR]

Trains the quickstart model (``mu ~ N(0, I_4)``, ``x_i ~ N(mu, I_4)``) with the
number of observations drawn per batch of simulations from 5 to 100, then asks
the one trained posterior about datasets of 5 to 100 observations (30 among
them, a size it never saw) and compares
its posterior sd with the analytic ``1 / sqrt(n + 1)``. Writes ``sd_vs_n.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import numpyro_amortized as na
from numpyro_amortized.models import gaussian_means, gaussian_means_posterior


def n_obs_sampler(sizes: list[int]):
    """Model arguments for one batch of simulations: ``n_obs`` drawn from ``sizes``.

    Each distinct ``n_obs`` compiles the simulator once, so a handful of sizes keeps
    compilation short; at inference any size up to the largest works (``30`` below
    was never simulated).
    """
    choices = np.asarray(sizes)

    def draw(key: jax.Array) -> dict:
        return {"n_obs": int(jax.random.choice(key, choices))}

    return draw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget (seconds)")
    parser.add_argument("--output", type=Path, default=Path("examples_output/varying"))
    ns = parser.parse_args(argv)
    num_simulations = 1_000 if ns.quick else 50_000
    train_sizes = [10, 50] if ns.quick else [5, 10, 20, 50, 100]

    posterior = na.AmortizedPosterior(gaussian_means)
    history = posterior.fit(
        jax.random.key(0),
        num_simulations=num_simulations,
        sample_kwargs=n_obs_sampler(train_sizes),
        max_epochs=2 if ns.quick else 200,
        progress=not ns.quick,
    )
    print(f"trained {history.num_epochs} epochs on {num_simulations:,} simulations")

    ns_obs = [10, 30, 50] if ns.quick else [5, 10, 20, 30, 50, 100]
    rows = []
    for i, n in enumerate(ns_obs):
        x = gaussian_means.simulate(jax.random.key(100 + i), 1, n_obs=n)["x"][0]
        draws = posterior.sample(jax.random.key(200 + i), {"x": x}, 2_000)["mu"]
        mean, sd = gaussian_means_posterior(jnp.asarray(x))
        rows.append((n, float(draws.std(0).mean()), float(sd.mean())))
        err = float(jnp.max(jnp.abs(draws.mean(0) - mean) / sd))
        print(
            f"n_obs={n:4d}: posterior sd {rows[-1][1]:.3f} "
            f"(analytic {rows[-1][2]:.3f}), "
            f"max |mean error| / sd {err:.2f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns.output.mkdir(parents=True, exist_ok=True)
    arr = np.array(rows)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(arr[:, 0], arr[:, 2], "k--", label="analytic 1/sqrt(n+1)")
    ax.plot(arr[:, 0], arr[:, 1], "o-", label="amortized (one network)")
    ax.set(xscale="log", yscale="log", xlabel="number of observations", ylabel="sd")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ns.output / "sd_vs_n.png", dpi=120)
    print(f"wrote {ns.output / 'sd_vs_n.png'}")


if __name__ == "__main__":
    main()
