"""NumpySimulator: a NumPy simulator inside a NumPyro model via pure_callback."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

import numpyro_amortized as na

CALLS = {"n": 0}


def noisy_line(rng, slope, offset):
    """Vectorized NumPy simulator: a batch of lines with Gaussian noise."""
    CALLS["n"] += 1
    t = np.linspace(0.0, 1.0, 6)
    mean = slope[:, None] * t + offset[:, None]
    return mean + 0.5 * rng.standard_normal(mean.shape)


def noisy_line_single(rng, slope, offset):
    """The same simulator, one parameter set at a time."""
    t = np.linspace(0.0, 1.0, 6)
    return slope * t + offset + 0.5 * rng.standard_normal(6)


def make_model(simulator, vectorized):
    @na.amortize(observed=["x"])
    def model(x=None):
        slope = numpyro.sample("slope", dist.Normal(2.0, 1.0))
        offset = numpyro.sample("offset", dist.Normal(-1.0, 0.5))
        sim = na.NumpySimulator(
            simulator, slope, offset, event_shape=(6,), vectorized=vectorized
        )
        numpyro.sample("x", sim, obs=x)

    return model


@pytest.mark.parametrize(
    "simulator, vectorized", [(noisy_line, True), (noisy_line_single, False)]
)
def test_numpy_simulator_moments(simulator, vectorized):
    model = make_model(simulator, vectorized)
    n = 4_000 if vectorized else 1_000
    sims = model.simulate(jax.random.key(0), n)
    x, slope, offset = sims["x"], sims["slope"], sims["offset"]
    assert x.shape == (n, 6) and x.dtype == np.float32
    resid = x - (slope[:, None] * np.linspace(0, 1, 6) + offset[:, None])
    np.testing.assert_allclose(resid.std(), 0.5, rtol=0.05)
    assert abs(resid.mean()) < 0.03
    # Noise is independent across simulations (no repeated seeds).
    assert abs(np.corrcoef(resid[:-1, 0], resid[1:, 0])[0, 1]) < 0.1


def test_vectorized_simulator_is_called_once_per_simulation():
    # A batch of one per call, each with its own seed: chunking cannot change
    # the simulations (see tests/test_faults_numerics.py).
    model = make_model(noisy_line, True)
    model.simulate(jax.random.key(0), 10)  # warm up (describe + compile)
    CALLS["n"] = 0
    model.simulate(jax.random.key(1), 3_000, batch_size=1_000)
    assert CALLS["n"] == 3_000


def test_numpy_simulator_is_reproducible_and_key_dependent():
    model = make_model(noisy_line_single, False)
    a = model.simulate(jax.random.key(3), 50)["x"]
    b = model.simulate(jax.random.key(3), 50)["x"]
    c = model.simulate(jax.random.key(4), 50)["x"]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # Per-simulation seeds: chunking does not change non-vectorized results.
    d = model.simulate(jax.random.key(3), 50, batch_size=16)["x"]
    np.testing.assert_array_equal(a, d)


def test_numpy_simulator_under_jit_and_plates():
    def sim(rng, loc):
        return loc + rng.standard_normal(loc.shape)

    def model():
        loc = numpyro.sample("loc", dist.Normal(10.0, 0.1))
        with numpyro.plate("obs", 4):
            return numpyro.sample("x", na.NumpySimulator(sim, loc))

    out = jax.jit(lambda k: handlers.seed(model, k)())(jax.random.key(0))
    assert out.shape == (4,) and bool(jnp.all(jnp.abs(out - 10) < 6))


def test_wrong_output_shape_and_log_prob_errors():
    bad = na.NumpySimulator(
        lambda rng, p: np.zeros((3, 2)), jnp.ones(()), event_shape=(5,)
    )
    with pytest.raises(Exception, match="returned shape"):
        jax.block_until_ready(bad.sample(jax.random.key(0), (3,)))
    with pytest.raises(NotImplementedError, match="no likelihood"):
        bad.log_prob(jnp.zeros(5))
