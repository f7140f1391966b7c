"""AmortizedPosterior: accuracy on conjugate models, supports, batching, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy import stats

import numpyro_amortized as na
from numpyro_amortized import networks as nets
from numpyro_amortized.models import gaussian_means, gaussian_means_posterior

KW = {"n_obs": 10, "dim": 2}


def tiny(**kwargs):
    """Small networks for fast tests (affine coupling compiles fastest; the spline
    flow is exercised in test_draws_stay_in_support_and_densities_are_finite)."""
    return {
        "inference_net": nets.CouplingFlow(num_layers=2, hidden=(32, 32)),
        "summary_net": nets.DeepSet(
            summary_dim=8, embed_dim=16, hidden=(32,), pooling=("mean",)
        ),
        **kwargs,
    }


@pytest.fixture(scope="module")
def trained():
    post = na.AmortizedPosterior(gaussian_means, model_kwargs=KW, **tiny())
    post.fit_online(
        jax.random.key(1),
        num_steps=9_000,
        steps_per_epoch=500,
        learning_rate=1e-3,
        progress=False,
    )
    return post


@pytest.fixture(scope="module")
def held_out():
    return gaussian_means.simulate(jax.random.key(2), 8, **KW)["x"]


def test_conjugate_posterior_mean_and_sd(trained, held_out):
    mean, sd = gaussian_means_posterior(jnp.asarray(held_out))
    draws = trained.sample(jax.random.key(3), {"x": held_out}, 4_000)["mu"]
    assert draws.shape == (8, 4_000, 2)
    mean_err = np.abs(draws.mean(1) - mean) / sd
    sd_err = np.abs(draws.std(1) - sd) / sd
    # Within 10% of the analytic posterior sd, for every dataset and dimension.
    print("max |mean err| / sd:", mean_err.max(), " max |sd err| / sd:", sd_err.max())
    assert mean_err.max() < 0.1 and sd_err.max() < 0.1


def test_log_prob_matches_analytic_density(trained, held_out):
    mean, sd = gaussian_means_posterior(jnp.asarray(held_out))
    draws = trained.sample(jax.random.key(4), {"x": held_out}, 500)["mu"]
    lp = trained.log_prob({"mu": draws}, {"x": held_out})
    ref = stats.norm(mean[:, None], sd[:, None]).logpdf(draws).sum(-1)
    assert lp.shape == (8, 500)
    assert np.median(np.abs(lp - ref)) < 0.25
    # One dataset, one point.
    one = trained.log_prob({"mu": mean[0]}, {"x": held_out[0]})
    assert one.shape == () and abs(float(one) - ref.max(axis=1)[0]) < 0.6


def test_batched_sample_equals_per_dataset_sample(trained, held_out):
    key = jax.random.key(5)
    batched = trained.sample(key, {"x": held_out[:3]}, 100)["mu"]
    keys = jax.random.split(key, 3)
    for b in range(3):
        single = trained.sample(keys[b], {"x": held_out[b]}, 100)["mu"]
        np.testing.assert_allclose(single, batched[b], atol=1e-5)


def test_summaries_and_inference_data(trained, held_out):
    s = trained.summarize({"x": held_out})
    assert s.shape == (8, 8)
    idata = trained.to_inference_data(jax.random.key(6), {"x": held_out[:3]}, 50)
    assert set(idata.groups()) == {"posterior", "observed_data"}
    assert idata.posterior["mu"].dims == ("chain", "draw", "dataset", "mu_dim_0")
    assert idata.posterior["mu"].shape == (1, 50, 3, 2)
    assert idata.observed_data["x"].dims == ("dataset", "obs", "x_dim_1")
    one = trained.to_inference_data(jax.random.key(6), {"x": held_out[0]}, 50)
    assert one.posterior["mu"].dims == ("chain", "draw", "mu_dim_0")


def test_any_number_of_observations_at_inference(trained):
    x = gaussian_means.simulate(jax.random.key(7), 1, n_obs=25, dim=2)["x"][0]
    draws = trained.sample(jax.random.key(8), {"x": x}, 200)["mu"]
    assert draws.shape == (200, 2) and np.isfinite(draws).all()


@na.amortize(observed=["y"])
def constrained(y=None):
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    p = numpyro.sample("p", dist.Beta(2.0, 2.0))
    w = numpyro.sample("w", dist.Dirichlet(jnp.ones(3)))
    lo = numpyro.sample("lo", dist.Uniform(-1.0, 2.0))
    loc = jnp.stack([lo, p, w[0], w[1]])
    numpyro.sample("y", dist.Normal(loc, sigma).to_event(1), obs=y)


def test_draws_stay_in_support_and_densities_are_finite():
    post = na.AmortizedPosterior(
        constrained, inference_net=nets.NeuralSplineFlow(num_layers=2, hidden=(16,))
    )
    post.fit(jax.random.key(0), num_simulations=2_000, max_epochs=3, progress=False)
    y = constrained.simulate(jax.random.key(1), 20)["y"]
    draws = post.sample(jax.random.key(2), {"y": y}, 500)
    assert (draws["sigma"] > 0).all()
    assert ((draws["p"] > 0) & (draws["p"] < 1)).all()
    assert ((draws["lo"] > -1) & (draws["lo"] < 2)).all()
    assert (draws["w"] > 0).all() and np.allclose(draws["w"].sum(-1), 1, atol=1e-5)
    lp = post.log_prob(draws, {"y": y})
    assert lp.shape == (20, 500) and np.isfinite(lp).all()
    assert post.summarize({"y": y}).shape == (20, 4)  # flat data: no summary net


def test_one_compilation_for_all_epochs():
    post = na.AmortizedPosterior(gaussian_means, model_kwargs=KW, **tiny())
    sims = gaussian_means.simulate(jax.random.key(0), 1_000, **KW)
    hist = post.fit(
        jax.random.key(1), simulations=sims, max_epochs=4, patience=100, progress=False
    )
    assert hist.num_epochs == 4 and len(hist.val_loss) == 4
    # default batch: 900 training rows -> 16, so 56 steps per epoch
    assert hist.num_simulations == 1_000 and hist.num_steps == 4 * (900 // 16)
    epoch_fn, evaluate = post._train_fns
    assert epoch_fn._cache_size() == 1 and evaluate._cache_size() == 1
    assert hist.train_loss[-1] < hist.train_loss[0]


def test_early_stopping_restores_best_weights():
    post = na.AmortizedPosterior(gaussian_means, model_kwargs=KW, **tiny())
    sims = gaussian_means.simulate(jax.random.key(0), 300, **KW)
    hist = post.fit(
        jax.random.key(1),
        simulations=sims,
        max_epochs=200,
        patience=3,
        learning_rate=3e-3,
        batch_size=32,
        progress=False,
    )
    assert hist.stopped_early and hist.num_epochs < 200
    assert hist.best_epoch == int(np.argmin(hist.val_loss))
    assert hist.num_epochs == hist.best_epoch + 1 + 3
    # The kept weights are the best epoch's: re-evaluating gives its loss.
    _, evaluate = post._train_fns
    got = float(evaluate(post._fitted.params, post._validation, jax.random.key(0)))
    assert got == pytest.approx(min(hist.val_loss), abs=1e-4)


def test_invalid_simulations_are_dropped_and_reported():
    @na.amortize(observed=["x"])
    def fragile(x=None):
        theta = numpyro.sample("theta", dist.Normal(1.0, 1.0))
        numpyro.sample("x", dist.Normal(jnp.sqrt(theta), 0.1).expand([3]), obs=x)

    post = na.AmortizedPosterior(
        fragile, inference_net=nets.CouplingFlow(num_layers=1, hidden=(8,))
    )
    with pytest.warns(na.InvalidSimulationWarning):
        hist = post.fit(
            jax.random.key(0), num_simulations=1_000, max_epochs=1, progress=False
        )
    assert 100 < hist.num_invalid < 250  # P(theta < 0) = 0.159
    assert hist.num_simulations == 1_000 - hist.num_invalid


def test_varying_number_of_observations():
    def draw(key):
        return {"n_obs": int(jax.random.choice(key, jnp.array([2, 10, 30])))}

    post = na.AmortizedPosterior(gaussian_means, model_kwargs={"dim": 1}, **tiny())
    post.fit(
        jax.random.key(0),
        num_simulations=6_000,
        sample_kwargs=draw,
        max_epochs=20,
        learning_rate=1e-3,
        progress=False,
    )
    for n in (2, 30):
        x = gaussian_means.simulate(jax.random.key(n), 6, n_obs=n, dim=1)["x"]
        _, sd = gaussian_means_posterior(jnp.asarray(x))
        draws = post.sample(jax.random.key(1), {"x": x}, 2_000)["mu"]
        np.testing.assert_allclose(np.median(draws.std(1)), sd[0, 0], rtol=0.2)
    # Padding + mask gives the same posterior as the unpadded dataset.
    x = gaussian_means.simulate(jax.random.key(9), 1, n_obs=5, dim=1)["x"][0]
    padded = np.concatenate([x, np.zeros((7, 1), np.float32)])
    mask = np.arange(12) < 5
    a = post.sample(jax.random.key(3), {"x": x}, 300)["mu"]
    b = post.sample(jax.random.key(3), {"x": padded, "x_mask": mask}, 300)["mu"]
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_bad_input_errors(trained, held_out):
    fresh = na.AmortizedPosterior(gaussian_means)
    with pytest.raises(na.NotFittedError, match="call posterior.fit"):
        fresh.sample(jax.random.key(0), {"x": held_out[0]}, 10)
    with pytest.raises(ValueError, match=r"Missing observed site\(s\) \['x'\]"):
        trained.sample(jax.random.key(0), {"y": held_out[0]}, 10)
    with pytest.raises(ValueError, match=r"'x' has shape \(10, 3\); .* \(10, 2\)"):
        trained.sample(jax.random.key(0), {"x": np.zeros((10, 3))}, 10)
    bad = np.array(held_out[0])
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="'x' contains 1 NaN/inf"):
        trained.sample(jax.random.key(0), {"x": bad}, 10)
    with pytest.raises(ValueError, match="exactly one of"):
        fresh.fit(jax.random.key(0))
    with pytest.raises(TypeError, match="@na.amortize"):
        na.AmortizedPosterior(gaussian_means.fn)
    with pytest.raises(ValueError, match="Target 'nope' is not a sample site"):
        na.AmortizedPosterior(gaussian_means, targets=["nope"]).fit(
            jax.random.key(0), num_simulations=10
        )


def test_history_plot(trained, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    ax = trained.history.plot()
    assert len(ax.lines) >= 2
    ax.figure.savefig(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
