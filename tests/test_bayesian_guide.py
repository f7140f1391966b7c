"""BayesianAmortizedGuide: Bayesian network weights as latent sites of the guide.

Tiny untrained networks built with ``post._build`` on a NumPy bank (as in
``test_guides.py``); the reference is the conjugate ``gaussian_means`` model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.util import log_density
from scipy import stats

import numpyro_amortized as na
from numpyro_amortized import networks as nets
from numpyro_amortized.models import gaussian_means, gaussian_means_posterior

N, DIM = 10, 2
KW = {"n_obs": N, "dim": DIM}
LOG_VAR = -4.0  # sd 0.14: draws visibly differ, the network still works


def gaussian_bank(seed, num):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(num, DIM)).astype(np.float32)
    x = (mu[:, None] + rng.normal(size=(num, N, DIM))).astype(np.float32)
    return {"mu": mu, "x": x}


@pytest.fixture(scope="module")
def post():
    flow = nets.bayesian(
        nets.CouplingFlow(num_layers=2, hidden=(16,)),
        include=["couplings.1.**"],
        init_logvar=LOG_VAR,
    )
    p = na.AmortizedPosterior(
        gaussian_means,
        inference_net=flow,
        summary_net=nets.DeepSet(summary_dim=4, embed_dim=8, hidden=(16,)),
        model_kwargs=KW,
    )
    p._build(jax.random.key(0), gaussian_bank(0, 256))
    return p


@pytest.fixture(scope="module")
def x_obs():
    noise = np.random.default_rng(7).normal(size=(N, DIM))
    return jnp.asarray(np.array([1.5, -1.0]) + noise, dtype=jnp.float32)


@pytest.fixture(scope="module")
def one_draw(post, x_obs):
    """A jitted ``key -> (bayes, point, draws)`` for one draw of the Bayesian guide:
    ``bayes = log p(x, mu) + log p(w) - log q(mu | x, w) - log q(w)`` (model with
    the weight prior), ``point`` the plain guide's ``log p(x, mu) - log q(mu | x)``
    with the drawn weights as its point weights (same latent draw), ``draws`` the
    guide's sample sites; ``.traces`` holds the trace recorded while tracing."""
    guide = post.as_guide()
    model = guide.model_with_weight_prior()
    params = guide.init_params()
    plain = na.AmortizedGuide(gaussian_means, post)
    data = {"x": x_obs, **KW}
    traces = []

    @jax.jit
    def run(key):
        seeded = handlers.substitute(handlers.seed(guide, key), data=params)
        log_q, tr = log_density(seeded, (), data, {})
        traces.append(tr)
        draws = {n: s["value"] for n, s in tr.items() if s["type"] == "sample"}
        log_p, _ = log_density(model, (), data, draws)
        drawn = zip(guide.weights, guide.weight_sites, strict=True)
        point = guide.to_posterior(
            {**params, guide.mean_name: {w.name: draws[s] for w, s in drawn}}
        )
        fixed = {plain.param_name: point.as_guide().init_params()[plain.param_name]}
        latent = {plain.latent_name: draws[guide.latent_name]}
        seeded = handlers.substitute(plain, data={**fixed, **latent})
        log_q0, _ = log_density(seeded, (), data, {})
        log_p0, _ = log_density(gaussian_means, (), data, draws)
        return log_p - log_q, log_p0 - log_q0, draws

    run.traces = traces
    return run


def test_as_guide_is_bayesian_with_weight_params_and_sites(post, one_draw):
    guide = post.as_guide()
    assert isinstance(guide, na.BayesianAmortizedGuide) and post.is_bayesian
    assert repr(guide).startswith("BayesianAmortizedGuide(targets=['mu']")
    params = guide.init_params()
    assert set(params) == {guide.param_name, guide.mean_name, guide.log_var_name}
    names = [w.name for w in guide.weights]
    assert names and all(n.startswith("flow.net.couplings.1.") for n in names)
    assert set(params[guide.mean_name]) == set(names)
    for lv in params[guide.log_var_name].values():
        np.testing.assert_array_equal(lv, LOG_VAR)

    _, _, d0 = one_draw(jax.random.key(0))
    tr = one_draw.traces[0]  # recorded while tracing, for the static fields
    assert tr[guide.mean_name]["type"] == "param"
    assert tr[guide.log_var_name]["type"] == "param"
    site = tr[guide.weight_sites[0]]
    assert site["type"] == "sample" and site["fn"].has_rsample
    _, _, d0_again = one_draw(jax.random.key(0))
    _, _, d1 = one_draw(jax.random.key(1))
    for s in guide.weight_sites:
        np.testing.assert_array_equal(d0[s], d0_again[s])
        assert not np.allclose(d0[s], d1[s])
    # The draws are N(mean, exp(LOG_VAR)): standardized residuals have sd 1.
    z = np.concatenate(
        [
            ((d0[s] - params[guide.mean_name][w.name]) / np.exp(0.5 * LOG_VAR)).ravel()
            for s, w in zip(guide.weight_sites, guide.weights, strict=True)
        ]
    )
    se = 1 / np.sqrt(z.size)  # 4 standard errors of the mean and of the sd
    assert z.size > 100 and abs(z.std() - 1) < 4 * se / np.sqrt(2)
    assert abs(z.mean()) < 4 * se
    # The drawn weights change the posterior: q(theta | x, w) differs.
    assert not np.allclose(d0["mu"], d1["mu"])


