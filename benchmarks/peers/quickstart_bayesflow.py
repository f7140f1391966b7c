"""Peer benchmark: BayesFlow (JAX backend) NPE on the "quickstart" task.

Task: mu ~ N(0, I_4), x_i ~ N(mu, I_4), i = 1..50 (each dataset is a set of
50 4-d observations).

Network (as close as BayesFlow 2.0.x allows to the library's quickstart):
  * summary: ``bf.networks.DeepSet(summary_dim=16, embed_dim=64, mlp_widths=(64,))``
    (BayesFlow's DeepSet: equivariant layers with mean pooling, then attention
    pooling (PMA) and a linear projection -- the peer's default design).
  * inference: ``bf.networks.CouplingFlow(depth=3, transform="spline")``; each
    BayesFlow "depth" unit is a *dual* coupling (two coupling layers), so
    depth=3 means 6 coupling layers; subnet MLP widths (128, 128) (BayesFlow's
    coupling default).

Training uses a fixed, pre-simulated bank (``OfflineDataset``) and keras'
``fit``; a callback timestamps every optimizer step so the first
``--warmup`` steps (compilation) are excluded from the steps/s figure.

Run (from the peer venv, see benchmarks/peers/README.md):
    KERAS_BACKEND=jax /work/peers/bayesflow-venv/bin/python \
        benchmarks/peers/quickstart_bayesflow.py --threads 2

Prints one JSON line.
"""

import argparse
import json
import os
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-simulations", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--steps", type=int, default=200, help="total optimizer steps (incl. warm-up)"
    )
    p.add_argument("--warmup", type=int, default=20, help="steps excluded from timing")
    p.add_argument(
        "--depth", type=int, default=3, help="CouplingFlow depth (x2 coupling layers)"
    )
    p.add_argument("--transform", default="spline", choices=["spline", "affine"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-obs", type=int, default=50)
    p.add_argument("--dim", type=int, default=4)
    return p.parse_args()


def main():
    args = parse_args()
    os.environ.setdefault("KERAS_BACKEND", "jax")
    # XLA:CPU has no portable "N threads" flag; with --threads 1 we disable its
    # multi-threaded Eigen pool, otherwise it uses the machine's cores (2 here).
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
        ).strip()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    t_wall0 = time.perf_counter()
    import bayesflow as bf
    import keras
    import numpy as np

    if keras.backend.backend() != "jax":
        print(
            f"warning: keras backend is {keras.backend.backend()!r}, not 'jax'",
            file=sys.stderr,
        )

    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    # Fixed simulated bank.
    n, d, m = args.num_simulations, args.dim, args.num_obs
    # Keep only full batches: a ragged last batch would trigger a JAX
    # re-compilation inside the timed window.
    n = (n // args.batch_size) * args.batch_size
    mu = rng.standard_normal((n, d)).astype("float32")
    x = (mu[:, None, :] + rng.standard_normal((n, m, d))).astype("float32")
    data = {"mu": mu, "x": x}

    adapter = (
        bf.Adapter()
        .convert_dtype("float64", "float32")
        .as_set("x")
        .rename("mu", "inference_variables")
        .rename("x", "summary_variables")
    )

    summary_net = bf.networks.DeepSet(summary_dim=16, embed_dim=64, mlp_widths=(64,))
    flow = bf.networks.CouplingFlow(depth=args.depth, transform=args.transform)
    approximator = bf.approximators.ContinuousApproximator(
        inference_network=flow, summary_network=summary_net, adapter=adapter
    )
    approximator.compile(optimizer=keras.optimizers.Adam(learning_rate=5e-4))

    dataset = bf.datasets.OfflineDataset(
        data, batch_size=args.batch_size, adapter=adapter
    )
    steps_per_epoch = len(dataset)

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []
            self.cpu = []

        def on_train_batch_end(self, batch, logs=None):
            # Force completion of the async step before timestamping.
            if logs is not None and "loss" in logs:
                float(logs["loss"])
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())
            if len(self.times) >= args.steps:
                self.model.stop_training = True

    timer = StepTimer()
    epochs = -(-args.steps // steps_per_epoch)
    t_fit0 = time.perf_counter()
    history = approximator.fit(
        dataset=dataset,
        epochs=epochs,
        verbose=0,
        callbacks=[timer],
    )
    t_fit = time.perf_counter() - t_fit0

    times = timer.times[: args.steps]
    w = min(args.warmup, len(times) - 2)
    timed_steps = len(times) - 1 - w
    steps_per_s = timed_steps / (times[-1] - times[w])
    intervals = [times[i + 1] - times[i] for i in range(w, len(times) - 1)]
    steps_per_s_median = 1.0 / statistics.median(intervals)
    # Process CPU seconds (all threads) per step: less sensitive to other load.
    cpu_s_per_step = (timer.cpu[len(times) - 1] - timer.cpu[w]) / timed_steps

    # Trainable parameters of the networks (summary + inference network).
    n_summary = int(sum(np.prod(v.shape) for v in summary_net.trainable_weights))
    n_flow = int(sum(np.prod(v.shape) for v in flow.trainable_weights))
    n_total = int(sum(np.prod(v.shape) for v in approximator.trainable_weights))

    losses = history.history.get("loss", [])
    out = {
        "peer": "bayesflow",
        "version": bf.__version__,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "task": "quickstart",
        "steps_per_s": round(steps_per_s, 3),
        "steps_per_s_median": round(steps_per_s_median, 3),
        "cpu_s_per_step": round(cpu_s_per_step, 4),
        "batch_size": args.batch_size,
        "num_simulations": n,
        "steps_total": len(times),
        "steps_timed": timed_steps,
        "warmup_steps": w + 1,
        "first_step_s": round(times[0] - t_fit0, 3),
        "warmup_s": round(times[w] - t_fit0, 3),
        "fit_s": round(t_fit, 3),
        "num_params_network": n_total,
        "num_params_summary": n_summary,
        "num_params_flow": n_flow,
        "final_epoch_loss": float(losses[-1]) if losses else None,
        "threads": args.threads,
        "wall_s": round(time.perf_counter() - t_wall0, 3),
        "notes": (
            f"DeepSet(summary_dim=16, embed_dim=64, mlp_widths=(64,), PMA pooling) + "
            f"CouplingFlow(depth={args.depth} dual couplings = {2 * args.depth} coupling layers, "
            f"transform={args.transform}, subnet MLP (128,128)); Adam 5e-4; OfflineDataset; "
            f"steps/s over steps after the first {w + 1} (compile/warm-up)"
        ),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
