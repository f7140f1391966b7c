"""Simulation banks: save simulations with their site metadata, load them safely.

A bank is one ``.npz`` file holding every simulated array plus a JSON header
(``__bank__``) with the format version, library version, model name and the
description of every site (shape, support, role) and a SHA-256 of all of it.
Loading with a model checks that the bank was made by a model with the same sites,
shapes and supports: a bank from a different model is a clear error, never silently
used. A damaged or truncated bank raises :class:`CorruptBankError` (banks written
before the checksum was added load without that check).

Files are written with :func:`~numpyro_amortized.safe_write.atomic_write`.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from numpyro_amortized._version import __version__
from numpyro_amortized.model import AmortizedModel
from numpyro_amortized.safe_write import atomic_savez
from numpyro_amortized.varying import MASK_SUFFIX

__all__ = [
    "BankMismatchError",
    "CorruptBankError",
    "digest",
    "load_simulations",
    "save_simulations",
]

BANK_FORMAT = 1
_HEADER = "__bank__"


class BankMismatchError(ValueError):
    """A simulation bank does not match the model it is loaded for."""


class CorruptBankError(ValueError):
    """A simulation bank (file or disk bank) is truncated or damaged."""


def digest(arrays: dict[str, Any], prefix: bytes = b"") -> str:
    """SHA-256 of ``prefix`` and the names, dtypes, shapes and bytes of arrays."""
    h = hashlib.sha256(prefix)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\n{name}:{a.dtype.str}:{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _header_digest(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    body = {k: v for k, v in header.items() if k != "sha256"}
    return digest(arrays, json.dumps(body, sort_keys=True).encode())


def _signature(model: AmortizedModel, args: tuple, kwargs: dict) -> dict[str, Any]:
    sites = model.describe(*args, **kwargs)
    return {
        "model": getattr(model.fn, "__name__", "model"),
        "observed": list(model.observed),
        "sites": {n: s.describe() for n, s in sites.items()},
    }


def save_simulations(
    path: str | os.PathLike,
    simulations: dict[str, np.ndarray],
    model: AmortizedModel,
    *args: Any,
    overwrite: bool = False,
    **kwargs: Any,
) -> Path:
    """Save a simulation dict with the model's site metadata.

    Args:
        path: file to write (``.npz`` is appended if missing).
        simulations: output of ``model.simulate``.
        model: the model that made them.
        *args: model arguments used for the simulations (for the site metadata).
        overwrite: replace an existing file.
        **kwargs: keyword model arguments used for the simulations.

    Returns:
        The path written. The write is atomic (see :func:`atomic_write`): with
        ``overwrite=False`` an existing file, even one created by a concurrent
        writer, is never replaced.

    Raises:
        FileExistsError: the file exists and ``overwrite`` is False.
    """

    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(path.suffix + ".npz")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    header = {
        "format": BANK_FORMAT,
        "library_version": __version__,
        "num_simulations": int(len(next(iter(simulations.values())))),
        **_signature(model, args, kwargs),
    }
    unknown = [
        k
        for k in simulations
        if k not in header["sites"]
        and not (k.endswith(MASK_SUFFIX) and k[: -len(MASK_SUFFIX)] in header["sites"])
    ]
    if unknown:
        raise ValueError(f"Simulations hold keys {unknown} that are not model sites.")
    for k, v in simulations.items():
        site = header["sites"].get(k)
        if site is None or (k + MASK_SUFFIX) in simulations:
            continue  # a mask, or a padded site whose shape varies
        if list(np.shape(v)[1:]) != site["shape"]:
            raise ValueError(
                f"Simulations of site '{k}' have shape {np.shape(v)[1:]} per "
                f"simulation, but the model with these arguments gives "
                f"{tuple(site['shape'])}. Pass the model arguments the simulations "
                "were made with."
            )
    arrays = {k: np.asarray(v) for k, v in simulations.items()}
    header = json.loads(json.dumps(header))  # what a reader will see
    header["sha256"] = _header_digest(header, arrays)
    arrays[_HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    atomic_savez(path, arrays, overwrite=overwrite)
    return path


def load_simulations(
    path: str | os.PathLike,
    model: AmortizedModel | None = None,
    *args: Any,
    **kwargs: Any,
) -> dict[str, np.ndarray]:
    """Load a bank; with a model, check it was made by a matching model.

    Args:
        path: a file written by :func:`save_simulations`.
        model: if given, the sites (names, shapes, supports, observed) must match.
        *args: model arguments (as for ``model.describe``).
        **kwargs: keyword model arguments.

    Raises:
        BankMismatchError: the bank's sites differ from the model's.
        CorruptBankError: the file is truncated, damaged, or its checksum differs.
        ValueError: the file is not a simulation bank or has a newer format.
    """
    with open(path, "rb") as f:
        head = f.read(64)
    looks_ours = head[:4] == b"PK\x03\x04" and (_HEADER + ".npy").encode() in head
    damaged = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)
    try:
        data = np.load(path, allow_pickle=False)
    except damaged as e:
        if looks_ours or isinstance(e, zipfile.BadZipFile):
            raise CorruptBankError(
                f"{path} is a damaged or truncated simulation bank ({e}); "
                "simulate it again or restore it from a backup."
            ) from e
        raise ValueError(f"{path} is not a readable simulation bank: {e}") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array, not a simulation bank.")
    with data:
        if _HEADER not in data.files:
            raise ValueError(f"{path} is not a numpyro_amortized simulation bank.")
        try:
            header = json.loads(bytes(data[_HEADER]).decode())
            sims = {k: data[k] for k in data.files if k != _HEADER}
        except (*damaged, UnicodeDecodeError) as e:
            raise CorruptBankError(
                f"{path} is a damaged simulation bank ({e}); simulate it again or "
                "restore it from a backup."
            ) from e
    if not isinstance(header, dict):
        raise CorruptBankError(f"{path} has a damaged bank header.")
    if header.get("format", 0) > BANK_FORMAT:
        raise ValueError(
            f"{path} has bank format {header['format']}, newer than this "
            f"library's ({BANK_FORMAT}); upgrade numpyro_amortized."
        )
    # Banks written before checksums were added have no "sha256": not checked.
    if "sha256" in header and header["sha256"] != _header_digest(header, sims):
        raise CorruptBankError(
            f"{path} is damaged: its checksum does not match its contents. "
            "Simulate it again or restore it from a backup."
        )
    if model is not None:
        _check(header, _signature(model, args, kwargs), path)
    return sims


def _check(
    saved: dict,
    current: dict,
    path: Any,
    *,
    what: str = "bank",
    fix: str = "Simulate a new bank for this model.",
    error: type[Exception] = BankMismatchError,
) -> None:
    """Raise ``error`` listing how the saved sites differ from the model's."""
    problems = []
    if saved["observed"] != current["observed"]:
        problems.append(f"observed sites {saved['observed']} vs {current['observed']}")
    s_sites, c_sites = saved["sites"], current["sites"]
    for n in sorted(set(s_sites) | set(c_sites)):
        if n not in c_sites:
            problems.append(f"site '{n}' is in the {what} but not in the model")
        elif n not in s_sites:
            problems.append(f"site '{n}' is in the model but not in the {what}")
        else:
            for field in ("shape", "support", "is_observed", "is_discrete"):
                if s_sites[n][field] != c_sites[n][field]:
                    problems.append(
                        f"site '{n}' {field}: {what} {s_sites[n][field]} vs model "
                        f"{c_sites[n][field]}"
                    )
    if problems:
        raise error(
            f"The {what} {path} was made by a different model ({what} model "
            f"'{saved['model']}', this model '{current['model']}'): "
            + "; ".join(problems)
            + f". {fix}"
        )
