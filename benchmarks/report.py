"""Print the README's benchmark tables from ``benchmarks/results/*.json``.

    python benchmarks/report.py

Accuracy: per (task, budget) the newest fit in ``accuracy_cpu_*.json`` (files whose
name contains ``partial`` are skipped); runs that scored that same fit on other
observations are pooled into one row (``accuracy.py --observations``).
Throughput: ``throughput_cpu.json``. Against NUTS: ``vs_nuts_cpu.json`` when
present. Nothing is re-run; numbers are read as saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def _same_fit(row: dict) -> tuple:
    """Rows from runs that trained the same network (same task, budget, epochs and
    best validation loss: ``accuracy.py`` fits with a fixed key, so a rerun on other
    observations retrains the identical posterior)."""
    return (
        row["task"],
        int(row["num_simulations"]),
        row.get("num_epochs"),
        round(float(row.get("best_val_loss") or 0.0), 5),
    )


def accuracy_rows() -> dict[tuple[str, int], dict]:
    """Per (task, budget): the newest fit's C2ST per observation, pooled over the
    result files that scored that same fit on different observations."""
    groups: dict[tuple, dict] = {}
    for path in sorted(RESULTS.glob("accuracy_cpu_*.json")):
        if "partial" in path.name:
            continue
        data = json.loads(path.read_text())
        stamp = data.get("timestamp", "")
        for row in data["results"]:
            g = groups.setdefault(
                _same_fit(row), {"stamp": "", "scores": {}, "files": [], "row": row}
            )
            for k, score in zip(row["observations"], row["c2st"], strict=True):
                if k not in g["scores"] or stamp > g["scores"][k][0]:
                    g["scores"][k] = (stamp, score)
            g["files"].append(path.name)
            g["stamp"] = max(g["stamp"], stamp)
    best: dict[tuple[str, int], dict] = {}
    for key, g in groups.items():
        task_budget = key[:2]
        if task_budget not in best or g["stamp"] > best[task_budget]["stamp"]:
            best[task_budget] = g
    return best


def accuracy_table() -> str:
    """C2ST per task and budget: ours (mean ± sd over observations) vs published NPE."""
    lines = [
        "| task | simulations | C2ST (ours) | observations | published NPE | file |",
        "|---|---|---|---|---|---|",
    ]
    for (task, n), g in sorted(accuracy_rows().items()):
        obs = sorted(g["scores"])
        scores = np.array([g["scores"][k][1] for k in obs])
        sd = scores.std(ddof=1) if len(scores) > 1 else 0.0
        contiguous = obs == list(range(obs[0], obs[-1] + 1))
        if len(obs) == 1:
            span = str(obs[0])
        elif contiguous:
            span = f"{obs[0]}–{obs[-1]}"
        else:
            span = ", ".join(map(str, obs))
        files = " + ".join(dict.fromkeys(g["files"]))
        lines.append(
            f"| {task} | 10^{len(str(n)) - 1} | {scores.mean():.3f} ± {sd:.3f} | "
            f"{span} | {g['row']['published_npe']:.2f} | {files} |"
        )
    return "\n".join(lines)


def throughput_table() -> str:
    """Training steps/s at batch 128 on the quickstart task, side by side."""
    data = json.loads((RESULTS / "throughput_cpu.json").read_text())
    ours = next(r for r in data["rows"] if r["peer"] == "numpyro_amortized")
    sized = {
        r["peer"].split("(")[1].split("-")[0]: r
        for r in data.get("sized_like_peers", [])
    }
    lines = [
        "| library | steps/s | network parameters | ours (default) ÷ theirs "
        "| ours (same size) ÷ theirs |",
        "|---|---|---|---|---|",
    ]
    for row in [*data["rows"], *sized.values()]:
        ratio = ours["steps_per_s"] / row["steps_per_s"]
        name = row["peer"] + (f" {row['version']}" if "version" in row else "")
        same = sized.get(row["peer"])
        same_ratio = f"{same['steps_per_s'] / row['steps_per_s']:.1f}×" if same else ""
        lines.append(
            f"| {name} | {row['steps_per_s']:.1f} | {row['num_params_network']:,} | "
            f"{ratio:.1f}× | {same_ratio} |"
        )
    lines.append(
        f"\nPosterior draws/s (1,000 datasets × 1,000 draws): "
        f"{ours['draws_per_s_1000x1000']:,.0f}"
    )
    if "draws_per_s_mlps_only" in ours:
        lines[-1] += (
            f" (generic inverse in the same run: "
            f"{ours['draws_per_s_generic_inverse']:,.0f}; the flow's conditioner "
            f"MLPs alone: {ours['draws_per_s_mlps_only']:,.0f})"
        )
    lines[-1] += "."
    return "\n".join(lines)


def vs_nuts_table() -> str | None:
    """Seconds per dataset, amortized vs NUTS, from ``vs_nuts_cpu.json``."""
    path = RESULTS / "vs_nuts_cpu.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    table = data.get("markdown")
    return table if table else json.dumps(data.get("summary", {}), indent=1)


def main() -> None:
    print("### Accuracy (C2ST against sbibm reference posteriors; 0.5 is perfect)\n")
    print(accuracy_table())
    print("\n### Training throughput (quickstart task, batch 128, 2 CPU cores)\n")
    print(throughput_table())
    nuts = vs_nuts_table()
    if nuts:
        print("\n### Against NUTS\n")
        print(nuts)


if __name__ == "__main__":
    main()
