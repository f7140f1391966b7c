"""Saving and loading posteriors, checkpoints and exact resumption, file safety."""

import copy
import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from flax import nnx

import numpyro_amortized as na
from numpyro_amortized import io
from numpyro_amortized import networks as nets
from numpyro_amortized.checkpoint import BEST, CHECKPOINT, Checkpointer, Position
from numpyro_amortized.networks.summary import masked_mean
from numpyro_amortized.train import TrainState


@na.amortize(observed=["x"])
def set_model(n_obs=6, x=None):
    """Constrained targets (interval, positive); data are a set (one plate)."""
    loc = numpyro.sample("loc", dist.Uniform(-1.0, 2.0))
    scale = numpyro.sample("scale", dist.HalfNormal(1.0))
    with numpyro.plate("obs", n_obs):
        numpyro.sample("x", dist.Normal(loc, scale), obs=x)


@na.amortize(observed=["x"])
def flat_model(x=None):
    """A simplex and a positive target; fixed-size data without a plate."""
    w = numpyro.sample("w", dist.Dirichlet(jnp.ones(3)))
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    mean = jnp.concatenate([w, s[None]])
    numpyro.sample("x", dist.Normal(mean, 0.3).to_event(1), obs=x)


@na.amortize(observed=["x"])
def small_model(x=None):
    """Cheap to simulate and compile: for the training tests."""
    a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.HalfNormal(1.0))
    numpyro.sample("x", dist.Normal(a, b).expand([3]).to_event(1), obs=x)


