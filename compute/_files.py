"""File helpers shared by the sandbox and the blob store."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil

copy_buffer_bytes = 4 * 1024 * 1024

FICLONE = 0x40049409
"""The Linux ioctl that makes a file a copy-on-write clone of another (btrfs, XFS, ...)."""


def clone_file(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Make ``target`` (new) a copy of ``source``: a reflink where the file system can (no
    bytes copied, and neither side sees the other's later writes), else a kernel-side copy.
    Never a hardlink: a job may write to its inputs, and a job directory is chowned to the
    job's uid, and neither may reach the node's own copy."""
    with open(source, "rb") as src, open(target, "xb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            return
        except OSError:
            pass  # not the same file system, or one without reflinks: copy
        size = os.fstat(src.fileno()).st_size
        done = 0
        try:
            while done < size:
                sent = os.copy_file_range(src.fileno(), dst.fileno(), size - done)
                if sent == 0:
                    break
                done += sent
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            src.seek(done)
            dst.seek(done)
            shutil.copyfileobj(src, dst, copy_buffer_bytes)
