"""Invariants every conditional flow must satisfy, plus fits to known densities.

The suite is parametrized over ``networks.FLOW_SPECS`` so a new flow joins it
automatically; ``TINY`` shrinks each spec so the whole file runs in well under a
minute on two CPU cores. Fresh flows are exactly the identity (zero-initialized
output layers), so the invariant tests first perturb all parameters (``perturb``) to
get non-trivial maps - the tests check that they really are non-trivial.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from numpyro_amortized import networks
from numpyro_amortized.networks.ode import odeint_rk4_with_log_det
from numpyro_amortized.networks.splines import rational_quadratic_spline

# Small versions of every flow spec (a new flow must add one; see the last test).
TINY = {
    "NeuralSplineFlow": {"num_layers": 2, "hidden": (16,), "num_bins": 6},
    "CouplingFlow": {"num_layers": 3, "hidden": (16,)},
    "FlowMatching": {"hidden": (16, 16), "num_steps": 16},
}
# Parameter noise that makes each flow clearly non-identity but well conditioned.
PERTURB = {"FlowMatching": 0.3}
# FlowMatching maps are RK4 discretizations of one ODE run forwards and backwards:
# inverse(forward(x)) and the log-dets carry an O(h^4) error (measured <= 5e-5 at 16
# steps for these perturbed fields); other flows are exact up to float32 roundoff.
ROUNDTRIP_ATOL = {"FlowMatching": 2e-4}
LOGDET_ATOL = {"FlowMatching": 2e-4}

FLOWS = [cls.__name__ for cls in networks.FLOW_SPECS]
CONTEXT_DIM = 2


def tiny_spec(name: str):
    return networks.SPECS[name](**TINY.get(name, {}))


def perturb(module, seed, scale):
    """Adds N(0, scale^2) noise to every parameter (numpy: no XLA compiles)."""
    graphdef, state = nnx.split(module)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(
        lambda p: p + scale * rng.standard_normal(p.shape).astype(np.float32), state
    )
    return nnx.merge(graphdef, state)


@functools.cache
def make_flow(name, num_params, context_dim=CONTEXT_DIM):
    """A perturbed tiny flow (cached: tests only read it)."""
    flow = tiny_spec(name).build(num_params, context_dim, rngs=nnx.Rngs(0))
    return perturb(flow, 100, PERTURB.get(name, 0.05))


def data(num_params, batch=(16,), context_dim=CONTEXT_DIM, seed=1):
    rng = np.random.default_rng(seed)
    x = 1.5 * rng.standard_normal((*batch, num_params))
    c = rng.standard_normal((*batch, context_dim))
    return jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32)


# Jitted entry points keyed on the (hashable) graphdef, so tests that use the same
# flow and shapes share one compilation. XLA:CPU compiles dominate this file's run
# time (~1-5 s each), so these invariant checks compile at backend optimization
# level 0 (about half the compile time; same numerics up to float roundoff). The
# fits below use default options.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.partial(jax.jit, static_argnums=(0, 1, 2), compiler_options=FAST_COMPILE)
def _apply(graphdef, method, static_kwargs, state, *args):
    return getattr(nnx.merge(graphdef, state), method)(*args, **dict(static_kwargs))


def apply(flow, method, *args, **static_kwargs):
    graphdef, state = nnx.split(flow)
    return _apply(graphdef, method, tuple(sorted(static_kwargs.items())), state, *args)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _bijection_report(graphdef, state, x, c):
    flow = nnx.merge(graphdef, state)

    def jac_log_det(fn, a, ctx):
        jac = jax.jacfwd(lambda v: fn(v[None], ctx[None])[0][0])(a)
        return jnp.linalg.slogdet(jac)[1]

    z, ld_fwd = flow.forward_and_log_det(x, c)
    x_back, ld_inv = flow.inverse_and_log_det(z, c)
    jac_fwd = jax.vmap(lambda a, b: jac_log_det(flow.forward_and_log_det, a, b))(x, c)
    jac_inv = jax.vmap(lambda a, b: jac_log_det(flow.inverse_and_log_det, a, b))(z, c)
    return z, ld_fwd, x_back, ld_inv, jac_fwd, jac_inv


def bijection_report(flow, x, c):
    graphdef, state = nnx.split(flow)
    return _bijection_report(graphdef, state, x, c)


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("num_params", [1, 3])
def test_inverse_of_forward_is_identity(name, num_params):
    x, c = data(num_params)
    z, ld_fwd, x_back, ld_inv, _, _ = bijection_report(
        make_flow(name, num_params), x, c
    )
    assert float(jnp.mean(jnp.abs(z - x))) > 0.05  # the map is not the identity
    atol = ROUNDTRIP_ATOL.get(name, 1e-4)
    np.testing.assert_allclose(x_back, x, atol=atol)
    np.testing.assert_allclose(ld_fwd + ld_inv, 0.0, atol=atol)


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("num_params", [1, 3])
def test_log_det_matches_autodiff_jacobian(name, num_params):
    """Per sample: log|det| == slogdet(jax.jacfwd(map)), for both directions."""
    x, c = data(num_params)
    _, ld_fwd, _, ld_inv, jac_fwd, jac_inv = bijection_report(
        make_flow(name, num_params), x, c
    )
    assert float(jnp.std(ld_fwd)) > 0.05  # non-trivial Jacobians
    atol = LOGDET_ATOL.get(name, 1e-4)
    np.testing.assert_allclose(ld_fwd, jac_fwd, atol=atol)
    np.testing.assert_allclose(ld_inv, jac_inv, atol=atol)


def _trapezoid(values, xs):
    return jnp.sum((values[..., 1:] + values[..., :-1]) / 2 * jnp.diff(xs), axis=-1)


@pytest.mark.parametrize("name", FLOWS)
def test_density_integrates_to_one_1d(name):
    flow = make_flow(name, 1)
    grid = jnp.linspace(-8.0, 8.0, 2001)
    log_p = apply(flow, "log_prob", grid[:, None], jnp.array([0.7, -1.2]))
    normal = -0.5 * grid**2 - 0.5 * math.log(2 * math.pi)
    assert float(jnp.max(jnp.abs(log_p - normal))) > 0.1  # not the base density
    assert abs(float(_trapezoid(jnp.exp(log_p), grid)) - 1.0) < 1e-2


@pytest.mark.parametrize("name", FLOWS)
def test_density_integrates_to_one_2d(name):
    flow = make_flow(name, 2)
    axis = jnp.linspace(-8.0, 8.0, 161)
    points = jnp.stack(jnp.meshgrid(axis, axis, indexing="ij"), axis=-1)
    log_p = apply(flow, "log_prob", points, jnp.array([0.3, 0.9]))
    normal = -0.5 * jnp.sum(points**2, -1) - math.log(2 * math.pi)
    assert float(jnp.max(jnp.abs(log_p - normal))) > 0.1
    total = _trapezoid(_trapezoid(jnp.exp(log_p), axis), axis)
    assert abs(float(total) - 1.0) < 1e-2


@pytest.mark.parametrize("name", FLOWS)
def test_jit_matches_eager(name):
    flow = make_flow(name, 2)  # (eager dispatch compiles every op: keep it small)
    x, c = data(2, batch=(4,))
    np.testing.assert_allclose(
        apply(flow, "log_prob", x, c), flow.log_prob(x, c), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("num_params", [1, 3])
def test_context_changes_density(name, num_params):
    flow = make_flow(name, num_params)
    x, c = data(num_params)
    diff = jnp.abs(apply(flow, "log_prob", x, c) - apply(flow, "log_prob", x, c + 1.0))
    assert float(jnp.max(diff)) > 1e-2


@pytest.mark.parametrize("name", FLOWS)
def test_unconditional_one_dimensional(name):
    flow = make_flow(name, 1, context_dim=0)
    x = jnp.linspace(-3, 3, 7)[:, None]
    log_p = apply(flow, "log_prob", x, None)
    assert log_p.shape == (7,) and bool(jnp.all(jnp.isfinite(log_p)))
    draws = apply(flow, "sample", jax.random.key(0), None, num_samples=11)
    assert draws.shape == (11, 1) and bool(jnp.all(jnp.isfinite(draws)))
    with pytest.raises(ValueError, match="context_dim"):
        jax.eval_shape(make_flow(name, 1).log_prob, x, None)


@pytest.mark.parametrize("name", FLOWS)
def test_sample_shapes_broadcasting_and_log_prob(name):
    flow = make_flow(name, 3)
    _, c = data(3, batch=(2, 4))
    key = jax.random.key(0)
    x, log_p = apply(flow, "sample_and_log_prob", key, c, num_samples=5)
    assert x.shape == (5, 2, 4, 3) and log_p.shape == (5, 2, 4)
    assert float(jnp.std(x[:, 0, 0] - x[:, 1, 3])) > 1e-3  # context matters per row
    # context (2, 4, C) broadcasts against x (5, 2, 4, D).
    np.testing.assert_allclose(apply(flow, "log_prob", x, c), log_p, atol=2e-4)
    single = apply(flow, "sample", key, c[1, 3], num_samples=5)
    assert single.shape == (5, 3)


@pytest.mark.parametrize("name", ["NeuralSplineFlow", "CouplingFlow"])
@pytest.mark.parametrize("num_params", [1, 3])
@pytest.mark.parametrize("context_dim", [0, CONTEXT_DIM])
def test_fast_sample_equals_generic_inverse(name, num_params, context_dim):
    """``sample`` (column layout, coupling_sample.py) == the generic inverse."""
    from numpyro_amortized.networks.coupling_sample import can_sample_fast

    flow = make_flow(name, num_params, context_dim)
    assert can_sample_fast(flow)
    _, c = data(num_params, batch=(2, 4), context_dim=context_dim)
    c = c if context_dim else None
    key = jax.random.key(3)
    fast = apply(flow, "sample", key, c, num_samples=7)
    generic, _ = apply(flow, "sample_and_log_prob", key, c, num_samples=7)
    assert fast.shape == generic.shape
    assert float(jnp.std(generic)) > 0.5  # a non-trivial map of N(0, 1) draws
    np.testing.assert_allclose(fast, generic, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FLOWS)
def test_fresh_flow_is_standard_normal(name):
    flow = tiny_spec(name).build(3, CONTEXT_DIM, rngs=nnx.Rngs(0))
    x, c = data(3)
    expected = -0.5 * jnp.sum(x**2, -1) - 1.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(apply(flow, "log_prob", x, c), expected, atol=1e-5)


@pytest.mark.parametrize("name", FLOWS)
def test_split_merge_loss_inside_jit_and_scan(name):
    """The trainer pattern: merge inside jit/scan; per-example loss; finite grads."""
    flow = make_flow(name, 3)
    x, c = data(3)
    graphdef, state = nnx.split(flow)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def scanned(state):
        def body(carry, key):
            def loss_fn(s):
                return jnp.mean(nnx.merge(graphdef, s).loss(key, x, c))

            loss, grads = jax.value_and_grad(loss_fn)(state)
            per_example = nnx.merge(graphdef, state).loss(key, x, c)
            return carry, (loss, per_example, grads)

        return jax.lax.scan(body, 0.0, jax.random.split(jax.random.key(0), 2))[1]

    losses, per_example, grads = scanned(state)
    assert per_example.shape == (2, 16) and bool(jnp.all(jnp.isfinite(per_example)))
    np.testing.assert_allclose(losses, jnp.mean(per_example, -1), rtol=1e-5)
    if name != "FlowMatching":  # maximum likelihood: loss == -log_prob
        log_p = apply(flow, "log_prob", x, c)
        np.testing.assert_allclose(per_example[0], -log_p, rtol=1e-4, atol=1e-4)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(math.isfinite(n) for n in norms) and max(norms) > 0


@pytest.mark.parametrize("name", FLOWS)
def test_spec_config_round_trip(name):
    spec = tiny_spec(name)
    config = json.loads(json.dumps(spec.to_config()))
    assert networks.spec_from_config(config) == spec
    assert networks.is_flow_module(make_flow(name, 3))


def test_every_flow_is_registered_and_has_a_tiny_config():
    for cls in networks.FLOW_SPECS:
        assert networks.SPECS[cls.__name__] is cls
        assert cls.__name__ in TINY, "add a small config for the new flow to TINY"


def test_rational_quadratic_spline_properties():
    """Zero raw parameters = identity; monotone; identity tails; exact inverse."""
    spline = jax.jit(
        rational_quadratic_spline,
        static_argnames="inverse",
        compiler_options=FAST_COMPILE,
    )
    x = jnp.linspace(-7.0, 7.0, 301)
    y, log_det = spline(x, jnp.zeros((301, 23)))
    np.testing.assert_allclose(y, x, atol=1e-5)
    np.testing.assert_allclose(log_det, 0.0, atol=1e-5)
    params = jnp.asarray(np.random.default_rng(0).standard_normal(23), jnp.float32)
    y, log_det = spline(x, jnp.broadcast_to(params, (301, 23)))
    assert bool(jnp.all(jnp.diff(y) > 0))
    outside = jnp.abs(x) > 5.0
    np.testing.assert_array_equal(y[outside], x[outside])
    assert float(jnp.max(jnp.abs(y - x))) > 0.1
    slope = jax.jit(
        jax.vmap(jax.grad(lambda a: rational_quadratic_spline(a, params)[0])),
        compiler_options=FAST_COMPILE,
    )(x)
    np.testing.assert_allclose(log_det, jnp.log(slope), atol=1e-4)
    x_back, log_det_inv = spline(y, jnp.broadcast_to(params, (301, 23)), inverse=True)
    # Raw N(0, 1) parameters make slopes as small as 2e-3, where float32 inversion
    # is ill-conditioned: compare the error in y-space units (error x slope).
    np.testing.assert_array_less(jnp.abs(x_back - x) * slope, 1e-5)
    np.testing.assert_allclose(log_det_inv, -log_det, atol=1e-4)


# --- fits to known densities -------------------------------------------------------


def fit(flow, x, c, *, num_steps, learning_rate=3e-3, batch_size=256, seed=0):
    """Minimizes ``mean(flow.loss)`` with Adam in one jitted ``lax.scan``."""
    graphdef, state = nnx.split(flow)
    optimizer = optax.adam(learning_rate)

    def step(carry, key):
        state, opt_state = carry
        k_idx, k_loss = jax.random.split(key)
        idx = jax.random.randint(k_idx, (batch_size,), 0, x.shape[0])
        ctx = None if c is None else c[idx]

        def loss_fn(s):
            return jnp.mean(nnx.merge(graphdef, s).loss(k_loss, x[idx], ctx))

        loss, grads = jax.value_and_grad(loss_fn)(state)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return (optax.apply_updates(state, updates), opt_state), loss

    keys = jax.random.split(jax.random.key(seed), num_steps)
    run = jax.jit(lambda s: jax.lax.scan(step, (s, optimizer.init(s)), keys))
    (state, _), losses = run(state)
    return nnx.merge(graphdef, state), losses


def two_moons(seed, n):
    """Standardized two-moons sample (numpy)."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0.0, math.pi, n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(angle), 1.0 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    points = np.stack([x, y], -1) + 0.08 * rng.standard_normal((n, 2))
    return jnp.asarray((points - [0.5, 0.25]) / [0.87, 0.5], jnp.float32)


