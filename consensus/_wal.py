"""The consensus write-ahead log: every message this validator signs, synced before it is sent.

File format: a sequence of records ``[length u32 BE][crc32 u32 BE][payload]`` where the payload
is the canonical encoding of ``WalRecord``. A record is appended and fsynced *before* the message
leaves the node, so after any crash the log holds every message peers may have seen. Reading
stops at the first short or corrupt record (a write torn by the crash, never sent) and truncates
the file there so later appends follow valid data.

The log only needs the heights not yet committed: once the application has durably committed
height h, ``reset()`` empties it (a crash in between leaves records for heights <= h, which
replay ignores because they are below the app's head).
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zlib
from typing import TYPE_CHECKING

from consensus.exceptions import WalError
from ledger import DecodeError, decode, encode

if TYPE_CHECKING:
    from pathlib import Path

wal_record_bytes_max = 10 * 1024 * 1024
"""Largest record: a proposal with its block plus the envelope."""
wal_records_max = 100_000
"""Most records replayed from one log (one height at most has a few per round)."""
_header = struct.Struct(">II")


@dataclasses.dataclass(frozen=True, slots=True)
class WalRecord:
    """One message we signed: the envelope bytes as sent, and for a non-nil precommit the block
    it locks on (so the lock, and the value to re-propose, survive a restart)."""

    height: int
    envelope: bytes
    block: bytes


class Wal:
    """An append-only, fsynced log of this validator's signed messages."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self._fsync = fsync
        self._file = open(path, "ab")
        self.torn_bytes_dropped = 0

    @classmethod
    def open(cls, path: Path, *, fsync: bool = True) -> tuple[Wal, list[WalRecord]]:
        """Open (creating) the log, returning it and the valid records it holds."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            records, valid_end, size = _read(path)
            if valid_end < size:
                with open(path, "r+b") as f:
                    f.truncate(valid_end)
                    f.flush()
                    os.fsync(f.fileno())
            wal = cls(path, fsync=fsync)
            wal.torn_bytes_dropped = size - valid_end
            if fsync:
                _fsync_dir(path)
        except OSError as exc:
            raise WalError(f"cannot open WAL {path}: {exc}") from exc
        return wal, records

    def append(self, record: WalRecord) -> None:
        payload = encode(record)
        if len(payload) > wal_record_bytes_max:
            raise WalError(f"WAL record of {len(payload)} bytes exceeds {wal_record_bytes_max}")
        data = _header.pack(len(payload), zlib.crc32(payload)) + payload
        try:
            self._file.write(data)
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
        except OSError as exc:
            raise WalError(f"cannot append to WAL {self.path}: {exc}") from exc

    def reset(self) -> None:
        """Drop every record: the heights they were for are committed."""
        try:
            self._file.truncate(0)
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
        except OSError as exc:
            raise WalError(f"cannot reset WAL {self.path}: {exc}") from exc

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Wal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _read(path: Path) -> tuple[list[WalRecord], int, int]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0, 0
    records: list[WalRecord] = []
    pos = 0
    while pos + _header.size <= len(data) and len(records) < wal_records_max:
        length, crc = _header.unpack_from(data, pos)
        start = pos + _header.size
        if length > wal_record_bytes_max or start + length > len(data):
            break
        payload = data[start : start + length]
        if zlib.crc32(payload) != crc:
            break
        try:
            record = decode(WalRecord, payload, max_bytes=wal_record_bytes_max)
        except DecodeError:
            break
        records.append(record)
        pos = start + length
    return records, pos, len(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
