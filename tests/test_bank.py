"""Simulation banks: save/load with site metadata, refusal of foreign banks."""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_amortized as na
from numpyro_amortized.models import gaussian_means


def test_round_trip(tmp_path):
    sims = gaussian_means.simulate(jax.random.key(0), 300, n_obs=5)
    path = na.save_simulations(tmp_path / "bank", sims, gaussian_means, n_obs=5)
    assert path.name == "bank.npz"
    loaded = na.load_simulations(path, gaussian_means, n_obs=5)
    assert set(loaded) == set(sims)
    for k in sims:
        np.testing.assert_array_equal(loaded[k], sims[k])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        na.save_simulations(path, sims, gaussian_means, n_obs=5)
    na.save_simulations(path, sims, gaussian_means, overwrite=True, n_obs=5)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match=r"Pass the model arguments"):
        na.save_simulations(tmp_path / "other", sims, gaussian_means, n_obs=6)


def test_bank_from_another_model_is_refused(tmp_path):
    sims = gaussian_means.simulate(jax.random.key(0), 100, n_obs=5)
    path = na.save_simulations(tmp_path / "b.npz", sims, gaussian_means, n_obs=5)
    with pytest.raises(na.BankMismatchError, match=r"site 'x' shape: bank \[5, 4\]"):
        na.load_simulations(path, gaussian_means, n_obs=6)

    @na.amortize(observed=["x"])
    def other(n_obs=5, x=None):
        mu = numpyro.sample("mu", dist.HalfNormal(1.0).expand([4]).to_event(1))
        with numpyro.plate("obs", n_obs):
            numpyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)

    with pytest.raises(na.BankMismatchError, match="site 'mu' support"):
        na.load_simulations(path, other)


def test_not_a_bank(tmp_path):
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a numpyro_amortized simulation bank"):
        na.load_simulations(tmp_path / "plain.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable simulation bank"):
        na.load_simulations(tmp_path / "junk.npz")


def test_varying_bank_keeps_masks(tmp_path):
    sims = gaussian_means.simulate(
        jax.random.key(1),
        40,
        sample_kwargs=lambda k: {"n_obs": int(jax.random.randint(k, (), 2, 5))},
        batch_size=10,
    )
    assert "x_mask" in sims
    path = na.save_simulations(tmp_path / "v.npz", sims, gaussian_means)
    loaded = na.load_simulations(path)
    np.testing.assert_array_equal(loaded["x_mask"], sims["x_mask"])
