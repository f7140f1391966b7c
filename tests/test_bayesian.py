"""Bayesian network weights: selection, KL, the training objective, sampled
networks, epistemic uncertainty, InferenceData and saving."""

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
from scipy import stats

import numpyro_amortized as na
from numpyro_amortized import networks as nets
from numpyro_amortized.epistemic import bayesian_loss_fn
from numpyro_amortized.networks.bayesian_dense import LocalReparamLinear
from numpyro_amortized.networks.bayesian_kl import gaussian_kl, monte_carlo_kl
from numpyro_amortized.networks.bayesian_paths import match_path, select_paths
from numpyro_amortized.train import TrainState, make_train_step


# ------------------------------------------------------------------- KL
def test_gaussian_kl_known_values():
    # KL(N(1, 1) || N(0, 1)) = 1/2; KL(N(0, s^2) || N(0, 1)) = -log s + s^2/2 - 1/2
    one = gaussian_kl(jnp.ones(1), jnp.zeros(1), dist.Normal(0.0, 1.0))
    assert float(one) == pytest.approx(0.5, abs=1e-6)
    s = 0.3
    lv = jnp.full((2, 3), 2 * math.log(s))
    got = gaussian_kl(jnp.zeros((2, 3)), lv, dist.Normal(0.0, 1.0))
    assert float(got) == pytest.approx(6 * (-math.log(s) + s**2 / 2 - 0.5), rel=1e-5)


def test_kl_closed_form_equals_monte_carlo():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    mean = jax.random.normal(k1, (5, 4))
    log_var = jax.random.uniform(k2, (5, 4), minval=-4.0, maxval=1.0)
    prior = dist.Normal(0.3, 0.7)
    exact = float(gaussian_kl(mean, log_var, prior))
    eps = jax.random.normal(k3, (20_000, 5, 4))
    w = mean + jnp.exp(0.5 * log_var) * eps
    per_draw = jax.jit(jax.vmap(lambda w: monte_carlo_kl(w, mean, log_var, prior)))(w)
    estimate = float(jax.jit(monte_carlo_kl)(w, mean, log_var, prior))  # averages
    se = float(jnp.std(per_draw)) / math.sqrt(len(per_draw))
    assert estimate == pytest.approx(float(per_draw.mean()), rel=1e-5)
    assert abs(estimate - exact) < 4 * se, (estimate, exact, se)


def test_monte_carlo_kl_for_a_laplace_prior():
    # KL(N(m, s^2) || Laplace(0, b)) = -H(q) + log(2b) + E|w| / b, with
    # E|w| = s sqrt(2/pi) exp(-m^2 / 2s^2) + m (1 - 2 Phi(-m/s)).
    m, s, b = 0.4, 0.5, 0.8
    abs_mean = s * math.sqrt(2 / math.pi) * math.exp(-(m**2) / (2 * s**2)) + m * (
        1 - 2 * stats.norm.cdf(-m / s)
    )
    exact = -0.5 * math.log(2 * math.pi * math.e * s**2) + math.log(2 * b)
    exact += abs_mean / b
    module = nets.BayesianModule(
        _Scalar(m), init_logvar=2 * math.log(s), prior=dist.Laplace(0.0, b)
    )
    with pytest.raises(ValueError, match="rng_key"):
        module.kl()
    estimate = float(module.kl(jax.random.key(1), num_draws=50_000))
    assert estimate == pytest.approx(exact, abs=0.01)


class _Scalar(nnx.Module):
    def __init__(self, value: float):
        self.w = nnx.Param(jnp.asarray(value, jnp.float32))


# ------------------------------------------------------------- selection
def test_glob_patterns():
    path = ("couplings", 0, "conditioner", "output_layer", "bias")
    assert match_path("**", path)
    assert match_path("**.bias", path)
    assert match_path("couplings.*.conditioner.**", path)
    assert match_path("couplings.0.**.bias", path)
    assert match_path("couplings.[01].conditioner.*.b*", path)
    assert not match_path("couplings.*.bias", path)  # '*' is one level only
    assert not match_path("*.bias", path)
    assert not match_path("**.kernel", path)
    assert match_path("**.bias", ("bias",))  # '**' may match nothing


