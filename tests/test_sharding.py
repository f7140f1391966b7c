"""Data-parallel training over several devices (and processes).

JAX fixes its device count when it starts, so every test runs a fresh Python in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (four CPU
devices). The script prints one JSON line, checked here.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def maxdiff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b)))


def run_script(code: str, *, num_devices: int = 4, env: dict | None = None) -> dict:
    full_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}",
        **(env or {}),
    }
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# A least-squares problem: per-example loss (w . a - b)^2, so the sharded and the
# single-device step compute the same gradient up to the order of the sums.
EPOCH_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np, optax
from numpyro_amortized.sharding import data_parallel
from numpyro_amortized.train import (
    TrainState, make_epoch, make_evaluate, make_train_step)

seen = []
def loss_fn(params, key, batch):
    a, b = batch
    jax.debug.inspect_array_sharding(
        a, callback=lambda s: seen.append((s.shard_shape(a.shape), len(s.device_set))))
    return (a @ params["w"] - b) ** 2

rng = np.random.default_rng(0)
a = rng.normal(size=(512, 3)).astype(np.float32)
b = (a @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=512)).astype(np.float32)
opt = optax.sgd(0.2)
step = make_train_step(loss_fn, opt)
result = {"num_devices": len(jax.devices()),
          "lstsq": np.linalg.lstsq(a, b, rcond=None)[0].tolist()}
for name, devices in [("one", jax.devices()[:1]), ("all", None)]:
    parallel = data_parallel(devices)
    epoch = make_epoch(step, 64, parallel=parallel)
    evaluate = make_evaluate(loss_fn, 100, parallel=parallel)
    params = {"w": jnp.zeros(3)}
    state, data = TrainState(params, opt.init(params), jnp.zeros((), jnp.int32)), (a, b)
    if parallel is not None:
        state, data = parallel.replicate(state), parallel.replicate(data)
    seen.clear()
    losses = []
    for e in range(3):
        state, info = epoch(state, data, jax.random.key(e))
        losses += np.asarray(info.loss).tolist()
    result[name] = {
        "losses": losses,
        "w": np.asarray(state.params["w"]).tolist(),
        "val": float(evaluate(state.params, data, jax.random.key(9))),
        "shards": sorted({(shape[0], n) for shape, n in seen}),
        "param_devices": len(state.params["w"].sharding.device_set),
        "param_replicated": bool(state.params["w"].sharding.is_fully_replicated),
        "compilations": epoch._cache_size(),
    }
print(json.dumps(result))
"""