def gaussian_held_out_log_lik(train, test):
    mean = jnp.mean(train, 0)
    cov = jnp.cov(train.T)
    diff = test - mean
    maha = jnp.sum(diff @ jnp.linalg.inv(cov) * diff, -1)
    return float(
        jnp.mean(-0.5 * maha - 0.5 * jnp.linalg.slogdet(cov)[1] - math.log(2 * math.pi))
    )


FIT_SPECS = {
    "NeuralSplineFlow": networks.NeuralSplineFlow(num_layers=3, hidden=(32, 32)),
    "CouplingFlow": networks.CouplingFlow(num_layers=6, hidden=(32, 32)),
    "FlowMatching": networks.FlowMatching(hidden=(64, 64), num_steps=16),
}
FIT_STEPS = {"NeuralSplineFlow": 400, "CouplingFlow": 600, "FlowMatching": 1500}
# Held-out log-likelihood margin over a fitted Gaussian (measured: NSF +1.0,
# coupling +0.9, flow matching +0.54 nats).
FIT_MARGIN = {"NeuralSplineFlow": 0.7, "CouplingFlow": 0.7, "FlowMatching": 0.3}


@pytest.mark.parametrize("name", list(FIT_SPECS))
def test_fits_two_moons_better_than_gaussian(name):
    train = two_moons(0, 4000)
    test = two_moons(1, 2000)
    flow = FIT_SPECS[name].build(2, 0, rngs=nnx.Rngs(0))
    flow, losses = fit(flow, train, None, num_steps=FIT_STEPS[name])
    flow_ll = float(jnp.mean(jax.jit(flow.log_prob)(test)))
    gauss_ll = gaussian_held_out_log_lik(train, test)
    # Standardized two moons: Gaussian ~ -2.7 nats; a good flow reaches ~ -1.7.
    assert flow_ll > gauss_ll + FIT_MARGIN[name], (flow_ll, gauss_ll)