@functools.cache
def _plain_flow():
    spec = nets.CouplingFlow(num_layers=2, hidden=(8,), actnorm=True)
    return spec.build(3, 2, rngs=nnx.Rngs(0))


def _flow(**kwargs):
    return nets.BayesianModule(_plain_flow(), **kwargs)


def test_include_exclude_select_exactly_the_intended_parameters():
    plain = _plain_flow()
    paths = nets.parameter_paths(plain)
    assert any(p[0] == "actnorms" for p in paths)
    assert set(select_paths(plain, ["**.bias"])) == {
        p for p in paths if p[-1] == "bias"
    }
    expected = {
        p for p in paths if p[:3] == ("couplings", 0, "conditioner") and p[-1] != "bias"
    }
    assert len(expected) == 2
    some = nets.BayesianModule(
        nnx.clone(plain),
        include=["couplings.*.conditioner.**"],
        exclude=["**.bias", "couplings.1.**"],
        init_logvar=-7.0,
    )
    assert set(some.paths) == expected

    # Means start at the usual initialisation, log-variances at init_logvar.
    plain_flat = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    for p, mean, lv in zip(some.paths, some.means(), some.log_variances, strict=True):
        np.testing.assert_array_equal(mean, plain_flat[p][...])
        np.testing.assert_array_equal(lv[...], np.full(mean.shape, -7.0))

    # Sampling changes exactly the selected parameters; called directly the
    # module is its mean network.
    graphdef, state = nnx.split(some)
    x, ctx = jnp.ones((4, 3)), jnp.ones((4, 2))

    @jax.jit
    def drawn_params(key):
        module = nnx.merge(graphdef, state)
        drawn, _ = module.sample_weights(key)
        return nnx.state(drawn, nnx.Param), module.log_prob(x, ctx)

    drawn, mean_log_prob = drawn_params(jax.random.key(0))
    flat = dict(nnx.to_flat_state(drawn))
    for p in paths:
        same = np.array_equal(flat[p][...], plain_flat[p][...])
        assert same == (p not in expected), p
    plain_def, plain_state = nnx.split(plain)
    plain_log_prob = jax.jit(lambda s: nnx.merge(plain_def, s).log_prob(x, ctx))
    np.testing.assert_allclose(mean_log_prob, plain_log_prob(plain_state), atol=1e-6)


def test_patterns_that_match_nothing_raise():
    with pytest.raises(ValueError, match=r"include=\['flow\.\*\*'\].*couplings\.0"):
        _flow(include="flow.**")
    with pytest.raises(ValueError, match=r"exclude=\['\*\*\.weight'\]"):
        _flow(exclude="**.weight")
    with pytest.raises(ValueError, match="selects no parameter"):
        _flow(include="**.bias", exclude="**.bias")
    with pytest.raises(ValueError, match="dotted glob"):
        _flow(include="couplings..bias")
    with pytest.raises(ValueError, match="scalar"):
        nets.bayesian(nets.MLP(), prior=dist.Normal(jnp.zeros(2), 1.0))
    with pytest.raises(TypeError, match="numpyro distribution"):
        nets.bayesian(nets.MLP(), prior=1.0)


