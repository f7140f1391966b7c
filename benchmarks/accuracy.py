"""Posterior accuracy on sbibm tasks (C2ST against reference posteriors).

Protocol (sbibm 1.1.0 / Lueckmann et al., 2021): for each task and simulation
budget, train ONE amortized posterior with the library defaults
(``na.AmortizedPosterior(model).fit(key, num_simulations=N)``: neural spline flow,
Adam 1e-3 with cosine decay, batch 128 (16 at 10^3 simulations: the default batch is
the training rows // 50 in multiples of 16 within [16, 128]), 10% validation, early
stopping with patience 20, at most 200 epochs, EMA of the weights), then draw
10,000 samples for each of the observations 1..10 in one batched call and compute
the classifier two-sample test (C2ST) accuracy against the 10,000 reference
posterior samples:

* both sets z-scored with the mean and standard deviation (ddof=1) of the
  *reference* samples;
* ``MLPClassifier(activation="relu", hidden_layer_sizes=(10 * dim, 10 * dim),
  max_iter=10000, solver="adam", random_state=seed)``;
* 5-fold ``KFold(shuffle=True, random_state=seed)`` cross-validated accuracy,
  averaged over folds; seed 1.

0.5 is a perfect posterior, 1.0 a completely wrong one. Published NPE numbers
(Lueckmann et al., 2021, mean over the 10 observations) are printed alongside.

Tasks and reference data: ``benchmarks/sbibm_tasks.py`` (``SBIBM_DIR`` points at
an sbibm checkout with the task ``files/``; default ``/work/peers/sbibm-data/sbibm``).

Reproduce (CPU; the full run takes tens of minutes, mostly C2ST)::

    python benchmarks/accuracy.py                 # 10^3, 10^4, 10^5; 10 observations
    python benchmarks/accuracy.py --quick         # 10^3, 10^4; 3 observations
    python benchmarks/accuracy.py --tasks two_moons --budgets 1000 10000

Results go to ``benchmarks/results/accuracy_cpu.json`` (``--quick``:
``accuracy_cpu_quick.json``; ``--out`` to choose), rewritten after every task x
budget so a partial run keeps what it finished.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import sklearn
from sklearn.model_selection import KFold, cross_validate
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

import numpyro_amortized as na

sys.path.insert(0, str(Path(__file__).parent))
from sbibm_tasks import (  # noqa: E402
    TASKS,
    load_observation,
    load_reference,
    sbibm_dir,
)

RESULTS = Path(__file__).parent / "results"
BUDGETS = (1_000, 10_000, 100_000)
QUICK_BUDGETS = (1_000, 10_000)
NUM_SAMPLES = 10_000

# NPE, Lueckmann et al. (2021), mean C2ST over the 10 observations.
PUBLISHED_NPE = {
    "two_moons": {1_000: 0.73, 10_000: 0.61, 100_000: 0.54},
    "gaussian_linear": {1_000: 0.69, 10_000: 0.55, 100_000: 0.51},
}


def c2st_folds(
    a: np.ndarray,
    b: np.ndarray,
    seed: int = 1,
    n_folds: int = 5,
    n_jobs: int | None = None,
    blas_threads: int | None = 1,
) -> dict:
    """C2ST per fold: accuracies, classifier iterations and fit times (see ``c2st``).

    ``n_jobs`` runs the folds in parallel; the scores do not depend on it.
    ``blas_threads`` caps BLAS threads while the classifiers train (None: no cap):
    the MLP's matrices are small, and on a busy machine multi-threaded OpenBLAS
    was 10-25x slower per iteration than one thread.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"c2st needs (n, d) and (m, d) arrays; got {a.shape}, {b.shape}"
        )
    mean, std = a.mean(axis=0), a.std(axis=0, ddof=1)
    a, b = (a - mean) / std, (b - mean) / std
    dim = a.shape[1]
    clf = MLPClassifier(
        activation="relu",
        hidden_layer_sizes=(10 * dim, 10 * dim),
        max_iter=10_000,
        solver="adam",
        random_state=seed,
    )
    data = np.concatenate([a, b])
    target = np.concatenate([np.zeros(len(a)), np.ones(len(b))])
    folds = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        cv = cross_validate(
            clf,
            data,
            target,
            cv=folds,
            scoring="accuracy",
            return_estimator=True,
            n_jobs=n_jobs,
        )
    return {
        "scores": [float(v) for v in cv["test_score"]],
        "n_iter": [int(e.n_iter_) for e in cv["estimator"]],
        "fit_s": [float(v) for v in cv["fit_time"]],
    }


