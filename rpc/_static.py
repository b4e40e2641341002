"""The dashboard's files (``rpc/static``), read once and served from memory.

Only the files shipped in the package directory are served, by exact name; nothing from a
request ever becomes a path.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Final

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
_content_types: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


@functools.cache
def _files() -> dict[str, tuple[bytes, str]]:
    return {
        path.name: (path.read_bytes(), _content_types[path.suffix])
        for path in sorted(STATIC_DIR.iterdir())
        if path.is_file() and path.suffix in _content_types
    }


def static_file(name: str) -> tuple[bytes, str] | None:
    """The bytes and content type of the shipped file ``name``, or None."""
    return _files().get(name)


def static_headers(content_type: str) -> dict[str, str]:
    return {
        "Content-Type": content_type,
        # The page may not be framed (clickjacking) and nothing it loads comes from elsewhere.
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
