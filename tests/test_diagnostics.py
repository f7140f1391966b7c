"""Diagnostics: positive and negative controls on a conjugate model.

The controls use the exact posterior of ``gaussian_means`` (Normal prior, Normal
likelihood): it must pass SBC, coverage and C2ST, while a deliberately
over-confident one (posterior sd x 0.5) and a biased one (mean shifted by one
posterior sd) must fail them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.figure import Figure

import numpyro_amortized as na
from numpyro_amortized import diagnostics as nd
from numpyro_amortized.models import gaussian_means, gaussian_means_posterior

DIM, N_OBS = 2, 50


class AnalyticPosterior:
    """The exact posterior of ``gaussian_means``, optionally distorted."""

    def __init__(self, sd_scale: float = 1.0, shift: float = 0.0):
        self.model = gaussian_means
        self.model_kwargs = {"dim": DIM, "n_obs": N_OBS}
        self.sd_scale, self.shift = sd_scale, shift

    def sample(self, rng_key, data, num_samples):
        mean, sd = gaussian_means_posterior(jnp.asarray(data["x"]))
        shape = (*mean.shape[:-1], num_samples, mean.shape[-1])
        eps = jax.random.normal(rng_key, shape)
        z = self.shift + self.sd_scale * eps
        return {"mu": mean[..., None, :] + sd[..., None, :] * z}


EXACT = AnalyticPosterior()
OVERCONFIDENT = AnalyticPosterior(sd_scale=0.5)
BIASED = AnalyticPosterior(shift=1.0)
CASES = {"exact": EXACT, "overconfident": OVERCONFIDENT, "biased": BIASED}


@pytest.fixture(scope="module")
def draws():
    """Fresh simulations + draws for each case (the same datasets for all)."""
    key = jax.random.key(0)
    return {
        name: nd.simulate_draws(key, post, num_datasets=200, num_samples=100)
        for name, post in CASES.items()
    }


def test_flatten_sites_names_and_order():
    w = np.arange(5 * 2 * 3).reshape(5, 2, 3)
    flat, names = nd.flatten_sites({"s": np.ones(5), "W": w}, batch_ndim=1)
    assert names == ("s", "W[0,0]", "W[0,1]", "W[0,2]", "W[1,0]", "W[1,1]", "W[1,2]")
    np.testing.assert_array_equal(flat[:, 6], w[:, 1, 2])
    with pytest.raises(ValueError, match="batch shape"):
        nd.flatten_sites({"a": np.ones(3), "b": np.ones(4)}, batch_ndim=1)


def test_simulate_draws_shapes_and_truth(draws):
    sims = draws["exact"]
    assert sims.truth.shape == (200, DIM) and sims.draws.shape == (200, 100, DIM)
    assert sims.names == ("mu[0]", "mu[1]")
    # The truth is the simulated mu: prior N(0, 1).
    assert abs(sims.truth.std() - 1) < 0.1


@pytest.mark.parametrize("case", ["exact", "overconfident", "biased"])
def test_sbc_controls(draws, case):
    # alpha = 0.01 per parameter: a calibrated posterior fails ~2% of seeds.
    result = nd.sbc_from_draws(*draws[case], alpha=0.01)
    assert result.ranks.shape == (200, DIM) and result.ranks.max() <= 100
    if case == "exact":
        assert result.in_band.all(), result.p_value
        assert (result.p_value > 0.01).all()
        assert (result.calibration_error < 0.05).all()
    else:
        assert not result.in_band.any()
        assert (result.p_value < 0.01).all()
        assert (result.calibration_error > 0.07).all()


def test_sbc_on_fresh_simulations_matches_draws(draws):
    result = nd.sbc(jax.random.key(0), EXACT, num_datasets=200, num_samples=100)
    expected = nd.sbc_from_draws(*draws["exact"])
    np.testing.assert_array_equal(result.ranks, expected.ranks)
    assert result.names == ("mu[0]", "mu[1]")


def test_sbc_shape_of_failure(draws):
    """Over-confidence piles ranks at both ends; a positive shift puts them low."""
    over = nd.sbc_from_draws(*draws["overconfident"])
    ends = ((over.ranks < 10) | (over.ranks > 90)).mean()
    assert ends > 0.4  # 0.2 when calibrated
    biased = nd.sbc_from_draws(*draws["biased"])
    # ECDF above the uniform CDF: the truth tends to rank below the draws.
    assert (biased.ecdf_diff[49] > 0.2).all()


def test_ecdf_band_simultaneous_coverage():
    """For uniform ranks the whole ECDF stays in the band ~(1 - alpha) of the time."""
    n, s, trials = 100, 99, 400
    band = nd.ecdf_band(n, s, alpha=0.05)
    rng = np.random.default_rng(123)
    ranks = rng.integers(0, s + 1, size=(n, trials))
    z, diff = nd.ecdf_difference(ranks, s)
    np.testing.assert_allclose(z, band.z)
    ecdf = diff + z[:, None]
    held = ((ecdf >= band.lower[:, None]) & (ecdf <= band.upper[:, None])).all(0)
    assert 0.92 <= held.mean() <= 0.985
    # Simultaneous is wider than pointwise: gamma well below alpha.
    assert band.gamma < 0.05 / 4
    # Deterministic and cached.
    assert nd.ecdf_band(n, s, alpha=0.05) is band


@pytest.mark.parametrize("case", ["exact", "overconfident", "biased"])
def test_coverage_controls(draws, case):
    cov = nd.coverage(*draws[case])
    at90 = cov.empirical[np.argmin(np.abs(cov.levels - 0.9))]
    if case == "exact":
        assert (np.abs(cov.empirical - cov.levels[:, None]) < 0.13).all()
        assert (cov.calibration_error < 0.05).all()
        assert (np.abs(at90 - 0.9) < 0.05).all()
    elif case == "overconfident":
        assert (at90 < 0.72).all()  # theory: P(|Z| < 0.82) = 0.59
    else:
        assert (at90 < 0.82).all()  # theory: P(|Z - 1| < 1.64) = 0.74
    assert cov.lower.shape == cov.levels.shape
    assert ((cov.lower <= cov.levels) & (cov.levels <= cov.upper)).all()


def test_coverage_accepts_dicts(draws):
    sims = draws["exact"]
    truth = {"mu": sims.truth}
    post = {"mu": sims.draws}
    a, b = nd.coverage(truth, post), nd.coverage(*sims)
    np.testing.assert_array_equal(a.empirical, b.empirical)
    assert a.names == ("mu[0]", "mu[1]")


def test_recovery_exact_vs_uninformative(draws):
    rec = nd.recovery(*draws["exact"])
    # Expected R^2 of the exact posterior mean: 1 - (1/51) / 1.
    np.testing.assert_allclose(rec.r2, 1 - 1 / (N_OBS + 1), atol=0.02)
    np.testing.assert_allclose(rec.sd.mean(0), 1 / np.sqrt(N_OBS + 1), rtol=0.03)
    sims = draws["exact"]
    prior_draws = np.random.default_rng(0).normal(size=sims.draws.shape)
    assert (nd.recovery(sims.truth, prior_draws).r2 < 0.1).all()


def test_z_score_contraction_controls(draws):
    exact = nd.z_score_contraction(*draws["exact"])
    assert (np.abs(exact.z_score.mean(0)) < 0.2).all()
    assert (np.abs(exact.z_score.std(0) - 1) < 0.15).all()
    expected = 1 - (1 / (N_OBS + 1)) / 1.0
    np.testing.assert_allclose(np.median(exact.contraction, 0), expected, atol=0.01)
    over = nd.z_score_contraction(*draws["overconfident"])
    assert (over.z_score.std(0) > 1.6).all()  # theory: 2
    biased = nd.z_score_contraction(*draws["biased"])
    assert (np.abs(biased.z_score.mean(0) - 1) < 0.2).all()
    # An explicit prior sd gives the same contraction here (prior sd is 1).
    explicit = nd.z_score_contraction(*draws["exact"], prior_sd=1.0)
    np.testing.assert_allclose(explicit.contraction, exact.contraction, atol=0.01)


def test_c2st_identical_far_and_seeded():
    rng = np.random.default_rng(0)
    # Unequal sizes: balanced by subsampling, else chance would be 2/3.
    a, b = rng.normal(size=(400, 2)), rng.normal(size=(800, 2))
    same = nd.c2st(a, b, seed=3)
    assert abs(same.accuracy - 0.5) < 0.07
    assert same.fold_accuracies.shape == (5,)
    again = nd.c2st(a, b, seed=3)
    assert again.accuracy == same.accuracy
    np.testing.assert_array_equal(again.fold_accuracies, same.fold_accuracies)
    assert nd.c2st(a, b + 6.0).accuracy > 0.97


@pytest.mark.parametrize("case", ["exact", "overconfident", "biased"])
def test_c2st_controls_against_analytic_posterior(case):
    x = gaussian_means.simulate(jax.random.key(5), 1, dim=DIM, n_obs=N_OBS)["x"][0]
    mean, sd = gaussian_means_posterior(jnp.asarray(x))
    reference = np.asarray(mean + sd * jax.random.normal(jax.random.key(6), (600, DIM)))
    post = CASES[case].sample(jax.random.key(7), {"x": x}, 600)["mu"]
    accuracy = nd.c2st(reference, np.asarray(post)).accuracy
    if case == "exact":
        assert accuracy < 0.57
    else:
        assert accuracy > 0.62


def test_mmd_matches_brute_force_and_separates():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 3)), rng.normal(size=(50, 3)) + 0.5
    h = 1.3
    k = lambda x, y: np.exp(-((x[:, None] - y[None]) ** 2).sum(-1) / (2 * h * h))  # noqa: E731
    kaa, kbb = k(a, a), k(b, b)
    ref = (
        (kaa.sum() - np.trace(kaa)) / (60 * 59)
        + (kbb.sum() - np.trace(kbb)) / (50 * 49)
        - 2 * k(a, b).mean()
    )
    got = nd.mmd(a, b, bandwidth=h, block=16)
    np.testing.assert_allclose(got.mmd2, ref, rtol=1e-4, atol=1e-6)
    same = nd.mmd(rng.normal(size=(800, 2)), rng.normal(size=(800, 2)))
    far = nd.mmd(rng.normal(size=(800, 2)), rng.normal(size=(800, 2)) + 1.0)
    assert abs(same.mmd2) < 0.005 and far.mmd2 > 0.1
    assert 1.0 < same.bandwidth < 3.0  # median distance of 2-d standard normals ~1.7


def test_two_sample_input_errors():
    with pytest.raises(ValueError, match="shape"):
        nd.mmd(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        nd.c2st(np.full((5, 1), np.nan), np.zeros((5, 1)))
    draws = np.zeros((4, 3, 1))
    draws[2, 1, 0] = np.nan
    with pytest.raises(ValueError, match="theta\\[0\\]"):
        nd.coverage(np.zeros((4, 1)), draws)


def test_plots_draw_every_parameter(draws):
    sims = draws["biased"]
    fig = Figure()
    axes = fig.subplots(1, 4)
    ax = nd.plots.plot_ecdf_difference(nd.sbc_from_draws(*sims), axes[0])
    assert (
        len(ax.lines) == DIM + 1 and "outside" in ax.get_legend_handles_labels()[1][1]
    )
    ax = nd.plots.plot_coverage(nd.coverage(*sims), axes[1])
    assert len(ax.lines) == DIM + 1
    ax = nd.plots.plot_recovery(nd.recovery(*sims), axes[2], standardize=True)
    assert len(ax.collections) == DIM
    ax = nd.plots.plot_z_score_contraction(nd.z_score_contraction(*sims), axes[3])
    assert len(ax.collections) == DIM


def test_diagnose_fitted_posterior_writes_figure(tmp_path):
    posterior = na.AmortizedPosterior(
        gaussian_means,
        inference_net=na.networks.CouplingFlow(num_layers=2, hidden=(16,)),
        summary_net=na.networks.DeepSet(summary_dim=4, embed_dim=8, hidden=(8,)),
    )
    posterior.fit(jax.random.key(1), num_simulations=512, max_epochs=2, progress=False)
    path = tmp_path / "diagnostics.png"
    report = posterior.diagnose(
        jax.random.key(2), num_datasets=40, num_samples=50, path=path
    )
    assert report.figure_path == path
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000
    assert report.sbc.ranks.shape == (40, 4)
    assert report.recovery.names == ("mu[0]", "mu[1]", "mu[2]", "mu[3]")
    assert np.isfinite(report.recovery.r2).all()
    table = report.table()
    assert len(table.splitlines()) == 5 and "mu[3]" in table
