"""Summary networks: invariances, masking, the user-module protocol, configs."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from numpyro_amortized import networks

OBS_DIM = 2
TINY = {
    "DeepSet": networks.DeepSet(summary_dim=6, embed_dim=16, hidden=(16,)),
    "SetTransformer": networks.SetTransformer(
        summary_dim=6, embed_dim=16, num_heads=2, num_inducing=4
    ),
    "TimeSeriesNetwork": networks.TimeSeriesNetwork(
        summary_dim=6, conv_features=8, recurrent_dim=8, hidden=(16,)
    ),
}
SET_NETS = ["DeepSet", "SetTransformer"]
SEQUENCE_NETS = [*SET_NETS, "TimeSeriesNetwork"]


def observations(shape=(3, 16, OBS_DIM), seed=0):
    rng = np.random.default_rng(seed)  # numpy test data: no XLA compiles
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


# Fast XLA:CPU compiles (backend optimization level 0) for these small checks.
@functools.partial(
    jax.jit,
    static_argnums=0,
    compiler_options={"xla_backend_optimization_level": 0},
)
def _call(graphdef, state, x, mask):
    return nnx.merge(graphdef, state)(x, mask)


def jitted(module, *, fill_mask=True):
    """The trainer's split/merge pattern: ``call(x, mask=None)`` under ``jax.jit``.

    With ``fill_mask`` a missing mask is passed as all-True (one compilation per
    shape instead of two; the ``mask=None`` path is checked separately).
    """
    graphdef, state = nnx.split(module)

    def call(x, mask=None):
        if mask is None and fill_mask:
            mask = jnp.ones(x.shape[:-1], bool)
        return _call(graphdef, state, x, mask)

    return call


@functools.cache
def tiny_net(name):
    return jitted(TINY[name].build(OBS_DIM, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("name", SET_NETS)
def test_set_networks_are_permutation_invariant(name):
    call = tiny_net(name)
    x = observations()
    perm = np.random.default_rng(1).permutation(x.shape[-2])
    out = call(x)
    assert out.shape == (3, 6)
    np.testing.assert_allclose(call(x[:, perm]), out, atol=1e-5)
    # ... also with a partial mask permuted along with the observations.
    mask = jnp.asarray(np.random.default_rng(2).random(x.shape[:-1]) < 0.7)
    np.testing.assert_allclose(
        call(x[:, perm], mask[:, perm]), call(x, mask), atol=1e-5
    )


def test_time_series_network_is_order_dependent():
    call = tiny_net("TimeSeriesNetwork")
    x = observations()
    assert float(jnp.max(jnp.abs(call(x[:, ::-1]) - call(x)))) > 1e-3


@pytest.mark.parametrize("name", SEQUENCE_NETS)
def test_padding_with_mask_equals_unpadded(name):
    """Rows of lengths 5, 12, 9 padded to 16 with garbage == each row alone."""
    call = tiny_net(name)
    lengths = [5, 12, 9]
    x = observations(seed=3)
    mask = jnp.arange(16)[None, :] < jnp.array(lengths)[:, None]
    garbage = 1e3 * observations(seed=4)
    out = call(jnp.where(mask[..., None], x, garbage), mask)
    for row, n in enumerate(lengths):
        alone = call(x[row : row + 1, :n])[0]
        np.testing.assert_allclose(out[row], alone, atol=1e-5, rtol=1e-5)
    # NaN in absent slots must not leak either.
    with_nan = jnp.where(mask[..., None], x, jnp.nan)
    np.testing.assert_allclose(call(with_nan, mask), out, atol=1e-6)


@pytest.mark.parametrize("name", SEQUENCE_NETS)
def test_leading_axes_and_empty_sets(name):
    call = tiny_net(name)
    x = observations((2, 3, 7, OBS_DIM))
    out = call(x)
    assert out.shape == (2, 3, 6)
    # mask=None means "all present".
    no_mask = jitted(TINY[name].build(OBS_DIM, rngs=nnx.Rngs(0)), fill_mask=False)
    np.testing.assert_allclose(no_mask(x[1, 2]), out[1, 2], atol=1e-5)
    empty = call(x, jnp.zeros(x.shape[:-1], bool))
    assert bool(jnp.all(jnp.isfinite(empty)))


def test_deep_set_sees_the_number_of_observations():
    """A set and the same set duplicated have equal mean/max; the count differs."""
    x = observations((1, 8, OBS_DIM))
    doubled = jnp.concatenate([x, x], axis=-2)
    call = tiny_net("DeepSet")
    assert float(jnp.max(jnp.abs(call(doubled) - call(x)))) > 1e-4
    spec = dataclasses.replace(TINY["DeepSet"], include_count=False)
    no_count = jitted(spec.build(OBS_DIM, rngs=nnx.Rngs(0)))
    np.testing.assert_allclose(no_count(doubled), no_count(x), atol=1e-5)


def _deep_set_reference(net, x, mask):
    """DeepSet as its definition reads: phi on every observation, then the mean."""
    from numpyro_amortized.networks.summary import masked_mean

    x = jnp.where(mask[..., None], x, 0.0)
    pooled = masked_mean(net.phi(x), mask)
    count = jnp.log1p(jnp.sum(mask, axis=-1).astype(x.dtype))[..., None]
    return net.rho(jnp.concatenate([pooled, count], axis=-1))


def test_deep_set_mean_pooling_applies_last_phi_layer_after_the_mean():
    """Mean pooling moves phi's affine last layer after the mean: same values and
    gradients as embedding every observation, also with a fully masked set."""
    net = TINY["DeepSet"].build(OBS_DIM, rngs=nnx.Rngs(3))
    # A non-zero output bias, so the 'present' factor of the bias is exercised.
    net.phi.output_layer.bias[...] = jnp.linspace(-1.0, 1.0, 16)
    x = observations((4, 12, OBS_DIM), seed=5)
    mask = jnp.asarray(np.random.default_rng(1).random((4, 12)) < 0.6)
    mask = mask.at[1].set(False).at[2].set(True)
    graphdef, state = nnx.split(net)

    def loss(state, impl):
        module = nnx.merge(graphdef, state)
        if impl == "fast":
            out = module(x, mask)
        else:
            out = _deep_set_reference(module, x, mask)
        return jnp.sum(jnp.sin(out)), out

    (_, fast), g_fast = jax.value_and_grad(loss, has_aux=True)(state, "fast")
    (_, ref), g_ref = jax.value_and_grad(loss, has_aux=True)(state, "ref")
    np.testing.assert_allclose(fast, ref, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The fully masked dataset pools to zeros (not to the bias) in both.
    empty = nnx.merge(graphdef, state)._pooled_mean_of_phi(x[1:2], mask[1:2])
    np.testing.assert_array_equal(empty, 0.0)
    # The bias counts: changing it changes the output.
    net.phi.output_layer.bias[...] = jnp.zeros(16)
    assert float(jnp.max(jnp.abs(net(x, mask) - fast))) > 1e-3


@pytest.mark.parametrize(
    ("pooling", "per_observation"), [(("mean",), False), (("mean", "max"), True)]
)
def test_deep_set_embeds_every_observation_only_when_it_must(pooling, per_observation):
    """Mean pooling alone never runs a whole DenseNetwork on the observations
    (phi's last layer comes after the mean); with max pooling phi runs on each."""
    spec = dataclasses.replace(TINY["DeepSet"], pooling=pooling)
    net = spec.build(OBS_DIM, rngs=nnx.Rngs(0))
    calls = []
    original = type(net.phi).__call__

    def spy(self, h):
        calls.append(h.shape)
        return original(self, h)

    x = observations((2, 7, OBS_DIM))
    try:
        type(net.phi).__call__ = spy
        net(x)
    finally:
        type(net.phi).__call__ = original
    assert ((2, 7, OBS_DIM) in calls) == per_observation, calls
    assert (2, 16 * len(pooling) + 1) in calls  # rho, on the pooled features


def test_mlp_summary_on_flat_inputs_ignores_masked_entries():
    spec = networks.MLP(summary_dim=5, hidden=(16,))
    call = jitted(spec.build(8, rngs=nnx.Rngs(0)))
    x = observations((4, 8))
    mask = jnp.broadcast_to(jnp.arange(8) < 6, x.shape)
    out = call(x, mask)
    assert out.shape == (4, 5)
    np.testing.assert_allclose(call(x.at[:, 6:].set(99.0), mask), out, atol=1e-6)
    full = call(x, jnp.ones_like(mask))
    assert float(jnp.max(jnp.abs(full - out))) > 1e-4  # the mask did something


class MeanAndSpread(nnx.Module):
    """A user's own summary network, following the call protocol."""

    def __init__(self, obs_dim: int, *, rngs: nnx.Rngs):
        self.proj = nnx.Linear(2 * obs_dim, 3, rngs=rngs)

    def __call__(self, x, mask=None):
        w = jnp.ones(x.shape[:-1]) if mask is None else mask.astype(x.dtype)
        n = jnp.maximum(jnp.sum(w, -1, keepdims=True), 1.0)
        mean = jnp.sum(x * w[..., None], -2) / n
        var = jnp.sum((x - mean[..., None, :]) ** 2 * w[..., None], -2) / n
        return self.proj(jnp.concatenate([mean, var], -1))


def test_user_module_is_accepted_as_summary():
    user = MeanAndSpread(OBS_DIM, rngs=nnx.Rngs(0))
    assert networks.is_summary_module(user)
    assert networks.build_summary(user, OBS_DIM, rngs=nnx.Rngs(1)) is user
    assert networks.summary_output_dim(user, (4, 10, OBS_DIM)) == 3
    assert jitted(user)(observations()).shape == (3, 3)
    # Specs are built, anything else is rejected with a helpful message.
    built = networks.build_summary(TINY["DeepSet"], OBS_DIM, rngs=nnx.Rngs(0))
    assert networks.is_summary_module(built)
    assert networks.summary_output_dim(built, (4, 10, OBS_DIM)) == 6
    assert not networks.is_summary_module(TINY["DeepSet"])
    with pytest.raises(TypeError, match="summary spec"):
        networks.build_summary("DeepSet", OBS_DIM, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("spec_cls", networks.SUMMARY_SPECS)
def test_summary_spec_config_round_trip(spec_cls):
    spec = spec_cls()
    config = json.loads(json.dumps(spec.to_config()))
    rebuilt = networks.spec_from_config(config)
    assert rebuilt == spec and hash(rebuilt) == hash(spec)
    assert networks.SPECS[spec_cls.__name__] is spec_cls


def test_spec_from_config_rejects_unknown_names():
    with pytest.raises(KeyError, match="Unknown network spec"):
        networks.spec_from_config({"spec": "NoSuchNet", "kwargs": {}})


def test_public_surface():
    for name in networks.__all__:
        assert hasattr(networks, name), name
    expected = {"NeuralSplineFlow", "CouplingFlow", "FlowMatching", "DeepSet", "MLP"}
    assert expected <= set(networks.__all__)
