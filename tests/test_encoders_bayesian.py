"""EncoderGuide with Bayesian encoder weights (``na.networks.bayesian(spec)``).

The model is probabilistic PCA with known weights (as in ``test_encoders.py``):
``z_i ~ N(0, I_2)``, ``x_i | z_i ~ N(W z_i + b, 0.5^2 I_4)``, whose posterior is
``N(S W^T (x_i - b) / sigma^2, S)`` with diagonal ``S`` (W has orthogonal columns).
The references are exact identities of the ELBO (the weight term is the closed-form
``-KL(q(w) || p(w))`` with ``TraceMeanField_ELBO`` and ``log p(w) - log q(w)`` at
the drawn weights with ``Trace_ELBO``) and, in the slow test, the analytic posterior.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from flax import nnx
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from ppca_model import S_DIAG, D, K, posterior_mean, ppca, ppca_data

import numpyro_amortized as na
from numpyro_amortized import encoders as enc

PREFIX = "encoder/sites.z.net."  # weight site = PREFIX + path in the NormalEncoder


def bayes_guide(include=("**",), exclude=(), hidden=(4,), init_logvar=-4.0):
    spec = na.networks.bayesian(
        enc.NormalEncoder(hidden=hidden),
        include=include,
        exclude=exclude,
        init_logvar=init_logvar,
    )
    return enc.EncoderGuide(ppca, encoder=spec)


def flat_paths(tree, prefix=()):
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in flat_paths(v, (*prefix, k))]
    return [".".join(str(k) for k in prefix)]


X20 = ppca_data(jax.random.key(0), 20)
SELECTED = ["net.hidden_layers.0.kernel", "net.output_layer.kernel"]
NAMES = [f"sites.z.net.{s}" for s in SELECTED]  # keys of $mean and $log_var


@pytest.fixture(scope="module")
def kernels_bayesian():
    """Kernels Bayesian, biases point estimates; SVI on minibatches of 5 of 20."""
    guide = bayes_guide(include=["net.**"], exclude=["**.bias"])
    svi = SVI(
        guide.model_with_weight_prior(), guide, optax.adam(3e-2), TraceMeanField_ELBO()
    )
    state = jax.jit(lambda k: svi.init(k, X20, 5))(jax.random.key(0))
    return guide, svi, state


def test_selected_paths_get_mean_and_log_var_params_and_train(kernels_bayesian):
    guide, svi, state = kernels_bayesian
    p0 = svi.get_params(state)
    assert sorted(p0["encoder$mean"]) == sorted(p0["encoder$log_var"]) == NAMES
    assert guide.weight_sites == tuple(f"{PREFIX}{s}" for s in SELECTED)
    # the point weights: exactly the unselected ones (no log-variances)
    assert sorted(flat_paths(p0["encoder$params"])) == [
        "sites.z.net.net.hidden_layers.0.bias",
        "sites.z.net.net.output_layer.bias",
    ]
    # means start at the plain encoder's initialisation, log-variances at -4
    site = enc.LocalSite("z", (K,), 1, constraints.real, False, ())
    plain = enc.NormalEncoder(hidden=(4,)).build(D, site, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(
        p0["encoder$mean"][NAMES[0]], plain.net.hidden_layers[0].kernel[...]
    )
    for v in p0["encoder$log_var"].values():
        np.testing.assert_array_equal(v, -4.0)
    # the loss falls, and gradients reach every log-variance
    result = svi.run(
        jax.random.key(1), 100, X20, 5, progress_bar=False, init_state=state
    )
    assert float(result.losses[-20:].mean()) < 0.5 * float(result.losses[:5].mean())
    for n in NAMES:  # (a weight without gradient would not move at all)
        change = jnp.abs(result.params["encoder$log_var"][n] - p0["encoder$log_var"][n])
        assert float(change.min()) > 0 and float(change.mean()) > 0.1, (n, change)


def test_only_included_paths_are_bayesian():
    guide = bayes_guide(include=["net.output_layer.*"], exclude=["**.bias"])
    svi = SVI(guide.model_with_weight_prior(), guide, optax.adam(1e-2), Trace_ELBO())
    shapes = svi.get_params(jax.eval_shape(svi.init, jax.random.key(0), X20))
    kernel = "sites.z.net.net.output_layer.kernel"
    assert list(shapes["encoder$mean"]) == list(shapes["encoder$log_var"]) == [kernel]
    assert shapes["encoder$mean"][kernel].shape == (4, 2 * K)
    assert sorted(flat_paths(shapes["encoder$params"])) == [
        "sites.z.net.net.hidden_layers.0.bias",
        "sites.z.net.net.hidden_layers.0.kernel",
        "sites.z.net.net.output_layer.bias",
    ]
    # the guide returns (and sample_posterior draws) the weights with the latents
    draws = jax.eval_shape(
        lambda p: guide.sample_posterior(jax.random.key(1), p, X20, sample_shape=(3,)),
        shapes,
    )
    assert {n: v.shape for n, v in draws.items()} == {
        f"encoder/{kernel}": (3, 4, 2 * K),
        "z": (3, 20, K),
    }
    # minibatches of 5 of 20: z and x scaled by N / B = 4 (the data plate), the
    # weight sites on both sides by 1 (outside every plate: the KL counts once)
    scales = {}

    def traces(params):
        seeded = handlers.substitute(handlers.seed(guide, 0), data=params)
        guide_tr = handlers.trace(seeded).get_trace(X20, 5)
        model = guide.model_with_weight_prior()
        model = handlers.replay(handlers.seed(model, 1), guide_tr)
        model_tr = handlers.trace(model).get_trace(X20, 5)
        for name, tr in (("guide", guide_tr), ("model", model_tr)):
            scales.update(
                {f"{name} {s}": tr[s]["scale"] for s in ("z", f"encoder/{kernel}")}
            )
        scales["model x"] = model_tr["x"]["scale"]

    jax.eval_shape(traces, shapes)
    w = f"encoder/{kernel}"
    assert scales == {  # (the weight sites' scale is kl_scale)
        "guide z": 4.0,
        "model z": 4.0,
        "model x": 4.0,
        f"guide {w}": 1.0,
        f"model {w}": 1.0,
    }


def test_weight_draws_differ_between_keys_and_repeat_with_the_same_key(
    kernels_bayesian,
):
    guide, svi, state = kernels_bayesian
    params = svi.get_params(state)
    # a nonzero output layer, so that the encoding depends on every weight
    params["encoder$mean"] = {k: v + 0.3 for k, v in params["encoder$mean"].items()}
    # the plain encoder at the means (the biases are the point weights)
    point = params["encoder$params"]["sites"]["z"]["net"]["net"]
    plain_net = {
        "hidden_layers": {0: dict(point["hidden_layers"][0])},
        "output_layer": dict(point["output_layer"]),
    }
    plain_net["hidden_layers"][0]["kernel"] = params["encoder$mean"][NAMES[0]]
    plain_net["output_layer"]["kernel"] = params["encoder$mean"][NAMES[1]]
    plain_params = {"encoder$params": {"sites": {"z": {"net": plain_net}}}}
    plain = enc.EncoderGuide(ppca, encoder=enc.NormalEncoder(hidden=(4,)))

    @jax.jit
    def one(key):
        seeded = handlers.substitute(handlers.seed(guide, key), data=params)
        tr = handlers.trace(seeded).get_trace(X20)
        return [tr[s]["value"] for s in guide.weight_sites], tr["z"]["fn"].mean

    @jax.jit
    def encodings(params, plain_params):
        loc = guide.distributions(params, X20)["z"].base_dist.loc
        ref = plain.distributions(plain_params, X20)["z"].base_dist.loc
        summary = guide.epistemic(jax.random.key(3), params, X20, num_networks=8)
        return loc, ref, summary

    (w1, m1), (w1b, m1b), (w2, m2) = (one(jax.random.key(k)) for k in (1, 1, 2))
    for a, b, c in zip(w1, w1b, w2, strict=True):
        np.testing.assert_array_equal(a, b)
        assert float(jnp.abs(a - c).min()) > 0
    np.testing.assert_array_equal(m1, m1b)
    assert float(jnp.abs(m1 - m2).max()) > 1e-3
    # the weights are N(mean, exp(-4)): standardized draws are about N(0, 1)
    z = jnp.concatenate(
        [
            ((w - params["encoder$mean"][n]) / jnp.exp(-2.0)).ravel()
            for w, n in zip(w1, NAMES, strict=True)
        ]
    )
    assert abs(float(z.mean())) < 4 / z.size**0.5 and abs(float(z.std()) - 1) < 0.2
    # distributions(): the mean network, i.e. the plain encoder at the means
    loc, ref, summary = encodings(params, plain_params)
    np.testing.assert_allclose(loc, ref, rtol=1e-6)
    # epistemic(): the encodings of 8 weight draws, spread around the mean network
    assert summary.means["z"].shape == summary.sds["z"].shape == (8, 20, K)
    spread = summary.mean_spread["z"]
    assert float(spread.min()) > 0.01
    assert float(jnp.abs(summary.means["z"] - loc).max()) < 20 * float(spread.max())


def test_elbo_is_point_weight_elbo_plus_weight_term(kernels_bayesian):
    """One-particle loss = the same guide's loss with the weights fixed at the drawn
    values (and the same z draw) + KL(q(w)||p(w)) in closed form (mean-field) or
    log q(w) - log p(w) at the draw (Trace_ELBO); full data (no subsampling)."""
    guide, svi, state = kernels_bayesian
    params = svi.get_params(state)
    model = guide.model_with_weight_prior()
    means, log_vars = params["encoder$mean"], params["encoder$log_var"]
    sites = dict(zip(guide.weight_sites, NAMES, strict=True))

    @jax.jit
    def both(key):
        # both ELBOs seed the guide with the second half of the key: same draws
        seeded = handlers.substitute(
            handlers.seed(guide, jax.random.split(key)[1]), data=params
        )
        tr = handlers.trace(seeded).get_trace(X20)
        draws = {s: tr[s]["value"] for s in (*sites, "z")}
        fixed = handlers.block(handlers.substitute(guide, data=draws), hide=list(sites))
        log_q_minus_log_p = sum(
            jnp.sum(
                dist.Normal(means[n], jnp.exp(0.5 * log_vars[n])).log_prob(draws[s])
                - dist.Normal(0.0, 1.0).log_prob(draws[s])
            )
            for s, n in sites.items()
        )
        return log_q_minus_log_p, [
            (
                elbo.loss(key, params, model, guide, X20),
                elbo.loss(jax.random.key(99), params, ppca, fixed, X20),
            )
            for elbo in (TraceMeanField_ELBO(), Trace_ELBO())
        ]

    log_q_p, [(loss, point_loss), (mc_loss, mc_point_loss)] = both(jax.random.key(5))
    kl = sum(
        0.5 * jnp.sum(jnp.exp(log_vars[n]) + means[n] ** 2 - 1.0 - log_vars[n])
        for n in NAMES
    )
    assert float(kl) > 10 and float(log_q_p) > 10  # a missing/doubled term is far off
    np.testing.assert_allclose(loss, point_loss + kl, rtol=1e-4)
    np.testing.assert_allclose(mc_loss, mc_point_loss + log_q_p, rtol=1e-4)


def test_point_encoder_model_with_weight_prior_is_a_clear_error():
    guide = enc.EncoderGuide(ppca, encoder=enc.NormalEncoder(hidden=()))
    model = handlers.seed(guide.model_with_weight_prior(), 0)
    with pytest.raises(ValueError, match="no Bayesian weights.*bayesian"):
        jax.eval_shape(model, X20)
    with pytest.raises(ValueError, match="epistemic needs Bayesian"):
        guide.epistemic(jax.random.key(0), {}, X20)


@pytest.mark.slow
def test_more_data_shrink_the_weight_variances_and_keep_the_posterior():
    """Linear Normal encoder with a Bayesian kernel on pPCA, 3000 steps of batch 100
    (all 20 for N = 20): with 2000 datapoints instead of 20 the learned weight
    variances and the spread of the encodings across weight draws shrink (the KL
    counts once, the data term N times; a weight's posterior variance falls about
    as 1 / N once the data dominate the prior), and the mean encoder still matches
    the analytic posterior. Measured: mean log-variance -4.87 at N = 20 and -8.26
    at N = 2000 (not yet converged: -8.9 after 6000 steps at a higher final
    learning rate), relative spread 0.385 and 0.089; at N = 2000 the mean encoder's
    largest mean error is 0.04 posterior sd, its largest scale error 4%. 25 s.
    """
    num_steps = 3000
    x_new = ppca_data(jax.random.key(7), 200)
    log_var, spread = {}, {}
    for n in (20, 2000):
        x = ppca_data(jax.random.key(n), n)
        batch = min(n, 100)
        guide = bayes_guide(
            include=["net.**"], exclude=["**.bias"], hidden=(), init_logvar=-6.0
        )
        svi = SVI(
            guide.model_with_weight_prior(),
            guide,
            optax.adam(optax.exponential_decay(3e-2, num_steps, 0.01)),
            TraceMeanField_ELBO(),
        )
        state = jax.jit(lambda k, x=x, svi=svi, b=batch: svi.init(k, x, b))(
            jax.random.key(1)
        )
        result = svi.run(
            jax.random.key(2),
            num_steps,
            x,
            batch,
            progress_bar=False,
            init_state=state,
        )
        (log_var[n],) = result.params["encoder$log_var"].values()
        summary = guide.epistemic(jax.random.key(3), result.params, x_new)
        spread[n] = float(jnp.mean(summary.relative_spread["z"]))
        q = guide.distributions(result.params, x_new)["z"].base_dist
        mean_err = jnp.abs(q.loc - posterior_mean(x_new)) / jnp.sqrt(S_DIAG)
        scale_err = jnp.abs(q.scale / jnp.sqrt(S_DIAG) - 1)
        print(
            f"N={n}: mean log-var {float(log_var[n].mean()):.2f}, relative spread "
            f"{spread[n]:.3f}, max mean error {float(mean_err.max()):.3f} sd, "
            f"scale error mean {float(scale_err.mean()):.3f} max "
            f"{float(scale_err.max()):.3f}"
        )
    # N = 2000: the mean encoder is the analytic posterior (mean within 0.2 sd,
    # scale within 10%)
    assert float(mean_err.max()) < 0.2
    assert float(scale_err.max()) < 0.1
    # 100x the data: weight variances over 12x smaller (e^2.5), spread under 0.35x
    assert float(log_var[2000].mean()) < float(log_var[20].mean()) - 2.5, log_var
    assert spread[2000] < 0.35 * spread[20], spread
