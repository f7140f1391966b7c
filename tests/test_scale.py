"""Bounded memory: disk banks, streamed training, chunked sampling; float64."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import numpyro_amortized as na
from numpyro_amortized import networks as nets
from numpyro_amortized.models import gaussian_means, gaussian_means_posterior
from numpyro_amortized.streaming import chunk_plan

KW = {"n_obs": 10, "dim": 2}
ROOT = Path(__file__).resolve().parents[1]


def tiny():
    return {
        "inference_net": nets.CouplingFlow(num_layers=2, hidden=(32, 32)),
        "summary_net": nets.DeepSet(
            summary_dim=8, embed_dim=16, hidden=(32,), pooling=("mean",)
        ),
    }


@pytest.mark.parametrize(("num_rows", "chunk"), [(10, 3), (1350, 448), (7, 7)])
def test_chunk_plan_visits_consecutive_rows_at_most_once(num_rows, chunk):
    plans = [chunk_plan(jax.random.key(s), num_rows, chunk) for s in range(20)]
    for starts in plans:
        assert len(starts) == num_rows // chunk
        rows = ((starts[:, None] + np.arange(chunk)) % num_rows).ravel()
        assert len(np.unique(rows)) == len(rows)  # no row twice in an epoch
    # The offsets and orders change between epochs (so every row gets used).
    if num_rows % chunk:
        assert len({tuple(p) for p in plans}) > 1
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_plan(jax.random.key(0), 5, 6)


def test_disk_bank_rows_are_the_chunked_simulations(tmp_path):
    bank = na.simulate_to_disk(
        jax.random.key(0), gaussian_means, 600, tmp_path / "b", chunk_size=256,
        progress=False, **KW,
    )  # fmt: skip
    assert len(bank) == 600 and bank.shapes == {"mu": (2,), "x": (10, 2)}
    assert bank.nbytes == 600 * (2 + 20) * 4
    # Chunk c is model.simulate(fold_in(key, c), 256): 256 + 256 + 88 rows.
    for c, (lo, hi) in enumerate([(0, 256), (256, 512), (512, 600)]):
        key = jax.random.fold_in(jax.random.key(0), c)
        ref = gaussian_means.simulate(key, 256, **KW)
        got = bank.read(lo, hi)
        np.testing.assert_array_equal(got["x"], ref["x"][: hi - lo])
        np.testing.assert_array_equal(got["mu"], ref["mu"][: hi - lo])
    # Plain .npy files; wrapped reads; reopening checks the model.
    whole = np.load(tmp_path / "b" / "x.npy", mmap_mode="r")
    wrapped = bank.read_wrapped(590, 20, 600)["x"]
    np.testing.assert_array_equal(wrapped, np.concatenate([whole[590:], whole[:10]]))
    na.DiskBank.open(tmp_path / "b", gaussian_means, **KW)
    with pytest.raises(na.BankMismatchError, match="shape"):
        na.DiskBank.open(tmp_path / "b", gaussian_means, n_obs=5, dim=2)
    with pytest.raises(FileExistsError):
        na.simulate_to_disk(jax.random.key(0), gaussian_means, 5, tmp_path / "b")
    with pytest.raises(ValueError, match="not a disk bank"):
        na.DiskBank.open(tmp_path)


@pytest.fixture(scope="module")
def bank_and_sims(tmp_path_factory):
    sims = gaussian_means.simulate(jax.random.key(0), 1_500, **KW)
    sims["x"][7, 3, 1] = np.nan  # one broken simulation in the training rows
    path = tmp_path_factory.mktemp("bank") / "bank"
    return na.DiskBank.write(path, sims, gaussian_means, **KW), sims


@pytest.fixture(scope="module")
def streamed(bank_and_sims):
    bank, _ = bank_and_sims
    post = na.AmortizedPosterior(gaussian_means, model_kwargs=KW, **tiny())
    fit = dict(max_epochs=6, patience=100, batch_size=64, learning_rate=3e-3)
    # 1350 training rows in chunks of 448: 3 chunks per epoch, wrapping around.
    hist = post.fit(
        jax.random.key(2), simulations=bank, chunk_size=450, progress=False, **fit
    )
    return post, hist, fit


def held_out_nll(post, test):
    return -float(post.log_prob({"mu": test["mu"]}, {"x": test["x"]}).mean())


def exact_nll(test):
    mean, sd = gaussian_means_posterior(jnp.asarray(test["x"]))
    return -stats.norm(mean, sd).logpdf(test["mu"]).sum(-1).mean()


def test_streamed_training_learns_the_posterior(streamed):
    post, hist, _ = streamed
    assert hist.num_epochs == 6 and hist.num_steps == 6 * 3 * (448 // 64)
    assert hist.num_simulations == 1_500 and hist.num_invalid == 1
    assert np.isfinite(hist.train_loss).all() and np.isfinite(hist.val_loss).all()
    assert post._train_fns[0]._cache_size() == 1  # one program for all chunks
    # The held-out density of the true parameters is close to that of the exact
    # posterior (the prior's is ~2.8 nats worse).
    test = gaussian_means.simulate(jax.random.key(9), 500, **KW)
    assert held_out_nll(post, test) - exact_nll(test) < 0.2


def test_disk_bank_refuses_rounds_and_sample_kwargs(bank_and_sims):
    bank, _ = bank_and_sims
    post = na.AmortizedPosterior(gaussian_means, model_kwargs=KW, **tiny())
    for bad in ({"num_rounds": 2}, {"sample_kwargs": lambda k: {"n_obs": 5}}):
        with pytest.raises(ValueError, match="num_rounds and sample_kwargs"):
            post.fit(jax.random.key(0), simulations=bank, progress=False, **bad)


@pytest.mark.slow
def test_streamed_training_matches_in_memory_training(bank_and_sims, streamed):
    _, sims = bank_and_sims
    post, _, fit = streamed
    memory = na.AmortizedPosterior(gaussian_means, model_kwargs=KW, **tiny())
    mem_hist = memory.fit(jax.random.key(2), simulations=sims, progress=False, **fit)
    assert mem_hist.num_invalid == 1
    # Same data, same budget: the same held-out density of the true parameters
    # (the batches differ, so the loss curves are not identical).
    test = gaussian_means.simulate(jax.random.key(9), 500, **KW)
    nll_stream, nll_memory = held_out_nll(post, test), held_out_nll(memory, test)
    print(f"held-out NLL: exact {exact_nll(test):.3f} stream {nll_stream:.3f} "
          f"memory {nll_memory:.3f}")  # fmt: skip
    assert abs(nll_stream - nll_memory) < 0.15


def test_chunked_sample_equals_unchunked(streamed, bank_and_sims):
    post = streamed[0]
    x = bank_and_sims[1]["x"][20:50].reshape(3, 10, 10, 2)  # batch axes (3, 10)
    key = jax.random.key(5)
    whole = post.sample(key, {"x": x}, 40)["mu"]
    # 30 datasets in chunks of 7: four full chunks and a padded one.
    chunked = post.sample(key, {"x": x}, 40, chunk_size=7, progress=False)
    assert isinstance(chunked["mu"], np.ndarray)
    assert chunked["mu"].shape == whole.shape == (3, 10, 40, 2)
    np.testing.assert_allclose(chunked["mu"], whole, atol=1e-5)
    # Other keys give other draws (the comparison above is not vacuous).
    other = post.sample(jax.random.key(6), {"x": x}, 40, chunk_size=7)["mu"]
    assert np.abs(other - whole).max() > 0.1
    with pytest.raises(ValueError, match="batch of datasets"):
        post.sample(key, {"x": x[0, 0]}, 40, chunk_size=7)


X64_SCRIPT = """
import jax
jax.config.update("jax_enable_x64", True)
import tempfile
import numpy as np
import numpyro_amortized as na
from numpyro_amortized import networks as nets
from numpyro_amortized.models import gaussian_means
KW = {"n_obs": 10, "dim": 2}
net = dict(inference_net=nets.CouplingFlow(num_layers=2, hidden=(32, 32)),
           summary_net=nets.DeepSet(summary_dim=8, embed_dim=16, hidden=(32,)))