@pytest.mark.slow  # test budget; the exact-posterior tests also pin the draws
def test_dense_layer_draws_with_and_without_local_reparameterization():
    # One dense layer y = x W + b: y_j ~ N(x M_j + m_j, x^2 V_j + v_j) either way;
    # whole-weight draws are W ~ N(M, V) with one output per draw.
    spec = nets.bayesian(
        nets.MLP(summary_dim=2, hidden=()),
        init_logvar=-1.0,
        local_reparameterization=True,
    )
    module = spec.build(3, rngs=nnx.Rngs(0))
    x = jnp.array([[0.5, -1.0, 2.0]])
    kernel = module.net.net.output_layer.kernel[...]
    mean = x @ kernel + module.net.net.output_layer.bias[...]
    var = (x**2).sum() * math.exp(-1.0) + math.exp(-1.0)
    graphdef, state = nnx.split(module)

    @jax.jit
    def whole(key):
        net, _ = nets.sample_weights(key, nnx.merge(graphdef, state))
        return net(jnp.repeat(x, 10, axis=0)), net.net.output_layer.kernel[...]

    y, drawn = jax.vmap(whole)(jax.random.split(jax.random.key(1), 400))
    # sd e^-0.5 = 0.61: standard errors 0.03 (mean), 3.5% (sd)
    np.testing.assert_allclose(drawn.mean(0), kernel, atol=0.12)
    np.testing.assert_allclose(drawn.std(0), math.exp(-0.5), rtol=0.14)
    assert float(jnp.std(y, axis=1).max()) < 1e-5  # one output per weight draw
    # standard errors of the outputs: 0.076 (mean), 7% (variance)
    np.testing.assert_allclose(y[:, 0].mean(0), mean[0], atol=0.3)
    np.testing.assert_allclose(y[:, 0].var(0), var, rtol=0.3)

    # Local: the dense layer becomes one that samples its outputs per row.
    layers = []

    @jax.jit
    def local(key, rows):
        net, _ = nets.sample_weights(
            key, nnx.merge(graphdef, state), local_reparameterization=True
        )
        layers.append(net.net.output_layer)
        return net(rows), net.net.output_layer.kernel_var[...]

    y, kernel_var = local(jax.random.key(2), jnp.repeat(x, 200_000, axis=0))
    assert isinstance(layers[0], LocalReparamLinear)
    np.testing.assert_allclose(kernel_var, math.exp(-1.0), rtol=1e-6)
    # standard errors: 0.0034 (mean), 0.3% (variance)
    np.testing.assert_allclose(y.mean(0), mean[0], atol=0.02)
    np.testing.assert_allclose(y.var(0), var, rtol=0.02)


# ------------------------------------------------------------ objective
class _LinearGaussian(nnx.Module):
    """q(theta | x, w) = N(theta; w x, 1): one weight, a closed-form posterior."""

    def __init__(self):
        self.w = nnx.Param(jnp.zeros(()))

    def loss(self, rng_key, theta, x, mask=None):
        del rng_key, mask
        return 0.5 * (theta - self.w[...] * x) ** 2 + 0.5 * math.log(2 * math.pi)


class _Holder(nnx.Module):
    def __init__(self, flow):
        self.flow = flow

    def loss(self, rng_key, theta, x, mask=None):
        return self.flow.loss(rng_key, theta, x, mask)


@pytest.mark.parametrize(
    "num_simulations", [10, pytest.param(300, marks=pytest.mark.slow)]
)
def test_objective_recovers_the_exact_weight_posterior(num_simulations):
    """Mean-field VI on one weight with the per-simulation loss + KL / N is exact:
    q(w) -> N(sum(x theta) / (1 + sum x^2), 1 / (1 + sum x^2))."""
    kx, kn = jax.random.split(jax.random.key(num_simulations))
    x = jax.random.normal(kx, (num_simulations,))
    theta = 0.8 * x + jax.random.normal(kn, (num_simulations,))
    precision = 1.0 + float(jnp.sum(x**2))
    exact_mean, exact_var = float(jnp.sum(x * theta)) / precision, 1.0 / precision

    holder = _Holder(nets.BayesianModule(_LinearGaussian(), init_logvar=-3.0))
    graphdef, params, rest = nnx.split(holder, nnx.Param, ...)
    loss_fn = bayesian_loss_fn(graphdef, rest, num_simulations)
    optimizer = optax.adam(optax.cosine_decay_schedule(0.05, 4000, alpha=0.01))
    step = make_train_step(loss_fn, optimizer)
    batch = ((theta, x, None), None)  # full batch, one weight draw per step

    def body(state, key):
        return step(state, batch, key)

    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    keys = jax.random.split(jax.random.key(2), 4000)
    state, _ = jax.jit(lambda s: jax.lax.scan(body, s, keys))(state)
    module = nnx.merge(graphdef, state.params, rest).flow
    mean, var = float(module.means()[0]), float(module.variances()[0])
    assert mean == pytest.approx(exact_mean, abs=0.1 * math.sqrt(exact_var))
    assert var == pytest.approx(exact_var, rel=0.1)


