"""Two moons with a Bayesian neural spline flow: how unsure is the amortizer?

    python examples/bayesian_flow.py [--quick] [--output DIR]

The conditioner weights of the spline flow get a mean-field Gaussian posterior
(``na.networks.bayesian``). After training, two networks drawn from that
posterior give two slightly different posterior densities for the same
observation (plotted side by side), the learned log-variances are plotted as a
histogram, and the spread across sampled networks is compared between an
observation like the training data and one far outside it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from flax import nnx

import numpyro_amortized as na


@na.amortize(observed=["x"], targets=["theta"])
def two_moons(x=None):
    """The sbibm two-moons task: a crescent-shaped, bimodal posterior."""
    theta = numpyro.sample("theta", dist.Uniform(-1.0, 1.0).expand([2]).to_event(1))
    a = numpyro.sample("a", dist.Uniform(-math.pi / 2, math.pi / 2))
    r = numpyro.sample("r", dist.Normal(0.1, 0.01))
    p = jnp.stack([r * jnp.cos(a) + 0.25, r * jnp.sin(a)], axis=-1)
    z0 = (theta[..., 0] + theta[..., 1]) / math.sqrt(2.0)
    z1 = (theta[..., 1] - theta[..., 0]) / math.sqrt(2.0)
    numpyro.sample(
        "x", dist.Delta(p + jnp.stack([-jnp.abs(z0), z1], -1), event_dim=1), obs=x
    )


def log_variances(posterior: na.AmortizedPosterior) -> np.ndarray:
    """All learned log-variances of the Bayesian weights, flattened."""
    flat = nnx.to_flat_state(posterior._require().params)
    return np.concatenate(
        [np.ravel(v[...]) for _, v in flat if isinstance(v, na.networks.LogVariance)]
    )


def density_grid(posterior, x_obs, num: int, lim: float = 0.6) -> tuple:
    """Posterior density of theta on a num x num grid over [-lim, lim]^2."""
    g = np.linspace(-lim, lim, num)
    grid = np.stack(np.meshgrid(g, g, indexing="xy"), axis=-1).reshape(-1, 2)
    logp = posterior.log_prob({"theta": jnp.asarray(grid)}, {"x": x_obs})
    return g, np.exp(np.asarray(logp)).reshape(num, num)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget")
    parser.add_argument("--output", type=Path, default=Path("examples_output/bnn"))
    ns = parser.parse_args(argv)
    ns.output.mkdir(parents=True, exist_ok=True)
    num_simulations, max_epochs = (2_000, 3) if ns.quick else (20_000, 60)
    layers, hidden = (2, (32, 32)) if ns.quick else (4, (64, 64))

    flow = na.networks.bayesian(
        na.networks.NeuralSplineFlow(num_layers=layers, hidden=hidden),
        include=["couplings.*.conditioner.**"],
        exclude=["**.bias"],  # biases stay point estimates
        init_logvar=-7.0,
    )
    posterior = na.AmortizedPosterior(two_moons, inference_net=flow)
    history = posterior.fit(
        jax.random.key(0),
        num_simulations=num_simulations,
        max_epochs=max_epochs,
        learning_rate=2e-3,
        progress=not ns.quick,
    )
    lv = log_variances(posterior)
    print(
        f"trained {history.num_epochs} epochs on {num_simulations} simulations; "
        f"{lv.size} Bayesian weights, log-variance median {np.median(lv):.2f} "
        f"(init -7.0), 5-95% [{np.percentile(lv, 5):.2f}, {np.percentile(lv, 95):.2f}]"
    )

    x_obs = jnp.array([0.0, 0.0])  # in the data (sbibm's reference obs. is near)
    x_far = jnp.array([1.5, -1.5])  # no simulation comes near this
    key = jax.random.key(1)
    for name, x in (("x = (0, 0)", x_obs), ("x = (1.5, -1.5), far", x_far)):
        e = posterior.epistemic(key, {"x": x}, num_networks=20, num_samples=500)
        print(
            f"{name}: spread of posterior means across 20 networks "
            f"{np.asarray(e.mean_spread['theta']).round(3)}, relative to the "
            f"posterior sd {np.asarray(e.relative_spread['theta']).round(3)}"
        )

    import matplotlib.pyplot as plt

    num = 80 if ns.quick else 200
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, k in zip(axes[:2], (0, 1), strict=True):
        net = posterior.sample_network(jax.random.fold_in(key, k))
        g, dens = density_grid(net, x_obs, num)
        ax.pcolormesh(g, g, dens, shading="auto", cmap="viridis")
        ax.set(title=f"sampled network {k + 1}: q(theta | x=0)", aspect="equal")
        ax.set(xlabel="theta[0]", ylabel="theta[1]")
    axes[2].hist(lv, bins=60, color="gray")
    axes[2].axvline(-7.0, color="k", ls="--", label="init")
    axes[2].set(title="learned log-variances", xlabel="log variance", ylabel="weights")
    axes[2].legend()
    fig.tight_layout()
    path = ns.output / "bayesian_flow.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"figure: {path.resolve()}")


if __name__ == "__main__":
    main()
