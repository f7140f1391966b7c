"""Faults in saving and storage: nothing a user has is lost or silently wrong.

Each test is one case of issue 17 (overwrites, concurrent writers, leftovers of
killed writers, damaged or foreign banks, file modes, a changed model).
"""

import copy
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import numpyro_amortized as na
from numpyro_amortized import bank as bank_mod
from numpyro_amortized import io
from numpyro_amortized import networks as nets

try:  # absent before issue 17
    from numpyro_amortized import safe_write
except ImportError:
    safe_write = None
from numpyro_amortized.checkpoint import BEST, CHECKPOINT, Checkpointer, Position
from numpyro_amortized.models import gaussian_means
from numpyro_amortized.train import TrainState

KW = {"n_obs": 10, "dim": 2}


@na.amortize(observed=["x"])
def model_a(x=None):
    a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.HalfNormal(1.0))
    numpyro.sample("x", dist.Normal(a, b).expand([3]).to_event(1), obs=x)


@na.amortize(observed=["x"])
def model_b(x=None):
    """Same sites, shapes and supports as ``model_a``; another prior."""
    a = numpyro.sample("a", dist.Normal(5.0, 1.0))
    b = numpyro.sample("b", dist.HalfNormal(1.0))
    numpyro.sample("x", dist.Normal(a, b).expand([3]).to_event(1), obs=x)


def numpy_sims(n, seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), np.abs(rng.normal(size=n)) + 0.1
    x = rng.normal(a[:, None], b[:, None], (n, 3))
    return {k: v.astype(np.float32) for k, v in {"a": a, "b": b, "x": x}.items()}


def built(seed=0):
    """A posterior with networks and random weights (no training)."""
    post = na.AmortizedPosterior(model_a, nets.CouplingFlow(num_layers=2, hidden=(8,)))
    post._build(jax.random.key(seed), numpy_sims(64, seed))
    return post


def perturbed(post, seed):
    """A copy of ``post`` with other weights."""
    other = copy.copy(post)
    noise = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda p: p + noise.normal(size=p.shape).astype(p.dtype), post._fitted.params
    )
    other._fitted = post._fitted._replace(params=params)
    return other


@pytest.fixture(scope="module")
def post():
    return built(0)


def bank_sims(n, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n, 2)).astype(np.float32)
    x = (mu[:, None] + rng.normal(size=(n, 10, 2))).astype(np.float32)
    return {"mu": mu, "x": x}


def write_bank(path, n=50, seed=0, **kw):
    return na.DiskBank.write(path, bank_sims(n, seed), gaussian_means, **KW, **kw)


def corrupt(match):
    """``pytest.raises`` for :class:`~numpyro_amortized.bank.CorruptBankError`."""
    return pytest.raises(getattr(bank_mod, "CorruptBankError", KeyError), match=match)


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def params_equal(a, b):
    la, lb = jax.tree.leaves(a._fitted.params), jax.tree.leaves(b._fitted.params)
    return all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


# ------------------------------------------------------- 1. overwrite=True
def test_overwrite_refuses_a_folder_that_is_not_a_bank(tmp_path):
    user = tmp_path / "results"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not a disk bank"):
        write_bank(user, overwrite=True)
    assert (user / "thesis.tex").read_text() == "years of work"
    # A bank folder the user put other files into is not replaced either.
    bank = tmp_path / "bank"
    write_bank(bank)
    (bank / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="other files in it.*notes.txt"):
        write_bank(bank, overwrite=True, seed=1)
    assert (bank / "notes.txt").exists()
    # A plain file is not a bank.
    (tmp_path / "f").write_text("data")
    with pytest.raises(ValueError, match="not a folder"):
        write_bank(tmp_path / "f", overwrite=True)
    assert (tmp_path / "f").read_text() == "data"