sims = gaussian_means.simulate(jax.random.key(0), 600, **KW)
assert sims["x"].dtype == np.float64
post = na.AmortizedPosterior(gaussian_means, model_kwargs=KW, **net)
h = post.fit(jax.random.key(1), simulations=sims, max_epochs=2, progress=False)
h2 = post.fit_online(jax.random.key(1), num_steps=20, steps_per_epoch=10,
                     num_validation=128, progress=False)
bank = na.simulate_to_disk(jax.random.key(0), gaussian_means, 600,
                           tempfile.mkdtemp() + "/b", progress=False, **KW)
h3 = post.fit(jax.random.key(1), simulations=bank, max_epochs=2, progress=False)
x = sims["x"][:3]
draws = post.sample(jax.random.key(2), {"x": x}, 10)
chunked = post.sample(jax.random.key(2), {"x": x}, 10, chunk_size=2)
lp = post.log_prob(draws, {"x": x})
assert draws["mu"].dtype == lp.dtype == np.float64, (draws["mu"].dtype, lp.dtype)
assert bank.dtypes["x"] == np.float64
assert np.isfinite(h.train_loss + h2.train_loss + h3.train_loss).all()
assert np.isfinite(lp).all()
np.testing.assert_allclose(chunked["mu"], draws["mu"], atol=1e-5)
print("ok")
"""


@pytest.mark.slow
def test_everything_runs_under_x64():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(X64_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().endswith("ok")
