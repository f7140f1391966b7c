"""A variational autoencoder on scikit-learn's 8x8 digits, as a NumPyro program.

    python examples/vae_digits.py [--quick] [--output DIR]

Each image is 64 pixel counts in 0..16; the model is

    z_i ~ N(0, I_2),   x_ij | z_i ~ Binomial(16, logits = decoder(z_i)_j),

with the decoder a flax.nnx MLP registered through ``nnx_module``, and the guide
``na.EncoderGuide``: an encoder MLP gives ``q(z_i | x_i)`` (diagonal Normal).
Training is plain ``SVI`` with ``TraceMeanField_ELBO`` (analytic KL) on
minibatches (``numpyro.plate(..., subsample_size=...)``). The script reports the
held-out ELBO per image and writes reconstructions and the 2-D latent space
coloured by digit into the output folder.

Measured (seed 0, 20,000 steps, one hidden layer of 64 in both networks, on the
shared 2-core CPU under load): held-out ELBO -155.5 nats per image (training
-137.3; a model of independent pixels scores -253.0 log-likelihood), 87 s of
training. Wider networks fit the 1,500 training images better and the held-out
images worse ((256, 256) for 30,000 steps: training -86.6, held-out -182.8).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from flax import nnx
from numpyro import handlers
from numpyro.contrib.module import nnx_module
from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

import numpyro_amortized as na
from numpyro_amortized.networks import DenseNetwork

LATENT_DIM = 2
NUM_PIXELS = 64


def make_model(decoder: nnx.Module):
    """The VAE's generative model, with the decoder network as numpyro params."""

    def model(x, batch_size=None):
        net = nnx_module("decoder", decoder)
        with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            prior = dist.Normal(0.0, 1.0).expand([LATENT_DIM]).to_event(1)
            z = numpyro.sample("z", prior)
            numpyro.sample(
                "x", dist.Binomial(16, logits=net(z)).to_event(1), obs=x[idx]
            )

    return model


def load_digits(seed: int):
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    x = jnp.asarray(digits.data[order], jnp.float32)
    y = np.asarray(digits.target[order])
    n_test = 297
    return x[n_test:], x[:n_test], y[:n_test]


def independent_pixels_log_lik(x_train, x_test) -> float:
    """Baseline without latents: one Binomial per pixel, fit on the training set."""
    p = jnp.clip(x_train.mean(0) / 16.0, 1e-3, 1 - 1e-3)
    return float(dist.Binomial(16, probs=p).log_prob(x_test).sum(-1).mean())


def reconstruct(model, params, z):
    """Mean image ``16 sigmoid(decoder(z))`` for latent codes ``z`` (B, 2)."""
    data = {**params, "z": z}
    x_dummy = jnp.zeros((z.shape[0], NUM_PIXELS))
    tr = handlers.trace(handlers.substitute(handlers.seed(model, 0), data)).get_trace(
        x_dummy
    )
    return tr["x"]["fn"].mean


