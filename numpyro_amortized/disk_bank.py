"""Simulation banks on disk, larger than memory: one ``.npy`` file per site.

A disk bank is a folder::

    bank/
      bank.json     format, library version, model signature (as in bank.py),
                    number of simulations, how it was made
      mu.npy        (num_simulations, 4)       float32
      x.npy         (num_simulations, 50, 4)   float32

The ``.npy`` files are ordinary NumPy arrays (``np.load(..., mmap_mode="r")``
opens them), written chunk by chunk with plain file writes, and read back by
row ranges with plain file reads (no memory map): the process holds one chunk at
a time, so its resident memory stays bounded whatever the bank's size; the
operating system's page cache keeps what fits of the files.

Passing a :class:`DiskBank` as ``simulations=`` to
:meth:`~numpyro_amortized.AmortizedPosterior.fit` streams it in chunks
(:mod:`numpyro_amortized.streaming`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from numpyro_amortized.bank import BANK_FORMAT, _check, _signature
from numpyro_amortized.model import AmortizedModel

__all__ = ["DiskBank", "simulate_to_disk"]

HEADER_FILE = "bank.json"


class DiskBank:
    """A simulation bank on disk, read in row ranges.

    Open an existing bank with :meth:`open`, make one with
    :func:`simulate_to_disk` or :meth:`write`.

    Attributes:
        path: the bank's folder.
        header: the parsed ``bank.json``.
        names: site names (one ``.npy`` each).
        shapes: per-simulation shape of each site.
        dtypes: dtype of each site.

    Examples:
        >>> import jax, numpyro_amortized as na
        >>> from numpyro_amortized.models import gaussian_means
        >>> bank = na.simulate_to_disk(  # doctest: +SKIP
        ...     jax.random.key(0), gaussian_means, 10**7, "bank")
        >>> posterior = na.AmortizedPosterior(gaussian_means)  # doctest: +SKIP
        >>> posterior.fit(jax.random.key(1), simulations=bank,  # doctest: +SKIP
        ...               batch_size=512, max_epochs=2)
    """

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.header = header
        self.names: tuple[str, ...] = tuple(header["arrays"])
        self._offsets: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        for name in self.names:
            with open(self._file(name), "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(f)
                self._offsets[name] = f.tell()
            if fortran or shape[0] != len(self):
                raise ValueError(
                    f"{self._file(name)} holds {shape[0]} rows"
                    f"{' in Fortran order' if fortran else ''}; bank.json says "
                    f"{len(self)} (C order). The bank is damaged: simulate it again."
                )
            self.shapes[name] = tuple(shape[1:])
            self.dtypes[name] = np.dtype(dtype)

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        model: AmortizedModel | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> DiskBank:
        """Open a disk bank; with a model, check the sites match (as
        :func:`~numpyro_amortized.load_simulations` does).

        Raises:
            ValueError: ``path`` is not a disk bank, or has a newer format.
            BankMismatchError: the bank's sites differ from the model's.
        """
        path = Path(path)
        header_path = path / HEADER_FILE
        if not header_path.is_file():
            raise ValueError(
                f"{path} is not a disk bank (no {HEADER_FILE}); make one with "
                "na.simulate_to_disk(rng_key, model, num_simulations, path)."
            )
        header = json.loads(header_path.read_text())
        if header.get("format", 0) > BANK_FORMAT:
            raise ValueError(
                f"{path} has bank format {header['format']}, newer than this "
                f"library's ({BANK_FORMAT}); upgrade numpyro_amortized."
            )
        if model is not None:
            _check(header, _signature(model, args, kwargs), path)
        return cls(path, header)

    @classmethod
    def write(
        cls,
        path: str | os.PathLike,
        simulations: dict[str, np.ndarray],
        model: AmortizedModel,
        *args: Any,
        overwrite: bool = False,
        **kwargs: Any,
    ) -> DiskBank:
        """Write an in-memory bank (``model.simulate`` output) as a disk bank."""
        n = len(next(iter(simulations.values())))
        with _Writer(path, model, args, kwargs, n, overwrite) as w:
            w.append({k: np.asarray(v) for k, v in simulations.items()})
        return cls.open(path)

    # ---------------------------------------------------------------- reading
    def __len__(self) -> int:
        return int(self.header["num_simulations"])

    def __repr__(self) -> str:
        return f"DiskBank({str(self.path)!r}, {len(self):,} simulations)"

    def _file(self, name: str) -> Path:
        return self.path / f"{name}.npy"

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays."""
        return sum(
            len(self) * int(np.prod(s, dtype=np.int64)) * self.dtypes[n].itemsize
            for n, s in self.shapes.items()
        )

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of every site, as fresh NumPy arrays."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"rows {start}:{stop} outside a bank of {len(self)}.")
        out = {}
        for name in self.names:
            row = int(np.prod(self.shapes[name], dtype=np.int64))
            dtype = self.dtypes[name]
            buf = np.empty((stop - start, *self.shapes[name]), dtype)
            with open(self._file(name), "rb") as f:
                f.seek(self._offsets[name] + start * row * dtype.itemsize)
                got = f.readinto(memoryview(buf).cast("B"))
            if got != buf.nbytes:
                raise OSError(f"{self._file(name)} ended early: the bank is damaged.")
            out[name] = buf
        return out

    def read_wrapped(self, start: int, count: int, stop: int) -> dict:
        """``count`` rows from ``start``, wrapping around at row ``stop``."""
        end = start + count
        if end <= stop:
            return self.read(start, end)
        head, tail = self.read(start, stop), self.read(0, end - stop)
        return {k: np.concatenate([head[k], tail[k]]) for k in head}

    def fingerprint(self) -> str:
        """Identifies the bank's contents for checkpoints (header + first row)."""
        h = hashlib.sha256(json.dumps(self.header, sort_keys=True).encode())
        for v in self.read(0, min(1, len(self))).values():
            h.update(v.tobytes())
        return f"DiskBank:{h.hexdigest()}"


