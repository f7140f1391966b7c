"""AmortizedGuide in SVI / Predictive, and amortized VI by the ELBO.

Closed-form references: ``gaussian_means`` (conjugate normal means) and a
two-level normal model whose mean-field optimum is known.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.util import log_density
from scipy import stats

import numpyro_amortized as na
from numpyro_amortized import networks as nets
from numpyro_amortized.elbo import elbo_loss_fn, make_log_joint, negative_elbo
from numpyro_amortized.models import gaussian_means, gaussian_means_posterior

N, DIM = 10, 2
KW = {"n_obs": N, "dim": DIM}


def tiny_nets():
    return {
        "inference_net": nets.CouplingFlow(num_layers=2, hidden=(16,)),
        "summary_net": nets.DeepSet(summary_dim=4, embed_dim=8, hidden=(16,)),
    }


def gaussian_bank(seed, num):
    """``gaussian_means`` draws in NumPy (cheaper than compiling ``simulate``)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(num, DIM)).astype(np.float32)
    x = (mu[:, None] + rng.normal(size=(num, N, DIM))).astype(np.float32)
    return {"mu": mu, "x": x}


def untrained(model, sims, **kwargs):
    """A posterior with built but untrained networks: a maximally perturbed
    posterior (any weights define a proper density), without compiling ``fit``."""
    post = na.AmortizedPosterior(model, **kwargs)
    post._build(jax.random.key(0), sims)
    return post


@pytest.fixture(scope="module")
def rough():
    return untrained(
        gaussian_means, gaussian_bank(0, 256), model_kwargs=KW, **tiny_nets()
    )


@pytest.fixture(scope="module")
def x_obs():
    """One dataset whose posterior is far from the prior's centre."""
    noise = np.random.default_rng(7).normal(size=(N, DIM))
    return jnp.asarray(np.array([1.5, -1.0]) + noise, dtype=jnp.float32)


def moment_errors(draws, x):
    """Max |mean error| and |sd error|, both in units of the exact posterior sd."""
    mean, sd = gaussian_means_posterior(x)
    return (
        float(jnp.max(jnp.abs(draws.mean(0) - mean) / sd)),
        float(jnp.max(jnp.abs(draws.std(0) - sd) / sd)),
    )


def guide_log_density(guide, key, **kwargs):
    """``(log q, {site: value}, trace)`` of one seeded run of the guide (jitted;
    the trace is the one recorded while tracing, for its static fields)."""
    traces = []

    def run(key):
        lp, tr = log_density(handlers.seed(guide, key), (), kwargs, {})
        traces.append(tr)
        return lp, {n: s["value"] for n, s in tr.items() if s["type"] == "sample"}

    lp, values = jax.jit(run)(key)
    return lp, values, traces[0]


@na.amortize(observed=["y"])
def constrained(y=None):
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    w = numpyro.sample("w", dist.Dirichlet(jnp.ones(3)))
    numpyro.sample("y", dist.Normal(w * 3.0, sigma).to_event(1), obs=y)


def test_guide_log_density_is_posterior_log_prob_with_exact_jacobians():
    rng = np.random.default_rng(2)
    sigma, w = np.abs(rng.normal(size=64)), rng.dirichlet(np.ones(3), size=64)
    sims = {"sigma": sigma, "w": w, "y": rng.normal(3 * w, sigma[:, None])}
    post = untrained(
        constrained, sims, inference_net=nets.CouplingFlow(num_layers=2, hidden=(8,))
    )
    guide = post.as_guide()
    y = jnp.array([0.5, 1.0, 1.5])
    lp, values, tr = guide_log_density(guide, jax.random.key(3), y=y)
    assert tr[guide.latent_name]["infer"] == {"is_auxiliary": True}
    assert tr[guide.param_name]["type"] == "param"
    assert tr["w"]["fn"].event_dim == 1 and tr["sigma"]["fn"].event_dim == 0
    theta = {n: values[n] for n in ("sigma", "w")}
    assert float(theta["sigma"]) > 0 and np.isclose(float(theta["w"].sum()), 1.0)
    log_q = post.log_prob(theta, {"y": y})
    np.testing.assert_allclose(lp, log_q, rtol=1e-5)
    # The Delta sites carry the Jacobians: log q(u) alone is a different number.
    log_q_u = log_q - post.space.unconstrain(theta)[1]
    assert abs(float(lp - log_q_u)) > 1e-2


