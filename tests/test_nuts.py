"""NUTS reference posteriors and ``compare_with_nuts`` on conjugate models.

``gaussian_means`` has a closed-form posterior, so the "amortized" side is the
exact posterior (or a deliberately biased / over-confident one): NUTS must agree
with the exact posterior (C2ST near 0.5, means and sds within Monte Carlo error)
and the metrics must report the known distortions. Settings are small (2
chains x 300 draws after 300 warmup steps) and the compiled NUTS programs are
shared between tests through the module's cache.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from matplotlib.figure import Figure

import numpyro_amortized as na
from numpyro_amortized.models import gaussian_means, gaussian_means_posterior
from numpyro_amortized.nuts import run_nuts

KW = {"dim": 2, "n_obs": 20}
NUTS_KW = {"num_samples": 300, "num_warmup": 300, "num_chains": 2}
METRIC_COLUMNS = {
    "mean_amortized",
    "mean_nuts",
    "sd_amortized",
    "sd_nuts",
    "mean_diff",
    "sd_diff",
    "c2st",
    "mmd",
    "r_hat",
    "ess_bulk",
    "ess_tail",
    "divergences",
}


class AnalyticPosterior:
    """The exact posterior of ``gaussian_means``, optionally distorted."""

    def __init__(self, sd_scale: float = 1.0, shift: float = 0.0):
        self.model = gaussian_means
        self.model_kwargs = KW
        self.sd_scale, self.shift = sd_scale, shift

    def sample(self, rng_key, data, num_samples):
        mean, sd = gaussian_means_posterior(jnp.asarray(data["x"]))
        eps = jax.random.normal(rng_key, (*mean.shape[:-1], num_samples, 2))
        z = self.shift + self.sd_scale * eps
        return {"mu": mean[..., None, :] + sd[..., None, :] * z}


@pytest.fixture(scope="module")
def x3():
    """Three datasets of ``gaussian_means`` with means far apart."""
    mu = jnp.array([[-1.0, 0.5], [0.0, 0.0], [1.0, -0.5]])
    noise = jax.random.normal(jax.random.key(0), (3, KW["n_obs"], KW["dim"]))
    return mu[:, None, :] + noise


@pytest.fixture(scope="module")
def exact_numpyro(x3):
    """One dataset, numpyro NUTS vs the exact posterior."""
    return na.compare_with_nuts(
        AnalyticPosterior(),
        {"x": x3[0]},
        rng_key=jax.random.key(1),
        num_metric_draws=500,
        **NUTS_KW,
    )


@pytest.fixture(scope="module")
def exact_blackjax(x3):
    """Three datasets, blackjax NUTS vmapped over them, vs the exact posterior."""
    return na.compare_with_nuts(
        AnalyticPosterior(),
        {"x": x3},
        rng_key=jax.random.key(2),
        backend="blackjax",
        c2st="joint",
        num_metric_draws=500,
        **NUTS_KW,
    )


@pytest.mark.slow  # its own compiled NUTS program: ~10-20 s of CPU
def test_numpyro_nuts_matches_analytic_posterior(exact_numpyro, x3):
    m = exact_numpyro.metrics
    assert list(m.index) == ["mu[0]", "mu[1]"]
    assert set(m.columns) == METRIC_COLUMNS
    mean, sd = gaussian_means_posterior(x3[0])
    # NUTS against the closed form, in posterior sds (ESS ~ 300-600).
    np.testing.assert_allclose(m["mean_nuts"], mean, atol=0.25 * float(sd[0]))
    np.testing.assert_allclose(m["sd_nuts"], sd, rtol=0.15)
    assert (m["mean_diff"].abs() < 0.25).all() and (m["sd_diff"].abs() < 0.15).all()
    assert (m["c2st"] < 0.57).all(), m["c2st"]
    joint = exact_numpyro.joint.loc[0]
    assert joint["c2st"] < 0.57, joint
    assert abs(joint["mmd"]) < 0.02
    assert (m["r_hat"] < 1.05).all() and (m["ess_bulk"] > 100).all()
    assert joint["divergences"] == 0


def test_blackjax_batched_matches_analytic_posteriors(exact_blackjax, x3):
    m = exact_blackjax.metrics
    assert m.index.names == ["dataset", "parameter"] and len(m) == 6
    assert m["c2st"].isna().all()  # c2st="joint": no per-parameter tests
    mean, sd = gaussian_means_posterior(x3)  # (3, 2) each
    nuts_mean = m["mean_nuts"].to_numpy().reshape(3, 2)
    nuts_sd = m["sd_nuts"].to_numpy().reshape(3, 2)
    np.testing.assert_allclose(nuts_mean, mean, atol=0.25 * float(sd[0, 0]))
    np.testing.assert_allclose(nuts_sd, sd, rtol=0.15)
    # The datasets differ by many posterior sds: a mix-up would fail above.
    assert np.ptp(np.asarray(mean[:, 0])) > 5 * float(sd[0, 0])
    j = exact_blackjax.joint
    assert list(j.index) == [0, 1, 2]
    assert (j["c2st"] < 0.57).all(), j["c2st"]
    assert (j["max_r_hat"] < 1.05).all() and (j["divergences"] == 0).all()
    assert exact_blackjax.verdict.status == "matches", exact_blackjax.verdict
    assert exact_blackjax.summary().startswith("Matches NUTS")
    assert "x faster" in exact_blackjax.summary().splitlines()[0]


def test_inference_data_groups_and_dims(exact_blackjax):
    many = exact_blackjax
    assert set(many.amortized.groups()) == {"posterior", "observed_data"}
    assert set(many.nuts.groups()) == {"posterior", "sample_stats", "observed_data"}
    dims = ("chain", "draw", "dataset", "mu_dim_0")
    assert many.nuts.posterior["mu"].dims == dims
    assert many.nuts.posterior["mu"].shape == (2, 300, 3, 2)
    assert many.amortized.posterior["mu"].dims == dims
    assert many.amortized.posterior["mu"].shape == (1, 600, 3, 2)  # chains x draws
    stats = many.nuts.sample_stats
    assert set(stats.data_vars) == {"diverging", "n_steps", "acceptance_rate"}
    assert stats["n_steps"].dims == ("chain", "draw", "dataset")
    assert many.nuts.observed_data["x"].dims == ("dataset", "obs", "x_dim_1")
    assert many.num_datasets == 3
    assert set(many.metrics.columns) == METRIC_COLUMNS
    assert set(many.joint.columns) == {
        "c2st",
        "mmd",
        "max_abs_mean_diff",
        "max_r_hat",
        "min_ess_bulk",
        "divergences",
    }
    # The NUTS idata holds the draws the metrics were computed from.
    np.testing.assert_allclose(
        float(many.nuts.posterior["mu"].isel(dataset=2, mu_dim_0=1).mean()),
        many.metrics.loc[(2, "mu[1]"), "mean_nuts"],
        rtol=1e-5,
    )
    w = many.wall_time
    assert w.nuts > 0 and 0 < w.amortized <= w.amortized_first and w.training is None
    assert w.speedup == pytest.approx(w.nuts / w.amortized)


@pytest.mark.slow
def test_single_dataset_inference_data(exact_numpyro):
    one = exact_numpyro
    assert set(one.nuts.groups()) == {"posterior", "sample_stats", "observed_data"}
    assert one.nuts.posterior["mu"].dims == ("chain", "draw", "mu_dim_0")
    assert one.nuts.posterior["mu"].shape == (2, 300, 2)
    assert one.amortized.posterior["mu"].shape == (1, 600, 2)
    assert one.nuts.observed_data["x"].dims == ("obs", "x_dim_1")
    assert one.num_datasets is None and list(one.joint.index) == [0]
    assert "mu[0]" in one.summary() and "faster" in one.summary()


@pytest.mark.parametrize(
    "shift, sd_scale, mean_diff, sd_diff",
    [(1.0, 1.0, 1.0, 0.0), (0.0, 0.5, 0.0, -0.5)],
    ids=["biased", "overconfident"],
)
def test_metrics_measure_known_distortions(x3, shift, sd_scale, mean_diff, sd_diff):
    # Same datasets and settings as `exact_blackjax`: the compiled NUTS is reused.
    report = na.compare_with_nuts(
        AnalyticPosterior(sd_scale=sd_scale, shift=shift),
        {"x": x3},
        rng_key=jax.random.key(2),
        backend="blackjax",
        c2st="none",
        num_metric_draws=500,
        **NUTS_KW,
    )
    m = report.metrics
    np.testing.assert_allclose(m["mean_diff"], mean_diff, atol=0.25)
    np.testing.assert_allclose(m["sd_diff"], sd_diff, atol=0.12)
    assert (report.joint["mmd"] > 0.03).all(), report.joint
    assert report.joint["c2st"].isna().all()
    # A converged reference and a distorted amortized side: no speed claim.
    assert report.verdict.status == "differs", report.verdict
    assert report.verdict.mismatched == (0, 1, 2)
    assert report.summary().startswith("DIFFERS") and "faster" not in report.summary()


def test_plot_overlays_both_posteriors(exact_blackjax, tmp_path):
    path = tmp_path / "vs_nuts.png"
    fig = exact_blackjax.plot(dataset=1, path=path)
    assert isinstance(fig, Figure) and path.stat().st_size > 0
    axes = fig.axes
    # A 2 x 2 pair grid without its empty upper triangle: marginal, scatter,
    # marginal; two lines (amortized, NUTS) per marginal, two scatters below.
    assert len(axes) == 3
    assert len(axes[0].lines) == 2 and len(axes[2].lines) == 2
    assert len(axes[1].collections) == 2
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["amortized", "NUTS (blackjax)"]


# ------------------------------------------------------------ bad input
def test_bad_input_errors(x3):
    with pytest.raises(ValueError, match="backend must be one of"):
        run_nuts(jax.random.key(0), gaussian_means, {"x": x3[0]}, backend="stan")
    with pytest.raises(ValueError, match="padding mask"):
        run_nuts(
            jax.random.key(0),
            gaussian_means,
            {"x": x3[0], "x_mask": np.ones(20, bool)},
            model_kwargs=KW,
        )
    with pytest.raises(ValueError, match="Observed site 'x' has shape"):
        run_nuts(jax.random.key(0), gaussian_means, {"x": x3[0, :5]}, model_kwargs=KW)
    with pytest.raises(ValueError, match="Missing observed site 'x'"):
        run_nuts(jax.random.key(0), gaussian_means, {"y": x3[0]}, model_kwargs=KW)
    with pytest.raises(ValueError, match="c2st must be one of"):
        na.compare_with_nuts(
            AnalyticPosterior(), {"x": x3[0]}, rng_key=jax.random.key(0), c2st="yes"
        )


# ------------------------------------------------------- discrete sites
SHIFT = 0.8


@na.amortize(observed=["x"])
def mixture(n_obs=10, x=None):
    """A global switch: ``x_i ~ N(mu + 0.8 z, 1)``, ``z ~ Bernoulli(1/2)``."""
    z = numpyro.sample("z", dist.Bernoulli(0.5))
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("obs", n_obs):
        numpyro.sample("x", dist.Normal(mu + SHIFT * z, 1.0), obs=x)


@na.amortize(observed=["x"])
def geometric_offset(x=None):
    k = numpyro.sample("k", dist.Geometric(probs=0.3))
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("x", dist.Normal(mu + k, 1.0).expand([5]).to_event(1), obs=x)


def _has_funsor() -> bool:
    try:
        import funsor  # noqa: F401
    except ImportError:
        return False
    return True


def test_discrete_site_with_infinite_support_is_a_clear_error():
    assert geometric_offset.nuisance == ("k",)
    with pytest.raises(ValueError, match="Latent site 'k' .* infinite support"):
        run_nuts(jax.random.key(0), geometric_offset, {"x": np.zeros(5)})


@pytest.mark.skipif(_has_funsor(), reason="funsor is installed")
def test_enumeration_without_funsor_names_site_and_fix():
    with pytest.raises(ImportError, match=r"\['z'\].*pip install funsor"):
        run_nuts(jax.random.key(0), mixture, {"x": np.zeros(10)})


def _mixture_posterior(key, x, num):
    """Exact draws of ``mu | x`` for :func:`mixture`: a two-component mixture."""
    n = x.shape[-1]
    ys = jnp.stack([x - SHIFT * z for z in (0.0, 1.0)])  # (2, n)
    log_w = -0.5 * ((ys**2).sum(-1) - ys.sum(-1) ** 2 / (n + 1))
    k1, k2 = jax.random.split(key)
    comp = jax.random.categorical(k1, log_w, shape=(num,))
    means = ys.sum(-1) / (n + 1)
    return means[comp] + jax.random.normal(k2, (num,)) / jnp.sqrt(n + 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["numpyro", "blackjax"])
def test_discrete_nuisance_is_enumerated(backend):
    pytest.importorskip("funsor")
    # Data halfway between the two modes: both components carry weight ~1/2.
    x = 0.4 + 0.1 * jax.random.normal(jax.random.key(3), (10,))
    ref = run_nuts(
        jax.random.key(1),
        mixture,
        {"x": x},
        num_samples=1000,
        num_warmup=500,
        num_chains=2,
        backend=backend,
    )
    assert set(ref.samples) == {"mu"}  # z is summed out, not sampled
    exact = _mixture_posterior(jax.random.key(4), x, 2000)
    nuts = ref.samples["mu"].reshape(-1)
    assert abs(nuts.std() / float(exact.std()) - 1) < 0.1
    assert na.diagnostics.c2st(exact, nuts).accuracy < 0.56


# ----------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["numpyro", "blackjax"])
def test_looped_equals_vectorized(x3, backend):
    kw = dict(model_kwargs=KW, backend=backend, **NUTS_KW)
    loop = run_nuts(
        jax.random.key(5), gaussian_means, {"x": x3}, vectorized=False, **kw
    )
    vec = run_nuts(jax.random.key(5), gaussian_means, {"x": x3}, vectorized=True, **kw)
    one = run_nuts(
        jax.random.split(jax.random.key(5), 3)[1], gaussian_means, {"x": x3[1]}, **kw
    )
    np.testing.assert_allclose(loop.samples["mu"], vec.samples["mu"], atol=1e-5)
    np.testing.assert_allclose(one.samples["mu"], vec.samples["mu"][1], atol=1e-5)


@pytest.mark.slow
def test_compare_with_a_trained_posterior(x3):
    posterior = na.AmortizedPosterior(gaussian_means, model_kwargs=KW)
    posterior.fit(jax.random.key(0), 2_000, max_epochs=3, progress=False)
    report = na.compare_with_nuts(
        posterior, {"x": x3}, rng_key=jax.random.key(1), backend="blackjax", **NUTS_KW
    )
    assert report.amortized.posterior["mu"].shape == (1, 600, 3, 2)
    assert report.wall_time.training == pytest.approx(posterior.history.wall_time[-1])
    # A network trained for seconds is close, not exact: within a posterior sd.
    assert (report.metrics["mean_diff"].abs() < 1.0).all(), report.metrics
