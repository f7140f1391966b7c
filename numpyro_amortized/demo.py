"""``python -m numpyro_amortized.demo``: the amortized-inference quickstart.

Model: Gaussian means, ``mu ~ N(0, I_4)``, 50 observations ``x_i ~ N(mu, I_4)``.
The demo trains the default amortized posterior (neural spline flow + DeepSet
summary) online, on fresh simulations in every step, then

* prints the posterior for a held-out dataset next to the analytic posterior,
* times posterior draws for 1,000 datasets at once,
* writes a loss plot and a recovery plot (posterior mean vs true value over
  held-out datasets) to ``--output`` (default ``demo_output/``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_amortized.models import gaussian_means, gaussian_means_posterior
from numpyro_amortized.posterior import AmortizedPosterior


def recovery_plot(truth: np.ndarray, means: np.ndarray, path: Path) -> list[float]:
    """Posterior mean vs truth per dimension; returns R^2 per dimension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dim = truth.shape[-1]
    fig, axes = plt.subplots(1, dim, figsize=(3 * dim, 3), squeeze=False)
    r2s = []
    for i, ax in enumerate(axes[0]):
        t, m = truth[:, i], means[:, i]
        r2 = 1 - np.sum((t - m) ** 2) / np.sum((t - t.mean()) ** 2)
        r2s.append(float(r2))
        lim = [min(t.min(), m.min()), max(t.max(), m.max())]
        ax.plot(lim, lim, color="grey", lw=1, ls=":")
        ax.scatter(t, m, s=6, alpha=0.6)
        ax.set_title(f"mu[{i}]  R² = {r2:.3f}")
        ax.set_xlabel("true value")
        if i == 0:
            ax.set_ylabel("posterior mean")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return r2s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-steps", type=int, default=8_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("demo_output"))
    parser.add_argument("--no-progress", action="store_true")
    ns = parser.parse_args(argv)

    model = gaussian_means
    key = jax.random.key(ns.seed)
    train_key, test_key, draw_key = jax.random.split(key, 3)
    print("Model sites:\n" + model.summary() + "\n")

    posterior = AmortizedPosterior(model)
    t0 = time.perf_counter()
    # The simulator is fast, so train online: fresh simulations every step.
    history = posterior.fit_online(
        train_key, num_steps=ns.num_steps, progress=not ns.no_progress
    )
    train_s = time.perf_counter() - t0
    print(
        f"Trained on {history.num_simulations:,} simulations: {history.num_epochs} "
        f"epochs, {history.num_steps:,} steps, {train_s:.1f} s "
        f"(best validation loss {min(history.val_loss):.3f} at epoch "
        f"{history.best_epoch + 1}; {history.num_invalid} invalid simulations)."
    )

    held_out = model.simulate(test_key, 1_000, progress=False)
    x_obs = held_out["x"][0]
    draws = posterior.sample(draw_key, {"x": x_obs}, 4_000)["mu"]
    mean, sd = gaussian_means_posterior(jnp.asarray(x_obs))
    print("\nPosterior for a held-out dataset (amortized vs analytic):")
    print("         true     mean (amortized / analytic)    sd (amortized / analytic)")
    for i in range(draws.shape[-1]):
        print(
            f"  mu[{i}]  {held_out['mu'][0, i]:+.3f}   {draws[:, i].mean():+.3f} / "
            f"{mean[i]:+.3f}               {draws[:, i].std():.3f} / {sd[i]:.3f}"
        )
    err = np.abs(draws.mean(0) - mean) / sd
    print(f"  |mean error| / analytic sd: max {err.max():.3f}")

    # Amortization: 1,000 datasets at once.
    batch = {"x": held_out["x"]}
    jax.block_until_ready(posterior.sample(draw_key, batch, 1_000))  # compile
    t0 = time.perf_counter()
    many = jax.block_until_ready(posterior.sample(draw_key, batch, 1_000)["mu"])
    many_s = time.perf_counter() - t0
    print(
        f"\n1,000 datasets x 1,000 draws in {many_s * 1e3:.0f} ms "
        f"({many.size // 4 / many_s:,.0f} draws/s)."
    )

    import matplotlib

    matplotlib.use("Agg")
    ns.output.mkdir(parents=True, exist_ok=True)
    ax = history.plot()
    ax.figure.savefig(ns.output / "loss.png", dpi=120)
    r2 = recovery_plot(
        held_out["mu"], np.asarray(many.mean(1)), ns.output / "recovery.png"
    )
    print(
        "Recovery over 1,000 held-out datasets: R² = "
        + ", ".join(f"{r:.3f}" for r in r2)
        + f"\nWrote {ns.output / 'loss.png'} and {ns.output / 'recovery.png'}."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
