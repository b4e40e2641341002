"""The write-ahead log on real files: replay, torn tails, and a writer killed mid-stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from consensus import Wal, WalRecord


def replay(path: Path) -> list[int]:
    wal, records = Wal.open(path)
    wal.close()
    return [r.height for r in records]


def record(i: int, size: int = 100) -> WalRecord:
    return WalRecord(height=i, envelope=bytes([i % 256]) * size, block=b"")


def test_records_replay_in_order(tmp_path: Path) -> None:
    path = tmp_path / "cs.wal"
    wal, records = Wal.open(path)
    assert records == [], "a new WAL is empty"
    for i in range(1, 6):
        wal.append(record(i))
    wal.close()
    assert replay(path) == [1, 2, 3, 4, 5], "every appended record must replay"


def test_reset_empties_the_log(tmp_path: Path) -> None:
    path = tmp_path / "cs.wal"
    wal, records = Wal.open(path)
    assert records == []
    wal.append(record(1))
    wal.reset()
    wal.append(record(2))
    wal.close()
    assert replay(path) == [2], "reset must drop earlier records"


def test_torn_tail_is_dropped_and_truncated(tmp_path: Path) -> None:
    path = tmp_path / "cs.wal"
    wal, _ = Wal.open(path)
    for i in range(1, 4):
        wal.append(record(i))
    wal.close()
    good_size = path.stat().st_size
    full = path.read_bytes()
    # A crash mid-write: the next record's header and half its payload.
    wal, _ = Wal.open(path)
    wal.append(record(4, size=1000))
    wal.close()
    torn = path.read_bytes()[: good_size + 500]
    path.write_bytes(torn)
    wal, records = Wal.open(path)
    assert [r.height for r in records] == [1, 2, 3], "the torn record must not replay"
    assert wal.torn_bytes_dropped == 500
    wal.close()
    assert path.read_bytes() == full, "the file must be truncated back to its valid prefix"
    with Wal.open(path)[0] as wal:
        wal.append(record(5))
    assert replay(path) == [1, 2, 3, 5], "appends after a tear replay"


def test_corrupt_record_stops_replay(tmp_path: Path) -> None:
    path = tmp_path / "cs.wal"
    wal, _ = Wal.open(path)
    for i in range(1, 4):
        wal.append(record(i))
    wal.close()
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip a byte in the last payload: its CRC no longer matches
    path.write_bytes(bytes(data))
    assert replay(path) == [1, 2], "a bad CRC ends the valid log"


WRITER = """
import sys
from pathlib import Path
from consensus import Wal, WalRecord
wal, records = Wal.open(Path(sys.argv[1]))
start = len(records)
for i in range(start, start + 100_000):
    wal.append(WalRecord(height=i, envelope=b"x" * 20_000, block=b""))
    print(i, flush=True)
"""


def test_killed_writer_loses_nothing_it_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "cs.wal"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    acknowledged = -1
    deadline = time.monotonic() + 60
    try:
        assert proc.stdout is not None
        while acknowledged < 50 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"writer exited early with {proc.poll()}"
            acknowledged = int(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert acknowledged >= 50, "the writer did not get going within 60 s"
    wal, records = Wal.open(path)
    wal.close()
    heights = [r.height for r in records]
    assert heights == list(range(len(heights))), "replayed records must be a gap-free prefix"
    assert len(heights) > acknowledged, (
        f"record {acknowledged} was fsynced and acknowledged but only {len(heights)} replayed"
    )
