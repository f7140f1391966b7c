"""Cheap proxy for the sbibm C2ST benchmark: reference-sample log density.

C2ST (``benchmarks/accuracy.py``) costs about 50 s per observation on CPU. This
proxy costs seconds per trained posterior: the mean negative log density of the
10,000 reference posterior samples of each sbibm observation under the amortized
posterior (``posterior.log_prob``, constrained space, exact Jacobians), averaged
over observations 1..10. Up to the reference posterior's entropy (a constant of
the task) it is the mean KL(reference || amortized), so lower is better and 0
difference means a perfect posterior; C2ST follows it closely.

One training run is noisy, so every configuration is trained with several seeds
(a fresh simulation bank and fit key per seed) and the table reports the mean and
spread over seeds. Seed 0 uses the fit key of ``benchmarks/accuracy.py``
(``fold_in(key(0), N)``), so its posterior is the one the C2ST run scores.

A configuration is the library defaults plus overrides of ``fit`` keywords
(``batch_size``, ``learning_rate``, ``max_epochs``, ``patience``, ...), of the
neural spline flow spec (``net``), and of two training internals that ``fit`` does
not expose, patched here for the experiment only: ``ema`` (the EMA decay of the
weights, ``fitting.OFFLINE_EMA_DECAY``; None: raw weights) and ``schedule``
(``"constant"``: no cosine decay of the learning rate).

Reproduce (CPU, about 15 s per seed and configuration at 10^3)::

    python benchmarks/accuracy_proxy.py --task two_moons --budget 1000 \
        --configs default lr5e-4 batch64
    python benchmarks/accuracy_proxy.py --list        # the named configurations

Results go to ``benchmarks/results/accuracy_proxy_<task>_<budget>.json`` (``--out``
to choose), merged with what is already there and rewritten after every run.

Measured on two_moons at 10^3 (mean over 3 seeds; seed sd 0.03-0.3; lower is
better), which led to the default batch rule
(``numpyro_amortized.train.default_batch_size``: batch 16 here, was 128):
batch 128 -2.38, batch 64 -2.55, batch 32 -2.74, batch 18 -2.86, batch 16 -2.92,
batch 32 + max_epochs 1000 -2.95, max_epochs 1000 -2.61, lr 2e-3 -2.63,
lr 5e-4 -2.08, batch 32 + lr 5e-4 -2.43, patience 50 -2.38, no EMA -2.31,
EMA 0.99 -2.38 (the same run as 0.998: below ~4,500 steps the EMA's warm-up
``(1 + t) / (10 + t)`` sets the horizon), 10 bins + hidden (50, 50) -2.40, and
sbi-like settings (batch 200, constant lr 5e-4, no EMA, 10 bins, hidden 50)
-1.90. At 7 steps per epoch the flow was under-fitted, not over-fitted: every
change that adds optimizer steps helped, every one that slows them hurt.
gaussian_linear at 10^3: batch 128 0.071, batch 16 0.051 (no regression).
At 10^4 the rule keeps batch 128 (identical runs). C2ST (``accuracy.py``, 10
observations): batch 128 0.761 (seed 0) / 0.745 (seed 1), batch 16 0.678 / 0.661.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

import numpyro_amortized as na
from numpyro_amortized import fitting, train

sys.path.insert(0, str(Path(__file__).parent))
from sbibm_tasks import TASKS, load_observation, load_reference  # noqa: E402

RESULTS = Path(__file__).parent / "results"

# name -> overrides of the library defaults (see the module docstring). All were
# measured; "default" is the library as it is (batch 16 at 10^3 since
# default_batch_size; the "batch128" row of the 10^3 results is the old default).
CONFIGS: dict[str, dict] = {
    "default": {},
    "lr5e-4": {"learning_rate": 5e-4},
    "batch128": {"batch_size": 128},
    "batch64": {"batch_size": 64},
    "batch32": {"batch_size": 32},
    "batch16": {"batch_size": 16},
    "batch256": {"batch_size": 256},
    "batch512": {"batch_size": 512},
    "batch18": {"batch_size": 18},
    "batch32_lr5e-4": {"batch_size": 32, "learning_rate": 5e-4},
    "batch32_epochs1000": {"batch_size": 32, "max_epochs": 1000},
    "lr2e-3": {"learning_rate": 2e-3},
    "epochs1000": {"max_epochs": 1000},
    "patience50": {"patience": 50},
    "ema0.99": {"ema": 0.99},
    "ema0.9995": {"ema": 0.9995},
    "no_ema": {"ema": None},
    "sbi_like": {
        "batch_size": 200,
        "learning_rate": 5e-4,
        "schedule": "constant",
        "max_epochs": 2000,
        "ema": None,
        "net": {"hidden": (50, 50), "num_bins": 10},
    },
    "bins10_h50": {"net": {"hidden": (50, 50), "num_bins": 10}},
}


@contextlib.contextmanager
def patched(ema: float | None | str = "default", schedule: str = "cosine"):
    """Temporarily override the offline EMA decay and the learning-rate schedule."""
    old_ema, old_opt = fitting.OFFLINE_EMA_DECAY, fitting.default_optimizer
    if ema != "default":
        fitting.OFFLINE_EMA_DECAY = ema
    if schedule == "constant":

        def constant(learning_rate, total_steps, *, clip_norm=1.0, ema_decay=None):
            opt = optax.chain(
                optax.clip_by_global_norm(clip_norm), optax.adam(learning_rate)
            )
            return (
                opt if ema_decay is None else train.with_param_averaging(opt, ema_decay)
            )

        fitting.default_optimizer = constant
    elif schedule != "cosine":
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    try:
        yield
    finally:
        fitting.OFFLINE_EMA_DECAY, fitting.default_optimizer = old_ema, old_opt


def reference_data(task: str, observations: list[int]) -> tuple[np.ndarray, list]:
    xs = np.stack([load_observation(task, k) for k in observations])
    refs = [load_reference(task, k) for k in observations]
    return xs.astype(np.float32), refs


def proxy_one(
    task: str,
    budget: int,
    overrides: dict,
    seed: int,
    xs: np.ndarray,
    refs: list[np.ndarray],
) -> dict:
    """Train once with ``overrides`` and score the reference samples."""
    overrides = dict(overrides)
    ema = overrides.pop("ema", "default")
    schedule = overrides.pop("schedule", "cosine")
    net = overrides.pop("net", None)
    inference_net = None if net is None else na.networks.NeuralSplineFlow(**net)
    posterior = na.AmortizedPosterior(TASKS[task], inference_net=inference_net)
    key = jax.random.fold_in(jax.random.key(seed), budget)
    start = time.perf_counter()
    with patched(ema, schedule):
        history = posterior.fit(
            key, num_simulations=budget, progress=False, **overrides
        )
    fit_s = time.perf_counter() - start
    nll = []
    for x, ref in zip(xs, refs, strict=True):
        lp = posterior.log_prob({"theta": ref.astype(np.float32)}, {"x": x})
        nll.append(-float(np.mean(np.asarray(lp))))
    best = history.val_loss[history.best_epoch] if history.val_loss else None
    return {
        "seed": seed,
        "nll": nll,
        "nll_mean": float(np.mean(nll)),
        "num_epochs": history.num_epochs,
        "best_epoch": history.best_epoch,
        "num_steps": history.num_steps,
        "best_val_loss": best,
        "final_train_loss": history.train_loss[-1],
        "fit_s": fit_s,
    }


def summarize(name: str, runs: list[dict]) -> dict:
    means = [r["nll_mean"] for r in runs]
    return {
        "name": name,
        "nll_mean": float(np.mean(means)),
        "nll_seed_sd": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0,
        "runs": runs,
    }


def table(rows: list[dict]) -> str:
    head = ("config", "NLL", "+-sd", "per seed", "epochs", "best", "val", "fit s")
    lines = [head]
    for r in rows:
        runs = r["runs"]
        lines.append(
            (
                r["name"],
                f"{r['nll_mean']:.3f}",
                f"{r['nll_seed_sd']:.3f}",
                " ".join(f"{u['nll_mean']:.3f}" for u in runs),
                "/".join(str(u["num_epochs"]) for u in runs),
                "/".join(str(u["best_epoch"]) for u in runs),
                " ".join(f"{u['best_val_loss']:.2f}" for u in runs),
                f"{np.mean([u['fit_s'] for u in runs]):.0f}",
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="two_moons", choices=TASKS)
    parser.add_argument("--budget", type=int, default=1_000)
    parser.add_argument("--configs", nargs="+", default=["default"])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..S-1")
    parser.add_argument("--num-observations", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--list", action="store_true", help="print the configs")
    args = parser.parse_args()
    if args.list:
        for name, over in CONFIGS.items():
            print(f"{name:12s} {over}")
        return
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; --list shows them")

    out = args.out or RESULTS / f"accuracy_proxy_{args.task}_{args.budget}.json"
    report = json.loads(out.read_text()) if out.exists() else {"configs": {}}
    report.update(
        {
            "benchmark": "accuracy proxy: mean -log q(reference samples | x_obs)",
            "task": args.task,
            "num_simulations": args.budget,
            "observations": list(range(1, args.num_observations + 1)),
            "fit_key": "fold_in(key(seed), N)",
            "jax": jax.__version__,
        }
    )
    xs, refs = reference_data(args.task, report["observations"])
    rows = []
    for name in args.configs:
        runs = []
        for seed in range(args.seeds):
            run = proxy_one(args.task, args.budget, CONFIGS[name], seed, xs, refs)
            runs.append(run)
            print(
                f"[{name} seed {seed}] NLL {run['nll_mean']:.4f}, "
                f"{run['num_epochs']} epochs (best {run['best_epoch']}), "
                f"fit {run['fit_s']:.0f} s",
                flush=True,
            )
        row = summarize(name, runs)
        row["overrides"] = {k: repr(v) for k, v in CONFIGS[name].items()}
        row["timestamp"] = datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        )
        rows.append(row)
        report["configs"][name] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    print()
    print(table(rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
