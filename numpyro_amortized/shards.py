"""The shards of a disk bank checked against its ``bank.json``.

``bank.json`` records, per shard, its shape, dtype, size, SHA-256 and a
fingerprint: the SHA-256 of its size and 16 evenly spaced 64 KiB blocks. Opening
a bank checks shape, dtype (bool, integer and float only: a shard declaring
objects is refused, never read), size and fingerprint, about a millisecond per
shard; the full SHA-256 (:func:`sha256_file`, measured at 0.56-0.67 GB/s on one
core) is left to :meth:`~numpyro_amortized.DiskBank.verify`. Array names that
would leave the bank folder are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from numpyro_amortized.bank import BANK_FORMAT, CorruptBankError

__all__ = [
    "HEADER_FILE",
    "NUMERIC_KINDS",
    "check_name",
    "is_plain_name",
    "check_replaceable",
    "check_shard",
    "fingerprint_file",
    "read_header",
    "read_npy_header",
    "sha256_file",
    "shard_file",
    "verify_shards",
]

HEADER_FILE = "bank.json"
NUMERIC_KINDS = "biuf"  # bool, int, uint, float: the dtypes a bank holds
_BLOCK = 1 << 16  # fingerprint: this many bytes ...
_NUM_BLOCKS = 16  # ... at this many evenly spaced offsets


def is_plain_name(name: Any) -> bool:
    """Whether ``name`` is a plain file name (no folder part, not ``.``/``..``)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not os.path.isabs(name)
        and (os.sep not in name)
        and (os.altsep is None or os.altsep not in name)
    )


def check_name(folder: Path, name: Any) -> None:
    """Refuse array names that are not a plain file name inside the bank."""
    if not is_plain_name(name):
        raise CorruptBankError(
            f"{folder / HEADER_FILE} names an array {name!r} that is not a plain "
            "file name inside the bank folder; refusing to read it. The bank is "
            "damaged or was edited: simulate it again."
        )


def shard_file(folder: Path, name: str) -> Path:
    check_name(folder, name)
    return folder / f"{name}.npy"


def read_header(path: Path) -> dict[str, Any]:
    """Parse and check ``path/bank.json``.

    Raises:
        ValueError: not a disk bank, or a newer format.
        CorruptBankError: a damaged ``bank.json`` or unsafe array names.
    """
    header_path = path / HEADER_FILE
    if not header_path.is_file():
        raise ValueError(
            f"{path} is not a disk bank (no {HEADER_FILE}); make one with "
            "na.simulate_to_disk(rng_key, model, num_simulations, path)."
        )
    try:
        header = json.loads(header_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptBankError(f"{header_path} is damaged ({e}).") from e
    keys = ("format", "num_simulations", "arrays", "sites", "observed")
    if not isinstance(header, dict) or any(k not in header for k in keys):
        raise ValueError(f"{header_path} is not the header of a disk bank.")
    if header["format"] > BANK_FORMAT:
        raise ValueError(
            f"{path} has bank format {header['format']}, newer than this "
            f"library's ({BANK_FORMAT}); upgrade numpyro_amortized."
        )
    if not isinstance(header["arrays"], list):
        raise CorruptBankError(f"{header_path} is damaged (arrays is not a list).")
    for name in header["arrays"]:
        check_name(path, name)
    return header


def read_npy_header(file: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a ``.npy`` file; numeric dtypes only."""
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except FileNotFoundError as e:
        raise CorruptBankError(
            f"{file} is missing: the bank is incomplete. Simulate it again."
        ) from e
    except (ValueError, OSError, SyntaxError) as e:
        raise CorruptBankError(f"{file} has a damaged .npy header ({e}).") from e
    dtype = np.dtype(dtype)
    if dtype.kind not in NUMERIC_KINDS or dtype.hasobject:
        raise CorruptBankError(
            f"{file} declares dtype {dtype}; a bank holds only bool, integer and "
            "float arrays, so it is not read (the bank is damaged or a foreign "
            "file was put in). Simulate the bank again."
        )
    if fortran:
        raise CorruptBankError(f"{file} is in Fortran order; the bank is damaged.")
    return tuple(shape), dtype, offset


def check_shard(
    file: Path,
    header: dict[str, Any],
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    offset: int,
    record: dict[str, Any] | None,
) -> None:
    """Compare a shard with what ``bank.json`` says about it."""
    n = int(header["num_simulations"])
    site = header["sites"].get(name, {})
    want_shape = (n, *site.get("shape", shape[1:]))
    want_dtype = np.dtype(site.get("dtype", dtype))
    if record is not None:
        want_shape, want_dtype = tuple(record["shape"]), np.dtype(record["dtype"])
    problems = []
    if tuple(shape) != want_shape:
        problems.append(f"shape {tuple(shape)}, bank.json says {want_shape}")
    if dtype != want_dtype:
        problems.append(f"dtype {dtype}, bank.json says {want_dtype}")
    size = os.path.getsize(file)
    want_size = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != want_size:
        problems.append(f"{size} bytes, its header needs {want_size}")
    if (
        not problems
        and record is not None
        and fingerprint_file(file) != record["fingerprint"]
    ):
        problems.append("other contents than were written (fingerprint mismatch)")
    if problems:
        raise CorruptBankError(
            f"{file} does not belong to this bank: " + "; ".join(problems) + ". The "
            "bank is damaged or a shard was replaced: simulate it again."
        )


def fingerprint_file(file: Path) -> str:
    """SHA-256 of the size and 16 evenly spaced 64 KiB blocks of a file."""
    size = os.path.getsize(file)
    h = hashlib.sha256(str(size).encode())
    with open(file, "rb") as f:
        for i in range(_NUM_BLOCKS):
            f.seek(max(size - _BLOCK, 0) * i // (_NUM_BLOCKS - 1))
            h.update(f.read(_BLOCK))
    return h.hexdigest()


def sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    buf = memoryview(bytearray(1 << 23))
    with open(file, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            h.update(buf[:k])
    return h.hexdigest()


def check_replaceable(path: Path) -> None:
    """Raise unless ``path`` is a disk bank with nothing else in its folder."""
    what = (
        "a symbolic link"
        if path.is_symlink()
        else "not a folder"
        if not path.is_dir()
        else None
    )
    if what is None:
        try:
            header = read_header(path)
        except ValueError as e:
            what = f"not a disk bank ({e})"
        else:
            ours = {HEADER_FILE} | {f"{n}.npy" for n in header["arrays"]}
            extra = sorted(set(os.listdir(path)) - ours)
            if extra:
                what = f"a disk bank with other files in it ({', '.join(extra[:5])})"
    if what is not None:
        raise ValueError(
            f"{path} is {what}; overwrite=True replaces only a disk bank made by "
            "numpyro_amortized, so nothing was written. Choose another path, or "
            "move or delete it yourself."
        )


def verify_shards(folder: Path, header: dict[str, Any]) -> None:
    """Compare every shard's SHA-256 with the one ``bank.json`` records.

    Raises:
        CorruptBankError: a shard's contents differ from when it was written.
    """
    for name in header["arrays"]:
        file = shard_file(folder, name)
        if sha256_file(file) != header["shards"][name]["sha256"]:
            raise CorruptBankError(
                f"{file} differs from what was written (SHA-256 mismatch): the bank "
                "is damaged or a shard was replaced. Simulate it again."
            )
