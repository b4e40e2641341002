"""Helpers for tests, scripts and benchmarks that run real node processes."""

from __future__ import annotations

import random
import socket
import time
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")
poll_interval_s = 0.1


def free_port_block(count: int, *, host: str = "127.0.0.1", tries: int = 50) -> int:
    """A base port such that ``base .. base + count - 1`` are all free on ``host`` right now."""
    rng = random.Random()
    for _ in range(tries):
        base = rng.randrange(20000, 60000 - count)
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind((host, port))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return base
    raise RuntimeError(f"no block of {count} free ports found in {tries} tries")


def wait_until(probe: Callable[[], T | None], *, timeout_s: float, what: str) -> T:
    """Poll ``probe`` until it returns a truthy value; raise AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_interval_s)
