"""Kill -9 during ``save``, ``simulate_to_disk`` and ``fit(checkpoint_dir=...)``.

Every run starts from a previous good state (a saved posterior, a disk bank, the
checkpoint folder of an interrupted fit), starts a child process that replaces
it (``save(overwrite=True)``, ``simulate_to_disk(overwrite=True)``, a resumed
``fit`` that rewrites ``checkpoint.npa`` and ``best.npa`` every epoch) and kills
it with SIGKILL after a delay drawn uniformly from 0 to 1.1 times the length of
that operation (measured in the same child just before; for ``fit``, from the
first checkpoint write on, so that the kills fall among the writes rather than in
the set-up). Then it checks:

* intact: the previous state is there unchanged (same bytes; the old bank opens
  and ``verify()`` passes; the old checkpoint loads), or the new one is complete
  (loads, verifies, equals what an uninterrupted child writes);
* leftovers: hidden ``.<name>.partial-…`` entries the kill left, and whether the
  next write into that folder removed them (the next ``save``, bank write, or
  the start of the next ``fit``, which runs the same clean-up).

Children are forked from a helper process that has imported the library but not
started JAX, so a run costs its compilation, not an interpreter start.

    python benchmarks/fault_injection.py [--runs 30] [--quick] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import numpy as np

import numpyro_amortized as na
from numpyro_amortized import io
from numpyro_amortized import networks as nets
from numpyro_amortized.checkpoint import BEST, CHECKPOINT, Checkpointer
from numpyro_amortized.models import gaussian_means
from numpyro_amortized.safe_write import clean_stale

RESULTS = Path(__file__).parent / "results"
KW = {"n_obs": 50, "dim": 4}
BANK = {"num_simulations": 20_000, "chunk_size": 2_000}
FIT = {
    "num_simulations": 512,
    "num_rounds": 1,
    "max_epochs": 16,
    "batch_size": 64,
    "validation_fraction": 0.25,
    "progress": False,
}
SCENARIOS = ("save", "simulate_to_disk", "fit")


def big_posterior(seed: int) -> na.AmortizedPosterior:
    """A posterior of a few MB (random weights: only the file matters here)."""
    post = na.AmortizedPosterior(
        gaussian_means,
        nets.CouplingFlow(num_layers=6, hidden=(256, 256)),
        model_kwargs=KW,
    )
    sims = gaussian_means.simulate(jax.random.key(seed), 256, **KW)
    post._build(jax.random.key(seed), sims)  # networks + standardization, no fit
    return post


def small_posterior() -> na.AmortizedPosterior:
    return na.AmortizedPosterior(
        gaussian_means,
        nets.CouplingFlow(num_layers=4, hidden=(128, 128)),
        nets.DeepSet(summary_dim=4, embed_dim=8, hidden=(16,)),
        model_kwargs={"n_obs": 10, "dim": 2},
    )


# ------------------------------------------------------------------- child
def timed(op) -> float:
    t = time.perf_counter()
    op()
    return time.perf_counter() - t


def child(cmd: dict) -> None:
    """One run in a forked process: warm up, say ready, do the operation."""
    work, target = Path(cmd["work"]), Path(cmd["target"])
    # Compiled programs are shared between children: a run's time is then
    # mostly its work (simulating, training, writing), not compiling.
    jax.config.update("jax_compilation_cache_dir", cmd["xla_cache"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    status = open(cmd["status"], "a", buffering=1)
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    if cmd["scenario"] == "save":
        post = na.load(cmd["new"], model=gaussian_means, model_kwargs=KW)

        def op(path=target):
            post.save(path, overwrite=True)

    elif cmd["scenario"] == "simulate_to_disk":

        def op(path=target):
            na.simulate_to_disk(
                jax.random.key(1), gaussian_means, BANK["num_simulations"], path,
                chunk_size=BANK["chunk_size"], progress=False, overwrite=True, **KW,
            )  # fmt: skip

    elif cmd["scenario"] == "fit_template":  # dies after its 3rd checkpoint
        save, calls = Checkpointer.save, []

        def save_then_die(self, *args, **kwargs):
            save(self, *args, **kwargs)
            calls.append(1)
            if len(calls) == 3:
                os._exit(0)

        Checkpointer.save = save_then_die
        small_posterior().fit(jax.random.key(5), checkpoint_dir=target, **FIT)
        return
    else:  # fit: resume the interrupted run, rewriting both files every epoch

        def op(path=target):
            small_posterior().fit(
                jax.random.key(5), checkpoint_dir=path, resume_from=path, **FIT
            )

    fresh = [scratch / "a", scratch / "b"]
    first_write: list[float] = []
    if cmd["scenario"] == "fit":
        for p in fresh:
            shutil.copytree(cmd["template"], p)
        save = Checkpointer.save

        def note_first_write(self, *args, **kwargs):
            first_write.append(time.perf_counter())
            save(self, *args, **kwargs)

        Checkpointer.save = note_first_write
    timed(lambda: op(fresh[0]))  # compiles
    first_write.clear()
    start = time.perf_counter()
    duration = timed(lambda: op(fresh[1]))
    # Kills are aimed at the writing part: after the set-up of the call
    # (checking the folder, tracing), when checkpoints are being written.
    setup = first_write[0] - start if first_write else 0.0
    status.write(f"ready {duration} {setup}\n")
    op()
    status.write("done\n")


def zygote() -> None:
    """Fork a child per command read from stdin; children are reaped by the OS."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("zygote ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            log = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = 0
            try:
                child(cmd)
            except BaseException:  # noqa: BLE001 - reported through the log
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)