def test_svi_fine_tuning_moves_toward_the_analytic_posterior(rough, x_obs):
    guide = rough.as_guide()
    key = jax.random.key(1)
    draws0 = rough.sample(key, {"x": x_obs}, 4000)["mu"]
    before = moment_errors(draws0, x_obs)
    svi = SVI(gaussian_means, guide, optax.adam(5e-3), Trace_ELBO(num_particles=8))

    @jax.jit
    def run(key):  # svi.run in one compiled function (init included)
        state = svi.init(key, x=x_obs, **KW)
        step = lambda s, _: svi.update(s, x=x_obs, **KW)  # noqa: E731
        state, losses = jax.lax.scan(step, state, None, length=800)
        return svi.get_params(state), losses

    params, losses = run(jax.random.key(2))
    assert np.isfinite(losses).all()
    assert losses[-50:].mean() < losses[:50].mean()
    refined = guide.to_posterior(params)
    after = moment_errors(refined.sample(key, {"x": x_obs}, 4000)["mu"], x_obs)
    print("mean / sd error in posterior sds, before:", before, "after:", after)
    assert before[0] > 2.0  # the untrained posterior is far off ...
    assert after[0] < 0.2 and after[1] < 0.2  # ... and close after fine-tuning
    # to_posterior copies: the original keeps its weights.
    assert np.array_equal(rough.sample(key, {"x": x_obs}, 4000)["mu"], draws0)


def test_predictive_with_the_guide(rough, x_obs):
    guide, fixed = rough.as_guide(), rough.as_guide(data={"x": x_obs})
    params, S = guide.init_params(), 500

    @jax.jit
    def run(key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        mu_x = ["mu", "x"]
        return (
            # Data in the call: posterior draws of mu (x observed, returned as is).
            Predictive(gaussian_means, guide=guide, params=params, num_samples=S)(
                k1, x=x_obs, **KW
            ),
            Predictive(
                gaussian_means,
                guide=guide,
                params=params,
                num_samples=S,
                return_sites=mu_x,
            )(k2, x=x_obs, **KW),
            # Data fixed in the guide, x=None in the call: posterior predictive.
            Predictive(
                gaussian_means,
                guide=fixed,
                params=params,
                num_samples=S,
                return_sites=mu_x,
            )(k3, **KW),
            guide.sample_posterior(k4, params, x=x_obs, sample_shape=(3, 4), **KW),
        )

    default, pred, both, draws = run(jax.random.key(3))
    assert set(default) == {"x"}  # numpyro's default: sites not drawn by the guide
    assert set(pred) == {"mu", "x"}
    assert pred["mu"].shape == (S, DIM) and pred["x"].shape == (S, N, DIM)
    assert np.allclose(pred["x"], x_obs[None])
    # The draws are the posterior's: same mean as posterior.sample to MC error.
    ref = rough.sample(jax.random.key(4), {"x": x_obs}, 4000)["mu"]
    se = ref.std(0) * (1 / np.sqrt(S) + 1 / np.sqrt(4000))
    assert np.all(np.abs(pred["mu"].mean(0) - ref.mean(0)) < 4 * se)
    assert np.all(np.abs(both["mu"].mean(0) - ref.mean(0)) < 4 * se)
    # Posterior-predictive x_i ~ N(mu, 1) given the guide's mu: the mean over
    # observations minus mu has sd 1/sqrt(N) (and x is not the observed data).
    assert both["x"].shape == (S, N, DIM) and not np.allclose(both["x"][0], x_obs)
    resid = both["x"].mean(1) - both["mu"]
    assert abs(float(resid.std()) * np.sqrt(N) - 1.0) < 0.1
    assert set(draws) == {"mu"} and draws["mu"].shape == (3, 4, DIM)


def test_guide_errors_name_the_problem(rough, x_obs):
    guide = rough.as_guide()
    with pytest.raises(ValueError, match="without data for the observed site 'x'"):
        handlers.seed(guide, 0)(**KW)
    with pytest.raises(ValueError, match="one dataset"):
        handlers.seed(guide, 0)(x=jnp.stack([x_obs, x_obs]), **KW)
    with pytest.raises(KeyError, match="amortized\\$params"):
        guide.to_posterior({})


def two_level(n_obs=N, dim=DIM, x=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0).expand([dim]).to_event(1))
    tau = numpyro.sample("tau", dist.Normal(mu, 1.0).to_event(1))
    with numpyro.plate("obs", n_obs):
        numpyro.sample("x", dist.Normal(tau, 1.0).to_event(1), obs=x)


