"""Checkpoints during ``fit`` / ``fit_online`` and exact resumption.

With ``checkpoint_dir`` the training loop writes, atomically,

* ``checkpoint.npa`` every ``checkpoint_every`` epochs and at the end of each
  round: a saved posterior (best weights so far, loadable with ``na.load``) plus
  the training state: current weights, optimizer state, step counter, where the
  loop stands (round, epoch, best validation loss, epochs since it improved), the
  history so far and the settings of the ``fit`` call;
* ``best.npa``: a saved posterior with the best weights, whenever the validation
  loss improves.

Every random number of a fit derives from its ``rng_key`` and the (round, epoch)
indices, and every simulation bank from the same key, so ``resume_from=`` with
the same key and settings replays the remaining epochs on exactly the state an
uninterrupted run would have had: the final weights are identical. A checkpoint
made with other settings, another key or another bank is refused.

A fit never replaces files of another run: if ``checkpoint.npa`` or ``best.npa``
already exist in ``checkpoint_dir``, ``fit`` refuses to start unless it resumes
from that same checkpoint. The folder is created if missing and tested for
writing before training starts.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_amortized.codec import tree_from_arrays, tree_to_arrays
from numpyro_amortized.history import History
from numpyro_amortized.io import (
    check_model,
    digest,
    model_fingerprint,
    read_file,
    write_file,
)
from numpyro_amortized.networks.registry import network_config, network_from_config
from numpyro_amortized.posterior_io import (
    encode_posterior,
    fitted_from,
    history_from_dict,
)
from numpyro_amortized.safe_write import clean_stale, partial_path

if TYPE_CHECKING:
    from numpyro_amortized.posterior import AmortizedPosterior
    from numpyro_amortized.train import TrainState

__all__ = ["BEST", "CHECKPOINT", "Checkpointer", "Position"]

CHECKPOINT = "checkpoint.npa"
BEST = "best.npa"


class Position(NamedTuple):
    """Where training stands after an epoch.

    Attributes:
        round: round index (offline training; 0 online).
        epoch: epoch index within the round.
        offset: epochs in the history before this round started.
        best_val: best validation loss of the round so far.
        since_best: epochs since it improved.
        done: whether this epoch ended the round.
    """

    round: int
    epoch: int
    offset: int
    best_val: float
    since_best: int
    done: bool


class _Resume(NamedTuple):
    path: Path
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]
    position: Position


class Checkpointer:
    """Writes checkpoints for one ``fit`` call and restores it from one.

    Use :meth:`create`; the training loop calls :meth:`begin_round`,
    :meth:`restore` (at the start of a round's epochs) and :meth:`save` (after
    every epoch).
    """

    def __init__(
        self,
        post: AmortizedPosterior,
        directory: str | os.PathLike | None,
        every: int,
        resume_from: str | os.PathLike | None,
        settings: dict[str, Any],
    ):
        if int(every) < 1:
            raise ValueError(f"checkpoint_every must be >= 1; got {every}.")
        self.directory = None if directory is None else Path(directory)
        self.every = int(every)
        self.settings = settings
        self.round = 0
        self._resume = None if resume_from is None else _open(post, resume_from)
        if self._resume is not None:
            _check_settings(self._resume, settings)
        self._owned: set[str] = set()  # files this run may replace
        self.fingerprint = None
        if self.directory is not None:
            _check_writable(self.directory)
            latest = self.directory / CHECKPOINT
            same = self._resume is not None and self._resume.path.resolve() == (
                latest.resolve()
            )
            if same:
                self._owned = {CHECKPOINT, BEST}
            else:
                _refuse_existing(self.directory)
            self.fingerprint = model_fingerprint(
                post.model, tuple(post.model_args), dict(post.model_kwargs)
            )

    @classmethod
    def create(
        cls,
        post: AmortizedPosterior,
        rng_key: jax.Array,
        directory: str | os.PathLike | None,
        every: int,
        resume_from: str | os.PathLike | None,
        settings: dict[str, Any],
    ) -> Checkpointer | None:
        """A checkpointer, or None when neither writing nor resuming.

        ``settings`` are the ``fit`` arguments that determine the result; dicts of
        arrays (a simulation bank) are recorded by their SHA-256, functions
        (``sample_kwargs``) only as present.
        """
        if directory is None and resume_from is None:
            return None
        key = rng_key
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        plain = {"rng_key": np.asarray(key).tolist()}
        for k, v in settings.items():
            plain[k] = (
                digest(v) if isinstance(v, dict) else "function" if callable(v) else v
            )
        plain = json.loads(json.dumps(plain))
        return cls(post, directory, every, resume_from, plain)

    def begin_round(self, round_index: int) -> bool:
        """Start a round; False if the checkpoint resumed from had finished it."""
        self.round = round_index
        return self._resume is None or round_index >= self._resume.position.round

    def restore(
        self, post: AmortizedPosterior, state: TrainState, history: History
    ) -> tuple[TrainState, Any, Position] | None:
        """The saved state, best weights and position, if resuming this round.

        ``history`` is set to the saved one in place.
        """
        res = self._resume
        if res is None or res.position.round != self.round:
            return None
        self._resume = None
        training = res.header["training"]
        trees = training["trees"]
        params = tree_from_arrays(
            "train_params", state.params, trees["train_params"], res.arrays
        )
        opt_state = tree_from_arrays(
            "opt_state", state.opt_state, trees["opt_state"], res.arrays
        )
        step = jnp.asarray(training["step"], jnp.result_type(state.step))
        saved = history_from_dict(res.header["posterior"]["history"])
        for field in dataclasses.fields(History):
            setattr(history, field.name, getattr(saved, field.name))
        state = type(state)(params, opt_state, step)
        return state, post._require().params, res.position

    def save(
        self,
        post: AmortizedPosterior,
        state: TrainState,
        best_params: Any,
        position: Position,
        history: History,
        *,
        improved: bool,
    ) -> None:
        """Write ``best.npa`` if improved, ``checkpoint.npa`` when due."""
        due = position.done or history.num_epochs % self.every == 0
        if self.directory is None or not (improved or due):
            return
        content, arrays = encode_posterior(post, best_params, self.fingerprint)
        content["posterior"]["history"] = history.to_dict()
        if improved:
            self._write(BEST, "posterior", content, arrays)
        if not due:
            return
        train_arrays, train_index = tree_to_arrays("train_params", state.params)
        opt_arrays, opt_index = tree_to_arrays("opt_state", state.opt_state)
        content["training"] = {
            "settings": self.settings,
            "position": position._asdict(),
            "step": int(state.step),
            "trees": {"train_params": train_index, "opt_state": opt_index},
        }
        arrays = {**arrays, **train_arrays, **opt_arrays}
        self._write(CHECKPOINT, "checkpoint", content, arrays)

    def _write(self, name: str, kind: str, content: dict, arrays: dict) -> None:
        """Write a file of this run: replace it if this run wrote (or resumes) it,
        else refuse to replace one that appeared meanwhile."""
        path = self.directory / name
        write_file(path, kind, content, arrays, overwrite=name in self._owned)
        self._owned.add(name)


def _check_writable(directory: Path) -> None:
    """Create ``directory`` if missing and check a file can be written there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        clean_stale(directory)
        probe = partial_path(directory / "write-test")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as e:
        raise OSError(
            e.errno or errno.EIO,
            f"checkpoint_dir {directory} cannot be written ({e.strerror or e}). "
            "Choose a folder you can write to, or fix its permissions, before "
            "training",
            str(directory),
        ) from e