class _Writer:
    """Writes a disk bank chunk by chunk into a temporary folder, renamed into
    place on success (a crash leaves no partial bank under ``path``)."""

    def __init__(self, path, model, args, kwargs, num_rows, overwrite):
        from numpyro_amortized import __version__

        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(
                f"{self.path} exists; pass overwrite=True to replace it."
            )
        self.sites = model.describe(*args, **kwargs)
        self.num_rows = num_rows
        self.written = 0
        self.header = {
            "format": BANK_FORMAT,
            "library_version": __version__,
            "num_simulations": num_rows,
            **_signature(model, args, kwargs),
            "arrays": list(self.sites),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=".bank"))
        self.files = {}
        for name, site in self.sites.items():
            f = open(self.tmp / f"{name}.npy", "wb")
            np.lib.format.write_array_header_2_0(
                f,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(site.dtype)),
                    "fortran_order": False,
                    "shape": (num_rows, *site.shape),
                },
            )
            self.files[name] = f

    def __enter__(self) -> _Writer:
        return self

    def append(self, chunk: dict[str, np.ndarray]) -> None:
        m = len(chunk[self.header["arrays"][0]])
        if self.written + m > self.num_rows:
            raise ValueError("More rows than the bank was created for.")
        for name, f in self.files.items():
            dtype = np.dtype(self.sites[name].dtype)
            v = np.ascontiguousarray(chunk[name], dtype=dtype)
            if v.shape[1:] != tuple(self.sites[name].shape):
                raise ValueError(
                    f"Site '{name}' has shape {v.shape[1:]} per simulation; the "
                    f"model gives {self.sites[name].shape}."
                )
            v.tofile(f)
        self.written += m

    def __exit__(self, exc_type, *_) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        if exc_type is None and self.written != self.num_rows:
            exc_type = ValueError
            err = ValueError(f"Wrote {self.written} of {self.num_rows} rows.")
        else:
            err = None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if err is not None:
                raise err
            return
        (self.tmp / HEADER_FILE).write_text(json.dumps(self.header, indent=1))
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)


def simulate_to_disk(
    rng_key: jax.Array,
    model: AmortizedModel,
    num_simulations: int,
    path: str | os.PathLike,
    *args: Any,
    chunk_size: int = 65_536,
    progress: bool = True,
    overwrite: bool = False,
    **kwargs: Any,
) -> DiskBank:
    """Simulate a bank straight to disk, one chunk in memory at a time.

    Chunk ``c`` is ``model.simulate(jax.random.fold_in(rng_key, c), chunk_size,
    ...)``; simulations with NaN/inf are dropped and further chunks simulated
    until ``num_simulations`` valid ones are written (the count of dropped ones is
    ``bank.header["num_invalid"]``). The bank depends on ``chunk_size``.

    Args:
        rng_key: JAX PRNG key.
        model: the model to simulate (fixed arguments only).
        num_simulations: valid simulations to write.
        path: folder to create.
        *args: positional model arguments.
        chunk_size: simulations per chunk (memory: one chunk).
        progress: show a progress bar.
        overwrite: replace an existing bank at ``path``.
        **kwargs: keyword model arguments.

    Returns:
        The opened :class:`DiskBank`.

    Examples:
        >>> import jax, numpyro_amortized as na
        >>> from numpyro_amortized.models import gaussian_means
        >>> bank = na.simulate_to_disk(  # doctest: +SKIP
        ...     jax.random.key(0), gaussian_means, 10**7, "/tmp/gauss_bank")
    """
    if num_simulations < 1:
        raise ValueError(f"num_simulations must be >= 1, got {num_simulations}.")
    chunk_size = int(min(chunk_size, num_simulations))
    bar = tqdm(total=num_simulations, unit="sim", desc="simulate", disable=not progress)
    num_invalid = 0
    with _Writer(path, model, args, kwargs, num_simulations, overwrite) as w:
        c = 0
        while w.written < num_simulations:
            sims, info = model.simulate(
                jax.random.fold_in(rng_key, c),
                chunk_size,
                *args,
                batch_size=chunk_size,
                progress=False,
                return_info=True,
                **kwargs,
            )
            num_invalid += info.num_invalid
            keep = min(info.num_valid, num_simulations - w.written)
            w.append({k: v[:keep] for k, v in sims.items()})
            bar.update(keep)
            c += 1
            if c > 10 and w.written < c * chunk_size / 10:
                raise RuntimeError(
                    f"Only {w.written} of {c * chunk_size} simulations were valid; "
                    "check the model (see the InvalidSimulationWarning)."
                )
        w.header["num_invalid"] = int(num_invalid)
        w.header["chunk_size"] = chunk_size
    bar.close()
    return DiskBank.open(path)