def c2st(a: np.ndarray, b: np.ndarray, seed: int = 1, n_folds: int = 5) -> float:
    """Classifier two-sample test accuracy between samples ``a`` and ``b``.

    ``a`` is the reference set: both sets are z-scored with its mean and standard
    deviation (ddof=1). A ReLU MLP with two hidden layers of 10 x dim units (adam,
    ``max_iter=10000``, ``random_state=seed``) is scored by ``n_folds``-fold
    shuffled cross-validation (``KFold``, ``random_state=seed``); returns the mean
    accuracy. 0.5: indistinguishable; 1.0: perfectly separable.
    """
    return float(np.mean(c2st_folds(a, b, seed, n_folds)["scores"]))


def support_report(task: str, draws: np.ndarray) -> dict:
    """Non-finite draws, and for bounded priors draws on or outside the bounds."""
    out = {"num_nonfinite": int((~np.isfinite(draws)).any(axis=-1).sum())}
    if task == "two_moons":  # prior U(-1, 1)^2: draws must lie strictly inside
        out["num_outside_open_support"] = int((np.abs(draws) >= 1.0).any(-1).sum())
        out["max_abs_draw"] = float(np.nanmax(np.abs(draws)))
    return out


def run_one(
    task: str,
    budget: int,
    observations: list[int],
    seed: int,
    save_draws: Path | None = None,
    n_jobs: int | None = None,
) -> dict:
    model = TASKS[task]
    posterior = na.AmortizedPosterior(model)
    fit_key = jax.random.fold_in(jax.random.key(seed), budget)
    start = time.perf_counter()
    history = posterior.fit(fit_key, num_simulations=budget, progress=False)
    jax.block_until_ready(posterior._fitted.params)
    fit_s = time.perf_counter() - start
    best_val = float(history.val_loss[history.best_epoch]) if history.val_loss else None
    print(
        f"[{task} {budget:>7,}] fit {fit_s:6.1f} s, {history.num_epochs} epochs "
        f"(best {history.best_epoch}, early stop {history.stopped_early}), "
        f"best val loss {best_val:.4f}, invalid sims {history.num_invalid}",
        flush=True,
    )

    xs = np.stack([load_observation(task, k) for k in observations]).astype(np.float32)
    sample_key = jax.random.fold_in(jax.random.key(seed + 1), budget)
    start = time.perf_counter()
    draws = posterior.sample(sample_key, {"x": xs}, NUM_SAMPLES)["theta"]
    draws = np.asarray(jax.block_until_ready(draws))
    sample_s = time.perf_counter() - start  # includes compilation
    assert draws.shape[:2] == (len(observations), NUM_SAMPLES), draws.shape
    support = support_report(task, draws)
    if save_draws is not None:
        save_draws.mkdir(parents=True, exist_ok=True)
        np.save(save_draws / f"{task}_{budget}.npy", draws)

    scores, c2st_s, n_iter = [], [], []
    for i, k in enumerate(observations):
        ref = load_reference(task, k)
        ok = np.isfinite(draws[i]).all(axis=-1)
        start = time.perf_counter()
        folds = c2st_folds(ref, draws[i][ok], seed=1, n_jobs=n_jobs)
        scores.append(float(np.mean(folds["scores"])))
        c2st_s.append(time.perf_counter() - start)
        n_iter.append(folds["n_iter"])
        print(
            f"[{task} {budget:>7,}] obs {k:2d}: C2ST {scores[-1]:.4f} "
            f"({c2st_s[-1]:.1f} s; MLP iterations per fold {folds['n_iter']})",
            flush=True,
        )
    return {
        "task": task,
        "num_simulations": budget,
        "observations": observations,
        "c2st": scores,
        "c2st_mean": float(np.mean(scores)),
        "c2st_std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
        "published_npe": PUBLISHED_NPE.get(task, {}).get(budget),
        "inference_net": repr(posterior.inference_net),
        "summary_net": repr(posterior.summary_net),
        "fit_wall_s": fit_s,
        "history_wall_s": history.wall_time[-1] if history.wall_time else None,
        "num_epochs": history.num_epochs,
        "best_epoch": history.best_epoch,
        "stopped_early": history.stopped_early,
        "best_val_loss": best_val,
        "final_train_loss": history.train_loss[-1] if history.train_loss else None,
        "num_steps": history.num_steps,
        "num_invalid": history.num_invalid,
        "val_loss": history.val_loss,
        "train_loss": history.train_loss,
        "sample_wall_s": sample_s,
        "c2st_wall_s": c2st_s,
        "c2st_mlp_iterations": n_iter,
        "draws": support,
    }


