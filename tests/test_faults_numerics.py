"""Issue 17, numerics: bad inputs and faults give clear errors, never wrong answers.

Each test is one case of the issue; all of them failed before the fix.
"""

from __future__ import annotations

import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from flax import nnx

import numpyro_amortized as na
from numpyro_amortized import chunked
from numpyro_amortized import networks as nets
from numpyro_amortized.data import Standardizer
from numpyro_amortized.epoch_loop import run_epochs
from numpyro_amortized.history import History
from numpyro_amortized.models import gaussian_means
from numpyro_amortized.posterior import draw_targets
from numpyro_amortized.train import StepInfo, TrainState

SMALL = 1e-7  # a unit in which data and parameters are O(1)
KW = {"n_obs": 5, "dim": 2}


@na.amortize(observed=["y", "counts", "probs", "bounded", "successes", "below"])
def supported(
    y=None, counts=None, probs=None, bounded=None, successes=None, below=None
):
    """Observed sites with many supports; ``below``'s bound depends on a latent."""
    loc = numpyro.sample("loc", dist.Normal(0.0, 1.0))
    rate = numpyro.sample("rate", dist.LogNormal(0.0, 0.5))
    numpyro.sample("y", dist.Normal(loc, 1.0).expand([2]).to_event(1), obs=y)
    numpyro.sample("counts", dist.Poisson(rate).expand([4]).to_event(1), obs=counts)
    numpyro.sample("probs", dist.Dirichlet(jnp.ones(3) * rate), obs=probs)
    numpyro.sample(
        "bounded", dist.Uniform(-1.0, 2.0).expand([2]).to_event(1), obs=bounded
    )
    p = rate / (1.0 + rate)
    numpyro.sample(
        "successes", dist.Binomial(10, p).expand([2]).to_event(1), obs=successes
    )
    numpyro.sample("below", dist.Uniform(-1.0, rate), obs=below)


