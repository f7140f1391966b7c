"""Peer benchmark: sbi (PyTorch) NPE on the "quickstart" task.

Task: mu ~ N(0, I_4), x_i ~ N(mu, I_4), i = 1..50 (each dataset is a set of
50 4-d observations).

Network (as close as sbi 0.27 allows to the library's quickstart):
  * embedding: ``sbi.neural_nets.embedding_nets.PermutationInvariantEmbedding``
    with a per-observation MLP 4 -> 64 -> 64 -> 64 (ReLU), mean pooling, then
    sbi's fully connected head (2 layers, 64 hidden) to a 16-d summary.
  * flow: ``posterior_nn(model="nsf", hidden_features=64, num_transforms=5,
    num_bins=10)`` (nflows neural spline flow, 5 coupling transforms).

Training: ``NPE.append_simulations(theta, x).train(...)`` on a fixed bank of
``--num-simulations`` simulations (sbi holds out ``validation_fraction=0.1``),
for a fixed number of epochs (early stopping disabled).  A global
``torch.optim`` step post-hook timestamps every optimizer step, so the first
``--warmup`` steps are excluded and validation passes between epochs can be
separated from the training loop proper.

Run (from the peer venv, see benchmarks/peers/README.md):
    /work/peers/sbi-venv/bin/python benchmarks/peers/quickstart_sbi.py --threads 2

Prints one JSON line.
"""

import argparse
import json
import statistics
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-simulations", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--epochs", type=int, default=5, help="training epochs (early stopping off)"
    )
    p.add_argument(
        "--warmup", type=int, default=20, help="optimizer steps excluded from timing"
    )
    p.add_argument("--num-transforms", type=int, default=5)
    p.add_argument("--hidden-features", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-obs", type=int, default=50)
    p.add_argument("--dim", type=int, default=4)
    return p.parse_args()


def main():
    args = parse_args()
    t_wall0 = time.perf_counter()

    import sbi
    import torch
    from sbi.inference import NPE
    from sbi.neural_nets import posterior_nn
    from sbi.neural_nets.embedding_nets import PermutationInvariantEmbedding
    from torch import nn
    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    n, d, m = args.num_simulations, args.dim, args.num_obs
    prior = torch.distributions.MultivariateNormal(torch.zeros(d), torch.eye(d))
    theta = prior.sample((n,))
    x = theta[:, None, :] + torch.randn(n, m, d)

    trial_net = nn.Sequential(
        nn.Linear(d, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
    )
    embedding = PermutationInvariantEmbedding(
        trial_net=trial_net,
        trial_net_output_dim=64,
        aggregation_fn="mean",
        num_hiddens=64,
        num_layers=2,
        output_dim=16,
    )
    density_estimator = posterior_nn(
        model="nsf",
        hidden_features=args.hidden_features,
        num_transforms=args.num_transforms,
        num_bins=10,
        embedding_net=embedding,
    )
    inference = NPE(
        prior=prior, density_estimator=density_estimator, show_progress_bars=False
    )
    inference.append_simulations(theta, x)

    # Timestamp every optimizer step (global hook, so it sees sbi's own Adam).
    step_times = []
    step_cpu = []
    epoch_of_step = []
    epoch_counter = {"epoch": 0}

    def _post_step_hook(optimizer, args_, kwargs_):
        step_times.append(time.perf_counter())
        step_cpu.append(time.process_time())
        epoch_of_step.append(getattr(inference, "epoch", epoch_counter["epoch"]))

    handle = register_optimizer_step_post_hook(_post_step_hook)

    t_train0 = time.perf_counter()
    inference.train(
        training_batch_size=args.batch_size,
        max_num_epochs=args.epochs - 1,  # sbi's loop runs while epoch <= max_num_epochs
        stop_after_epochs=10**9,
        learning_rate=5e-4,
    )
    t_train = time.perf_counter() - t_train0
    handle.remove()

    net = inference._neural_net
    num_params = int(sum(p.numel() for p in net.parameters() if p.requires_grad))
    num_params_embedding = int(
        sum(p.numel() for p in embedding.parameters() if p.requires_grad)
    )

    w = min(args.warmup, len(step_times) - 2)
    t = step_times[w:]
    e = epoch_of_step[w:]
    timed_steps = len(t) - 1
    # (a) everything after warm-up, incl. validation passes between epochs.
    sps_incl_val = timed_steps / (t[-1] - t[0])
    # (b) training loop only: drop intervals that span an epoch boundary.
    intra = [t[i + 1] - t[i] for i in range(len(t) - 1) if e[i + 1] == e[i]]
    sps_train_only = len(intra) / sum(intra)
    sps_median = 1.0 / statistics.median(intra)
    # Process CPU seconds (all threads) per step, training loop only.
    c = step_cpu[w:]
    intra_cpu = [c[i + 1] - c[i] for i in range(len(c) - 1) if e[i + 1] == e[i]]
    cpu_s_per_step = sum(intra_cpu) / len(intra_cpu)

    out = {
        "peer": "sbi",
        "version": sbi.__version__,
        "torch_version": torch.__version__,
        "task": "quickstart",
        "steps_per_s": round(sps_train_only, 3),
        "steps_per_s_incl_validation": round(sps_incl_val, 3),
        "steps_per_s_median": round(sps_median, 3),
        "cpu_s_per_step": round(cpu_s_per_step, 4),
        "batch_size": args.batch_size,
        "num_simulations": n,
        "epochs": int(getattr(inference, "epoch", args.epochs)),
        "steps_total": len(step_times),
        "steps_timed": timed_steps,
        "warmup_steps": w + 1,
        "train_s": round(t_train, 3),
        "num_params_network": num_params,
        "num_params_embedding": num_params_embedding,
        "best_validation_loss": float(inference._summary["best_validation_loss"][-1]),
        "threads": args.threads,
        "wall_s": round(time.perf_counter() - t_wall0, 3),
        "notes": (
            f"PermutationInvariantEmbedding(trial MLP 4-64-64-64, mean pool, head 64x2 -> 16) + "
            f"nsf(hidden_features={args.hidden_features}, num_transforms={args.num_transforms}, "
            f"num_bins=10); Adam 5e-4, clip_max_norm=5 (sbi default); validation_fraction=0.1; "
            f"steps_per_s = training loop only (intervals spanning epoch boundaries/validation "
            f"dropped), after the first {w + 1} steps"
        ),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