def c2st_floor(observation: int = 1, n_jobs: int | None = None) -> dict:
    """Sanity check of ``c2st``: gaussian_linear reference vs exact posterior draws."""
    x = load_observation("gaussian_linear", observation)
    ref = load_reference("gaussian_linear", observation)
    rng = np.random.default_rng(0)
    exact = x / 2 + np.sqrt(0.05) * rng.standard_normal(ref.shape)
    start = time.perf_counter()
    folds = c2st_folds(ref, exact, seed=1, n_jobs=n_jobs)
    score = float(np.mean(folds["scores"]))
    wall = time.perf_counter() - start
    print(
        f"[c2st sanity] gaussian_linear obs {observation}: ref vs exact {score:.4f} "
        f"({wall:.0f} s; MLP iterations per fold {folds['n_iter']})",
        flush=True,
    )
    return {
        "observation": observation,
        "c2st_ref_vs_exact": score,
        "wall_s": wall,
        "mlp_iterations": folds["n_iter"],
    }


def library_state() -> dict:
    """The library's git commit (read-only query) and ``fit``'s default arguments."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "numpyro_amortized"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    params = inspect.signature(na.AmortizedPosterior.fit).parameters
    defaults = {
        n: p.default
        for n, p in params.items()
        if p.default is not inspect.Parameter.empty
        and (p.default is None or isinstance(p.default, int | float | bool | str))
    }
    return {
        "git_commit": commit or None,
        "library_modified": bool(dirty),
        "fit_defaults": defaults,
    }


def table(results: list[dict]) -> str:
    rows = [("task", "sims", "ours", "+-sd", "NPE 2021", "at/below", "fit s", "epochs")]
    for r in results:
        pub = r["published_npe"]
        rows.append(
            (
                r["task"],
                f"{r['num_simulations']:,}",
                f"{r['c2st_mean']:.3f}",
                f"{r['c2st_std']:.3f}",
                "-" if pub is None else f"{pub:.2f}",
                "-" if pub is None else ("yes" if r["c2st_mean"] <= pub else "no"),
                f"{r['fit_wall_s']:.0f}",
                f"{r['num_epochs']}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^3, 10^4; 3 obs")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--budgets", nargs="+", type=int, default=None)
    parser.add_argument("--num-observations", type=int, default=None)
    parser.add_argument(
        "--observations",
        nargs="+",
        type=int,
        default=None,
        help="explicit observation numbers (1-10); overrides --num-observations",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--save-draws", type=Path, default=None, help="folder for posterior draws"
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="C2ST folds in parallel (sklearn n_jobs)"
    )
    parser.add_argument("--no-sanity", action="store_true", help="skip the C2ST check")
    args = parser.parse_args()

    budgets = args.budgets or (QUICK_BUDGETS if args.quick else BUDGETS)
    num_obs = args.num_observations or (3 if args.quick else 10)
    observations = args.observations or list(range(1, num_obs + 1))
    if not all(1 <= k <= 10 for k in observations):
        parser.error(f"--observations must lie in 1..10, got {observations}")
    name = "accuracy_cpu_quick.json" if args.quick else "accuracy_cpu.json"
    out = args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)

    device = jax.devices()[0]
    report = {
        "benchmark": "accuracy (C2ST vs sbibm reference posteriors)",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"{device.platform}: {device.device_kind}",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpyro_amortized": getattr(na, "__version__", "unknown"),
        "sklearn": sklearn.__version__,
        "sbibm_dir": str(sbibm_dir()),
        "library": library_state(),
        "settings": {
            "tasks": args.tasks,
            "budgets": list(budgets),
            "observations": observations,
            "num_posterior_samples": NUM_SAMPLES,
            "seed": args.seed,
            "fit": "AmortizedPosterior(model).fit(key, num_simulations=N, "
            "progress=False): library defaults",
            "fit_key": "fold_in(key(seed), N)",
            "sample_key": "fold_in(key(seed + 1), N); one batched call for all obs",
            "c2st": "z-score with reference mean/std (ddof=1); MLPClassifier relu "
            "(10*dim, 10*dim), adam, max_iter 10000, random_state 1; 5-fold "
            "shuffled KFold (seed 1); mean accuracy",
            "published": "NPE, Lueckmann et al. (2021)",
        },
        "results": [],
    }
    if not args.no_sanity and "gaussian_linear" in args.tasks:
        report["c2st_sanity"] = c2st_floor(n_jobs=args.jobs)

    def save() -> None:
        out.write_text(json.dumps(report, indent=1) + "\n")

    total = time.perf_counter()
    for task in args.tasks:
        for budget in budgets:
            report["results"].append(
                run_one(
                    task,
                    budget,
                    observations,
                    args.seed,
                    args.save_draws,
                    n_jobs=args.jobs,
                )
            )
            save()
    report["total_wall_s"] = time.perf_counter() - total
    save()
    print()
    print(table(report["results"]))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