def test_failed_replace_keeps_the_old_bank(tmp_path, monkeypatch):
    path = tmp_path / "bank"
    old = write_bank(path, seed=0).read(0, 50)

    def fail(*args, **kwargs):
        raise OSError("disk failure")

    # The swap does not go through os.replace; a failure there cannot lose it.
    monkeypatch.setattr(os, "replace", fail)
    try:
        write_bank(path, overwrite=True, seed=1)
    except OSError:
        pass
    monkeypatch.undo()
    got = na.DiskBank.open(path).read(0, 50)
    assert any(np.array_equal(got["x"], s["x"]) for s in (old, bank_sims(50, 1)))
    # Without an atomic exchange: two renames, the second fails -> old put back.
    monkeypatch.setattr("numpyro_amortized.disk_bank.exchange", lambda a, b: False)
    rename, calls = os.rename, []

    def second_fails(src, dst):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk failure")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(OSError, match="disk failure"):
        write_bank(path, overwrite=True, seed=2)
    monkeypatch.undo()
    np.testing.assert_array_equal(na.DiskBank.open(path).read(0, 50)["x"], got["x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]


# ------------------------------------------------ 2. concurrent no-overwrite
def _race(monkeypatch, num, target):
    """Run ``target(i)`` in ``num`` threads that all finish writing their data
    before any of them puts its file in place; returns results or errors."""
    barrier = threading.Barrier(num, timeout=60)
    savez = np.savez

    def savez_then_wait(file, **arrays):
        savez(file, **arrays)
        barrier.wait()

    monkeypatch.setattr(np, "savez", savez_then_wait)
    out = [None] * num

    def run(i):
        try:
            out[i] = target(i)
        except Exception as e:  # noqa: BLE001 - collected for the assertions
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(num)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    return out


def test_concurrent_saves_exactly_one_wins(post, tmp_path, monkeypatch):
    posts = [perturbed(post, seed) for seed in range(4)]
    path = tmp_path / "p.npa"
    out = _race(monkeypatch, 4, lambda i: posts[i].save(path))
    winners = [i for i, r in enumerate(out) if not isinstance(r, Exception)]
    assert len(winners) == 1, out
    assert all(isinstance(out[i], FileExistsError) for i in range(4) if i != winners[0])
    assert params_equal(na.load(path), posts[winners[0]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npa"]


def test_concurrent_save_simulations_exactly_one_wins(tmp_path, monkeypatch):
    sims = [numpy_sims(20, seed) for seed in range(3)]
    path = tmp_path / "bank.npz"
    out = _race(monkeypatch, 3, lambda i: na.save_simulations(path, sims[i], model_a))
    winners = [i for i, r in enumerate(out) if not isinstance(r, Exception)]
    assert len(winners) == 1, out
    assert all(isinstance(out[i], FileExistsError) for i in range(3) if i != winners[0])
    np.testing.assert_array_equal(na.load_simulations(path)["x"], sims[winners[0]]["x"])


# --------------------------------------------------- 3. files fit writes
def _state(post):
    params = post._fitted.params
    return TrainState(params, optax.adam(1e-3).init(params), jnp.asarray(0))


def test_fit_refuses_best_npa_of_an_earlier_run(post, tmp_path):
    post.save(tmp_path / BEST)
    earlier = (tmp_path / BEST).read_bytes()
    with pytest.raises(FileExistsError, match="resume_from=.*another checkpoint_dir"):
        Checkpointer(post, tmp_path, 1, None, {"fit": "test"})
    assert (tmp_path / BEST).read_bytes() == earlier


def test_checkpointer_does_not_replace_a_file_that_appears_meanwhile(post, tmp_path):
    ckpt = Checkpointer(post, tmp_path, 1, None, {"fit": "test"})
    post.save(tmp_path / BEST)  # another process, after the check at the start
    other = (tmp_path / BEST).read_bytes()
    history = na.History(train_loss=[1.0])
    position = Position(0, 0, 0, 1.0, 0, done=False)
    with pytest.raises(FileExistsError):
        ckpt.save(post, _state(post), post._fitted.params, position, history,
                  improved=True)  # fmt: skip
    assert (tmp_path / BEST).read_bytes() == other
    # What this run wrote itself it replaces.
    ckpt2 = Checkpointer(post, tmp_path / "run", 1, None, {"fit": "test"})
    for e in range(2):
        position = Position(0, e, 0, 1.0, 0, done=False)
        ckpt2.save(post, _state(post), post._fitted.params, position, history,
                   improved=True)  # fmt: skip
    assert (tmp_path / "run" / BEST).exists() and (tmp_path / "run" / CHECKPOINT)


def test_unwritable_checkpoint_dir_fails_before_training(post):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    # /proc/self exists and cannot be written, even as root.
    with pytest.raises(OSError, match="cannot be written"):
        Checkpointer(post, "/proc/self", 1, None, {"fit": "test"})


# ---------------------------------------------------------- 4. leftovers
def test_leftovers_of_dead_writers_are_named_and_cleaned(post, tmp_path, monkeypatch):
    pid, host = dead_pid(), getattr(safe_write, "_HOST", "0" * 8)
    stale_file = tmp_path / f".p.npa.partial-{host}-{pid}-0a1b"
    stale_file.write_bytes(b"PK\x03\x04 half")
    stale_dir = tmp_path / f".bank.partial-{host}-{pid}-0a1b"
    stale_dir.mkdir()
    (stale_dir / "x.npy").write_bytes(b"half")
    live = tmp_path / f".q.npa.partial-{host}-{os.getpid()}-0a1b"
    live.write_bytes(b"another thread of this process, still writing")
    names = []
    savez = np.savez

    def spy(file, **arrays):
        names.extend(n for n in os.listdir(tmp_path) if n.startswith(".p.npa"))
        savez(file, **arrays)

    monkeypatch.setattr(np, "savez", spy)
    post.save(tmp_path / "p.npa")
    monkeypatch.undo()
    assert names[0].startswith(f".p.npa.partial-{host}-{os.getpid()}-")
    assert not stale_file.exists() and not stale_dir.exists() and live.exists()
    # A replaced bank whose writer died between its two renames is put back.
    write_bank(tmp_path / "b")
    (tmp_path / "b").rename(tmp_path / f".b.trash-{host}-{pid}-0a1b")
    assert len(na.DiskBank.open(tmp_path / "b")) == 50


# -------------------------------------------------------- 11. shard checks
def test_disk_bank_refuses_a_shard_copied_from_another_bank(tmp_path):
    write_bank(tmp_path / "a", seed=0)
    write_bank(tmp_path / "b", seed=1)  # same model, other simulations
    os.replace(tmp_path / "b" / "x.npy", tmp_path / "a" / "x.npy")
    with corrupt(match="x.npy.*fingerprint"):
        na.DiskBank.open(tmp_path / "a")


def test_disk_bank_refuses_a_shard_of_another_shape(tmp_path):
    write_bank(tmp_path / "a")
    np.save(tmp_path / "a" / "x.npy", np.zeros((50, 5, 2), np.float32))
    with corrupt(match=r"shape \(50, 5, 2\)"):
        na.DiskBank.open(tmp_path / "a")
    # The same for a bank of an older version (no shard records in bank.json).
    header = json.loads((tmp_path / "a" / "bank.json").read_text())
    header.pop("shards", None)
    (tmp_path / "a" / "bank.json").write_text(json.dumps(header))
    with corrupt(match=r"shape \(50, 5, 2\)"):
        na.DiskBank.open(tmp_path / "a")


def test_disk_bank_refuses_paths_that_leave_its_folder(tmp_path):
    write_bank(tmp_path / "a")
    np.save(tmp_path / "secret.npy", np.zeros((50, 2), np.float32))
    for name in ("../secret", str(tmp_path / "secret")):
        header = json.loads((tmp_path / "a" / "bank.json").read_text())
        header["arrays"] = [name, "x"]
        header.pop("shards", None)
        (tmp_path / "a" / "bank.json").write_text(json.dumps(header))
        with corrupt(match="plain file name"):
            na.DiskBank.open(tmp_path / "a")


def test_verify_finds_a_change_the_open_check_does_not_sample(tmp_path):
    bank = write_bank(tmp_path / "a", n=20_000)  # x.npy: 1.6 MB > 16 blocks
    bank.verify()
    file, size, block = tmp_path / "a" / "x.npy", (tmp_path / "a" / "x.npy"), 1 << 16
    size = os.path.getsize(file)
    starts = [(size - block) * i // 15 for i in range(16)]
    gap = next(o for o in range(0, size, 4096) if all(not s <= o < s + block
                                                      for s in starts))  # fmt: skip
    with open(file, "r+b") as f:
        f.seek(gap)
        byte = f.read(1)
        f.seek(gap)
        f.write(bytes([byte[0] ^ 0xFF]))
    reopened = na.DiskBank.open(tmp_path / "a")  # sampled blocks unchanged
    with corrupt(match="SHA-256"):
        reopened.verify()


def test_old_disk_bank_without_shard_records_still_opens(tmp_path):
    write_bank(tmp_path / "a")
    header = json.loads((tmp_path / "a" / "bank.json").read_text())
    header.pop("shards", None)
    (tmp_path / "a" / "bank.json").write_text(json.dumps(header))
    bank = na.DiskBank.open(tmp_path / "a", gaussian_means, **KW)
    np.testing.assert_array_equal(bank.read(0, 50)["x"], bank_sims(50)["x"])
    with pytest.warns(UserWarning, match="without checksums"):
        bank.verify()


# ---------------------------------------------------- 13. object-dtype shard
def test_object_dtype_shard_is_refused_not_read(tmp_path):
    write_bank(tmp_path / "a")
    with open(tmp_path / "a" / "x.npy", "wb") as f:  # a header that lies
        np.lib.format.write_array_header_2_0(
            f, {"descr": "|O", "fortran_order": False, "shape": (50, 10, 2)}
        )
        f.write(os.urandom(50 * 20 * 8))
    header = json.loads((tmp_path / "a" / "bank.json").read_text())
    header.pop("shards", None)  # an old bank: only the .npy header to go by
    (tmp_path / "a" / "bank.json").write_text(json.dumps(header))
    # Refused at open (reading it as objects would crash the interpreter).
    with corrupt(match="dtype object"):
        na.DiskBank.open(tmp_path / "a")


# ------------------------------------------------------ bank files (.npz)
def test_damaged_bank_file_is_a_clear_error(tmp_path):
    path = na.save_simulations(tmp_path / "b", numpy_sims(30), model_a)
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with corrupt(match="damaged or truncated"):
        na.load_simulations(tmp_path / "cut.npz")
    # A consistent edit of a member: the checksum catches it.
    sims = dict(np.load(path))
    sims["x"] = sims["x"] + 1
    np.savez(tmp_path / "edit.npz", **sims)
    with corrupt(match="checksum"):
        na.load_simulations(tmp_path / "edit.npz")
    # A bank of an older version (no checksum) still loads.
    header = json.loads(bytes(sims["__bank__"]).decode())
    del header["sha256"]
    sims["__bank__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(tmp_path / "old.npz", **sims)
    assert set(na.load_simulations(tmp_path / "old.npz", model_a)) == {"a", "b", "x"}


# ----------------------------------------------------------- file modes
def test_saved_files_get_the_usual_umask_mode(post, tmp_path):
    old = os.umask(0o022)
    try:
        post.save(tmp_path / "p.npa")
        na.save_simulations(tmp_path / "s.npz", numpy_sims(10), model_a)
        write_bank(tmp_path / "bank")
    finally:
        os.umask(old)
    for p in ("p.npa", "s.npz", "bank/x.npy", "bank/bank.json"):
        assert oct((tmp_path / p).stat().st_mode & 0o777) == "0o644", p
    assert oct((tmp_path / "bank").stat().st_mode & 0o777) == "0o755"


# -------------------------------------------------- 12. model fingerprint
def test_loading_with_another_model_of_the_same_sites_warns(post, tmp_path):
    path = post.save(tmp_path / "p.npa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right model: no warning
        na.load(path, model=model_a)
    with pytest.warns(io.ModelChangedWarning, match="'a'.*other priors"):
        na.load(path, model=model_b)
    # Files saved before the fingerprint existed load as before.
    header, arrays = io.read_file(path)
    del header["posterior"]["model"]["fingerprint"]
    io.write_file(tmp_path / "old.npa", "posterior", {"posterior": header["posterior"]},
                  arrays)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        na.load(tmp_path / "old.npa", model=model_b)


@na.amortize(observed=["x"])
def backslash_site(x=None):
    mu = numpyro.sample("a\\b", dist.Normal(0.0, 1.0))
    numpyro.sample("x", dist.Normal(mu, 1.0).expand([3]).to_event(1), obs=x)


def test_writer_refuses_a_name_the_reader_refuses_before_replacing(tmp_path):
    # Before, "a\b" was written and swapped in, and only reopening it failed:
    # the good bank it replaced was gone.
    path = tmp_path / "bank"
    write_bank(path)
    sims = {"a\\b": np.zeros(4, np.float32), "x": np.zeros((4, 3), np.float32)}
    with pytest.raises(ValueError, match=r"Site 'a\\b' cannot be a file name"):
        na.DiskBank.write(path, sims, backslash_site, overwrite=True)
    assert len(na.DiskBank.open(path)) == 50


def test_reserved_name_is_given_back_when_the_rename_fails(tmp_path, monkeypatch):
    # Without hard links the final name is reserved with O_EXCL, then filled by
    # a rename; a failed rename must not leave an empty file under that name.
    tmp, path = tmp_path / "tmp", tmp_path / "final.npa"
    tmp.write_bytes(b"content")

    def no_link(*_):
        raise PermissionError("no hard links here")

    def failing_replace(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        safe_write._link_new(tmp, path)
    assert not path.exists() and tmp.read_bytes() == b"content"
