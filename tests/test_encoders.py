"""EncoderGuide (VAE / AEVB): checked against closed-form posteriors and ELBOs.

The workhorse is probabilistic PCA with known weights,

    z_i ~ N(0, I_k),   x_i | z_i ~ N(W z_i + b, sigma^2 I_D),

whose posterior is ``N(S W^T (x_i - b) / sigma^2, S)`` with
``S = (I + W^T W / sigma^2)^{-1}``. W has orthogonal columns, so S is diagonal and
a diagonal-Normal encoder with a linear map (``hidden=()``) contains the exact
posterior: VI must find it. For any diagonal-Normal q the per-datapoint ELBO is
also closed-form, which pins the value (and the subsampling scale) of every ELBO
estimator.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from flax import nnx
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer import (
    SVI,
    Predictive,
    Trace_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from numpyro.infer.autoguide import AutoGuideList, AutoNormal
from ppca_model import B_OFFSET, S_DIAG, SIGMA, D, K, W, posterior_mean, ppca, ppca_data

import numpyro_amortized as na
from numpyro_amortized import encoders as enc
from numpyro_amortized.networks import CouplingFlow, spec_from_config


def exact_neg_elbo(x, loc, scale):
    """``-sum_i ELBO_i`` for q(z_i) = N(loc_i, diag(scale_i^2)) (closed form)."""
    resid = x - loc @ W.T - B_OFFSET
    quad = jnp.sum(resid**2, -1) + jnp.sum(jnp.diag(W.T @ W) * scale**2, -1)
    expected_loglik = -0.5 * D * math.log(2 * math.pi * SIGMA**2) - quad / (
        2 * SIGMA**2
    )
    kl = 0.5 * jnp.sum(scale**2 + loc**2 - 1.0 - 2.0 * jnp.log(scale), -1)
    return -jnp.sum(expected_loglik - kl)


def per_particle_losses(elbo, rng_key, params, guide, num, *args):
    keys = jax.random.split(rng_key, num)
    return jax.jit(jax.vmap(lambda k: elbo.loss(k, params, ppca, guide, *args)))(keys)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("site",))
def encode(guide, params, *args, site="z"):
    """``(loc, scale)`` of a loc-scale encoder's q (jitted, cached per guide)."""
    q = guide.distributions(params, *args)[site]
    q = getattr(q, "base_dist", q)
    return q.loc, q.scale


def run_svi(svi, rng_key, num_steps, *args):
    """``svi.run`` with a jitted ``init`` (one compile instead of many eager ops)."""
    init_key, run_key = jax.random.split(rng_key)
    state = jax.jit(svi.init)(init_key, *args)
    return svi.run(run_key, num_steps, *args, progress_bar=False, init_state=state)


def decaying_adam(lr, num_steps):
    return optax.adam(optax.exponential_decay(lr, num_steps, 0.01))


@pytest.fixture(scope="module")
def trained_ppca():
    x = ppca_data(jax.random.key(0), 200)
    guide = enc.EncoderGuide(ppca, encoder=enc.NormalEncoder(hidden=()))
    svi = SVI(ppca, guide, decaying_adam(3e-2, 3000), TraceMeanField_ELBO())
    return guide, run_svi(svi, jax.random.key(1), 3000, x).params, x


def test_ppca_encoder_matches_analytic_posterior(trained_ppca):
    guide, params, _ = trained_ppca
    x_new = ppca_data(jax.random.key(5), 100)  # amortized: unseen datapoints
    loc, scale = encode(guide, params, x_new)
    assert loc.shape == scale.shape == (100, K)
    sd = jnp.sqrt(S_DIAG)
    mean_err = jnp.abs(loc - posterior_mean(x_new)) / sd
    assert float(mean_err.max()) < 0.1, mean_err.max()
    np.testing.assert_allclose(scale, jnp.broadcast_to(sd, scale.shape), rtol=0.08)
    # Predictive draws the local latents from the trained encoder
    predictive = Predictive(
        ppca, guide=guide, params=params, num_samples=2000, return_sites=["z"]
    )
    z = jax.jit(predictive)(jax.random.key(6), x_new)["z"]
    assert z.shape == (2000, 100, K)
    np.testing.assert_allclose(z.mean(0), loc, atol=float(4 * sd.max() / 2000**0.5))