# ------------------------------------------------------------------ parent
class Zygote:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "zygote ready"

    def spawn(self, cmd: dict) -> int:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def status_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def leftovers(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".partial-" in n or ".trash-" in n)


def run_once(z: Zygote, cmd: dict, rng: np.random.Generator) -> dict:
    """Start a child, kill it at a random moment of its operation."""
    status = Path(cmd["status"])
    pid = z.spawn(cmd)
    end = time.monotonic() + 600
    while not any(s.startswith("ready") for s in status_lines(status)):
        if not alive(pid) or time.monotonic() > end:
            log = Path(cmd["log"]).read_text()[-3000:]
            raise RuntimeError(f"child {cmd['scenario']} failed:\n{log}")
        time.sleep(0.002)
    _, duration, setup = status_lines(status)[0].split()
    duration, setup = float(duration), float(setup)
    delay = float(rng.uniform(setup, 1.1 * duration))
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it had finished
        pass
    wait_gone(pid, 30)
    return {
        "op_s": duration,
        "setup_s": setup,
        "kill_after_s": delay,
        "finished_first": "done" in status_lines(status),
    }


def same_weights(a: na.AmortizedPosterior, b: na.AmortizedPosterior) -> bool:
    la, lb = jax.tree.leaves(a._fitted.params), jax.tree.leaves(b._fitted.params)
    return all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def check_save(target: Path, old: Path, new: Path) -> str:
    try:
        loaded = na.load(target)
    except Exception as e:  # noqa: BLE001 - any failure is a broken state
        return f"broken ({e})"
    if target.read_bytes() == old.read_bytes():
        return "old"
    return "new" if same_weights(loaded, na.load(new)) else "broken"


def bank_shas(path: Path) -> dict:
    bank = na.DiskBank.open(path, gaussian_means, **KW)
    bank.verify()
    return {n: s["sha256"] for n, s in bank.header["shards"].items()}


def check_bank(target: Path, old: dict, new: dict) -> str:
    try:
        shas = bank_shas(target)
    except Exception as e:  # noqa: BLE001 - any failure is a broken state
        return f"broken ({e})"
    return "old" if shas == old else "new" if shas == new else "broken"


def check_fit(target: Path, old: dict) -> str:
    try:
        header, _ = io.read_file(target / CHECKPOINT, kinds=("checkpoint",))
        na.load(target / BEST)
    except Exception as e:  # noqa: BLE001 - any failure is a broken state
        return f"broken ({e})"
    position = header["training"]["position"]
    if (position["round"], position["epoch"]) == (old["round"], old["epoch"]):
        return "old"
    return "new" if position["epoch"] > old["epoch"] else "broken"