def test_nuisance_sites_need_a_nuisance_guide(rough, x_obs):
    guide = na.AmortizedGuide(two_level, rough)
    with pytest.raises(ValueError, match=r"latent site\(s\) \['tau'\].*AutoNormal"):
        handlers.seed(guide, 0)(x=x_obs, **KW)

    def with_discrete(n_obs=N, dim=DIM, x=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0).expand([dim]).to_event(1))
        k = numpyro.sample("k", dist.Bernoulli(0.5))
        with numpyro.plate("obs", n_obs):
            numpyro.sample("x", dist.Normal(mu + k, 1.0).to_event(1), obs=x)

    guide = na.AmortizedGuide(with_discrete, rough)
    with pytest.raises(ValueError, match=r"\['k'\] are discrete"):
        handlers.seed(guide, 0)(x=x_obs, **KW)


@pytest.mark.slow
def test_nuisance_autonormal_reaches_the_mean_field_optimum(rough, x_obs):
    """mu ~ N(0,1), tau ~ N(mu,1), x_i ~ N(tau,1), per dimension.

    Posterior precision of (mu, tau) is [[2, -1], [-1, 1 + n]] with mean
    (S, 2S) / (2n + 1), S = sum_i x_i. The mean-field optimum q(mu) q(tau) has
    the exact means and sd(tau) = 1 / sqrt(1 + n).
    """
    guide = na.AmortizedGuide(two_level, rough, nuisance_guide=AutoNormal)
    schedule = optax.cosine_decay_schedule(1e-2, 1500, alpha=0.05)
    svi = SVI(two_level, guide, optax.adam(schedule), Trace_ELBO(num_particles=8))
    result = svi.run(jax.random.key(8), 1500, x=x_obs, **KW, progress_bar=False)
    s = x_obs.sum(0)
    loc = result.params["tau_auto_loc"]
    scale = result.params["tau_auto_scale"]  # SVI reports constrained params
    print("tau loc", loc, "exact", 2 * s / (2 * N + 1), "scale", scale)
    sd_tau = 1 / np.sqrt(1 + N)
    np.testing.assert_allclose(loc, 2 * s / (2 * N + 1), atol=0.15 * sd_tau)
    np.testing.assert_allclose(scale, sd_tau, rtol=0.15)
    mu = guide.sample_posterior(
        jax.random.key(9), result.params, x=x_obs, sample_shape=(4000,), **KW
    )
    assert set(mu) == {"mu", "tau"}
    # q(mu | x) (the flow) has the weaker curvature (mean-field sd 1/sqrt(2)) and
    # converges more slowly; its mean is within half a mean-field sd.
    np.testing.assert_allclose(mu["mu"].mean(0), s / (2 * N + 1), atol=0.5 / np.sqrt(2))


# ------------------------------------------------------------------ amortized VI
def test_log_joint_matches_scipy():
    log_joint = make_log_joint(gaussian_means.fn, (), KW)
    mu = jnp.array([0.3, -1.2])
    x = jnp.arange(N * DIM, dtype=jnp.float32).reshape(N, DIM) / 10
    expected = stats.norm.logpdf(mu).sum() + stats.norm.logpdf(x, mu).sum()
    lp = jax.jit(log_joint)({"mu": mu}, {"x": x})
    np.testing.assert_allclose(lp, expected, rtol=1e-6)