@pytest.mark.parametrize("name", ["NeuralSplineFlow", "CouplingFlow"])
def test_one_parameter_flow_fits_conditional_density(name):
    """D = 1: the layers must use the context (x | c ~ N(c, (0.3 + 0.3|c|)^2))."""

    def simulate(seed, n):
        rng = np.random.default_rng(seed)
        c = rng.uniform(-2.0, 2.0, (n, 1))
        scale = 0.3 + 0.3 * np.abs(c)
        x = c + scale * rng.standard_normal((n, 1))
        return (jnp.asarray(a, jnp.float32) for a in (x, c, scale))

    x, c, _ = simulate(0, 8000)
    x_test, c_test, s_test = simulate(1, 2000)
    spec = dataclasses.replace(FIT_SPECS[name], num_layers=2)
    flow, _ = fit(spec.build(1, 1, rngs=nnx.Rngs(0)), x, c, num_steps=500)
    true_nll = -jnp.mean(
        -0.5 * ((x_test - c_test) / s_test) ** 2
        - jnp.log(s_test)
        - 0.5 * math.log(2 * math.pi)
    )
    nll = -jnp.mean(apply(flow, "log_prob", x_test, c_test))
    assert float(nll - true_nll) < 0.05, (float(nll), float(true_nll))
    # Conditional means follow the context.
    ctx = jnp.array([[-1.5], [1.5]])
    means = jnp.mean(apply(flow, "sample", jax.random.key(2), ctx, num_samples=4000), 0)
    # (sampling error ~0.01; the small, briefly trained flow is biased by ~0.1)
    np.testing.assert_allclose(means[:, 0], [-1.5, 1.5], atol=0.15)


