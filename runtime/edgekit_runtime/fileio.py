"""Files that host and device both write or check: a file's sha256, and replacing a file atomically."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

# What fsync of a directory may answer where the platform or filesystem cannot do it at all (some
# network and FUSE filesystems; Windows cannot even open a directory): the rename itself still
# happened. Any other error (EIO, ENOSPC) is the storage failing, and the caller must hear of it.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR, errno.EACCES,
                          errno.EPERM}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks: the digest devices check bundles against."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or unlink in ``path`` durable (where the filesystem can)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        if exc.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, never a mix.

    The bytes go to a hidden temporary file next to ``path`` (same filesystem, so the rename is
    atomic), named ``.<name>.tmp-<pid>-<thread>`` so that writers never share one and a clean-up
    can recognise what a crash left. ``durable``: fsync the file before the rename and the folder
    after it, so the new content also survives a power cut.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk gets its space back; the old file is untouched
        raise
    if durable:
        fsync_dir(path.parent)