def _refuse_existing(directory: Path) -> None:
    """Raise if ``directory`` holds checkpoint files of another run."""
    found = [directory / n for n in (CHECKPOINT, BEST) if (directory / n).exists()]
    if found:
        names = " and ".join(str(p) for p in found)
        raise FileExistsError(
            f"{names} already exist (files of an earlier run), and fit does not "
            f"replace them. Pass resume_from='{directory / CHECKPOINT}' to continue "
            "that run, choose another checkpoint_dir, or delete them first."
        )


def _open(post: AmortizedPosterior, resume_from: str | os.PathLike) -> _Resume:
    """Read a checkpoint and put its posterior (standardization, best weights)
    into ``post``, after checking it was made for the same networks and model."""
    path = Path(resume_from)
    if path.is_dir():
        path = path / CHECKPOINT
    header, arrays = read_file(path, kinds=("checkpoint",))
    content = header["posterior"]
    mine = network_config(post.inference_net)
    if mine != content["inference_net"]:
        raise ValueError(
            f"{path} was trained with inference_net {content['inference_net']}, "
            f"this posterior has {mine}."
        )
    summary = post.summary_net
    if summary is None and content["summary_net"] is not None:
        summary = network_from_config(content["summary_net"])  # the default then
    elif network_config_or_none(summary) != content["summary_net"]:
        raise ValueError(
            f"{path} was trained with summary_net {content['summary_net']}, this "
            f"posterior has {network_config_or_none(summary)}."
        )
    check_model(path, content, post.model, post.model_args, post.model_kwargs)
    post._fitted = fitted_from(path, content, arrays, post.inference_net, summary)
    post._jitted = {}
    position = Position(**header["training"]["position"])
    return _Resume(path, header, arrays, position)


def network_config_or_none(network: Any) -> dict[str, Any] | None:
    """:func:`~numpyro_amortized.networks.network_config`, None for None."""
    return None if network is None else network_config(network)


def _check_settings(res: _Resume, settings: dict[str, Any]) -> None:
    saved = res.header["training"]["settings"]
    diff = [
        f"{k}: checkpoint {saved.get(k)!r}, now {settings.get(k)!r}"
        for k in sorted(set(saved) | set(settings))
        if saved.get(k) != settings.get(k)
    ]
    if diff:
        raise ValueError(
            f"{res.path} was written by a fit with other settings ("
            + "; ".join(diff)
            + "). Resuming replays the same random numbers, so it needs the same "
            "rng_key, simulations and settings as the interrupted call."
        )