def test_sharded_epoch_equals_single_device_and_batches_are_split():
    r = run_script(EPOCH_SCRIPT)
    one, four = r["one"], r["all"]
    assert r["num_devices"] == 4
    # Same losses and weights up to floating-point reduction order.
    assert len(one["losses"]) == len(four["losses"]) == 3 * (512 // 64)
    assert maxdiff(one["losses"], four["losses"]) < 1e-5
    assert maxdiff(one["w"], four["w"]) < 1e-5
    assert abs(one["val"] - four["val"]) < 1e-5
    # SGD reached the least-squares solution (so the losses mean something).
    assert maxdiff(four["w"], r["lstsq"]) < 0.02
    # The batch inside the step is split over the 4 devices: 64 / 4 = 16 rows per
    # device in training, 100 / 4 = 25 in evaluation (whole batches on one
    # device); the parameters stay replicated; one compilation.
    assert four["shards"] == [[16, 4], [25, 4]]
    assert one["shards"] == [[64, 1], [100, 1]]
    assert four["param_devices"] == 4 and four["param_replicated"]
    assert one["compilations"] == four["compilations"] == 1


FIT_SCRIPT = """
import json
import jax, numpy as np
import numpyro_amortized as na
from numpyro_amortized import fitting, networks as nets
from numpyro_amortized.models import gaussian_means

seen = []
make_train_step = fitting.make_train_step
def recording_step(loss_fn, optimizer):
    def loss(params, key, batch):
        jax.debug.inspect_array_sharding(
            batch[1], callback=lambda s: seen.append(len(s.device_set)))
        return loss_fn(params, key, batch)
    return make_train_step(loss, optimizer)
fitting.make_train_step = recording_step

KW = {"n_obs": 10, "dim": 2}
def posterior():
    return na.AmortizedPosterior(
        gaussian_means, model_kwargs=KW,
        inference_net=nets.CouplingFlow(num_layers=2, hidden=(32, 32)),
        summary_net=nets.DeepSet(summary_dim=8, embed_dim=16, hidden=(32,),
                                 pooling=("mean",)))
sims = gaussian_means.simulate(jax.random.key(0), 1_000, **KW)
x = sims["x"][:4]
out = {}
for name, devices in [("one", jax.devices()[:1]), ("all", None)]:
    seen.clear()
    post = posterior()
    h = post.fit(jax.random.key(1), simulations=sims, max_epochs=3, patience=100,
                 progress=False, devices=devices)
    offline_seen = sorted(set(seen))
    seen.clear()
    post2 = posterior()
    h2 = post2.fit_online(jax.random.key(1), num_steps=200, steps_per_epoch=100,
                          num_validation=256, progress=False, devices=devices)
    out[name] = {
        "train": h.train_loss, "val": h.val_loss,
        "online_train": h2.train_loss, "online_val": h2.val_loss,
        "offline_batch_devices": offline_seen,
        "online_batch_devices": sorted(set(seen)),
        "compilations": [post._train_fns[0]._cache_size(),
                         post2._train_fns[0]._cache_size()],
        "draws": post.sample(jax.random.key(2), {"x": x}, 50)["mu"].tolist(),
    }
print(json.dumps(out))
"""


@pytest.mark.slow
def test_fit_on_four_devices_matches_one_device():
    r = run_script(FIT_SCRIPT)
    one, four = r["one"], r["all"]
    for k in ("train", "val", "online_train", "online_val"):
        assert len(one[k]) == len(four[k]) > 0
        assert maxdiff(one[k], four[k]) < 1e-3, k
    assert four["offline_batch_devices"] == four["online_batch_devices"] == [4]
    assert one["offline_batch_devices"] == one["online_batch_devices"] == [1]
    assert four["compilations"] == [1, 1]
    # The trained weights came back to one device: sampling works and agrees.
    assert maxdiff(one["draws"], four["draws"]) < 1e-2


MULTI_PROCESS_SCRIPT = """
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port = int(os.environ["PID"]), os.environ["PORT"]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import numpyro_amortized as na
from numpyro_amortized import networks as nets
from numpyro_amortized.models import gaussian_means

KW = {"n_obs": 10, "dim": 2}
post = na.AmortizedPosterior(
    gaussian_means, model_kwargs=KW,
    inference_net=nets.CouplingFlow(num_layers=2, hidden=(32, 32)),
    summary_net=nets.DeepSet(summary_dim=8, embed_dim=16, hidden=(32,),
                             pooling=("mean",)))
h = post.fit_online(jax.random.key(1), num_steps=200, steps_per_epoch=100,
                    num_validation=256, progress=False)
print(json.dumps({"process": jax.process_index(), "global": len(jax.devices()),
                  "local": len(jax.local_devices()),
                  "train": h.train_loss, "val": h.val_loss}))
"""

SINGLE_PROCESS_SCRIPT = MULTI_PROCESS_SCRIPT.replace(
    'jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)',
    "",
).replace('pid, port = int(os.environ["PID"]), os.environ["PORT"]', "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_as_many_devices():
    """Two processes on 127.0.0.1 with 2 CPU devices each (``jax.distributed``,
    gloo collectives) give the loss curve of one process with 4 devices."""
    port = str(free_port())
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PORT": port,
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(MULTI_PROCESS_SCRIPT)],
            env={**env, "PID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    single = run_script(SINGLE_PROCESS_SCRIPT, num_devices=4)
    assert [r["process"] for r in results] == [0, 1]
    assert all(r["global"] == 4 and r["local"] == 2 for r in results)
    assert single["global"] == 4 and single["local"] == 4
    for k in ("train", "val"):
        # Both processes hold the same (replicated) result ...
        assert results[0][k] == results[1][k]
        # ... which is the single-process result up to reduction order.
        assert maxdiff(results[0][k], single[k]) < 1e-3