def test_negative_elbo_is_kl_minus_log_evidence(rough):
    """-ELBO(x) = KL(q || p(.|x)) - log p(x), both sides from closed forms/draws."""
    f = rough._fitted
    from flax import nnx

    net = nnx.merge(f.graphdef, f.params, f.rest)
    x = jnp.asarray(gaussian_bank(11, 3)["x"])
    xin, mask = f.layout.to_network({"x": x}, 1)
    neg_elbo = jax.jit(
        lambda key: negative_elbo(
            key,
            net,
            f.x_std(xin),
            mask,
            {"x": x},
            space=f.space,
            theta_std=f.theta_std,
            log_joint=make_log_joint(gaussian_means.fn, (), KW),
            num_particles=4000,
        )
    )(jax.random.key(12))
    mean, sd = gaussian_means_posterior(x)
    draws = rough.sample(jax.random.key(13), {"x": x}, 4000)["mu"]  # (3, S, DIM)
    log_q = rough.log_prob({"mu": draws}, {"x": x})
    log_post = stats.norm.logpdf(draws, mean[:, None], sd[:, None]).sum(-1)
    kl = (log_q - log_post).mean(1)
    # Marginal: x[:, d] ~ N(0, I + 11^T) independently per dimension.
    cov = np.eye(N) + np.ones((N, N))
    log_evidence = sum(
        stats.multivariate_normal(np.zeros(N), cov).logpdf(np.asarray(x[:, :, d]))
        for d in range(DIM)
    )
    print("-ELBO", neg_elbo, "KL - log p(x)", kl - log_evidence)
    assert np.all(kl > 0.5)  # the rough posterior is visibly off
    np.testing.assert_allclose(neg_elbo, kl - log_evidence, atol=0.15 * kl.max())


def test_mixed_loss_is_the_weighted_sum(rough):
    sims = gaussian_bank(14, 8)
    (theta, x, mask), _ = rough._prepare(sims)
    batch = (theta, x, mask, {"x": jnp.asarray(sims["x"])})
    params, key = rough._fitted.params, jax.random.key(15)

    @jax.jit
    def losses(params, batch):
        return (
            elbo_loss_fn(rough)(params, key, batch),
            elbo_loss_fn(rough, elbo_weight=0.0, npe_weight=1.0)(params, key, batch),
            elbo_loss_fn(rough, elbo_weight=0.5, npe_weight=2.0)(params, key, batch),
            rough._loss_fn()(params, key, batch[:3]),
        )

    elbo, npe, mixed, npe_loss = losses(params, batch)
    np.testing.assert_allclose(mixed, 0.5 * elbo + 2.0 * npe, rtol=1e-5)
    # The NPE part is the posterior's own training loss (-log q_v(v | x)).
    np.testing.assert_allclose(npe, npe_loss, rtol=1e-6)


@pytest.mark.slow
def test_fit_elbo_reduces_kl_to_the_exact_posterior(rough):
    post = rough.as_guide().to_posterior(rough.as_guide().init_params())  # a copy
    x = jnp.asarray(gaussian_bank(16, 8)["x"])
    mean, sd = gaussian_means_posterior(x)

    def kl(p):
        draws = p.sample(jax.random.key(17), {"x": x}, 2000)["mu"]
        log_post = stats.norm.logpdf(draws, mean[:, None], sd[:, None]).sum(-1)
        return float((p.log_prob({"mu": draws}, {"x": x}) - log_post).mean())

    before = kl(post)
    history = post.fit_elbo(
        jax.random.key(18),
        num_steps=300,
        batch_size=32,
        steps_per_epoch=100,
        learning_rate=3e-3,
        num_validation=64,
        progress=False,
    )
    after = kl(post)
    print("KL(q || p) before", before, "after", after, history.val_loss)
    assert len(history.val_loss) == 3 and np.isfinite(history.val_loss).all()
    assert after < 0.25 * before
    assert np.isclose(kl(rough), before)  # the original is untouched


def test_amortized_vi_refuses_nuisance_sites():
    model = na.amortize(observed=["x"])(two_level)
    bank = gaussian_bank(0, 32)
    post = untrained(model, bank, targets=["mu"], model_kwargs=KW, **tiny_nets())
    with pytest.raises(ValueError, match=r"latent site\(s\) \['tau'\]"):
        elbo_loss_fn(post)
