"""Print the README's benchmark tables from ``benchmarks/results/*.json``.

    python benchmarks/report.py

Accuracy: the newest ``accuracy_cpu_*.json`` result per (task, budget) (files whose
name contains ``partial`` are skipped). Throughput: ``throughput_cpu.json``. Against
NUTS: ``vs_nuts_cpu.json`` when present. Nothing is re-run; numbers are read as saved.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def accuracy_table() -> str:
    """C2ST per task and budget: ours (mean ± sd over observations) vs published NPE."""
    best: dict[tuple[str, int], tuple[str, dict, str]] = {}
    for path in sorted(RESULTS.glob("accuracy_cpu_*.json")):
        if "partial" in path.name:
            continue
        data = json.loads(path.read_text())
        for row in data["results"]:
            key = (row["task"], int(row["num_simulations"]))
            stamp = data.get("timestamp", "")
            if key not in best or stamp > best[key][0]:
                best[key] = (stamp, row, path.name)
    lines = [
        "| task | simulations | C2ST (ours) | observations | published NPE | file |",
        "|---|---|---|---|---|---|",
    ]
    for (task, n), (_, row, name) in sorted(best.items()):
        obs = row["observations"]
        span = f"{obs[0]}–{obs[-1]}" if len(obs) > 1 else str(obs[0])
        lines.append(
            f"| {task} | 10^{len(str(n)) - 1} | {row['c2st_mean']:.3f} ± "
            f"{row['c2st_std']:.3f} | {span} | {row['published_npe']:.2f} | {name} |"
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