def test_subsampled_plate_shapes_indices_and_scale(trained_ppca):
    guide, params, x = trained_ppca
    n, batch = x.shape[0], 8
    scales = {}

    @jax.jit
    def traces(params):
        seeded = handlers.substitute(handlers.seed(guide, 3), data=params)
        guide_tr = handlers.trace(seeded).get_trace(x, batch)
        model_tr = handlers.trace(handlers.replay(ppca, guide_tr)).get_trace(x, batch)
        scales.update(guide_z=guide_tr["z"]["scale"], model_x=model_tr["x"]["scale"])
        return (
            guide_tr["data"]["value"],
            guide_tr["z"]["value"],
            guide_tr["z"]["fn"].mean,
            model_tr["data"]["value"],
            model_tr["x"]["value"],
        )

    idx, z, z_mean, model_idx, model_x = traces(params)
    assert z.shape == (batch, K) and idx.shape == (batch,)
    assert scales["guide_z"] == pytest.approx(n / batch)
    assert scales["model_x"] == pytest.approx(n / batch)
    np.testing.assert_array_equal(model_idx, idx)
    np.testing.assert_array_equal(model_x, x[idx])
    # the encoder saw exactly the subsampled rows
    loc, scale = encode(guide, params, x)
    np.testing.assert_allclose(z_mean, loc[idx], atol=1e-5)


def test_trace_and_mean_field_elbos_are_unbiased_for_the_closed_form(trained_ppca):
    # Trace_ELBO and TraceMeanField_ELBO (analytic KL), on minibatches of 8 of 200
    # datapoints, both estimate the closed-form full-data ELBO: the N / B scale is
    # right and the two estimators agree in expectation.
    guide, params, x = trained_ppca
    n, batch, num = x.shape[0], 8, 4000
    exact = float(exact_neg_elbo(x, *encode(guide, params, x)))
    for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):
        losses = per_particle_losses(
            elbo, jax.random.key(4), params, guide, num, x, batch
        )
        mean, stderr = float(jnp.mean(losses)), float(jnp.std(losses)) / math.sqrt(num)
        assert abs(mean - exact) < 4 * stderr, (
            type(elbo).__name__,
            mean,
            exact,
            stderr,
        )
        assert abs(mean - exact * batch / n) > 20 * stderr  # unscaled would fail


def mixture(x):
    means = jnp.array([-3.0, 0.0, 3.0])
    with numpyro.plate("data", x.shape[0]):
        c = numpyro.sample("c", dist.Categorical(probs=jnp.ones(3) / 3))
        numpyro.sample("x", dist.Normal(means[c], 1.0), obs=x)


