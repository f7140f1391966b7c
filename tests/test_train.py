"""The pure training pieces: parameter averaging (EMA), the default optimizer and
the default batch size."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from numpyro_amortized.train import (
    AveragedState,
    TrainState,
    averaged_params,
    default_batch_size,
    default_optimizer,
    make_train_step,
    with_param_averaging,
)


def test_param_average_follows_the_ema_recursion():
    decay = 0.9
    opt = with_param_averaging(optax.sgd(0.1), decay)
    params = {"w": jnp.array([1.0, -2.0])}
    state = opt.init(params)
    expected = np.asarray(params["w"])
    for t in range(40):
        grads = {"w": params["w"] - 3.0}  # pulls w toward 3
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        d = min(decay, (1.0 + t) / (10.0 + t))
        expected = d * expected + (1.0 - d) * np.asarray(params["w"])
    np.testing.assert_allclose(state.average["w"], expected, rtol=1e-6)
    assert int(state.count) == 40
    # The average lags the iterate: it is strictly between the start and w.
    assert np.all(np.abs(state.average["w"] - 3.0) > np.abs(params["w"] - 3.0))


def test_averaging_does_not_change_the_updates():
    params = {"w": jnp.array([0.5, 1.5, -1.0])}
    grads = {"w": jnp.array([0.3, -0.2, 0.1])}
    plain = optax.adam(1e-2)
    averaged = with_param_averaging(optax.adam(1e-2), 0.99)
    u1, _ = plain.update(grads, plain.init(params), params)
    u2, _ = averaged.update(grads, averaged.init(params), params)
    np.testing.assert_array_equal(u1["w"], u2["w"])


def test_averaged_params_picks_the_average_only_when_tracked():
    params = {"w": jnp.ones(2)}

    def loss_fn(p, key, batch):
        return jnp.sum((p["w"] - batch) ** 2, axis=-1)

    for ema, cls in ((0.99, AveragedState), (None, tuple)):
        opt = default_optimizer(1e-1, 100, ema_decay=ema)
        step = jax.jit(make_train_step(loss_fn, opt))
        state = TrainState(params, opt.init(params), jnp.zeros((), jnp.int32))
        for i in range(5):
            batch = (jnp.full((4, 2), 2.0), None)
            state, _ = step(state, batch, jax.random.key(i))
        assert isinstance(state.opt_state, cls)
        if ema is None:
            assert averaged_params(state) is state.params
        else:
            avg = averaged_params(state)["w"]
            assert not np.allclose(avg, state.params["w"])
            np.testing.assert_array_equal(avg, state.opt_state.average["w"])


def test_default_batch_size_gives_about_50_steps_between_16_and_128():
    # num_train // 50, rounded down to a multiple of 16, inside [16, 128]
    assert default_batch_size(900) == 16  # sbibm 10^3 with 10% validation
    assert default_batch_size(1_600) == 32 and default_batch_size(1_599) == 16
    assert default_batch_size(5_000) == 96
    assert default_batch_size(6_399) == 112 and default_batch_size(6_400) == 128
    assert default_batch_size(9_000) == 128 and default_batch_size(10**7) == 128
    assert default_batch_size(100) == 16
    # the same batch on 1, 2, 4, 8 or 16 devices ...
    for n in (900, 5_000, 9_000):
        assert {default_batch_size(n, d) for d in (1, 2, 4, 8, 16)} == {
            default_batch_size(n)
        }
    # ... otherwise whole shards per device, at least one example per device
    assert default_batch_size(9_000, num_devices=3) == 126
    assert default_batch_size(900, num_devices=32) == 32
