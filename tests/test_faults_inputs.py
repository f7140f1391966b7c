"""Bad inputs get clear errors, and model shapes answered wrongly are refused.

Issue 17: model structure the amortizer does not handle yet (targets inside the
plate a pooling summary pools over; varying model arguments the networks never
see), bad fit options, malformed ``fit(simulations=...)`` dicts, improper priors
and plate sizes drawn from a latent site.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_amortized as na
from numpyro_amortized import networks as nets
from numpyro_amortized.models import gaussian_means

KW = {"n_obs": 5, "dim": 1}
FLOW = nets.CouplingFlow(num_layers=1, hidden=(8,))
SET = nets.DeepSet(summary_dim=4, embed_dim=8, hidden=(8,), pooling=("mean",))


def tiny_posterior(model=gaussian_means, **kwargs):
    kwargs.setdefault("inference_net", FLOW)
    return na.AmortizedPosterior(model, **kwargs)


@na.amortize(observed=["x"])
def scalar_mean(x=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("x", dist.Normal(mu, 1.0).expand([2]).to_event(1), obs=x)


@pytest.fixture(scope="module")
def flat_sims():
    return scalar_mean.simulate(jax.random.key(0), 200)


def fit_flat(bank, **kwargs):
    post = tiny_posterior(scalar_mean)
    return post.fit(jax.random.key(1), simulations=bank, progress=False, **kwargs)


@pytest.fixture(scope="module")
def sims():
    return gaussian_means.simulate(jax.random.key(0), 200, **KW)


def fit_bank(bank, **kwargs):
    post = tiny_posterior(summary_net=SET, model_kwargs=KW)
    return post.fit(jax.random.key(1), simulations=bank, progress=False, **kwargs)


def fit_varying(post, draw, seed=0):
    """One tiny fit with model arguments drawn per batch by ``draw``."""
    return post.fit(
        jax.random.key(seed),
        num_simulations=64,
        sample_kwargs=draw,
        max_epochs=1,
        progress=False,
    )


# ------------------------------------------------- structure answered wrongly
@na.amortize(observed=["y"])
def eight_schools(sigma=1.0, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(5.0))
    with numpyro.plate("school", 8):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


@na.amortize(observed=["y"])
def eight_schools_vector(sigma=1.0, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(5.0))
    theta = numpyro.sample("theta", dist.Normal(mu, tau).expand([8]).to_event(1))
    numpyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


@pytest.mark.parametrize(
    "summary", [None, SET, nets.SetTransformer(summary_dim=4)], ids=repr
)
def test_target_in_pooled_plate_is_refused(summary):
    post = tiny_posterior(eight_schools, summary_net=summary)
    with pytest.raises(ValueError, match=r"Target 'theta'.*plate 'school'") as e:
        post.fit(jax.random.key(0), num_simulations=64, max_epochs=1, progress=False)
    msg = str(e.value)
    assert "same posterior" in msg and ".to_event(1)" in msg and "targets=" in msg


def test_target_in_pooled_plate_is_refused_by_fit_online_and_fit_elbo():
    post = tiny_posterior(eight_schools)
    with pytest.raises(ValueError, match="Target 'theta'"):
        post.fit_online(jax.random.key(0), num_steps=10, progress=False)
    with pytest.raises(ValueError, match="Target 'theta'"):
        post.fit_elbo(jax.random.key(0), num_steps=10, progress=False)


@pytest.mark.slow
def test_what_works_instead_of_a_target_in_the_plate():
    """Guard (passes before the fix too): the alternatives the error names."""
    vector = tiny_posterior(eight_schools_vector)
    vector.fit(jax.random.key(0), num_simulations=200, max_epochs=1, progress=False)
    assert vector.layout.kind == "flat"
    globals_only = tiny_posterior(eight_schools, targets=["mu", "tau"])
    globals_only.fit(
        jax.random.key(0), num_simulations=200, max_epochs=1, progress=False
    )
    assert globals_only.space.names == ("mu", "tau")


def test_flat_summary_on_set_data_is_a_clear_error():
    post = tiny_posterior(summary_net=nets.MLP(summary_dim=4), model_kwargs=KW)
    with pytest.raises(ValueError, match=r"MLP.*set of observations.*plate 'obs'"):
        post.fit(jax.random.key(0), num_simulations=64, max_epochs=1, progress=False)


@na.amortize(observed=["y"])
def regression(X=None, y=None):
    beta = numpyro.sample("beta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ beta, 0.1), obs=y)


def test_varying_argument_the_networks_do_not_see_is_refused():
    post = tiny_posterior(regression, model_kwargs={"X": np.ones((10, 2))})

    def draw_design(key):
        return {"X": np.asarray(jax.random.normal(key, (10, 2)))}

    with pytest.raises(ValueError, match=r"\['X'\] vary.*never see") as e:
        fit_varying(post, draw_design)
    assert "observed=[..., 'X']" in str(e.value) and "n_obs" in str(e.value)


@pytest.mark.parametrize(
    "seed",
    [
        1,
        pytest.param(2, marks=pytest.mark.slow),
        pytest.param(3, marks=pytest.mark.slow),
    ],
)  # ~15 s each: 16 probe traces of new shapes
def test_varying_design_whose_length_sets_the_plate_is_refused(seed):
    # X sets the plate size too, so X's length is seen; X's values are not. With
    # sizes from a wide range no two probes share a size: still refused, whatever
    # the key (before this rule, these keys let it through).
    post = tiny_posterior(regression, model_kwargs={"X": np.ones((10, 2))})

    def draw_design(key):
        k1, k2 = jax.random.split(key)
        n = int(jax.random.randint(k1, (), 5, 500))
        return {"X": np.asarray(jax.random.normal(k2, (n, 2)))}

    with pytest.raises(ValueError, match=r"\['X'\] vary"):
        fit_varying(post, draw_design, seed=seed)


def test_first_fit_that_diverges_leaves_the_posterior_unfitted(flat_sims):
    # No untrained network is left behind to sample from after the error.
    post = tiny_posterior(scalar_mean)
    with pytest.raises(RuntimeError, match="Training diverged"):
        post.fit(
            jax.random.key(1),
            simulations=flat_sims,
            learning_rate=1e30,
            validation_fraction=0,
            max_epochs=2,
            progress=False,
        )
    assert not post.is_fitted and post.history is None
    with pytest.raises(na.NotFittedError):
        post.sample(jax.random.key(0), {"x": np.zeros(2)}, 10)


def test_fit_accepts_patience_none(flat_sims):
    fit_flat(flat_sims, max_epochs=1, patience=None, validation_fraction=0)


@na.amortize(observed=["x"])
def noisy_means(n_obs=10, noise=1.0, x=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("obs", n_obs):
        numpyro.sample("x", dist.Normal(mu, noise), obs=x)


def test_varying_scalar_beside_a_varying_size_is_refused():
    def draw(key):
        k1, k2 = jax.random.split(key)
        n = int(jax.random.choice(k1, jnp.array([3, 6])))
        return {"n_obs": n, "noise": float(jax.random.uniform(k2, (), minval=0.1))}

    post = tiny_posterior(noisy_means, summary_net=SET)
    with pytest.raises(ValueError, match=r"\['noise'\] vary"):
        fit_varying(post, draw)


def test_varying_scalar_is_refused_when_every_size_differs():
    """No two probes share n_obs, so only changing ``noise`` alone reveals that
    the networks do not see it (checked on shapes, without tracing a model)."""
    from numpyro_amortized.varying import check_arguments_seen

    def draw(key):
        k1, k2 = jax.random.split(key)
        n = int(jax.random.randint(k1, (), 2, 10**9))
        return {"n_obs": n, "noise": float(jax.random.uniform(k2, ()))}

    def shapes(kw):
        return ((kw["n_obs"],),)

    with pytest.raises(ValueError, match=r"\['noise'\] vary"):
        check_arguments_seen(jax.random.key(0), draw, shapes, observed=["x"])
    seen_only = lambda key: {"n_obs": draw(key)["n_obs"]}  # noqa: E731
    check_arguments_seen(jax.random.key(0), seen_only, shapes, observed=["x"])


@pytest.mark.slow
def test_varying_size_alone_still_trains():
    """Guard (passes before the fix too): n_obs is seen through the mask (also
    covered by test_posterior.py::test_varying_number_of_observations)."""

    def draw(key):
        return {"n_obs": int(jax.random.choice(key, jnp.array([3, 6])))}

    post = tiny_posterior(summary_net=SET, model_kwargs={"dim": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        post.fit(
            jax.random.key(0),
            num_simulations=600,
            sample_kwargs=draw,
            max_epochs=1,
            progress=False,
        )
    assert post.is_fitted


def test_unseen_arguments_rule():
    from numpyro_amortized.varying import unseen_arguments

    draws = [{"n": 3, "s": 1.0}, {"n": 5, "s": 2.0}, {"n": 3, "s": 1.0}]
    assert unseen_arguments(draws, [(3,), (5,), (3,)]) == []
    draws[2] = {"n": 3, "s": 7.0}
    assert unseen_arguments(draws, [(3,), (5,), (3,)]) == ["s"]


# ------------------------------------------------------------- fit options
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, r"batch_size must be >= 1; got 0"),
        ({"batch_size": -3}, r"batch_size must be >= 1; got -3"),
        ({"validation_fraction": 1.0}, r"validation_fraction must lie in \[0, 1\)"),
        ({"validation_fraction": -0.1}, r"validation_fraction must lie in \[0, 1\)"),
        ({"validation_fraction": float("nan")}, r"validation_fraction must lie"),
        ({"learning_rate": float("nan")}, r"learning_rate must be a finite number"),
        ({"learning_rate": -1e-3}, r"learning_rate must be a finite number > 0"),
        ({"learning_rate": 0.0}, r"learning_rate must be a finite number > 0"),
        ({"max_epochs": 0}, r"max_epochs must be >= 1; got 0"),
        ({"patience": 0}, r"patience must be >= 1; got 0"),
        ({"num_rounds": 0}, r"num_rounds must be >= 1; got 0"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_fit_option_is_a_clear_error(sims, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_bank(sims, **kwargs)


def test_fit_num_simulations_zero_names_fit():
    post = tiny_posterior(summary_net=SET, model_kwargs=KW)
    with pytest.raises(ValueError, match=r"fit: num_simulations must be >= 1"):
        post.fit(jax.random.key(0), num_simulations=0, progress=False)


@pytest.mark.parametrize("method", ["fit_online", "fit_elbo"])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_steps": 0}, r"num_steps must be >= 1; got 0"),
        ({"num_steps": -5}, r"num_steps must be >= 1; got -5"),
        ({"batch_size": 0}, r"batch_size must be >= 1; got 0"),
        ({"steps_per_epoch": 0}, r"steps_per_epoch must be >= 1; got 0"),
        ({"learning_rate": float("nan")}, r"learning_rate must be a finite"),
        ({"num_validation": 0}, r"num_validation must be >= 1; got 0"),
        ({"patience": 0}, r"patience must be >= 1; got 0"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_online_option_is_a_clear_error(method, kwargs, match):
    post = tiny_posterior(summary_net=SET, model_kwargs=KW)
    with pytest.raises(ValueError, match=f"{method}: {match}"):
        getattr(post, method)(jax.random.key(0), progress=False, **kwargs)


def test_small_validation_set_warns(flat_sims):
    with pytest.warns(UserWarning, match=r"validation set has only 20 row"):
        fit_flat(flat_sims, max_epochs=1)


def test_small_validation_set_of_a_disk_bank_warns(flat_sims, tmp_path):
    # The streamed path (a DiskBank) splits its bank too: the same warning.
    bank = na.DiskBank.write(tmp_path / "bank", flat_sims, scalar_mean)
    with pytest.warns(UserWarning, match=r"validation set has only 20 row"):
        fit_flat(bank, max_epochs=1)


def test_batch_size_larger_than_training_rows_warns(flat_sims):
    with pytest.warns(UserWarning, match=r"batch_size=1000 is larger than the 200"):
        fit_flat(flat_sims, max_epochs=1, batch_size=1000, validation_fraction=0)


def test_no_training_rows_left_is_an_error(sims):
    small = {k: v[:3] for k, v in sims.items()}
    with pytest.raises(ValueError, match="no training rows left"):
        fit_bank(small, max_epochs=1, validation_fraction=0.9)


# -------------------------------------------------- malformed simulations
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda s: {k: v[:0] for k, v in s.items()}, r"has 0 simulations"),
        (lambda s: {"x": s["x"]}, r"lacks site\(s\) \['mu'\].*'mu': \(1,\)"),
        (
            lambda s: {"mu": s["mu"][:100], "x": s["x"]},
            r"different numbers of simulations.*'mu': 100, 'x': 200",
        ),
        (
            lambda s: {"mu": s["mu"], "x": s["x"][..., None]},
            r"site 'x' has shape \(5, 1, 1\).*gives \(5, 1\)",
        ),
        (
            lambda s: {"mu": s["mu"][:, None], "x": s["x"]},
            r"site 'mu' has shape \(1, 1\).*gives \(1,\)",
        ),
        (lambda s: {"mu": s["mu"], "x": s["x"] * np.nan}, r"'x' is NaN/inf in every"),
        (lambda s: {**s, "x_maks": s["x"][..., 0] > 0}, r"key\(s\) \['x_maks'\]"),
        (
            lambda s: {**s, "x_mask": np.ones((200, 7), bool)},
            r"mask 'x_mask' has shape \(200, 7\)",
        ),
        (lambda s: {"mu": s["mu"], "x": s["x"].astype(complex)}, r"dtype complex"),
    ],
    ids=[
        "empty",
        "missing",
        "unequal",
        "shape_x",
        "shape_mu",
        "all_nan",
        "unknown_key",
        "mask_shape",
        "complex",
    ],
)
def test_malformed_simulations_are_clear_errors(sims, make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fit_bank(make(sims), max_epochs=1)


def test_simulations_not_a_dict_is_a_type_error(sims):
    with pytest.raises(TypeError, match=r"takes a dict .* got list"):
        fit_bank([sims["mu"], sims["x"]], max_epochs=1)


def test_every_simulation_nonfinite_somewhere_is_a_clear_error(sims):
    mu, x = sims["mu"].copy(), sims["x"].copy()
    mu[::2] = np.nan
    x[1::2, 0] = np.inf
    with pytest.raises(ValueError, match="All 200 simulations have NaN/inf"):
        fit_bank({"mu": mu, "x": x}, max_epochs=1)


@pytest.mark.parametrize("batch_size", [0, -2, 2.5])
def test_simulate_batch_size_is_checked(batch_size):
    with pytest.raises(ValueError, match=r"simulate: batch_size .* >= 1"):
        gaussian_means.simulate(jax.random.key(0), 10, batch_size=batch_size, **KW)


# ------------------------------------------------------ unsupported models
def test_improper_prior_names_the_site():
    @na.amortize(observed=["x"])
    def improper(x=None):
        m = numpyro.sample("m", dist.ImproperUniform(dist.constraints.real, (), ()))
        numpyro.sample("x", dist.Normal(m, 1.0), obs=x)

    with pytest.raises(na.ModelTraceError, match=r"Site 'm'.*improper prior") as e:
        improper.simulate(jax.random.key(0), 10)
    assert "proper distribution" in str(e.value)


def test_plate_size_from_a_latent_names_plate_and_site():
    @na.amortize(observed=["x"])
    def latent_size(x=None):
        n = numpyro.sample("n", dist.Poisson(5.0))
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("obs", n):
            numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"plate 'obs'.*latent site 'n'") as e:
        latent_size.simulate(jax.random.key(0), 10)
    assert "sample_kwargs" in str(e.value)