# --- the ODE solver behind FlowMatching ----------------------------------------------


def gaussian_velocity(mean, std, sigma_min):
    """Exact marginal velocity of the conditional-OT path to data ``N(mean, std^2)``.

    ``x_t = a(t) z + t x1`` with ``a = 1 - (1 - sigma_min) t`` is Gaussian with mean
    ``t mean`` and sd ``s(t) = sqrt(a^2 + t^2 std^2)``, so ``v = mean + s'/s (x - t
    mean)`` and the flow maps ``N(0, 1)`` to ``N(mean, sigma_min^2 + std^2)``.
    """

    def fn(x, t, c):
        del c
        a = 1.0 - (1.0 - sigma_min) * t
        s2 = a**2 + t**2 * std**2
        ds_over_s = (-(1.0 - sigma_min) * a + t * std**2) / s2
        return mean + ds_over_s * (x - t * mean)

    return fn


# Measured max errors: 7e-2 (4 steps), 9e-5 (16), 2e-5 (32: the float32 floor).
@pytest.mark.parametrize(("num_steps", "tol"), [(4, 2e-1), (16, 3e-4), (32, 1e-4)])
def test_rk4_change_of_variables_matches_closed_form(num_steps, tol):
    mean, std, sigma_min = jnp.array([1.0, -2.0]), jnp.array([0.5, 2.0]), 1e-3
    fn = gaussian_velocity(mean, std, sigma_min)
    x = mean + 3.0 * jnp.asarray(np.random.default_rng(0).standard_normal((64, 2)))
    ctx = jnp.zeros((64, 0))
    solve = jax.jit(
        functools.partial(odeint_rk4_with_log_det, fn, t0=1.0, t1=0.0),
        static_argnames="num_steps",
        compiler_options=FAST_COMPILE,
    )
    z, log_det = solve(x, ctx, num_steps=num_steps)
    log_q = networks.standard_normal_log_prob(z) + log_det
    sd = jnp.sqrt(std**2 + sigma_min**2)
    exact = jnp.sum(
        -0.5 * ((x - mean) / sd) ** 2 - jnp.log(sd) - 0.5 * math.log(2 * math.pi), -1
    )
    err = float(jnp.max(jnp.abs(log_q - exact)))
    assert err < tol
    if num_steps == 4:
        assert err > 1e-2  # coarse steps are visibly inexact: the check has teeth