def train_with_grads(rng_key, elbo, model, guide, optimizer, num_steps, *args):
    """Plain optax loop in one ``lax.scan``: losses and whether every grad is finite."""
    svi = SVI(model, guide, optimizer, elbo)
    params = svi.get_params(jax.jit(svi.init)(rng_key, *args))
    loss_and_grad = jax.value_and_grad(
        lambda p, k: elbo.loss(k, p, model, guide, *args)
    )

    def step(carry, key):
        params, opt_state = carry
        loss, grads = loss_and_grad(params, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        finite = jnp.all(
            jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        )
        grad_norm = optax.tree.norm(grads)
        return (optax.apply_updates(params, updates), opt_state), (
            loss,
            finite,
            grad_norm,
        )

    keys = jax.random.split(jax.random.fold_in(rng_key, 1), num_steps)
    init = (params, optimizer.init(params))
    (params, _), trace = jax.jit(lambda c: jax.lax.scan(step, c, keys))(init)
    return params, trace


def test_discrete_local_latent_trains_with_trace_graph_elbo():
    means = jnp.array([-3.0, 0.0, 3.0])
    x = (means[:, None] + jax.random.normal(jax.random.key(0), (3, 60))).ravel()
    guide = enc.EncoderGuide(mixture, encoder=enc.CategoricalEncoder(hidden=()))
    params, (losses, finite, grad_norm) = train_with_grads(
        jax.random.key(1),
        TraceGraph_ELBO(),
        mixture,
        guide,
        decaying_adam(5e-2, 1500),
        1500,
        x,
    )
    assert bool(jnp.all(finite)) and bool(jnp.all(grad_norm > 0))
    assert float(losses[-100:].mean()) < float(losses[:100].mean()) - 50
    # the exact posterior P(c | x) is softmax(mu_c x - mu_c^2 / 2): linear logits,
    # found only with the score-function term of TraceGraph_ELBO
    grid = jnp.linspace(-5.0, 5.0, 41)
    exact = jax.nn.softmax(grid[:, None] * means - means**2 / 2, axis=-1)
    probs = jax.jit(lambda p: guide.distributions(p, grid)["c"].probs)(params)
    assert float(jnp.abs(probs - exact).max()) < 0.1


def global_offset_model(x):
    b = numpyro.sample("b", dist.Normal(0.0, 3.0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(z + b, 1.0), obs=x)


@pytest.fixture(scope="module")
def trained_global():
    x = 2.0 + math.sqrt(2.0) * jax.random.normal(jax.random.key(0), (100,))
    guide = enc.EncoderGuide(
        global_offset_model,
        encoder=enc.NormalEncoder(hidden=()),
        global_guide=AutoNormal,
    )
    optimizer = decaying_adam(3e-2, 2000)
    svi = SVI(global_offset_model, guide, optimizer, TraceMeanField_ELBO())
    return guide, run_svi(svi, jax.random.key(1), 2000, x).params, x


def test_global_latent_through_global_guide(trained_global):
    guide, params, x = trained_global
    n = x.shape[0]
    # Gaussian target: mean-field VI recovers the exact posterior mean of b, and
    # q(b)'s variance is 1 / (joint precision of b) = 1 / (1/9 + n).
    exact_mean = (x.sum() / 2.0) / (n / 2.0 + 1.0 / 9.0)
    mf_sd = 1.0 / math.sqrt(1.0 / 9.0 + n)
    assert abs(float(params["b_auto_loc"]) - float(exact_mean)) < 0.04
    assert float(params["b_auto_scale"]) == pytest.approx(mf_sd, rel=0.1)
    loc, scale = encode(guide, params, x)
    np.testing.assert_allclose(loc, (x - exact_mean) / 2.0, atol=0.1)
    np.testing.assert_allclose(scale, math.sqrt(0.5), rtol=0.05)


@pytest.mark.slow
def test_global_latent_through_auto_guide_list(trained_global):
    guide, params, x = trained_global
    hidden = handlers.block(handlers.seed(global_offset_model, 0), hide=["z"])
    listed = AutoGuideList(global_offset_model)
    listed.append(AutoNormal(hidden))
    listed.append(
        enc.EncoderGuide(
            global_offset_model,
            encoder=enc.NormalEncoder(hidden=()),
            external_globals=True,
        )
    )
    with handlers.seed(rng_seed=0):
        listed(x)  # set up (same parameter names as the global_guide= version)
    losses = {}
    for name, g in (("global_guide", guide), ("AutoGuideList", listed)):
        keys = jax.random.split(jax.random.key(3), 2000)
        fn = jax.vmap(
            lambda k, g=g: TraceMeanField_ELBO().loss(
                k, params, global_offset_model, g, x
            )
        )
        losses[name] = jax.jit(fn)(keys)
    diff = float(losses["global_guide"].mean() - losses["AutoGuideList"].mean())
    stderr = float(
        jnp.sqrt((losses["global_guide"].var() + losses["AutoGuideList"].var()) / 2000)
    )
    assert abs(diff) < 4 * stderr, (diff, stderr)
    draws = jax.jit(
        lambda p: listed.sample_posterior(jax.random.key(2), p, x, sample_shape=(7,))
    )(params)
    assert draws["b"].shape == (7,) and draws["z"].shape == (7, x.shape[0])


def test_global_latent_without_global_guide_is_a_clear_error():
    guide = enc.EncoderGuide(global_offset_model)
    with pytest.raises(ValueError, match=r"\['b'\].*global_guide=AutoNormal"):
        handlers.seed(guide, 0)(jnp.zeros(5))


def test_model_without_plate_local_latent_is_a_clear_error():
    def no_local(x):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    guide = enc.EncoderGuide(no_local)
    with pytest.raises(ValueError, match="expected per-datapoint latent") as info:
        handlers.seed(guide, 0)(jnp.zeros(5))
    assert "'mu' (latent; no plate)" in str(info.value)
    assert "'x' (observed; data)" in str(info.value)


def test_observed_site_not_passed_is_a_clear_error():
    @na.amortize(observed=["x"])
    def model(n=5, x=None):
        with numpyro.plate("data", n):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x)

    guide = enc.EncoderGuide(model)
    with pytest.raises(ValueError, match=r"'x' is not observed.*x=\.\.\."):
        handlers.seed(guide, 0)()


def two_site_model(x):
    with numpyro.plate("data", x.shape[0]):
        u = numpyro.sample("u", dist.Normal(0.0, 1.0))
        v = numpyro.sample("v", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(jnp.stack([u, v], -1), 1.0).to_event(1), obs=x)


@pytest.mark.slow
def test_symmetric_loc_scale_families_center_on_posterior_mean():
    # each posterior N(x/2, 1/2) is symmetric: the best symmetric q is centred on x/2
    x = jax.random.normal(jax.random.key(0), (100, 2)) * math.sqrt(2.0)
    specs = {
        "u": enc.LaplaceEncoder(hidden=()),
        "v": enc.StudentTEncoder(hidden=(), df=4.0),
    }
    guide = enc.EncoderGuide(two_site_model, encoder=specs)
    svi = SVI(two_site_model, guide, decaying_adam(3e-2, 2000), Trace_ELBO())
    params = svi.run(jax.random.key(1), 2000, x, progress_bar=False).params
    families = {}

    def locs(params):
        qs = guide.distributions(params, x)
        families.update({n: type(q).__name__ for n, q in qs.items()})
        return {n: q.loc for n, q in qs.items()}

    loc = jax.jit(locs)(params)
    assert families == {"u": "Laplace", "v": "StudentT"}
    np.testing.assert_allclose(loc["u"], x[:, 0] / 2.0, atol=0.06)
    np.testing.assert_allclose(loc["v"], x[:, 1] / 2.0, atol=0.06)


def test_constrained_local_site_gets_exact_jacobian():
    def positive(x):
        with numpyro.plate("data", x.shape[0]):
            r = numpyro.sample("r", dist.LogNormal(0.0, 1.0).expand([3]).to_event(1))
            numpyro.sample("x", dist.Normal(r, 1.0).to_event(1), obs=x)

    guide = enc.EncoderGuide(positive, encoder=enc.NormalEncoder(hidden=(8,)))

    @jax.jit  # also checks that the first call (building the network) may be jitted
    def run(x):
        tr = handlers.trace(handlers.seed(guide, 0)).get_trace(x)
        value, q = tr["r"]["value"], tr["r"]["fn"]
        base = q.base_dist  # Normal over log r
        expected = base.log_prob(jnp.log(value)) - jnp.sum(jnp.log(value), -1)
        return value, q.log_prob(value), expected

    value, log_prob, expected = run(jnp.ones((6, 3)))
    assert value.shape == (6, 3) and bool(jnp.all(value > 0))
    np.testing.assert_allclose(log_prob, expected, rtol=1e-5)


@pytest.mark.slow
def test_flow_encoder_density_is_normalized_and_reparameterized():
    site = enc.LocalSite("z", (2,), 1, constraints.real_vector, False, ())
    spec = enc.FlowEncoder(flow=CouplingFlow(num_layers=2, hidden=(8,)), hidden=(8,))
    h = jnp.array([[0.3, -1.0, 2.0]])
    g = jnp.linspace(-8.0, 8.0, 201)
    grid = jnp.stack(jnp.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 1, 2)
    shapes = {}

    @jax.jit
    def check(grid):
        module = spec.build(3, site, rngs=nnx.Rngs(0))
        # random weights everywhere (the flow starts at the identity otherwise)
        graphdef, state = nnx.split(module)
        leaves, tree = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        leaves = [
            p + 0.3 * jax.random.normal(k, p.shape)
            for p, k in zip(leaves, keys, strict=True)
        ]
        module = nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))
        q = module(h)
        shapes.update(batch=q.batch_shape, event=q.event_shape, rsample=q.has_rsample)
        u, lp = q.sample_and_log_prob(jax.random.key(0), (5,))
        mass = jnp.sum(jnp.exp(q.log_prob(grid))) * (g[1] - g[0]) ** 2
        gap = jnp.abs(q.log_prob(grid) - dist.Normal().log_prob(grid).sum(-1)).max()
        return mass, lp, q.log_prob(u), gap

    mass, lp, lp_again, gap = check(grid)
    assert shapes == {"batch": (1,), "event": (2,), "rsample": True}
    assert float(gap) > 0.5  # not the standard normal: the test below means something
    assert float(mass) == pytest.approx(1.0, abs=0.01)
    np.testing.assert_allclose(lp, lp_again, atol=1e-4)