def test_elbo_is_point_guide_elbo_plus_weight_prior_minus_q(post, one_draw):
    """One draw: the ELBO term is the plain guide's at the drawn weights plus
    log p(w) - log q(w); averaged over draws that is -KL(q(w) || p(w))."""
    guide = post.as_guide()
    params = guide.init_params()
    bayes, point, draws = one_draw(jax.random.key(3))
    w = {s: np.asarray(draws[s]) for s in guide.weight_sites}
    log_prior = sum(stats.norm.logpdf(v).sum() for v in w.values())
    log_q_w = sum(
        stats.norm.logpdf(
            w[s], params[guide.mean_name][wt.name], np.exp(0.5 * LOG_VAR)
        ).sum()
        for s, wt in zip(guide.weight_sites, guide.weights, strict=True)
    )
    assert abs(float(bayes - point)) > 10  # the weight term is not negligible
    np.testing.assert_allclose(bayes, point + log_prior - log_q_w, rtol=1e-4)
    # Closed-form KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2) / 2 - 1/2.
    var = np.exp(LOG_VAR)
    kl = sum(
        float(np.sum(-0.5 * LOG_VAR + (var + np.asarray(m) ** 2) / 2 - 0.5))
        for m in params[guide.mean_name].values()
    )
    prior_only = guide.model_with_weight_prior(lambda: None)

    def weight_term(key):  # log p(w) - log q(w) of one draw of the weights alone
        seeded = handlers.seed(guide.network_params, key)
        log_q, tr = log_density(handlers.substitute(seeded, data=params), (), {}, {})
        draws = {s: tr[s]["value"] for s in guide.weight_sites}
        return log_density(prior_only, (), {}, draws)[0] - log_q

    diffs = jax.jit(jax.vmap(weight_term))(jax.random.split(jax.random.key(4), 256))
    se = float(diffs.std()) / 16
    print("mean(log p(w) - log q(w))", float(diffs.mean()), "-KL", -kl, "se", se)
    assert abs(float(diffs.mean()) + kl) < 4 * se


@pytest.mark.slow  # ~38 s wall, 25 s CPU (loaded 2-core machine), mostly compiling
def test_svi_fine_tuning_moves_the_mean_toward_the_analytic_posterior(post, x_obs):
    guide = post.as_guide(kl_scale=1e-3)
    model = guide.model_with_weight_prior()
    mean, sd = gaussian_means_posterior(x_obs)
    key = jax.random.key(5)

    def error(p):
        return float(
            jnp.max(
                jnp.abs(p.sample(key, {"x": x_obs}, 2000)["mu"].mean(0) - mean) / sd
            )
        )

    svi = SVI(model, guide, optax.adam(1e-2), Trace_ELBO(num_particles=2))

    @jax.jit
    def run(key):
        state = svi.init(key, x=x_obs, **KW)
        step = lambda s, _: svi.update(s, x=x_obs, **KW)  # noqa: E731
        state, losses = jax.lax.scan(step, state, None, length=150)
        return svi.get_params(state), losses

    params, losses = run(jax.random.key(6))
    assert np.isfinite(losses).all()
    init = guide.init_params()
    moved = [
        not np.allclose(params[guide.log_var_name][n], init[guide.log_var_name][n])
        for n in init[guide.log_var_name]
    ]
    assert all(moved)  # the log-variances are trained too
    refined = guide.to_posterior(params)
    assert refined.is_bayesian
    before, after = error(post), error(refined)
    print("max |mean error| / sd, before:", before, "after:", after)
    assert before > 2.0 and after < 0.3 * before