def save_figures(output: Path, x_test, y_test, recon, codes, losses) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    paths = [output / "reconstructions.png", output / "latent.png", output / "loss.png"]
    fig, axes = plt.subplots(2, 10, figsize=(10, 2.3))
    for j in range(10):
        for row, images in enumerate((x_test, recon)):
            axes[row, j].imshow(np.asarray(images[j]).reshape(8, 8), cmap="gray_r")
            axes[row, j].axis("off")
    axes[0, 0].set_title("test image", loc="left", fontsize=8)
    axes[1, 0].set_title("reconstruction (q mean)", loc="left", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    sc = ax.scatter(codes[:, 0], codes[:, 1], c=y_test, cmap="tab10", s=12)
    ax.legend(*sc.legend_elements(), title="digit", fontsize=7, loc="best")
    ax.set(xlabel="z[0] (posterior mean)", ylabel="z[1]", title="held-out digits")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(np.asarray(losses) / NUM_PIXELS)
    ax.set(xlabel="step", ylabel="-ELBO / pixel (minibatch)", yscale="log")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close("all")
    return paths


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds")
    parser.add_argument("--num-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--hidden", type=int, nargs="*", default=None, help="MLP widths (both nets)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("vae_digits_output"))
    ns = parser.parse_args(argv)
    num_steps = ns.num_steps or (300 if ns.quick else 20_000)
    hidden = tuple(ns.hidden) if ns.hidden is not None else (64,)

    x_train, x_test, y_test = load_digits(ns.seed)
    decoder = DenseNetwork(LATENT_DIM, hidden, NUM_PIXELS, rngs=nnx.Rngs(ns.seed))
    model = make_model(decoder)
    guide = na.EncoderGuide(
        model,
        encoder=na.encoders.NormalEncoder(hidden=hidden),
        preprocess=lambda h: h / 16.0,
        seed=ns.seed + 1,
    )
    schedule = optax.cosine_decay_schedule(2e-3, num_steps, alpha=0.05)
    svi = SVI(model, guide, optax.adam(schedule), TraceMeanField_ELBO())
    print(
        f"{len(x_train)} training / {len(x_test)} held-out digits; "
        f"{num_steps} steps of batch {ns.batch_size}"
    )
    start = time.perf_counter()
    num_chunks = 5
    chunk = max(num_steps // num_chunks, 1)

    @jax.jit
    def run_chunk(state):
        def step(state, _):
            return svi.update(state, x_train, ns.batch_size)

        return jax.lax.scan(step, state, None, length=chunk)

    monitor = Trace_ELBO(num_particles=8)

    @jax.jit
    def held_out_elbo(rng_key, params):
        return -monitor.loss(rng_key, params, model, guide, x_test) / x_test.shape[0]

    init = jax.jit(lambda key, x: svi.init(key, x, ns.batch_size))
    state = init(jax.random.key(ns.seed), x_train)
    losses = []
    for i in range(num_chunks):
        state, chunk_losses = run_chunk(state)
        losses.append(chunk_losses)
        test_elbo = held_out_elbo(jax.random.key(i), svi.get_params(state))
        print(
            f"  step {(i + 1) * chunk:>6}: ELBO/image minibatch "
            f"{-float(chunk_losses[-50:].mean()) / len(x_train):8.2f}, "
            f"held-out {float(test_elbo):8.2f}"
        )
    params = svi.get_params(state)
    seconds = time.perf_counter() - start

    elbo = Trace_ELBO(num_particles=64)

    @jax.jit
    def elbo_per_image(rng_key, params, x):
        return -elbo.loss(rng_key, params, model, guide, x) / x.shape[0]

    @jax.jit
    def encode_and_reconstruct(params, x):
        codes = guide.distributions(params, x)["z"].mean
        return codes, reconstruct(model, params, codes)

    held_out = float(elbo_per_image(jax.random.key(1), params, x_test))
    train = float(elbo_per_image(jax.random.key(2), params, x_train))
    baseline = independent_pixels_log_lik(x_train, x_test)
    codes, recon = encode_and_reconstruct(params, x_test)
    recon_error = float(jnp.abs(recon - x_test).mean())
    num_steps = chunk * num_chunks
    print(f"trained in {seconds:.1f} s ({num_steps / seconds:.0f} steps/s)")
    print(f"held-out ELBO per image: {held_out:.2f} nats")
    print(f"training ELBO per image: {train:.2f} nats")
    print(f"independent-pixel baseline log-lik per image: {baseline:.2f} nats")
    print(f"reconstruction mean abs error: {recon_error:.2f} (pixel counts 0..16)")
    paths = save_figures(
        ns.output, x_test, y_test, recon, codes, np.concatenate(losses)
    )
    print(f"Figures written to {ns.output.resolve()}/: {[p.name for p in paths]}")
    return {
        "held_out_elbo": held_out,
        "train_elbo": train,
        "baseline": baseline,
        "recon_error": recon_error,
    }


if __name__ == "__main__":
    main()
