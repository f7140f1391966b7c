"""Save and load trained posteriors: one versioned file, no pickles.

A saved posterior (``posterior.save(path)``) is an uncompressed ``.npz`` (zip)
archive. Its first member, ``__numpyro_amortized__``, is a UTF-8 JSON header::

    {"magic": "numpyro_amortized", "kind": "posterior" | "checkpoint",
     "format": 1, "library_version": "...", "sha256": "...",
     "posterior": {inference_net, summary_net (configs by registered name),
                   model (name, observed, targets, arguments, fingerprint),
                   signature and sites (shapes, supports, plates), space,
                   layout, history,
                   trees (path, shape, dtype of every saved weight)},
     "training": {...}}                         # checkpoints only

and every other member is a plain array: ``params/<i>`` and ``rest/<i>`` (network
state), ``theta_std/*`` and ``x_std/*`` (standardization), ``model_args/*`` (array
arguments of the model) and, in checkpoints, the optimizer state. ``sha256`` covers
the header and every array, so a damaged file is detected, not loaded. Files
are written with :func:`~numpyro_amortized.safe_write.atomic_write` (all or nothing,
never over a file another writer made meanwhile).

Loading rebuilds the networks from their specs (or registered user modules, see
:func:`~numpyro_amortized.networks.register_module`) and puts the saved weights in;
the weights must fit the rebuilt structure exactly. Without the model, sampling,
``log_prob``, ``summarize`` and ``to_inference_data`` work; simulation and training
need ``load(path, model=model)``, which also checks that the model has the saved
sites, and warns (:class:`ModelChangedWarning`) when its prior draws differ from
the saved fingerprint (:func:`model_fingerprint`). Files of a newer format raise
:class:`FormatVersionError`; damaged or truncated files :class:`CorruptFileError`;
other files :class:`NotAnAmortizerFileError`.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from numpyro_amortized._version import __version__
from numpyro_amortized.bank import BankMismatchError, _check, _signature, digest
from numpyro_amortized.safe_write import atomic_savez
from numpyro_amortized.sites import run_trace

if TYPE_CHECKING:
    from numpyro_amortized.posterior import AmortizedPosterior

__all__ = [
    "FORMAT",
    "AmortizerFileError",
    "CorruptFileError",
    "FormatVersionError",
    "ModelChangedWarning",
    "ModelMismatchError",
    "ModelRequiredError",
    "NotAnAmortizerFileError",
    "check_model",
    "digest",
    "load",
    "model_fingerprint",
    "read_file",
    "save_posterior",
    "write_file",
]

FORMAT = 1
"""Version of the file layout this library writes (and the newest it reads)."""

MAGIC = "numpyro_amortized"
HEADER = "__numpyro_amortized__"
_ZIP_PREFIX = b"PK\x03\x04"


class AmortizerFileError(ValueError):
    """A file cannot be loaded as a saved posterior (base class)."""


class NotAnAmortizerFileError(AmortizerFileError):
    """The file was not written by ``posterior.save`` (or a checkpoint)."""


class CorruptFileError(AmortizerFileError):
    """The file is truncated or damaged (unreadable, or its checksum differs)."""


class FormatVersionError(AmortizerFileError):
    """The file has a format version this library cannot read."""


class ModelMismatchError(BankMismatchError):
    """The model passed to :func:`load` differs from the one trained on."""


class ModelChangedWarning(UserWarning):
    """The model passed to :func:`load` has the saved sites but draws other values
    (other priors or another simulator) than the one the posterior was trained on.
    """


class ModelRequiredError(RuntimeError):
    """A posterior loaded without its model was asked to simulate or train."""


# ------------------------------------------------------------------ container
def _digest(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    body = {k: v for k, v in header.items() if k != "sha256"}
    return digest(arrays, json.dumps(body, sort_keys=True).encode())


def write_file(
    path: str | os.PathLike,
    kind: str,
    content: dict[str, Any],
    arrays: dict[str, np.ndarray],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a header + arrays file atomically
    (:func:`~numpyro_amortized.bank.atomic_write`).

    With ``overwrite=False`` the final name is taken with ``os.link``, which fails
    if the file exists, even one created by a concurrent writer a moment ago.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """

    path = Path(path)
    if os.path.lexists(path) and not overwrite:  # fail before encoding; the
        raise FileExistsError(  # write itself checks again, atomically
            f"{path} exists; pass overwrite=True to replace it (or choose another "
            "path)."
        )
    header = {
        "magic": MAGIC,
        "kind": kind,
        "format": FORMAT,
        "library_version": __version__,
        **content,
    }
    header = json.loads(json.dumps(header))  # what a reader will see
    header["sha256"] = _digest(header, arrays)
    raw = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    # header first: recognizable
    atomic_savez(path, {HEADER: raw, **arrays}, overwrite=overwrite)
    return path


