"""Simulation banks on disk, larger than memory: one ``.npy`` file per site.

A disk bank is a folder::

    bank/
      bank.json     format, library version, model signature (as in bank.py),
                    number of simulations, how it was made, and per shard its
                    shape, dtype, size, SHA-256 and a fingerprint (a hash of
                    16 evenly spaced 64 KiB blocks)
      mu.npy        (num_simulations, 4)       float32
      x.npy         (num_simulations, 50, 4)   float32

The ``.npy`` files are ordinary NumPy arrays (``np.load(..., mmap_mode="r")``
opens them), written chunk by chunk with plain file writes, and read back by
row ranges with plain file reads (no memory map): the process holds one chunk at
a time, so its resident memory stays bounded whatever the bank's size; the
operating system's page cache keeps what fits of the files.

Opening checks each shard against ``bank.json`` (:mod:`.shards`);
:meth:`DiskBank.verify` checks the full SHA-256. A bank is built in a hidden
sibling folder ``.<name>.partial-<host>-<pid>-<random>`` and swapped into place
when complete (:mod:`.safe_write`): a crash leaves the previous bank at ``path``,
never a mix; the next write into the parent folder removes the hidden folder.

Passing a :class:`DiskBank` as ``simulations=`` to
:meth:`~numpyro_amortized.AmortizedPosterior.fit` streams it in chunks
(:mod:`numpyro_amortized.streaming`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from numpyro_amortized._version import __version__
from numpyro_amortized.bank import BANK_FORMAT, CorruptBankError, _check, _signature
from numpyro_amortized.model import AmortizedModel
from numpyro_amortized.safe_write import (
    clean_stale,
    exchange,
    exists_error,
    fsync_dir,
    partial_path,
)
from numpyro_amortized.shards import (
    HEADER_FILE,
    NUMERIC_KINDS,
    check_replaceable,
    check_shard,
    fingerprint_file,
    is_plain_name,
    read_header,
    read_npy_header,
    shard_file,
    verify_shards,
)

__all__ = ["DiskBank", "simulate_to_disk"]


class DiskBank:
    """A simulation bank on disk, read in row ranges.

    Open an existing bank with :meth:`open`, make one with
    :func:`simulate_to_disk` or :meth:`write`. Opening checks every shard against
    ``bank.json``: its shape, dtype (numeric only), size and a fingerprint of its
    contents (16 blocks of 64 KiB); :meth:`verify` checks the full SHA-256.

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
        shards = header.get("shards")  # absent in banks of older versions
        for name in self.names:
            file = shard_file(path, name)
            shape, dtype, offset = read_npy_header(file)
            self._offsets[name] = offset
            self.shapes[name] = shape[1:]
            self.dtypes[name] = dtype
            record = None if shards is None else shards.get(name)
            check_shard(file, header, name, shape, dtype, offset, record)

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
            CorruptBankError: a shard does not match ``bank.json`` (shape, dtype,
                size or content fingerprint).
            BankMismatchError: the bank's sites differ from the model's.
        """
        path = Path(path)
        if not path.exists():
            clean_stale(path.parent)  # puts back a bank whose replacement died
        header = read_header(path)
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
        """Write an in-memory bank (``model.simulate`` output) as a disk bank.

        With ``overwrite=True`` only a disk bank (a folder with its
        ``bank.json`` and shards and nothing else) is replaced, atomically.
        """
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
        return shard_file(self.path, name)

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
            if dtype.kind not in NUMERIC_KINDS:  # checked at open; never objects
                raise CorruptBankError(f"{self._file(name)} is not numeric.")
            buf = np.empty((stop - start, *self.shapes[name]), dtype)
            with open(self._file(name), "rb") as f:
                f.seek(self._offsets[name] + start * row * dtype.itemsize)
                got = f.readinto(memoryview(buf).cast("B"))
            if got != buf.nbytes:
                raise CorruptBankError(
                    f"{self._file(name)} ended early: the bank is damaged."
                )
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

    def verify(self) -> None:
        """Check every shard's full SHA-256 against ``bank.json``.

        Reads the whole bank (about 0.5-0.7 GB/s per core for SHA-256), so
        :meth:`open` checks only sizes and a fingerprint of sampled blocks.
        Banks written by versions without checksums are not checked (a warning
        says so).

        Raises:
            CorruptBankError: a shard's contents differ from when it was written.
        """
        if self.header.get("shards") is None:
            warnings.warn(
                f"{self.path} was written by an older numpyro_amortized without "
                "checksums; only its shapes, dtypes and sizes were checked. "
                "Simulate it again to get a bank that can be verified.",
                stacklevel=2,
            )
            return
        verify_shards(self.path, self.header)


# ------------------------------------------------------------------ writing
class _Writer:
    """Writes a disk bank chunk by chunk into a hidden sibling folder
    (``.<name>.partial-<host>-<pid>-<random>``), swapped into place on success:
    a crash leaves the previous bank (or nothing) under ``path``, never a mix."""

    def __init__(self, path, model, args, kwargs, num_rows, overwrite):

        self.path = Path(path)
        self.overwrite = overwrite
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.path.parent)
        self._check_target()
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
        for name in self.sites:
            if not is_plain_name(name) or name.startswith("."):
                raise ValueError(
                    f"Site '{name}' cannot be a file name in a disk bank; rename "
                    "the site (no '/' or '\\', no leading '.') or use "
                    "na.save_simulations."
                )
        for name, site in self.sites.items():
            if np.dtype(site.dtype).kind not in NUMERIC_KINDS:
                raise ValueError(
                    f"Site '{name}' has dtype {site.dtype}; a disk bank holds bool, "
                    "integer and float sites only. Use na.save_simulations."
                )
        self.tmp = partial_path(self.path)
        os.mkdir(self.tmp, 0o777)  # the usual mode: 0o777 less the umask
        self.files, self.hashes, self.shapes = {}, {}, {}
        try:
            for name, site in self.sites.items():
                self._open_shard(name, np.dtype(site.dtype), (num_rows, *site.shape))
        except BaseException:
            for f in self.files.values():
                f.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _open_shard(self, name: str, dtype: np.dtype, shape: tuple) -> None:
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(
            buf,
            {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": False,
                "shape": shape,
            },
        )
        f = open(self.tmp / f"{name}.npy", "wb")
        self.files[name] = f
        f.write(buf.getvalue())
        self.hashes[name] = hashlib.sha256(buf.getvalue())
        self.shapes[name] = shape

    def _check_target(self) -> None:
        if os.path.lexists(self.path):
            if not self.overwrite:
                raise exists_error(self.path)
            check_replaceable(self.path)

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
            self.hashes[name].update(v.reshape(-1).view(np.uint8))
        self.written += m

    def __exit__(self, exc_type, *_) -> None:
        try:
            for f in self.files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
            if exc_type is None and self.written != self.num_rows:
                raise ValueError(f"Wrote {self.written} of {self.num_rows} rows.")
            if exc_type is None:
                self._finish()
        finally:
            if self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)

    def _finish(self) -> None:
        self.header["shards"] = {
            name: {
                "shape": list(self.shapes[name]),
                "dtype": np.lib.format.dtype_to_descr(np.dtype(site.dtype)),
                "bytes": os.path.getsize(self.tmp / f"{name}.npy"),
                "fingerprint": fingerprint_file(self.tmp / f"{name}.npy"),
                "sha256": self.hashes[name].hexdigest(),
            }
            for name, site in self.sites.items()
        }
        with open(self.tmp / HEADER_FILE, "w") as f:
            f.write(json.dumps(self.header, indent=1))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.tmp)
        self._check_target()  # again: the folder may have changed meanwhile
        if not os.path.lexists(self.path):
            try:
                os.rename(self.tmp, self.path)
            except OSError as e:  # a folder appeared there meanwhile
                raise exists_error(self.path) from e
        elif exchange(self.tmp, self.path):
            shutil.rmtree(self.tmp, ignore_errors=True)  # now the previous bank
        else:  # two renames; clean_stale puts the old one back after a crash
            trash = partial_path(self.path, "trash")
            os.rename(self.path, trash)
            try:
                os.rename(self.tmp, self.path)
            except BaseException:
                os.rename(trash, self.path)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        fsync_dir(self.path.parent)


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
        overwrite: replace an existing disk bank at ``path``, atomically (the
            new bank is built in a hidden sibling folder and swapped in at the
            end). A folder that is not a disk bank, or holds other files, is
            never replaced.
        **kwargs: keyword model arguments.

    Returns:
        The opened :class:`DiskBank`.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: ``overwrite=True`` but ``path`` is not a disk bank.

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
