"""LatentSpace: flatten/unflatten, constrain/unconstrain, exact log-Jacobians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.distributions import constraints

from numpyro_amortized import LatentSpace
from numpyro_amortized.models import gaussian_means


def _free(support, shape):
    """Constrained value -> its free coordinates (numpyro Jacobian convention)."""
    if support is constraints.simplex:
        return lambda x: x[..., :-1]
    if support is constraints.corr_cholesky:
        rows, cols = np.tril_indices(shape[-1], -1)
        return lambda x: x[..., rows, cols]
    return lambda x: x


SUPPORTS = {
    "real": ((3,), constraints.real),
    "positive": ((2,), constraints.positive),
    "interval": ((), constraints.interval(-2.0, 3.0)),
    "unit_interval": ((2, 2), constraints.unit_interval),
    "greater_than": ((), constraints.greater_than(1.5)),
    "less_than": ((2,), constraints.less_than(-1.0)),
    "simplex": ((4,), constraints.simplex),
    "ordered": ((3,), constraints.ordered_vector),
    "positive_ordered": ((3,), constraints.positive_ordered_vector),
    "corr_cholesky": ((3, 3), constraints.corr_cholesky),
    "softplus_positive": ((), constraints.softplus_positive),
}


@pytest.mark.parametrize("name", list(SUPPORTS))
def test_round_trip_and_log_det(name):
    shape, support = SUPPORTS[name]
    space = LatentSpace.from_shapes({"s": (shape, support)})
    u = jax.random.normal(jax.random.key(0), (5, space.dim))
    theta, log_det = space.constrain(u)
    x = theta["s"]
    assert x.shape == (5, *shape) and log_det.shape == (5,)
    assert bool(jnp.all(support(x) if support.event_dim else support.check(x)))
    u_back, inv_log_det = space.unconstrain(theta)
    np.testing.assert_allclose(u_back, u, atol=2e-4)
    np.testing.assert_allclose(inv_log_det, -log_det, atol=1e-4)
    theta_back, _ = space.constrain(u_back)
    np.testing.assert_allclose(theta_back["s"], x, atol=1e-5)
    free = _free(support, shape)
    for i in range(5):
        jac = jax.jacfwd(lambda v: free(space.constrain(v)[0]["s"]).reshape(-1))(u[i])
        sign, ref = jnp.linalg.slogdet(jac)
        assert sign != 0
        np.testing.assert_allclose(log_det[i], ref, atol=1e-4, rtol=1e-4)


def test_multi_site_space_is_block_diagonal():
    space = LatentSpace.from_shapes(
        {
            "sigma": ((), constraints.positive),
            "w": ((3,), constraints.simplex),
            "mu": ((2,), constraints.real),
        }
    )
    assert space.dim == 1 + 2 + 2 and space.names == ("sigma", "w", "mu")
    u = jax.random.normal(jax.random.key(1), (2, 3, space.dim))  # two batch axes
    theta, log_det = space.constrain(u)
    assert theta["w"].shape == (2, 3, 3) and log_det.shape == (2, 3)
    np.testing.assert_allclose(theta["w"].sum(-1), 1.0, atol=1e-6)

    def free(v):
        t = space.constrain(v)[0]
        return jnp.concatenate([t["sigma"][None], t["w"][:-1], t["mu"]])

    ref = jnp.linalg.slogdet(jax.jacfwd(free)(u[1, 2]))[1]
    np.testing.assert_allclose(log_det[1, 2], ref, atol=1e-4)


def test_flatten_unflatten_batched():
    space = LatentSpace.from_shapes(
        {"a": ((2, 3), constraints.real), "b": ((), constraints.real)}
    )
    values = {
        "a": jnp.arange(4 * 6.0).reshape(4, 2, 3),
        "b": jnp.arange(4.0) + 100,
    }
    flat = space.flatten(values)
    assert flat.shape == (4, 7)
    np.testing.assert_array_equal(flat[:, -1], values["b"])
    back = space.unflatten(flat)
    for k in values:
        np.testing.assert_array_equal(back[k], values[k])
    # A single (unbatched) vector works too.
    single = space.unflatten(flat[0])
    assert single["a"].shape == (2, 3) and single["b"].shape == ()


def test_errors_name_the_site():
    with pytest.raises(ValueError, match="Site 'k' has a discrete support"):
        LatentSpace.from_shapes({"k": ((), constraints.nonnegative_integer)})
    space = LatentSpace.from_shapes({"a": ((2,), constraints.real)})
    with pytest.raises(ValueError, match="Missing target site"):
        space.unconstrain({"b": jnp.zeros(2)})
    with pytest.raises(ValueError, match="Site 'a': expected shape"):
        space.unconstrain({"a": jnp.zeros((5, 3))})
    with pytest.raises(ValueError, match="last axis 2"):
        space.constrain(jnp.zeros((5, 3)))


def test_latent_space_from_model():
    space = gaussian_means.latent_space(n_obs=7, dim=3)
    assert space.names == ("mu",) and space.dim == 3