# ----------------------------------------------------- trained posteriors
@na.amortize(observed=["x"])
def _model(x=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("x", dist.Normal(mu, 0.5).expand([2]).to_event(1), obs=x)


def _bayesian_posterior(**kwargs):
    flow = nets.CouplingFlow(num_layers=1, hidden=(16,), actnorm=False)
    return na.AmortizedPosterior(
        _model, nets.bayesian(flow, init_logvar=-5.0, **kwargs)
    )


def _fit(post, bank, n, epochs):
    post.fit(
        jax.random.key(1),
        simulations={k: v[:n] for k, v in bank.items()},
        batch_size=32,
        max_epochs=epochs,
        learning_rate=3e-2,
        validation_fraction=0.0,
        progress=False,
    )
    return post


def _log_variances(post):
    flat = nnx.to_flat_state(post._fitted.params)
    return np.concatenate(
        [np.ravel(v[...]) for _, v in flat if isinstance(v, nets.LogVariance)]
    )


def _simulate(seed, n):
    """The model's simulations, written out in NumPy (no compilation)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=n).astype(np.float32)
    x = mu[:, None] + 0.5 * rng.normal(size=(n, 2)).astype(np.float32)
    return {"mu": mu, "x": x}


@pytest.fixture(scope="module")
def bank():
    return _simulate(0, 8192)


@pytest.fixture(scope="module")
def datasets():
    x = _simulate(9, 16)["x"]
    return {"in": x, "out": x + 6.0}  # 6 = 5.4 sd of the marginal of x


@pytest.fixture(scope="module")
def trained(bank):
    """160 steps on 256 simulations: enough to tell data apart from outliers."""
    return _fit(_bayesian_posterior(), bank, 256, 20)


NUM_NETWORKS, NUM_SAMPLES = 16, 200  # one compilation shared by the tests below


@pytest.fixture(scope="module")
def spreads(trained, datasets):
    return {
        kind: trained.epistemic(
            jax.random.key(3),
            {"x": x},
            num_networks=NUM_NETWORKS,
            num_samples=NUM_SAMPLES,
        )
        for kind, x in datasets.items()
    }


def test_epistemic_spread_is_larger_out_of_distribution(spreads):
    inside = float(spreads["in"].relative_spread["mu"].mean())
    outside = float(spreads["out"].relative_spread["mu"].mean())
    print("relative spread in / out of distribution:", inside, outside)
    assert outside > 4 * inside
    summary = spreads["in"]
    assert summary.means["mu"].shape == summary.sds["mu"].shape == (16, 16)
    assert summary.mean_spread["mu"].shape == (16,)
    np.testing.assert_allclose(
        summary.mean_spread["mu"], summary.means["mu"].std(0), rtol=1e-5
    )
    np.testing.assert_allclose(
        summary.relative_spread["mu"],
        summary.mean_spread["mu"] / summary.sds["mu"].mean(0),
        rtol=1e-5,
    )


def test_num_networks_shapes_and_inference_data(trained, datasets):
    x = datasets["in"]
    key = jax.random.key(4)
    draws = trained.sample(key, {"x": x}, NUM_SAMPLES, num_networks=NUM_NETWORKS)
    assert draws["mu"].shape == (NUM_NETWORKS, 16, NUM_SAMPLES)
    # Network k of sample(key, ..., num_networks=K) is sample_network of the first
    # half of split(key, K)[k], sampled with the second half.
    k = 3
    weight_key, sample_key = jax.random.split(jax.random.split(key, NUM_NETWORKS)[k])
    point = trained.sample_network(weight_key)
    assert not point.is_bayesian
    assert point.inference_net == trained.inference_net.spec
    np.testing.assert_allclose(
        point.sample(sample_key, {"x": x}, NUM_SAMPLES)["mu"], draws["mu"][k], atol=1e-5
    )
    # Sampled networks differ from each other.
    assert float(jnp.std(draws["mu"].mean(2), axis=0).min()) > 1e-3
    idata = trained.to_inference_data(
        key, {"x": x}, NUM_SAMPLES, num_networks=NUM_NETWORKS
    )
    assert idata.posterior["mu"].dims == ("chain", "draw", "network", "dataset")
    assert idata.posterior["mu"].shape == (1, NUM_SAMPLES, NUM_NETWORKS, 16)
    np.testing.assert_allclose(
        idata.posterior["mu"].values[0], np.moveaxis(np.asarray(draws["mu"]), 2, 0)
    )
    assert idata.observed_data["x"].dims == ("dataset", "x_dim_0")
    with pytest.raises(ValueError, match="num_networks must be"):
        trained.sample(key, {"x": x}, 50, num_networks=0)
    for call in (
        lambda: point.sample(key, {"x": x}, 5, num_networks=2),
        lambda: point.sample_network(key),
        lambda: point.epistemic(key, {"x": x}),
    ):
        with pytest.raises(ValueError, match="na.networks.bayesian"):
            call()


def test_kl_is_scaled_by_the_number_of_simulations(trained, bank):
    f = trained._fitted
    arrays, _ = trained._prepare({k: v[:32] for k, v in bank.items()})
    kl = float(nnx.merge(f.graphdef, f.params, f.rest).flow.kl())
    few, many = (
        trained._loss_fn(num_simulations=10),
        trained._loss_fn(num_simulations=1000),
    )
    key = jax.random.key(5)
    a, b = jax.jit(lambda p: (few(p, key, arrays), many(p, key, arrays)))(f.params)
    np.testing.assert_allclose(a - b, kl * (1 / 10 - 1 / 1000), rtol=1e-4)
    with pytest.raises(ValueError, match="number of training simulations"):
        trained._loss_fn()


def test_save_and_load(trained, tmp_path):
    back = na.load(trained.save(tmp_path / "bnn.npa"))
    assert back.is_bayesian and back.inference_net == trained.inference_net
    saved = nnx.to_flat_state(trained._fitted.params)
    loaded = dict(nnx.to_flat_state(back._fitted.params))
    assert len(saved) == len(loaded)
    for path, v in saved:
        assert type(loaded[path]) is type(v)  # log-variances stay LogVariance
        np.testing.assert_array_equal(loaded[path][...], v[...])
    point = trained.sample_network(jax.random.key(0))
    again = na.load(point.save(tmp_path / "one.npa"))
    assert not again.is_bayesian and again.inference_net == point.inference_net
    # Priors are saved by name and parameters; others cannot be.
    laplace = nets.bayesian(nets.MLP(), prior=dist.Laplace(0.0, 0.3), exclude="**.bias")
    assert nets.spec_from_config(nets.network_config(laplace)) == laplace
    mixture = dist.MixtureSameFamily(
        dist.Categorical(jnp.array([0.5, 0.5])), dist.Normal(0.0, jnp.array([1.0, 0.1]))
    )
    with pytest.raises(TypeError, match="Cannot save the Bayesian weight prior"):
        nets.network_config(nets.bayesian(nets.MLP(), prior=mixture))


class _Stop(Exception):
    pass


def test_number_of_simulations_that_scales_the_kl(monkeypatch, bank):
    """Offline: the training set; online: num_steps * batch_size unless
    num_effective_simulations is given (checked without compiling anything)."""
    import numpyro_amortized.epistemic as epistemic

    seen = []

    def spy(graphdef, rest, num_simulations):
        seen.append(num_simulations)
        raise _Stop

    monkeypatch.setattr(epistemic, "bayesian_loss_fn", spy)
    post = _bayesian_posterior()
    sims = {k: v[:200] for k, v in bank.items()}
    with pytest.raises(_Stop):
        post.fit(jax.random.key(0), simulations=sims, validation_fraction=0.1)
    kw = {"batch_size": 16, "num_validation": 64, "progress": False}
    with pytest.raises(_Stop):
        post.fit_online(jax.random.key(7), num_steps=50, steps_per_epoch=30, **kw)
    with pytest.raises(_Stop):
        post.fit_online(jax.random.key(7), num_effective_simulations=7, **kw)
    assert seen == [180, 60 * 16, 7]


# --------------------------------------------------------- NumPyro sites
def test_weights_as_numpyro_sites_give_the_exact_posterior_in_svi():
    """y = w x + N(0, 1) with w ~ N(0, 1): the mean-field guide is exact."""
    from numpyro.infer import SVI, Trace_ELBO

    lin = nnx.Linear(1, 1, use_bias=False, rngs=nnx.Rngs(0))
    module = nets.BayesianModule(lin, init_logvar=-3.0)
    before = np.asarray(lin.kernel[...])

    def model(x, y=None):
        net = na.random_bayesian_module("net", module)
        numpyro.sample("y", dist.Normal(net(x[:, None])[:, 0], 1.0), obs=y)

    def guide(x, y=None):
        na.bayesian_nnx_module("net", module)

    x = jax.random.normal(jax.random.key(0), (50,))
    y = 0.8 * x + jax.random.normal(jax.random.key(1), (50,))
    precision = 1.0 + float(jnp.sum(x**2))
    mean, var = float(jnp.sum(x * y)) / precision, 1.0 / precision

    trace = numpyro.handlers.trace(numpyro.handlers.seed(guide, 0)).get_trace(x)
    assert trace["net/kernel"]["type"] == "sample"
    assert {"net$params", "net$mean", "net$log_var"} <= set(trace)
    schedule = optax.cosine_decay_schedule(0.05, 2000, alpha=0.01)
    svi = SVI(model, guide, optax.adam(schedule), Trace_ELBO())
    result = svi.run(jax.random.key(2), 2000, x, y, progress_bar=False)
    got_mean = float(result.params["net$mean"]["kernel"][0, 0])
    got_var = float(jnp.exp(result.params["net$log_var"]["kernel"][0, 0]))
    assert got_mean == pytest.approx(mean, abs=0.1 * math.sqrt(var))
    assert got_var == pytest.approx(var, rel=0.1)
    np.testing.assert_array_equal(lin.kernel[...], before)  # the module is unchanged
    with pytest.raises(TypeError, match="Bayesian weights"):
        na.bayesian_nnx_module("net", lin)


# ------------------------------------------------------------------ slow
@pytest.mark.slow
def test_more_simulations_shrink_weight_variances_and_epistemic_spread(bank, datasets):
    posts = {64: _fit(_bayesian_posterior(), bank, 64, 200)}  # 400 steps
    posts[8192] = _fit(_bayesian_posterior(), bank, 8192, 2)  # 512 steps
    small, large = _log_variances(posts[64]), _log_variances(posts[8192])
    print("mean log-variance: 64 sims", small.mean(), " 8192 sims", large.mean())
    # From -5 at init: the KL pulls towards the prior (0) at 64 simulations; the
    # likelihood pulls the other way at 8192.
    assert small.mean() > -4.0 > -5.0 > large.mean()
    spread = {}
    for n, post in posts.items():
        for kind, x in datasets.items():
            e = post.epistemic(jax.random.key(3), {"x": x}, num_networks=16)
            spread[n, kind] = float(e.mean_spread["mu"].mean())
    print("spread of posterior means:", spread)
    assert spread[8192, "in"] < 0.6 * spread[64, "in"]
    for n in posts:
        assert spread[n, "out"] > 4 * spread[n, "in"]


@pytest.mark.slow
def test_fit_online_with_a_monte_carlo_kl():
    post = _bayesian_posterior(prior=dist.Laplace(0.0, 1.0))
    post.fit_online(
        jax.random.key(8),
        num_steps=60,
        steps_per_epoch=30,
        batch_size=16,
        num_validation=64,
        num_effective_simulations=1,
        progress=False,
    )
    f = post._fitted
    module = nnx.merge(f.graphdef, f.params, f.rest).flow
    kl = float(module.kl(jax.random.key(0), num_draws=100))
    # With N = 1 the loss is the KL (hundreds of nats) plus a few nats of NLL.
    print("online losses", post.history.train_loss, "KL", kl)
    assert kl > 50 and min(post.history.train_loss) > 0.9 * kl
    assert np.isfinite(post.history.val_loss).all()
