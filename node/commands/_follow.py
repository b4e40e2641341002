"""Following a job's logs from the CLI: ``job logs -f`` and ``job submit --wait``.

The node pushes new bytes on the ``jobLogs`` topic; ``job_logs`` reads from offsets. The
follower subscribes first, reads from offset 0, writes each pushed chunk that starts where it
stands, and reads again whenever it cannot (a gap, a dropped subscription, the tail starting
over, a quiet ``resync_s``). It stops once the node says no byte past the sizes will come and
it has them all, so the last bytes (from the sealed logs) are never lost to a race.
"""

from __future__ import annotations

import base64
import sys
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from node.commands._common import call
from node.exceptions import NodeError

if TYPE_CHECKING:
    from pathlib import Path

    from node.commands._common import Subscription

resync_s = 2.0
"""Without a pushed chunk for this long, the follower reads again (and sees the end)."""
reads_max = 1_000_000
"""Bounds the follow loop (a job's logs are at most a few MiB; each read moves or waits)."""


class ByteSink(Protocol):
    """Where a stream's bytes go (a binary file, or ``_ByteSink`` over a terminal's text)."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> object: ...


class _ByteSink:
    """Bytes to a text stream: through its byte buffer when it has one (the job's bytes as
    they are), after whatever text was written to it before; else decoded."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, data: bytes) -> None:
        buffer = getattr(self._stream, "buffer", None)
        self._stream.flush()
        if buffer is None:
            self._stream.write(data.decode(errors="replace"))
        else:
            buffer.write(data)

    def flush(self) -> None:
        buffer = getattr(self._stream, "buffer", None)
        (buffer or self._stream).flush()


class LogPrinter:
    """Writes a job's stdout and stderr in order, every byte once, and tracks the offsets."""

    def __init__(self, out: ByteSink, err: ByteSink) -> None:
        self.streams: dict[str, ByteSink] = {"stdout": out, "stderr": err}
        self.offsets = {"stdout": 0, "stderr": 0}
        self.generation = 0

    @classmethod
    def stdio(cls) -> LogPrinter:
        return cls(_ByteSink(sys.stdout), _ByteSink(sys.stderr))

    def _restarted(self, generation: int) -> bool:
        """True when the node's tail started over: read again from offset 0."""
        if generation == self.generation or generation == 0:
            return False
        self.generation = generation
        if not any(self.offsets.values()):
            return False  # nothing written yet: this read is from offset 0 anyway
        self.streams["stderr"].write(b"\n--- the job's logs start over (it runs again) ---\n")
        self.streams["stderr"].flush()
        self.offsets = {"stdout": 0, "stderr": 0}
        return True

    def write(self, stream: str, offset: int, data: bytes) -> bool:
        """Write what is new in ``data`` (which starts at ``offset``); False on a gap."""
        at = self.offsets[stream]
        if offset > at:
            return False
        fresh = data[at - offset :]
        if fresh:
            self.streams[stream].write(fresh)
            self.streams[stream].flush()
            self.offsets[stream] = at + len(fresh)
        return True

    def apply_view(self, view: dict[str, Any]) -> bool:
        """Write a ``job_logs`` answer; True when it is complete (ended and all written)."""
        if self._restarted(int(view.get("generation") or 0)):
            return False
        for stream in ("stdout", "stderr"):
            self.write(stream, int(view[f"{stream}_offset"]), base64.b64decode(view[stream]))
        return bool(view["ended"]) and all(
            self.offsets[s] >= int(view[f"{s}_size"]) for s in ("stdout", "stderr")
        )

    def apply_event(self, event: dict[str, Any]) -> bool:
        """Write a pushed chunk; False when the follower must read (gap, end, start over)."""
        if event.get("ended") or self._restarted(int(event.get("generation") or 0)):
            return False
        stream = event.get("stream")
        if stream not in ("stdout", "stderr"):
            return False
        return self.write(stream, int(event["offset"]), base64.b64decode(event["data"]))


async def follow_logs(
    home: Path, job_id: str, printer: LogPrinter, events: Subscription | None
) -> dict[str, Any]:
    """Write the job's logs as they come until it ends; returns the last ``job_logs`` answer.

    ``events`` is an open ``jobLogs`` subscription (opened before the first read, so nothing
    pushed in between is missed); without one, or once it drops, the follower polls."""
    import trio

    view: dict[str, Any] = {}
    for _ in range(reads_max):
        params = {
            "job_id": job_id,
            "stdout_offset": printer.offsets["stdout"],
            "stderr_offset": printer.offsets["stderr"],
        }
        view = await trio.to_thread.run_sync(call, home, "job_logs", params)
        if printer.apply_view(view):
            return view
        if int(view["stdout_offset"]) + len(base64.b64decode(view["stdout"])) < int(
            view["stdout_size"]
        ) or int(view["stderr_offset"]) + len(base64.b64decode(view["stderr"])) < int(
            view["stderr_size"]
        ):
            continue  # more is held than one answer carries: read on at once
        with trio.move_on_after(resync_s):
            if events is None:
                await trio.sleep_forever()
            while True:
                try:
                    event = await events.next()
                except NodeError:
                    events = None  # the subscription dropped: poll from here on
                    await trio.sleep_forever()
                if event.get("job_id") != job_id:
                    continue
                if not printer.apply_event(event):
                    break
    raise NodeError(f"the logs of job {job_id[:16]} did not end within {reads_max} reads")


async def show_logs(home: Path, job_id: str, events: Subscription | None) -> None:
    """``follow_logs`` to this terminal, where the logs are a side show: a failure to follow
    them is said on stderr and the caller goes on."""
    try:
        await follow_logs(home, job_id, LogPrinter.stdio(), events)
    except NodeError as exc:
        print(
            f"(live logs not shown: {exc}; `gpumesh job logs {job_id}` reads them)",
            file=sys.stderr,
            flush=True,
        )
