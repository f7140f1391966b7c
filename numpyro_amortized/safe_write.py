"""Safe writing: all of a file or none of it, never over another writer's file.

Every file and bank folder the library saves goes through :func:`atomic_write`
(or :func:`exchange` for folders): data go to a hidden sibling named
``.<name>.partial-<host>-<pid>-<random>``, are flushed to disk and then renamed
into place (``os.link`` when an existing file must not be replaced, so that of
two concurrent writers exactly one wins). A writer killed mid-write leaves that
sibling behind; the next write into the same folder on the same host removes the
ones whose process is gone (:func:`clean_stale`). Files are created with the
usual mode (``0o666`` less the umask), folders with ``0o777`` less the umask.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np

__all__ = [
    "atomic_savez",
    "atomic_write",
    "clean_stale",
    "exchange",
    "exists_error",
    "fsync_dir",
    "partial_path",
]

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_LEFTOVER = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>partial|trash)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)"
    r"-[0-9a-f]+$"
)


def partial_path(path: Path, kind: str = "partial") -> Path:
    """A hidden sibling of ``path`` named after this host and process:
    ``.<name>.<kind>-<host>-<pid>-<random>``."""
    name = f".{path.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
    return path.parent / name


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":
        return True  # elsewhere os.kill(pid, 0) is no liveness test: keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove what writers that died (``kill -9``, power loss) left in ``folder``.

    Only hidden ``.<name>.partial-…`` / ``.<name>.trash-…`` entries written on
    this host by a process that no longer exists are touched. A ``trash`` entry
    is the previous version of a disk bank being replaced; if the bank itself is
    missing (the writer died between two renames) it is put back instead.

    Returns:
        The paths removed or restored.
    """
    folder = Path(folder)
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return []
    done = []
    for entry in entries:
        m = _LEFTOVER.match(entry)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        path, final = folder / entry, folder / m["name"]
        try:
            if m["kind"] == "trash" and not os.path.lexists(final):
                os.rename(path, final)
            else:
                _remove(path)
        except OSError:
            continue
        done.append(path)
    return done


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk, where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def exists_error(path: Path) -> FileExistsError:
    """The error for a write that must not replace ``path``."""
    return FileExistsError(
        f"{path} exists; pass overwrite=True to replace it (or choose another path)."
    )


def _link_new(tmp: Path, path: Path) -> None:
    """Give the finished ``tmp`` the name ``path``, failing if ``path`` exists."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise exists_error(path) from None
    except OSError:
        pass  # no hard links here (some network or FAT file systems)
    try:  # reserve the name atomically, then fill it by a rename
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        raise exists_error(path) from None
    try:
        os.replace(tmp, path)
    except BaseException:
        path.unlink(missing_ok=True)  # give the reserved name back
        raise


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, overwrite: bool
) -> Path:
    """Write a file safely: all of it or nothing, and never over another's.

    ``write(f)`` fills a hidden sibling (:func:`partial_path`), which is flushed
    to disk and then renamed to ``path`` (``os.replace``) or, with
    ``overwrite=False``, hard-linked to it (``os.link`` fails if ``path``
    exists, so of concurrent writers exactly one succeeds). A crash leaves the
    previous file untouched; leftovers of dead writers are cleaned first.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise exists_error(path)
    clean_stale(path.parent)
    tmp = partial_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_savez(
    path: str | os.PathLike, arrays: dict[str, np.ndarray], *, overwrite: bool
) -> Path:
    """Write ``arrays`` as an uncompressed ``.npz`` with :func:`atomic_write`."""
    return atomic_write(path, lambda f: np.savez(f, **arrays), overwrite=overwrite)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns:
        False where the system or file system cannot do it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    fn.argtypes += [ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))
