"""The cookie and port files: written whole (temp file + rename) with their final mode."""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path
from typing import Final

COOKIE_FILE_NAME: Final = "rpc.cookie"
PORT_FILE_NAME: Final = "rpc.port"
cookie_mode = 0o600
port_file_mode = 0o644


def write_file_atomic(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to ``path`` so that no reader ever sees it partial or with a wider mode.

    The temp file is created with O_EXCL at ``mode`` (then fchmod'ed, since the umask only
    narrows), filled, fsynced and renamed over ``path``.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            data = text.encode()
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_if_holds(path: Path, text: str) -> None:
    """Remove ``path`` if it still holds ``text``: a newer server may have replaced it."""
    try:
        if path.read_text() == text:
            path.unlink()
    except FileNotFoundError:
        return