def scenario(z: Zygote, name: str, runs: int, base: Path, rng) -> dict:
    ref = base / f"ref_{name}"
    ref.mkdir()
    log = base / "child.log"
    rows = []
    if name == "save":
        big_posterior(0).save(ref / "old.npa")
        big_posterior(1).save(ref / "new.npa")
        old, new = ref / "old.npa", ref / "new.npa"
    elif name == "simulate_to_disk":
        na.simulate_to_disk(
            jax.random.key(0), gaussian_means, 5_000, ref / "old", progress=False,
            **KW,
        )  # fmt: skip
        na.simulate_to_disk(
            jax.random.key(1), gaussian_means, BANK["num_simulations"], ref / "new",
            chunk_size=BANK["chunk_size"], progress=False, **KW,
        )  # fmt: skip
        old, new = bank_shas(ref / "old"), bank_shas(ref / "new")
    else:
        status = base / "template.status"
        cmd = {"scenario": "fit_template", "work": str(ref), "status": str(status)}
        cmd["xla_cache"] = str(base / "xla")
        pid = z.spawn({**cmd, "target": str(ref / "template"), "log": str(log)})
        wait_gone(pid, 900)
        header, _ = io.read_file(ref / "template" / CHECKPOINT, kinds=("checkpoint",))
        old = header["training"]["position"]
    for i in range(runs):
        work = base / f"{name}_{i}"
        folder = work / "data"
        folder.mkdir(parents=True)
        if name == "save":
            target = folder / "posterior.npa"
            shutil.copyfile(ref / "old.npa", target)
        elif name == "simulate_to_disk":
            target = folder / "bank"
            shutil.copytree(ref / "old", target)
        else:
            target = folder / "run"
            shutil.copytree(ref / "template", target)
        cmd = {
            "scenario": name,
            "work": str(work),
            "target": str(target),
            "status": str(work / "status"),
            "log": str(log),
            "new": str(ref / "new.npa"),
            "template": str(ref / "template"),
            "xla_cache": str(base / "xla"),
        }
        row = run_once(z, cmd, rng)
        if name == "save":
            row["state"] = check_save(target, old, new)
            left = leftovers(folder)
            big_posterior(0).save(folder / "next.npa") if left else None
        elif name == "simulate_to_disk":
            row["state"] = check_bank(target, old, new)
            left = leftovers(folder)
            if left:  # the next bank written into the folder cleans up
                sims = gaussian_means.simulate(jax.random.key(2), 8, **KW)
                na.DiskBank.write(folder / "next", sims, gaussian_means, **KW)
        else:
            row["state"] = check_fit(target, old)
            left = leftovers(target)
            clean_stale(target)  # what the next fit's Checkpointer does first
        row["leftovers_after_kill"] = left
        after = leftovers(target if name == "fit" else folder)
        row["leftovers_after_next_write"] = after
        rows.append(row)
        shutil.rmtree(work, ignore_errors=True)
        print(
            f"  {name:16s} run {i + 1:3d}/{runs}: killed after "
            f"{row['kill_after_s']:.3f} of {row['op_s']:.3f} s -> {row['state']}"
            f"{' (had finished)' if row['finished_first'] else ''}"
            f", leftovers {len(left)} -> {len(after)}",
            flush=True,
        )
    return {
        "runs": runs,
        "killed_mid_operation": sum(not r["finished_first"] for r in rows),
        "old_intact": sum(r["state"] == "old" for r in rows),
        "new_complete": sum(r["state"] == "new" for r in rows),
        "broken": sum(r["state"].startswith("broken") for r in rows),
        "runs_with_leftovers": sum(bool(r["leftovers_after_kill"]) for r in rows),
        "leftovers_after_next_write": sum(
            len(r["leftovers_after_next_write"]) for r in rows
        ),
        "op_seconds_median": float(np.median([r["op_s"] for r in rows])),
        "details": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="5 runs per scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", nargs="+", default=SCENARIOS)
    parser.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.zygote:
        zygote()
        return
    runs = 5 if ns.quick else ns.runs
    rng = np.random.default_rng(ns.seed)
    base = Path(tempfile.mkdtemp(prefix="fault_injection_"))
    z = Zygote()
    results = {}
    try:
        for name in ns.scenarios:
            results[name] = scenario(z, name, runs, base, rng)
    finally:
        z.close()
        shutil.rmtree(base, ignore_errors=True)
    print()
    head = (
        f"{'operation':18s} {'runs':>5s} {'killed mid-op':>13s} {'old intact':>10s} "
        f"{'new complete':>12s} {'broken':>6s} {'left files':>10s} "
        f"{'left after next':>15s} {'op s':>6s}"
    )
    print(head)
    for name, r in results.items():
        print(
            f"{name:18s} {r['runs']:5d} {r['killed_mid_operation']:13d} "
            f"{r['old_intact']:10d} {r['new_complete']:12d} {r['broken']:6d} "
            f"{r['runs_with_leftovers']:10d} {r['leftovers_after_next_write']:15d} "
            f"{r['op_seconds_median']:6.2f}"
        )
    ok = all(r["broken"] == 0 for r in results.values())
    total = sum(r["runs"] for r in results.values())
    intact = sum(r["old_intact"] + r["new_complete"] for r in results.values())
    print(
        f"\n{intact}/{total} runs left the previous state intact or the new complete."
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "fault_injection.json"
    out.write_text(
        json.dumps(
            {
                "settings": {"runs": runs, "seed": ns.seed, "bank": BANK, "fit": FIT},
                "machine": platform.platform(),
                "python": platform.python_version(),
                "library_version": na.__version__,
                "intact": intact,
                "total": total,
                "results": results,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
