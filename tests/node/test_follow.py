"""The CLI's log follower: every byte once and in order, across gaps, repeats and restarts."""

from __future__ import annotations

import base64
import io
from typing import Any

from node.commands._follow import LogPrinter


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def view(
    out: bytes, err: bytes = b"", *, at: tuple[int, int] = (0, 0), ended: bool = False, **kw: Any
) -> dict[str, Any]:
    sizes = kw.pop("sizes", (at[0] + len(out), at[1] + len(err)))
    return {
        "generation": kw.pop("generation", 1),
        "ended": ended,
        "stdout": b64(out),
        "stdout_offset": at[0],
        "stdout_size": sizes[0],
        "stderr": b64(err),
        "stderr_offset": at[1],
        "stderr_size": sizes[1],
    }


def event(stream: str | None, offset: int, data: bytes, **kw: Any) -> dict[str, Any]:
    return {
        "job_id": "j",
        "generation": kw.get("generation", 1),
        "stream": stream,
        "offset": offset,
        "data": b64(data),
        "ended": kw.get("ended", False),
    }


def printer() -> tuple[LogPrinter, io.BytesIO, io.BytesIO]:
    out, err = io.BytesIO(), io.BytesIO()
    return LogPrinter(out, err), out, err


def test_pushed_chunks_are_written_once_and_a_gap_asks_for_a_read() -> None:
    p, out, err = printer()
    assert not p.apply_view(view(b"ab", b"x"))
    assert p.apply_event(event("stdout", 1, b"bcd")), "an overlapping chunk is fine"
    assert p.apply_event(event("stdout", 0, b"abcd")), "a repeat writes nothing new"
    assert not p.apply_event(event("stdout", 9, b"z")), "a gap must make the follower read"
    assert p.apply_event(event("stderr", 1, b"y"))
    assert (out.getvalue(), err.getvalue()) == (b"abcd", b"xy")
    assert p.offsets == {"stdout": 4, "stderr": 2}
    assert not p.apply_event(event(None, 0, b"", ended=True)), "the end makes it read once more"


def test_a_view_is_complete_only_when_ended_and_every_byte_is_written() -> None:
    p, out, _ = printer()
    assert not p.apply_view(view(b"abc", ended=True, sizes=(6, 0))), "more is held than came"
    assert p.apply_view(view(b"def", at=(3, 0), ended=True))
    assert out.getvalue() == b"abcdef"


def test_a_tail_that_starts_over_is_followed_from_zero_with_a_note() -> None:
    p, out, err = printer()
    p.apply_view(view(b"run one\n"))
    assert not p.apply_event(event(None, 0, b"", generation=2)), "a restart makes it read"
    assert p.offsets == {"stdout": 0, "stderr": 0}
    assert p.apply_view(view(b"run two\n", generation=2, ended=True))
    assert out.getvalue() == b"run one\nrun two\n"
    assert b"start over" in err.getvalue()