@nets.register_module
class MeanSummary(nnx.Module):
    """A user's own summary network, made savable by the decorator."""

    def __init__(self, features: int, width: int = 3, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(features, width, rngs=rngs)

    def __call__(self, x, mask=None):
        return self.linear(masked_mean(x, mask))


TINY_FLOW = nets.CouplingFlow(num_layers=2, hidden=(8,))
TINY_MLP = nets.MLP(summary_dim=4, hidden=(8,))

# Every flow spec and every summary spec (MLP: see ``flat`` below) and a user module.
CONFIGS = {
    "spline+deepset": (
        nets.NeuralSplineFlow(num_layers=2, hidden=(8,), num_bins=4),
        nets.DeepSet(summary_dim=4, embed_dim=8, hidden=(8,)),
    ),
    "coupling+set_transformer": (
        TINY_FLOW,
        nets.SetTransformer(
            summary_dim=4, embed_dim=8, num_heads=2, num_inducing=2, num_blocks=1
        ),
    ),
    "flow_matching+time_series": (
        nets.FlowMatching(hidden=(8,), num_steps=4),
        nets.TimeSeriesNetwork(
            summary_dim=4, conv_features=4, recurrent_dim=4, hidden=(8,)
        ),
    ),
    "coupling+user_module": (TINY_FLOW, "user"),
}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Reuse XLA executables within this module: the original and the loaded
    posterior (and a resumed and an uninterrupted fit) compile the same programs."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {n: getattr(jax.config, n) for n in names}
    values = (str(tmp_path_factory.mktemp("xla")), 0.0, 0)
    for n, v in zip(names, values, strict=True):
        jax.config.update(n, v)
    cc.reset_cache()
    yield
    for n, v in before.items():
        jax.config.update(n, v)
    cc.reset_cache()


@pytest.fixture(scope="module")
def banks():
    """Simulations drawn with NumPy (no model compilation needed here)."""
    rng = np.random.default_rng(0)
    loc, scale = rng.uniform(-1, 2, 200), np.abs(rng.normal(size=200))
    w, s = rng.dirichlet(np.ones(3), 200), np.abs(rng.normal(size=200))
    f32 = np.float32
    return {
        set_model: {
            "loc": loc.astype(f32),
            "scale": scale.astype(f32),
            "x": rng.normal(loc[:, None], scale[:, None], (200, 6)).astype(f32),
        },
        flat_model: {
            "w": w.astype(f32),
            "s": s.astype(f32),
            "x": rng.normal(np.c_[w, s], 0.3).astype(f32),
        },
    }


def built(model, inference_net, summary_net, sims, seed=1):
    """A posterior with networks and standardization from ``sims`` and random
    weights far from any initialization (a broken weight restore cannot pass)."""
    if summary_net == "user":
        summary_net = MeanSummary(1, width=3, rngs=nnx.Rngs(0))
    post = na.AmortizedPosterior(model, inference_net, summary_net)
    post._build(jax.random.key(seed), sims)
    f = post._fitted
    rng = np.random.default_rng(seed)
    noisy = jax.tree.map(
        lambda p: jnp.asarray(p + 0.3 * rng.normal(size=p.shape), p.dtype), f.params
    )
    post._fitted = f._replace(params=noisy)
    post.history = na.History(train_loss=[1.5, 1.25], num_steps=7)
    return post


def assert_same_params(a, b):
    pa, pb = jax.tree.leaves(a._fitted.params), jax.tree.leaves(b._fitted.params)
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_gives_identical_draws(name, banks, tmp_path):
    inference_net, summary_net = CONFIGS[name]
    sims = banks[set_model]
    post = built(set_model, inference_net, summary_net, sims)
    data = {"x": sims["x"][:3]}
    key = jax.random.key(7)
    draws = post.sample(key, data, 32)
    path = post.save(tmp_path / "post.npa")

    loaded = na.load(path)  # no model needed
    again = loaded.sample(key, data, 32)
    for site in ("loc", "scale"):
        np.testing.assert_array_equal(np.asarray(again[site]), np.asarray(draws[site]))
    # Supports survive: draws stay inside them (up to float32 saturation at the
    # bounds of the interval), spaces are identical.
    assert ((again["loc"] >= -1) & (again["loc"] <= 2)).all()
    assert (again["scale"] > 0).all()
    assert loaded.space == post.space and loaded.layout == post.layout
    assert loaded.inference_net == inference_net
    assert type(loaded.summary_net) is type(post._fitted.summary_net)
    assert loaded.history == post.history


@pytest.fixture(scope="module")
def flat(banks, tmp_path_factory):
    """(posterior, its file, the posterior loaded from it): flat data, MLP."""
    post = built(flat_model, TINY_FLOW, TINY_MLP, banks[flat_model])
    path = post.save(tmp_path_factory.mktemp("flat") / "flat.npa")
    return post, path, na.load(path)


@pytest.fixture(scope="module")
def x_flat(banks):
    return banks[flat_model]["x"][0]


def test_round_trip_densities_summaries_and_weights(flat, x_flat):
    post, _, loaded = flat
    data = {"x": x_flat}
    draws = post.sample(jax.random.key(1), data, 16)
    again = loaded.sample(jax.random.key(1), data, 16)
    np.testing.assert_array_equal(np.asarray(again["w"]), np.asarray(draws["w"]))
    np.testing.assert_allclose(again["w"].sum(-1), 1.0, atol=1e-5)  # simplex
    lp = np.asarray(post.log_prob(draws, data))
    assert np.isfinite(lp).all()
    np.testing.assert_array_equal(np.asarray(loaded.log_prob(draws, data)), lp)
    np.testing.assert_array_equal(
        np.asarray(loaded.summarize(data)), np.asarray(post.summarize(data))
    )
    assert loaded.summary_net == TINY_MLP
    assert_same_params(loaded, post)
    np.testing.assert_array_equal(loaded._fitted.x_std.std, post._fitted.x_std.std)


def test_loaded_without_model_samples_but_cannot_simulate(flat, x_flat, tmp_path):
    post, _, loaded = flat
    idata = loaded.to_inference_data(jax.random.key(1), {"x": x_flat}, 16)
    assert idata.posterior["w"].shape == (1, 16, 3)
    assert idata.observed_data["x"].shape == (4,)
    with pytest.raises(io.ModelRequiredError, match="na.load\\(path, model=model\\)"):
        loaded.fit(jax.random.key(0), num_simulations=50, progress=False)
    # A posterior loaded without its model saves again, unchanged.
    twice = na.load(loaded.save(tmp_path / "q.npa"))
    assert_same_params(twice, post)
    assert twice.model.content == loaded.model.content


def test_load_with_model_checks_it_is_the_same_model(flat):
    # (Training a posterior rebuilt from a file is exercised by the resume tests.)
    _, path, _ = flat
    with_model = na.load(path, model=flat_model)
    assert with_model.model is flat_model
    assert with_model.model.targets == ("w", "s")
    with pytest.raises(io.ModelMismatchError, match="site 'w'"):
        na.load(path, model=set_model)


def test_model_arguments_are_saved_as_data_or_arrays():
    from numpyro_amortized.posterior_io import _decode_args, _encode_args

    meta, arrays = _encode_args((3, (1, 2.5)), {"X": np.ones((2, 2)), "name": "a"})
    assert meta["saved"] and list(arrays) == ["model_kwargs/X"]
    args, kwargs = _decode_args(json.loads(json.dumps(meta)), arrays)
    assert args == (3, (1, 2.5)) and kwargs["name"] == "a"
    np.testing.assert_array_equal(kwargs["X"], np.ones((2, 2)))
    meta, arrays = _encode_args((), {"link": np.exp})  # a function: not data
    assert not meta["saved"] and arrays == {} and _decode_args(meta, arrays) is None


def test_unregistered_user_module_cannot_be_saved(banks, tmp_path):
    class Plain(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(1, 2, rngs=rngs)

        def __call__(self, x, mask=None):
            return self.linear(masked_mean(x, mask))

    post = na.AmortizedPosterior(set_model, TINY_FLOW, Plain(nnx.Rngs(0)))
    post._build(jax.random.key(0), banks[set_model])
    with pytest.raises(TypeError, match="register_module"):
        post.save(tmp_path / "p.npa")
    assert not (tmp_path / "p.npa").exists()


# --------------------------------------------------------------------- safety
@pytest.fixture
def post(flat):
    return copy.copy(flat[0])


def test_no_overwrite_unless_asked(post, tmp_path):
    path = post.save(tmp_path / "p.npa")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="p.npa.*overwrite=True"):
        post.save(path)
    assert path.read_bytes() == before
    post.history = na.History(train_loss=[9.0])
    post.save(path, overwrite=True)
    assert na.load(path).history.train_loss == [9.0]


def test_truncated_or_damaged_file_is_refused(post, tmp_path):
    data = post.save(tmp_path / "p.npa").read_bytes()
    for i, bad in enumerate(
        [data[: len(data) // 2], data[:-20], data[:200]]
        + [data[:n] + bytes([data[n] ^ 1]) + data[n + 1 :] for n in (len(data) // 2,)]
    ):
        path = tmp_path / f"bad{i}.npa"
        path.write_bytes(bad)
        with pytest.raises(io.CorruptFileError, match="damaged"):
            na.load(path)


def _rewrite_header(src, dst, change):
    with np.load(src) as f:
        arrays = {k: f[k] for k in f.files}
    header = json.loads(bytes(arrays.pop(io.HEADER)).decode())
    change(header)
    raw = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(dst, **{io.HEADER: raw, **arrays})


def test_newer_format_and_tampered_header_are_refused(post, tmp_path):
    path = post.save(tmp_path / "p.npa")
    _rewrite_header(path, tmp_path / "new.npz", lambda h: h.update(format=99))
    with pytest.raises(io.FormatVersionError, match="format 99.*Upgrade"):
        na.load(tmp_path / "new.npz")
    # A consistent-looking edit (another shape) breaks the checksum.
    _rewrite_header(
        path, tmp_path / "edit.npz", lambda h: h["posterior"]["layout"].update(kind="x")
    )
    with pytest.raises(io.CorruptFileError, match="checksum"):
        na.load(tmp_path / "edit.npz")


def test_files_that_are_not_ours_are_refused(banks, tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    np.save(tmp_path / "b.npy", np.zeros(3))
    np.savez(tmp_path / "c.npz", weights=np.zeros(3))
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        z.writestr("x.txt", "not numpy")
    for name in ("a.txt", "b.npy", "c.npz", "d.zip"):
        with pytest.raises(io.NotAnAmortizerFileError):
            na.load(tmp_path / name)
    bank = na.save_simulations(tmp_path / "bank", banks[set_model], set_model)
    with pytest.raises(io.NotAnAmortizerFileError, match="load_simulations"):
        na.load(bank)
    with pytest.raises(FileNotFoundError):
        na.load(tmp_path / "missing.npa")


def test_interrupted_save_leaves_previous_file_intact(post, tmp_path, monkeypatch):
    path = post.save(tmp_path / "p.npa")
    before = path.read_bytes()

    def crash(file, **arrays):  # writes part of the archive, then dies
        file.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        post.save(path, overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npa"]  # no temp file
    assert na.load(path).history == post.history


# ---------------------------------------------------------- checkpoint/resume
FIT = {
    "num_simulations": 160,
    "num_rounds": 2,
    "max_epochs": 3,
    "batch_size": 32,
    "validation_fraction": 0.25,
    "progress": False,
}


def fresh():
    return na.AmortizedPosterior(small_model, TINY_FLOW)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    post = fresh()
    post.fit(jax.random.key(5), checkpoint_dir=directory, **FIT)
    return post, directory


def assert_same_training(a, b):
    assert_same_params(a, b)
    ha, hb = a.history.to_dict(), b.history.to_dict()
    ha.pop("wall_time"), hb.pop("wall_time")
    assert ha == hb


class Crash(Exception):
    pass


def crash_after(monkeypatch, num_checkpoints):
    """Make training die right after its ``num_checkpoints``-th checkpoint."""
    save, calls = Checkpointer.save, []

    def save_then_crash(self, *args, **kwargs):
        save(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == num_checkpoints:
            raise Crash

    monkeypatch.setattr(Checkpointer, "save", save_then_crash)


def saved_position(directory):
    position = io.read_file(directory / CHECKPOINT)[0]["training"]["position"]
    return position["round"], position["epoch"]


def test_resume_equals_uninterrupted_training(uninterrupted, tmp_path, monkeypatch):
    reference, _ = uninterrupted
    key, resume = jax.random.key(5), {"checkpoint_dir": tmp_path}
    # Dies at the end of round 0 (3 epochs per round, a checkpoint every epoch).
    crash_after(monkeypatch, 3)
    with pytest.raises(Crash):
        fresh().fit(key, **resume, **FIT)
    assert saved_position(tmp_path) == (0, 2)
    # Resumed, dies again after the first epoch of round 1.
    crash_after(monkeypatch, 1)
    with pytest.raises(Crash):
        fresh().fit(key, resume_from=tmp_path, **resume, **FIT)
    assert saved_position(tmp_path) == (1, 0)
    monkeypatch.undo()
    resumed = fresh()
    resumed.fit(key, resume_from=tmp_path / CHECKPOINT, **resume, **FIT)
    assert resumed.history.num_epochs == 6
    assert_same_training(resumed, reference)


def test_resume_online_training_equals_uninterrupted(tmp_path, monkeypatch):
    key = jax.random.key(8)
    kw = {"num_steps": 6, "steps_per_epoch": 2, "batch_size": 16, "progress": False}
    kw["num_validation"] = 32
    reference = fresh()
    reference.fit_online(key, **kw)  # without checkpoints: they change nothing
    crash_after(monkeypatch, 2)
    with pytest.raises(Crash):
        fresh().fit_online(key, checkpoint_dir=tmp_path, **kw)
    monkeypatch.undo()
    assert saved_position(tmp_path) == (0, 1)
    resumed = fresh()
    resumed.fit_online(key, checkpoint_dir=tmp_path, resume_from=tmp_path, **kw)
    assert resumed.history.num_epochs == 3
    assert_same_training(resumed, reference)


def test_checkpoint_every_k_epochs_and_best_on_improvement(flat, tmp_path):
    post = flat[0]
    params = post._fitted.params
    state = TrainState(params, optax.adam(1e-3).init(params), jnp.asarray(0))
    ckpt = Checkpointer(post, tmp_path, 2, None, {"fit": "test"})
    history, written = na.History(), []
    for e in range(5):
        history.train_loss.append(float(e))
        position = Position(0, e, 0, 1.0, 0, done=e == 4)
        ckpt.save(post, state, params, position, history, improved=e == 1)
        if (tmp_path / CHECKPOINT).exists():
            written.append(saved_position(tmp_path))
    # After epochs 2 and 4 (every 2) and at the end of the round (epoch 5).
    assert sorted(set(written)) == [(0, 1), (0, 3), (0, 4)]
    assert written.count((0, 1)) == 2  # not rewritten after epoch 3
    assert na.load(tmp_path / BEST).history.train_loss == [0.0, 1.0]


def test_checkpoint_files_are_loadable_posteriors(uninterrupted):
    reference, directory = uninterrupted
    best = na.load(directory / BEST)
    assert_same_training(best, reference)
    ckpt = na.load(directory / CHECKPOINT)  # a checkpoint is a posterior too
    assert_same_params(ckpt, reference)
    with pytest.raises(io.NotAnAmortizerFileError, match="checkpoint"):
        fresh().fit(jax.random.key(5), resume_from=directory / BEST, **FIT)


def test_resume_refuses_other_settings_and_existing_checkpoints(uninterrupted):
    _, directory = uninterrupted
    other = {**FIT, "batch_size": 16}
    with pytest.raises(ValueError, match="batch_size: checkpoint 32, now 16"):
        fresh().fit(jax.random.key(5), resume_from=directory, **other)
    with pytest.raises(ValueError, match="rng_key"):
        fresh().fit(jax.random.key(6), resume_from=directory, **FIT)
    with pytest.raises(FileExistsError, match="resume_from="):
        fresh().fit(jax.random.key(5), checkpoint_dir=directory, **FIT)