def read_file(
    path: str | os.PathLike, kinds: tuple[str, ...] = ("posterior", "checkpoint")
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and verify a file written by :func:`write_file`.

    Returns:
        ``(header, arrays)``.

    Raises:
        FileNotFoundError: no such file.
        NotAnAmortizerFileError: not one of our files (or not of ``kinds``).
        CorruptFileError: truncated, unreadable, or checksum mismatch.
        FormatVersionError: written in a newer (or unknown) format.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(64)
    name = (HEADER + ".npy").encode()
    looks_ours = head[:4] == _ZIP_PREFIX and head[30 : 30 + len(name)] == name
    try:
        data = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        if looks_ours:
            raise CorruptFileError(
                f"{path} is a damaged or truncated numpyro_amortized file ({e}); "
                "restore it from a backup or save again."
            ) from e
        raise NotAnAmortizerFileError(
            f"{path} is not a file saved by numpyro_amortized (posterior.save)."
        ) from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise NotAnAmortizerFileError(f"{path} is a single .npy array, not ours.")
    with data:
        if HEADER not in data.files:
            hint = (
                " It is a simulation bank: use na.load_simulations."
                if "__bank__" in data.files
                else ""
            )
            error = CorruptFileError if looks_ours else NotAnAmortizerFileError
            raise error(f"{path} has no numpyro_amortized header.{hint}")
        try:
            header = json.loads(bytes(data[HEADER]).decode())
            arrays = {k: data[k] for k in data.files if k != HEADER}
        except Exception as e:  # zip CRC, truncated member, bad JSON
            raise CorruptFileError(f"{path} is damaged ({e}).") from e
    _check_header(path, header, kinds)
    if header.get("sha256") != _digest(header, arrays):
        raise CorruptFileError(
            f"{path} is damaged: its checksum does not match its contents."
        )
    return header, arrays


def _check_header(path: Path, header: Any, kinds: tuple[str, ...]) -> None:
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise NotAnAmortizerFileError(f"{path} is not a numpyro_amortized file.")
    version = header.get("format")
    if not isinstance(version, int) or version > FORMAT or version < 1:
        raise FormatVersionError(
            f"{path} has file format {version!r} (written by numpyro_amortized "
            f"{header.get('library_version', '?')}); this library "
            f"({_version()}) reads formats 1 to {FORMAT}. Upgrade numpyro_amortized "
            "to load it."
        )
    if header.get("kind") not in kinds:
        raise NotAnAmortizerFileError(
            f"{path} holds a {header.get('kind')!r}; expected {' or '.join(kinds)}."
        )


def _version() -> str:

    return __version__


# ------------------------------------------------------------------ posterior
def save_posterior(
    post: AmortizedPosterior, path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Save a trained posterior (see the module docstring for the format).

    Args:
        post: a fitted :class:`~numpyro_amortized.AmortizedPosterior`.
        path: file to write; no suffix is added (``.npa`` is customary).
        overwrite: replace an existing file.

    Returns:
        The path written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        TypeError: a network that cannot be saved (an unregistered user module).

    Examples:
        >>> import jax, numpyro_amortized as na  # doctest: +SKIP
        >>> posterior.save("gauss.npa")  # doctest: +SKIP
        >>> posterior = na.load("gauss.npa")  # doctest: +SKIP
    """
    from numpyro_amortized.posterior_io import encode_posterior

    content, arrays = encode_posterior(post)
    return write_file(path, "posterior", content, arrays, overwrite=overwrite)


def load(
    path: str | os.PathLike,
    model: Any = None,
    *,
    model_args: tuple | None = None,
    model_kwargs: dict | None = None,
) -> AmortizedPosterior:
    """Load a posterior saved with ``posterior.save`` (or a training checkpoint).

    Args:
        path: the file.
        model: the ``@na.amortize`` model it was trained on. Optional: sampling,
            ``log_prob``, ``summarize`` and ``to_inference_data`` work without it;
            simulation, ``fit`` and ``fit_online`` need it.
        model_args: positional model arguments (default: the saved ones).
        model_kwargs: keyword model arguments (default: the saved ones). Needed
            when the saved ones could not be stored (not plain data or arrays).

    Returns:
        The :class:`~numpyro_amortized.AmortizedPosterior`, with ``history``.

    Raises:
        FileNotFoundError: no file at ``path``.
        NotAnAmortizerFileError: the file is not a saved posterior.
        CorruptFileError: the file is truncated or its checksum does not match.
        FormatVersionError: the file was written by a newer format version.
        ModelMismatchError: ``model`` does not have the saved sites (names,
            shapes, supports) with these arguments.
        KeyError: a network spec or module that is not registered (import the
            module that defines it first).

    Examples:
        >>> posterior = na.load("gauss.npa")  # doctest: +SKIP
        >>> posterior.sample(jax.random.key(0), {"x": x_obs}, 1000)  # doctest: +SKIP
    """
    from numpyro_amortized.posterior_io import decode_posterior

    header, arrays = read_file(path)
    return decode_posterior(
        path, header["posterior"], arrays, model, model_args, model_kwargs
    )


def check_model(path: Any, content: dict[str, Any], model: Any, args, kwargs) -> None:
    """Raise :class:`ModelMismatchError` if ``model`` lacks the saved sites; warn
    (:class:`ModelChangedWarning`) if its prior draws differ from the saved ones.

    Files saved before the fingerprint was added are checked by sites only.
    """
    args, kwargs = tuple(args), dict(kwargs)
    _check(
        content["signature"],
        _signature(model, args, kwargs),
        path,
        what="saved posterior",
        fix="Pass the model (and model_args/model_kwargs) it was trained with.",
        error=ModelMismatchError,
    )
    saved = content["model"].get("fingerprint")
    if not saved:
        return
    differ = fingerprint_differences(saved, model_fingerprint(model, args, kwargs))
    if differ:
        warnings.warn(
            f"The model passed to load ('{getattr(model.fn, '__name__', 'model')}' "
            f"with these arguments) draws other values for site(s) "
            f"{', '.join(differ)} than the model {path} was trained with "
            f"('{content['signature']['model']}'): same sites and shapes, but other "
            "priors or another simulator. The posterior still answers for the model "
            "it was trained on: train again for this model, or load with the original "
            "one. (To treat this as an error: warnings.simplefilter('error', "
            "na.io.ModelChangedWarning).)",
            ModelChangedWarning,
            stacklevel=3,
        )


FINGERPRINT_SIMULATIONS = 8
FINGERPRINT_VERSION = 1
"""Bump when the way a traced model uses its key changes (old fingerprints are
then ignored instead of flagging every model as changed)."""


def model_fingerprint(model: Any, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """A few numbers that identify a model's priors and simulator.

    The model is run ``FINGERPRINT_SIMULATIONS`` times, eagerly (no compilation:
    milliseconds), under ``seed`` with the fixed keys ``jax.random.key(k)``,
    ``k = 0, 1, ...``; for every sample site the mean and root mean square of each
    simulation are kept (robust to last-digit differences between devices, which
    a hash of the draws is not). Two models with the same sites and shapes but
    other priors or simulators differ here.

    Returns:
        ``{"version": 1, "key": 0, "num_simulations": 8, "sites": {site: [mean,
        rms, ...]}}``,
        or None when the model cannot be simulated with fixed arguments alone
        (arguments drawn per simulation): then only sites are checked.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traces = [
                run_trace(model.fn, jax.random.key(k), args, kwargs)
                for k in range(FINGERPRINT_SIMULATIONS)
            ]
    except Exception:  # noqa: BLE001 - best effort: the sites are still checked
        return None
    sims = {
        name: np.stack([np.asarray(t[name]["value"], np.float64) for t in traces])
        for name, site in traces[0].items()
        if site["type"] == "sample"
    }
    stats = {}
    for name in sorted(sims):
        v = np.asarray(sims[name], np.float64).reshape(FINGERPRINT_SIMULATIONS, -1)
        with np.errstate(all="ignore"):
            both = np.stack([v.mean(1), np.sqrt((v**2).mean(1))], 1).ravel()
        stats[name] = [float(x) if np.isfinite(x) else None for x in both]
    return {
        "version": FINGERPRINT_VERSION,
        "key": 0,
        "num_simulations": FINGERPRINT_SIMULATIONS,
        "sites": stats,
    }


def fingerprint_differences(saved: dict[str, Any], now: dict | None) -> list[str]:
    """Sites whose fingerprint numbers differ (relative tolerance 1e-3)."""
    if now is None or any(saved.get(k) != now[k] for k in ("version", "key")):
        return []
    if saved.get("num_simulations") != now["num_simulations"]:
        return []
    differ = []
    for name, a in saved["sites"].items():
        b = now["sites"].get(name)
        if b is None:
            continue
        x = np.array([np.nan if v is None else v for v in a], np.float64)
        y = np.array([np.nan if v is None else v for v in b], np.float64)
        scale = np.nanmax(np.abs(x), initial=0.0)
        same = x.shape == y.shape and np.allclose(
            x, y, rtol=1e-3, atol=1e-4 * scale, equal_nan=True
        )
        if not same:
            differ.append(f"'{name}'")
    return differ
