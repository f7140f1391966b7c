"""amortize / AmortizedModel: site metadata, targets, simulation."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer import MCMC, NUTS, Predictive

import numpyro_amortized as na
from numpyro_amortized.models import gaussian_means


@na.amortize(observed=["x"])
def mixture(n_obs=20, x=None):
    """Two-component mixture; the component index is a per-observation nuisance."""
    loc = numpyro.sample("loc", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with numpyro.plate("obs", n_obs):
        z = numpyro.sample("z", dist.Categorical(probs=jnp.array([0.3, 0.7])))
        numpyro.sample("x", dist.Normal(loc[z] + 5.0 * z, 0.1), obs=x)


@na.amortize(observed=["y"])
def nested(y=None):
    scale = numpyro.sample("scale", dist.HalfNormal(1.0))
    w = numpyro.sample("w", dist.Dirichlet(jnp.ones(3)))
    with numpyro.plate("groups", 3, dim=-2):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        with numpyro.plate("items", 5, dim=-1):
            numpyro.sample("y", dist.Normal(a + w.sum(), scale), obs=y)


def test_decorated_model_is_plain_numpyro_model():
    x = np.asarray(gaussian_means.simulate(jax.random.key(1), 1)["x"][0])
    mcmc = MCMC(
        NUTS(gaussian_means), num_warmup=100, num_samples=200, progress_bar=False
    )
    mcmc.run(jax.random.key(0), x=x)
    mean, _ = na.models.gaussian_means_posterior(jnp.asarray(x))
    np.testing.assert_allclose(mcmc.get_samples()["mu"].mean(0), mean, atol=0.1)
    pred = Predictive(gaussian_means, num_samples=7)(jax.random.key(2))
    assert pred["x"].shape == (7, 50, 4)
    tr = handlers.trace(handlers.seed(gaussian_means, 0)).get_trace(n_obs=3)
    assert tr["x"]["value"].shape == (3, 4)
    assert gaussian_means.__name__ == "gaussian_means"


def test_site_metadata():
    sites = nested.sites
    assert list(sites) == ["scale", "w", "a", "y"]
    assert sites["scale"].shape == () and sites["scale"].support is constraints.positive
    assert sites["w"].shape == (3,) and sites["w"].event_shape == (3,)
    assert sites["w"].support is constraints.simplex
    assert sites["a"].shape == (3, 1) and [p.name for p in sites["a"].plates] == [
        "groups"
    ]
    y = sites["y"]
    assert y.shape == (3, 5) and y.batch_shape == (3, 5) and y.is_observed
    assert {(p.name, p.dim, p.size) for p in y.plates} == {
        ("groups", -2, 3),
        ("items", -1, 5),
    }
    assert not sites["a"].is_observed and not sites["a"].is_discrete
    m = mixture.sites
    assert m["z"].is_discrete and m["z"].shape == (20,)
    assert m["x"].plates[0].size == 20
    assert sites["w"].describe()["support"] == "Simplex()"


def test_targets_and_nuisance():
    assert mixture.targets == ("loc",)
    assert mixture.nuisance == ("z",)
    assert nested.targets == ("scale", "w", "a")
    assert "loc" in mixture.summary() and "nuisance (discrete)" in mixture.summary()


def test_discrete_target_is_an_error():
    model = na.amortize(observed=["x"], targets=["loc", "z"])(mixture.fn)
    with pytest.raises(ValueError, match="Target 'z' is discrete"):
        _ = model.sites


def test_unknown_observed_site_is_an_error():
    model = na.amortize(observed=["y"])(mixture.fn)
    with pytest.raises(ValueError, match="Observed site 'y' is not a sample site"):
        _ = model.sites


def test_no_continuous_latent_is_an_error():
    @na.amortize(observed=["x"])
    def only_discrete(x=None):
        k = numpyro.sample("k", dist.Bernoulli(0.5))
        numpyro.sample("x", dist.Normal(k, 1.0), obs=x)

    with pytest.raises(ValueError, match="no continuous latent site"):
        _ = only_discrete.sites


def test_data_for_latent_site_is_an_error():
    @na.amortize(observed=["x"])
    def model(mu_obs=None, x=None):
        mu = numpyro.sample("mu", dist.Normal(0, 1), obs=mu_obs)
        numpyro.sample("x", dist.Normal(mu, 1), obs=x)

    with pytest.raises(
        ValueError, match="Site 'mu' is latent but the model was called"
    ):
        model.simulate(jax.random.key(0), 10, mu_obs=1.0)
    with pytest.raises(ValueError, match="do not pass data for it"):
        model.simulate(jax.random.key(0), 10, x=jnp.ones(3))


def test_failing_model_names_the_site():
    @na.amortize(observed=["x"])
    def broken(x=None):
        mu = numpyro.sample("mu", dist.Normal(0, 1).expand([3]))
        scale = numpyro.sample("scale", dist.HalfNormal(jnp.ones(2)))
        numpyro.sample("x", dist.Normal(mu, scale), obs=x)

    with pytest.raises(na.ModelTraceError, match="failed after site 'scale'") as err:
        _ = broken.sites
    assert 'numpyro.sample("x", dist.Normal(mu, scale), obs=x)' in str(err.value)
    assert "'mu' (3,)" in str(err.value) and "'scale' (2,)" in str(err.value)


def test_prior_predictive_moments():
    sims = gaussian_means.simulate(jax.random.key(0), 20_000, n_obs=10)
    mu = sims["mu"].astype(np.float64)
    x = sims["x"].astype(np.float64)
    assert mu.shape == (20_000, 4) and x.shape == (20_000, 10, 4)
    np.testing.assert_allclose(mu.mean(0), 0.0, atol=0.03)
    np.testing.assert_allclose(mu.var(0), 1.0, atol=0.04)
    np.testing.assert_allclose(x.var(axis=(0, 1)), 2.0, atol=0.08)
    cov = ((x - x.mean()) * (mu[:, None] - mu.mean())).mean(axis=(0, 1))
    np.testing.assert_allclose(cov, 1.0, atol=0.05)
    # Observations are conditionally independent given mu.
    resid = x - mu[:, None]
    c = np.corrcoef(resid[:, 0, 0], resid[:, 1, 0])[0, 1]
    assert abs(c) < 0.03


def test_mixture_with_categorical_index():
    sims = mixture.simulate(jax.random.key(3), 4_000)
    z, x, loc = sims["z"], sims["x"], sims["loc"]
    assert z.shape == (4_000, 20) and np.issubdtype(z.dtype, np.integer)
    np.testing.assert_allclose((z == 1).mean(), 0.7, atol=0.01)
    expected = np.take_along_axis(loc, z, axis=1) + 5.0 * z
    resid = x - expected
    np.testing.assert_allclose(resid.std(), 0.1, rtol=0.02)
    assert abs(resid.mean()) < 0.002


def test_jit_vmap_equals_eager_trace():
    key = jax.random.key(5)
    sims = mixture.simulate(key, 6, n_obs=4)
    for i in range(6):
        with jax.disable_jit():
            tr = handlers.trace(
                handlers.seed(mixture.fn, jax.random.fold_in(key, i))
            ).get_trace(n_obs=4)
        for name in ("loc", "z", "x"):
            np.testing.assert_allclose(sims[name][i], tr[name]["value"], atol=1e-6)


def test_chunked_equals_unchunked_and_no_recompile():
    key = jax.random.key(7)
    whole = gaussian_means.simulate(key, 1_000, n_obs=5, batch_size=1_000)
    chunked = gaussian_means.simulate(key, 1_000, n_obs=5, batch_size=128)
    for k in whole:
        np.testing.assert_array_equal(whole[k], chunked[k])
    cache = gaussian_means._simulators
    before = cache.num_traces
    again = gaussian_means.simulate(jax.random.key(8), 1_000, n_obs=5, batch_size=128)
    assert cache.num_traces == before  # same shapes: no new compilation
    assert not np.array_equal(again["mu"], chunked["mu"])
    gaussian_means.simulate(key, 10, n_obs=6, batch_size=128)
    assert cache.num_traces == before + 1  # new static argument: one compilation


def test_array_arguments_are_inputs_not_recompiles():
    @na.amortize(observed=["x"])
    def regression(xs, y=None, x=None):
        w = numpyro.sample("w", dist.Normal(0, 1))
        numpyro.sample("x", dist.Normal(w * xs, 0.01).to_event(1), obs=x)

    xs1, xs2 = jnp.linspace(0, 1, 8), jnp.linspace(1, 2, 8)
    a = regression.simulate(jax.random.key(0), 50, xs1)
    n = regression._simulators.num_traces
    b = regression.simulate(jax.random.key(0), 50, xs2)
    assert regression._simulators.num_traces == n
    np.testing.assert_allclose(a["x"], a["w"][:, None] * xs1, atol=0.05)
    np.testing.assert_allclose(b["x"], b["w"][:, None] * xs2, atol=0.05)


def test_nan_simulations_are_dropped_and_counted():
    @na.amortize(observed=["x"])
    def fragile(x=None):
        theta = numpyro.sample("theta", dist.Normal(1.0, 1.0))
        numpyro.sample("x", dist.Normal(jnp.sqrt(theta), 0.1), obs=x)

    key = jax.random.key(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", na.InvalidSimulationWarning)
        raw = fragile.simulate(key, 2_000, drop_invalid=False)
    expected_bad = int((~np.isfinite(raw["x"])).sum())
    assert expected_bad == int((raw["theta"] < 0).sum()) > 0
    with pytest.warns(na.InvalidSimulationWarning, match=f"{expected_bad} of 2000"):
        sims, info = fragile.simulate(key, 2_000, return_info=True)
    assert info.num_invalid == expected_bad
    assert info.num_valid == 2_000 - expected_bad == len(sims["x"])
    assert info.invalid_by_site == {"x": expected_bad}
    assert np.isfinite(sims["x"]).all() and (sims["theta"] >= 0).all()
    np.testing.assert_array_equal(sims["theta"], raw["theta"][raw["theta"] >= 0])


def test_mostly_failing_simulator_is_an_error():
    @na.amortize(observed=["x"])
    def broken(x=None):
        theta = numpyro.sample("theta", dist.Normal(-1.0, 0.5))
        numpyro.sample("x", dist.Normal(jnp.log(theta), 1.0), obs=x)

    with pytest.raises(na.SimulationError, match="More than half"):
        broken.simulate(jax.random.key(0), 500)


def test_arguments_drawn_per_batch_pad_and_mask():
    def draw(key):
        return {"n_obs": int(jax.random.choice(key, jnp.array([3, 6, 9])))}

    sims, info = gaussian_means.simulate(
        jax.random.key(4), 100, sample_kwargs=draw, batch_size=10, return_info=True
    )
    x, mask = sims["x"], sims["x_mask"]
    n = mask.sum(axis=1)
    assert x.shape[0] == 100 and mask.shape == (100, x.shape[1])
    assert set(n.tolist()) <= {3, 6, 9} and len(set(n.tolist())) > 1
    for b in range(10):  # one n_obs per batch
        assert len(set(n[b * 10 : (b + 1) * 10].tolist())) == 1
    assert (x[~mask] == 0).all() and (x[mask] != 0).all()
    assert mask[np.arange(100), n - 1].all() and not mask[:, 0].sum() < 100
    assert "mu_mask" not in sims and info.num_valid == 100
    # Per-batch simulations equal fixed-argument ones with the same indices.
    fixed = gaussian_means.simulate(jax.random.key(4), 10, n_obs=int(n[0]))
    np.testing.assert_array_equal(fixed["mu"], sims["mu"][:10])


def test_failure_inside_sample_statement_names_the_site():
    @na.amortize(observed=["x"])
    def bad_plate(x=None):
        mu = numpyro.sample("mu", dist.Normal(0, 1).expand([3]).to_event(1))
        with numpyro.plate("obs", 4):
            numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    with pytest.raises(na.ModelTraceError, match="while sampling site 'x'"):
        _ = bad_plate.sites