def test_default_encoders_follow_the_support():
    def site(support, discrete):
        return enc.LocalSite("s", (3,), 1, support, discrete, ())

    assert isinstance(
        enc.default_encoder(site(constraints.real_vector, False)), enc.NormalEncoder
    )
    assert isinstance(
        enc.default_encoder(site(constraints.boolean, True)), enc.BernoulliEncoder
    )
    cat_site = site(constraints.integer_interval(0, 4), True)
    cat = enc.default_encoder(cat_site)
    assert isinstance(cat, enc.CategoricalEncoder)
    shapes = {}

    @jax.jit
    def probs(h):
        q = cat.build(2, cat_site, rngs=nnx.Rngs(0))(h)
        shapes.update(batch=q.batch_shape, event=q.event_shape)
        return q.base_dist.probs

    assert probs(jnp.zeros((7, 2))).shape == (7, 3, 5)
    assert shapes == {"batch": (7,), "event": (3,)}
    with pytest.raises(ValueError, match="no default encoder for site 's'"):
        enc.default_encoder(site(constraints.nonnegative_integer, True))


@pytest.mark.parametrize("spec", [s() for s in enc.ENCODER_SPECS])
def test_encoder_specs_round_trip_through_config(spec):
    assert spec_from_config(spec.to_config()) == spec