@na.amortize(observed=["x"])
def small_units(x=None):
    """``gaussian_means`` in units of 1e-7: ``mu ~ N(0, s^2)``, ``x_i ~ N(mu, s^2)``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, SMALL).expand([2]).to_event(1))
    numpyro.sample("x", dist.Normal(mu, SMALL).expand([10, 2]).to_event(2), obs=x)


def supported_bank(n: int) -> dict[str, np.ndarray]:
    """Simulations of ``supported`` drawn with NumPy (no compilation)."""
    rng = np.random.default_rng(0)
    loc, rate = rng.normal(size=n), rng.lognormal(0.0, 0.5, size=n)
    bank = {
        "loc": loc,
        "rate": rate,
        "y": rng.normal(loc[:, None], 1.0, (n, 2)),
        "counts": rng.poisson(rate[:, None], (n, 4)),
        "probs": np.stack([rng.dirichlet(np.full(3, r)) for r in rate]),
        "bounded": rng.uniform(-1.0, 2.0, (n, 2)),
        "successes": rng.binomial(10, (rate / (1 + rate))[:, None], (n, 2)),
        "below": rng.uniform(-1.0, rate),
    }
    return {k: v.astype(np.float32) for k, v in bank.items()}


def quick_fit(model, sims, **kwargs):
    """A posterior trained for one epoch: enough to exercise input checks."""
    post = na.AmortizedPosterior(
        model, inference_net=nets.CouplingFlow(num_layers=1, hidden=(8,)), **kwargs
    )
    post.fit(
        jax.random.key(1),
        simulations=sims,
        max_epochs=1,
        validation_fraction=0,
        progress=False,
    )
    return post, sims


@pytest.fixture(scope="module")
def flat():
    return quick_fit(supported, supported_bank(128))


@pytest.fixture(scope="module")
def sets():
    sims = gaussian_means.simulate(jax.random.key(0), 128, progress=False, **KW)
    post, sims = quick_fit(
        gaussian_means,
        sims,
        model_kwargs=KW,
        summary_net=nets.DeepSet(summary_dim=4, embed_dim=8, hidden=(8,)),
    )
    return post, np.asarray(sims["x"][:3])


def one(sims: dict, i: int = 0) -> dict:
    """Observed data of simulation ``i`` (as float64 NumPy arrays)."""
    return {n: np.array(sims[n][i], np.float64) for n in supported.observed}


# ------------------------------------------------------------------- item 5
def test_standardizer_keeps_small_scales():
    rng = np.random.default_rng(0)
    v = SMALL * rng.standard_normal((1_000, 3)) + np.array([0.0, SMALL, 5.0])
    v[:, 2] = 5.0  # an exactly constant feature still passes through
    std = Standardizer.fit(v.astype(np.float32))
    np.testing.assert_allclose(std.std[:2], SMALL, rtol=0.1)
    assert float(std.std[2]) == 1.0
    # Spread below float32 resolution at the feature's magnitude is constant.
    tiny = np.float32(1e4) + np.float32(1e-3) * (np.arange(100) % 2)
    assert float(Standardizer.fit(tiny[:, None].astype(np.float32)).std[0]) == 1.0


@pytest.mark.slow
def test_posterior_in_small_units_matches_the_analytic_one():
    post = na.AmortizedPosterior(
        small_units, inference_net=nets.CouplingFlow(num_layers=2, hidden=(16,))
    )
    post.fit(
        jax.random.key(0),
        num_simulations=4_000,
        max_epochs=40,
        learning_rate=3e-3,
        validation_fraction=0,
        progress=False,
    )
    x = np.asarray(small_units.simulate(jax.random.key(1), 8)["x"], np.float64)
    draws = np.asarray(post.sample(jax.random.key(2), {"x": x}, 4_000)["mu"])
    mean, sd = x.sum(axis=1) / 11, SMALL / np.sqrt(11)  # N(0, s^2) prior, 10 obs
    # Measured: 0.29 and 0.09; before the fix, 2e7 and 7e7 (the prior's scale).
    assert np.abs(draws.mean(axis=1) - mean).max() / sd < 0.5
    assert np.abs(draws.std(axis=1) / sd - 1).max() < 0.25


# ------------------------------------------------------------------- item 6
def _fake_epochs(losses: list[float], poison: int | None):
    """``run_epoch`` whose weights become NaN from epoch ``poison`` on."""
    calls = {"e": 0}

    def run_epoch(state, key):
        e = calls["e"]
        calls["e"] += 1
        scale = np.nan if poison is not None and e >= poison else 1.0 + e
        params = jax.tree.map(lambda p: p * 0 + scale, state.params)
        loss = jnp.asarray([losses[e]])
        info = StepInfo(loss, jnp.zeros(1), jnp.zeros(1, jnp.int32))
        return TrainState(params, None, state.step + 1), info

    return run_epoch


def _run(post, run_epoch, max_epochs=3, checkpoint=None):
    f = post._require()
    state = TrainState(f.params, None, jnp.zeros((), jnp.int32))
    kw = dict(max_epochs=max_epochs, patience=None, steps_per_epoch=1, progress=False,
              checkpoint=checkpoint)  # fmt: skip
    run_epochs(post, jax.random.key(0), run_epoch, state, None, None, History(),
               time.perf_counter(), **kw)  # fmt: skip
    return post._require().params


def test_diverging_training_keeps_the_last_finite_weights(flat):
    post = na.AmortizedPosterior(supported)
    post._fitted = flat[0]._fitted  # the same networks, not trained further
    with pytest.warns(RuntimeWarning, match="epoch 2; keeping the finite weights"):
        params = _run(post, _fake_epochs([1.0, np.nan, np.nan], poison=1))
    leaves = jax.tree.leaves(nnx.to_pure_dict(params))
    assert all(np.all(np.asarray(p) == 1.0) for p in leaves)  # epoch 1's weights


def test_diverging_at_once_raises(flat):
    post = na.AmortizedPosterior(supported)
    post._fitted = flat[0]._fitted
    before = post._require().params
    with pytest.raises(RuntimeError, match="Training diverged.*smaller learning_rate"):
        _run(post, _fake_epochs([np.nan] * 3, poison=0))
    assert post._require().params is before


class _RecordingCheckpoint:
    """Stands in for a ``Checkpointer``: records the positions it is asked to save."""

    round = 0

    def __init__(self):
        self.saved = []

    def restore(self, *_):
        return None

    def save(self, post, state, best_params, pos, history, *, improved):
        self.saved.append(pos)


def test_diverging_at_once_writes_no_finished_checkpoint(flat):
    # A checkpoint marked finished would make resume_from= return the untrained
    # weights without a word; the error comes first, and nothing is written.
    post = na.AmortizedPosterior(supported)
    post._fitted = flat[0]._fitted
    checkpoint = _RecordingCheckpoint()
    with pytest.raises(RuntimeError, match="Training diverged"):
        _run(post, _fake_epochs([1.0, np.nan, np.nan], poison=0), checkpoint=checkpoint)
    assert checkpoint.saved == []
    # Diverging later: the finite epoch's checkpoint, then a finished one that
    # keeps it (the warning's path).
    checkpoint = _RecordingCheckpoint()
    with pytest.warns(RuntimeWarning, match="keeping the finite weights of epoch 1"):
        _run(post, _fake_epochs([1.0, np.nan, np.nan], poison=1), checkpoint=checkpoint)
    assert [p.done for p in checkpoint.saved] == [False, True]


def _nan_loss(*_):
    return jnp.nan


def test_a_validation_loss_that_is_never_finite_keeps_nothing_untrained(flat):
    # Training stays finite, the validation loss is NaN every epoch: no epoch is
    # ever "better", and before, the untrained weights came back without a word.
    post = na.AmortizedPosterior(supported)
    post._fitted = flat[0]._fitted
    f = post._require()
    state = TrainState(f.params, None, jnp.zeros((), jnp.int32))
    run_epoch = _fake_epochs([1.0, 1.0, 1.0], poison=None)
    kw = dict(max_epochs=3, patience=2, steps_per_epoch=1, progress=False)
    with pytest.raises(RuntimeError, match="validation loss was never finite"):
        run_epochs(post, jax.random.key(0), run_epoch, state, "val", _nan_loss,
                   History(), time.perf_counter(), **kw)  # fmt: skip


# ------------------------------------------------------------------- item 7
def test_values_beyond_float32_are_refused(flat):
    post, sims = flat
    data = one(sims)
    data["y"][1] = 1e39  # finite in float64, inf in float32
    with pytest.raises(
        ValueError, match=r"'y' contains 1 NaN/inf.*float32.*3\.403e\+38.*index \(1,\)"
    ):
        post.sample(jax.random.key(0), data, 10)


# ------------------------------------------------------------------- item 8
@pytest.mark.parametrize(
    "site, index, value, shown",
    [
        ("counts", 2, -1.0, r"IntegerNonnegative.*-1\.0 at index \(2,\)"),
        ("counts", 0, 1.5, r"IntegerNonnegative.*1\.5 at index \(0,\)"),
        ("probs", 0, 0.9, r"Simplex.*at index \(\)"),
        ("bounded", 1, 2.5, r"Interval.*2\.5 at index \(1,\)"),
        ("successes", 0, 11.0, r"IntegerInterval.*11\.0 at index \(0,\)"),
    ],
)
def test_data_outside_any_checkable_support_are_refused(
    flat, site, index, value, shown
):
    post, sims = flat
    data = one(sims)
    data[site][index] = value
    with pytest.raises(
        ValueError, match=rf"'{site}' has 1 value\(s\) outside .*{shown}"
    ):
        post.sample(jax.random.key(0), data, 10)


def test_the_guide_checks_data_supports_too(flat):
    # The same check as `sample`, when the guide runs on concrete data.
    post, sims = flat
    data = one(sims)
    data["counts"][2] = -1.0
    guide = post.as_guide()
    with pytest.raises(ValueError, match=r"'counts' has 1 value\(s\) outside"):
        numpyro.handlers.seed(guide, jax.random.key(0))(**data)


def test_bounds_that_depend_on_a_latent_are_not_checked(flat):
    post, sims = flat
    data = one(sims)
    data["below"] = np.asarray(50.0)  # fine for a large enough rate
    assert np.isfinite(post.sample(jax.random.key(0), data, 10)["rate"]).all()


# ------------------------------------------------------------------- item 9
def test_log_prob_outside_the_support_is_minus_inf(flat):
    post, sims = flat
    lp = post.log_prob(
        {"loc": jnp.zeros(3), "rate": jnp.asarray([-1.0, 0.5, 0.0])}, one(sims)
    )
    assert lp[0] == -np.inf and np.isfinite(lp[1]) and lp[2] == -np.inf


# ------------------------------------------------------------------ item 10
def _walk(rng, drift):
    steps = rng.normal(drift[:, None], 1.0, size=(drift.shape[0], 5))
    return np.cumsum(steps, axis=1)


@na.amortize(observed=["x"])
def walk(x=None):
    drift = numpyro.sample("drift", dist.Normal(0.0, 1.0))
    numpyro.sample("x", na.NumpySimulator(_walk, drift, event_shape=(5,)), obs=x)


def test_vectorized_simulator_does_not_depend_on_batch_size():
    a = walk.simulate(jax.random.key(0), 70, batch_size=7, progress=False)["x"]
    b = walk.simulate(jax.random.key(0), 70, batch_size=64, progress=False)["x"]
    np.testing.assert_array_equal(a, b)
    assert np.unique(a[:, 0]).size == 70


def _fragile(rng, drift):
    if drift[0] > 1.0:
        raise FloatingPointError("overflow in the solver")
    return _walk(rng, drift)


@na.amortize(observed=["x"])
def fragile(x=None):
    drift = numpyro.sample("drift", dist.Normal(0.0, 1.0))
    numpyro.sample("x", na.NumpySimulator(_fragile, drift, event_shape=(5,)), obs=x)


def test_a_raising_simulator_is_a_failed_simulation():
    with pytest.warns(RuntimeWarning, match=r"'_fragile' raised.*\[1\.\d+.*overflow"):
        sims, info = fragile.simulate(
            jax.random.key(0), 200, return_info=True, progress=False
        )
    # About 16% of N(0, 1) draws exceed 1: those are dropped and counted.
    assert 10 < info.num_invalid < 60 and len(sims["x"]) == 200 - info.num_invalid
    assert (np.asarray(sims["drift"]) <= 1.0).all() and np.isfinite(sims["x"]).all()


def _fragile_counts(rng, drift):
    if drift > 1.0:
        raise FloatingPointError("overflow in the solver")
    return rng.poisson(3.0, size=5)


@na.amortize(observed=["x"])
def fragile_counts(x=None):
    drift = numpyro.sample("drift", dist.Normal(0.0, 1.0))
    simulator = na.NumpySimulator(
        _fragile_counts, drift, event_shape=(5,), dtype=np.int32, vectorized=False
    )
    numpyro.sample("x", simulator, obs=x)


def test_a_raising_integer_simulator_stops_naming_simulator_and_parameters():
    # Integer outputs have no NaN to mark a failure: the run stops, and the
    # message names the simulator, its parameters and the cause.
    with pytest.raises(Exception, match=r"'_fragile_counts' raised for parameters"):
        fragile_counts.simulate(jax.random.key(0), 200, progress=False)


# ------------------------------------------------------------------ item 14
def test_draw_memory_is_bounded_whatever_num_samples(sets, monkeypatch):
    post, x = sets
    f = post._require()
    _, xx, mask = post._data_arrays({"x": x[0]})

    def draw(params, key, num_samples):
        net = nnx.merge(f.graphdef, params, f.rest)
        return draw_targets(net, f.space, f.theta_std, f.x_std, key, xx, mask,
                            num_samples)  # fmt: skip

    lowered = jax.jit(draw, static_argnums=2).lower(f.params, jax.random.key(0), 10**6)
    memory = lowered.compile().memory_analysis()
    # 10^6 draws of 2 parameters: 8 MB of output; before, 300 MB of temporaries.
    assert memory.output_size_in_bytes == 8 * 10**6
    assert memory.temp_size_in_bytes < 50 * 10**6
    monkeypatch.setattr(chunked, "DRAW_BLOCK", 500)  # blocks of 500: fast
    small = post.sample(jax.random.key(0), {"x": x[0]}, 500)["mu"]
    many = post.sample(jax.random.key(0), {"x": x[0]}, 2_100)["mu"]
    assert many.shape == (2_100, 2) and np.isfinite(many).all()
    # Up to one block: one pass with the key itself (the draws before blocks).
    net = nnx.merge(f.graphdef, f.params, f.rest)
    ctx = net.context(f.x_std(xx), mask)
    v = net.flow.sample(jax.random.key(0), ctx, 500)
    np.testing.assert_allclose(
        small, f.space.constrain(f.theta_std.inverse(v))[0]["mu"], rtol=1e-5, atol=1e-6
    )
    # More: independent blocks of the same posterior, none repeating another.
    np.testing.assert_allclose(many.mean(0), small.mean(0), atol=0.3)
    assert np.unique(many, axis=0).shape[0] == 2_100
    chunks = post.sample(jax.random.key(0), {"x": x[:2]}, 2_100, chunk_size=1)
    batched = post.sample(jax.random.key(0), {"x": x[:2]}, 2_100)
    np.testing.assert_allclose(chunks["mu"], batched["mu"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ clear errors
@pytest.mark.parametrize("num_samples", [0, -3, 2.5])
def test_num_samples_must_be_positive(sets, num_samples):
    post, x = sets
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        post.sample(jax.random.key(0), {"x": x[0]}, num_samples)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        post.to_inference_data(jax.random.key(0), {"x": x[0]}, num_samples)


def test_mask_of_the_wrong_shape_is_refused(sets):
    post, x = sets
    with pytest.raises(ValueError, match=r"Mask 'x_mask' has shape \(3, 4\).*\(3, 5\)"):
        post.sample(jax.random.key(0), {"x": x, "x_mask": np.ones((3, 4), bool)}, 5)


def test_all_false_mask_warns_naming_the_datasets(sets):
    post, x = sets
    mask = np.ones((3, 5), bool)
    mask[1] = False
    with pytest.warns(
        RuntimeWarning, match=r"1 dataset\(s\) have no observations.*\[\(1,\)\]"
    ):
        post.sample(jax.random.key(0), {"x": x, "x_mask": mask}, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        post.sample(jax.random.key(0), {"x": x, "x_mask": np.ones((3, 5), bool)}, 5)


@pytest.mark.parametrize(
    "convert, dtype",
    [
        (lambda v: v + 1j, "complex"),
        (lambda v: v.astype(object), "object"),
        (lambda v: v.astype(str), "<U"),
    ],
)
def test_non_real_data_are_refused(sets, convert, dtype):
    post, x = sets
    with pytest.raises(TypeError, match=rf"'x' has dtype {dtype}.*real numbers"):
        post.sample(jax.random.key(0), {"x": convert(x[0])}, 5)


def test_an_empty_dataset_is_refused(sets):
    post, _ = sets
    with pytest.raises(ValueError, match=r"'x' has no observations.*'obs' plate"):
        post.sample(jax.random.key(0), {"x": np.zeros((0, 2))}, 5)
