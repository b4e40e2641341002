"""The production clock: trio's clock for timeouts (so MockClock drives tests), the OS for dates."""

from __future__ import annotations

import time

import trio

from consensus.abc import ClockAPI


class TrioClock(ClockAPI):
    """Timeouts follow ``trio.current_time()``; block times follow the wall clock.

    ``wall_offset_ms`` set: wall time is that offset plus trio's clock, which keeps simulated
    block times deterministic under ``trio.testing.MockClock``.
    """

    def __init__(self, *, wall_offset_ms: int | None = None) -> None:
        self._wall_offset_ms = wall_offset_ms

    def monotonic_ms(self) -> int:
        return int(trio.current_time() * 1000)

    def wall_ms(self) -> int:
        if self._wall_offset_ms is not None:
            return self._wall_offset_ms + self.monotonic_ms()
        return time.time_ns() // 1_000_000

    def trio_deadline(self, deadline_ms: int) -> float:
        # Half a millisecond late, so that on waking ``monotonic_ms()`` (which truncates) has
        # reached the deadline; waking a hair early would spin without letting time advance.
        return (deadline_ms + 0.5) / 1000