W_CORR = jnp.array([[1.0, 1.0], [1.0, 1.0], [1.0, 0.5], [0.5, 1.0]])


def correlated_ppca(x):
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([K]).to_event(1))
        numpyro.sample("x", dist.Normal(z @ W_CORR.T, 1.0).to_event(1), obs=x)


@pytest.mark.slow
def test_flow_encoder_captures_posterior_correlation():
    cov = jnp.linalg.inv(jnp.eye(K) + W_CORR.T @ W_CORR)  # sigma = 1
    exact_corr = float(cov[0, 1] / jnp.sqrt(cov[0, 0] * cov[1, 1]))
    assert exact_corr < -0.6  # a diagonal q could not represent this
    kz, kx = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kz, (300, K)) @ W_CORR.T + jax.random.normal(kx, (300, D))
    spec = enc.FlowEncoder(
        flow=CouplingFlow(num_layers=4, hidden=(32, 32)), context_dim=8, hidden=(32,)
    )
    guide = enc.EncoderGuide(correlated_ppca, encoder=spec)
    svi = SVI(correlated_ppca, guide, decaying_adam(1e-2, 6000), Trace_ELBO(4))
    params = svi.run(jax.random.key(1), 6000, x, progress_bar=False).params
    x_new = x[:5]

    @jax.jit
    def draws(params):
        q = guide.distributions(params, x_new)["z"]
        return q.sample(jax.random.key(2), (20_000,))  # (S, 5, K)

    z = draws(params)
    exact_mean = (x_new @ W_CORR) @ cov
    np.testing.assert_allclose(z.mean(0), exact_mean, atol=0.1)
    for i in range(5):
        emp = jnp.cov(z[:, i].T)
        np.testing.assert_allclose(
            jnp.sqrt(jnp.diag(emp)), jnp.sqrt(jnp.diag(cov)), rtol=0.1
        )
        corr = emp[0, 1] / jnp.sqrt(emp[0, 0] * emp[1, 1])
        assert abs(float(corr) - exact_corr) < 0.1, (float(corr), exact_corr)


@pytest.mark.slow
def test_discrete_encoder_needs_the_score_function_term():
    # negative control for the TraceGraph_ELBO test: without the score-function
    # term (Trace_ELBO) the encoder gets no signal from the likelihood
    means = jnp.array([-3.0, 0.0, 3.0])
    x = (means[:, None] + jax.random.normal(jax.random.key(0), (3, 60))).ravel()
    grid = jnp.linspace(-5.0, 5.0, 41)
    exact = jax.nn.softmax(grid[:, None] * means - means**2 / 2, axis=-1)
    errors = {}
    for elbo in (TraceGraph_ELBO(), Trace_ELBO()):
        guide = enc.EncoderGuide(mixture, encoder=enc.CategoricalEncoder(hidden=()))
        svi = SVI(mixture, guide, decaying_adam(5e-2, 1500), elbo)
        params = svi.run(jax.random.key(1), 1500, x, progress_bar=False).params
        probs = jax.jit(lambda p, g=guide: g.distributions(p, grid)["c"].probs)(params)
        errors[type(elbo).__name__] = float(jnp.abs(probs - exact).max())
    assert errors["TraceGraph_ELBO"] < 0.1 and errors["Trace_ELBO"] > 0.3, errors
