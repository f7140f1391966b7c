"""Scale: data-parallel training, a bank streamed from disk, chunked sampling.

    python examples/multi_device.py [--quick] [--output DIR]

On a CPU the script asks XLA for 4 host devices (``XLA_FLAGS``, set before JAX
starts), so the data-parallel path runs anywhere; on a machine with several GPUs
it uses them instead. It

1. trains the quickstart model online on one device and on all devices and
   checks that the loss curves agree (up to floating-point reduction order);
2. simulates a bank to disk in chunks and trains on it by streaming, reporting
   the peak resident memory of the process;
3. draws posteriors for many datasets in chunks and compares their means with the
   exact (conjugate) posterior.

Figures go to the folder printed at the end.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import argparse  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import numpyro_amortized as na  # noqa: E402
from numpyro_amortized import networks as nets  # noqa: E402
from numpyro_amortized.models import (  # noqa: E402
    gaussian_means,
    gaussian_means_posterior,
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def small_posterior(quick: bool) -> na.AmortizedPosterior:
    width = 32 if quick else 64
    return na.AmortizedPosterior(
        gaussian_means,
        inference_net=nets.CouplingFlow(
            num_layers=2 if quick else 4, hidden=(width, width)
        ),
        summary_net=nets.DeepSet(summary_dim=8, embed_dim=width, hidden=(width,)),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    ns = parser.parse_args(argv)
    out = ns.output or Path(tempfile.mkdtemp(prefix="multi_device_"))
    out.mkdir(parents=True, exist_ok=True)
    q = ns.quick
    print(f"devices: {jax.devices()}")

    # 1. One device against all devices: same losses up to reduction order.
    steps, per_epoch = (60, 20) if q else (3_000, 250)
    histories = {}
    for name, devices in [("1 device", jax.devices()[:1]), ("all devices", None)]:
        post = small_posterior(q)
        t0 = time.perf_counter()
        histories[name] = post.fit_online(
            jax.random.key(1),
            num_steps=steps,
            steps_per_epoch=per_epoch,
            batch_size=256,
            num_validation=1_000,
            progress=False,
            devices=devices,
        )
        print(
            f"{name:>12}: final val loss {histories[name].val_loss[-1]:.4f} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    a, b = (np.asarray(h.train_loss) for h in histories.values())
    print(f"largest difference between the loss curves: {np.abs(a - b).max():.2e}")

    # 2. A bank on disk, streamed in chunks.
    num = 5_000 if q else 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        bank = na.simulate_to_disk(
            jax.random.key(2), gaussian_means, num, Path(tmp) / "bank", progress=not q
        )
        print(
            f"{bank}: {bank.nbytes / 1e9:.2f} GB written in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        streamed = small_posterior(q)
        t0 = time.perf_counter()
        hist = streamed.fit(
            jax.random.key(3),
            simulations=bank,
            batch_size=512,
            max_epochs=2 if q else 3,
            progress=not q,
        )
        print(
            f"streamed {hist.num_epochs} epochs ({hist.num_steps} steps) in "
            f"{time.perf_counter() - t0:.1f} s; validation loss {hist.val_loss[-1]:.3f}"
            f"; peak resident memory so far {peak_rss_mb():.0f} MB"
        )

    # 3. Posteriors for many datasets, in chunks (NumPy arrays in host memory).
    many = 2_000 if q else 100_000
    x = gaussian_means.simulate(jax.random.key(4), many, progress=False)["x"]
    t0 = time.perf_counter()
    draws = streamed.sample(jax.random.key(5), {"x": x}, 100, chunk_size=2_048)
    wall = time.perf_counter() - t0
    mean, sd = gaussian_means_posterior(jnp.asarray(x))
    err = np.abs(draws["mu"].mean(axis=1) - np.asarray(mean)) / np.asarray(sd)
    print(
        f"{many:,} datasets x 100 draws in {wall:.1f} s; posterior means within "
        f"{np.median(err):.2f} posterior sd of the exact ones (median)"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, h in histories.items():
        axes[0].plot(h.train_loss, label=name, ls="-" if "1" in name else "--")
    axes[0].set(xlabel="epoch", ylabel="training loss", title="fit_online")
    axes[0].legend()
    hist.plot(ax=axes[1])
    axes[1].set_title("streamed from disk")
    fig.tight_layout()
    fig.savefig(out / "multi_device.png", dpi=100)
    print(f"figures in {out}")


if __name__ == "__main__":
    main()
