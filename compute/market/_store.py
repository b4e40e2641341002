"""The job store: every job this node requests or provides, its inputs and fetched outputs,
and what it has seen of each provider, in one LevelDB directory (plyvel).

The schema (this module owns every key):
- ``j`` + role (1 byte) + id -> ``JobRecord``. A requester's id is the job id; a provider's is
  the attempt's job id (every attempt is a separate trade, hence a separate provider job).
- ``m`` + job id -> ``JobManifest`` (requester: what providers fetch).
- ``b`` + sha256 -> blob bytes (verified output files).
- ``v`` -> the store's format (``store_format``, u32 BE). Records of another format do not
  decode, so a store of another format (or an unmarked one holding jobs: written before the
  mark existed) is refused at open with what to do, rather than failing on its first record.

Input files are not in LevelDB: they are blobs (``_blobs.BlobStore``) in ``inputs``, a
directory beside the database (``<path>-blobs/inputs`` unless given): the requester's copies
of what it submitted, the provider's fetched (or half-fetched) copies of what it runs. A blob
stays while an unfinished job of either role names it in its manifest (or a submit in
progress holds it); ``sweep_inputs`` drops the rest.

Every write is one synced batch, made before the change is acknowledged to anyone.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import plyvel

import ledger
from compute.market._blobs import BlobStore
from compute.market.exceptions import StoreCorrupt, StoreFormatError
from compute.market.types import JobManifest, JobRecord, Role, message_bytes_max

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

_JOB = b"j"
_MANIFEST = b"m"
_BLOB = b"b"
_PROVIDER = b"p"
_FORMAT = b"v"
store_format = 2
"""Bumped whenever ``JobRecord`` or ``JobManifest`` change shape (2: inputs as blobs, outputs
on disk, live logs, images, per-attempt deliveries)."""
record_bytes_max = 8 * 1024 * 1024
"""A record holds up to two capped logs (1 MiB each) plus bids and metadata."""
jobs_listed_max = 100_000


def _job_key(role: Role, key: bytes) -> bytes:
    return _JOB + bytes([int(role)]) + key


class JobStore:
    """Jobs, manifests, blobs and provider stats in LevelDB at ``path`` (created if missing),
    and the input blobs in ``inputs_dir``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        inputs_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self._db = plyvel.DB(self.path, create_if_missing=True)
        try:
            self._check_format()
        except StoreFormatError:
            self._db.close()
            raise
        self.inputs = BlobStore(inputs_dir or f"{self.path}-blobs/inputs")
        self._inputs_in_use: dict[bytes, frozenset[bytes]] = {}
        """Unfinished record key (role byte + key) -> the input roots its manifest names."""
        for record in self.records():
            self._track(record, None)

    def _check_format(self) -> None:
        found = self._db.get(_FORMAT)
        if found is None:
            with self._db.iterator(include_value=False) as keys:
                holds_jobs = any(key[:1] in (_JOB, _MANIFEST) for key in keys)
            if not holds_jobs:  # a new (or empty) store: mark it
                self._write([(_FORMAT, store_format.to_bytes(4, "big"))])
                return
            version = 1
        else:
            version = int.from_bytes(found, "big")
        if version != store_format:
            raise StoreFormatError(
                f"the job store {self.path} is in format {version}, this gpumesh reads format "
                f"{store_format}: finish or cancel its jobs with the gpumesh that wrote it, or "
                "move the directory aside (its jobs' trades settle or refund on chain anyway)"
            )

    def close(self) -> None:
        self._db.close()

    def _write(self, puts: Iterable[tuple[bytes, bytes]]) -> None:
        with self._db.write_batch(sync=True, transaction=True) as batch:
            for key, value in puts:
                batch.put(key, value)

    @staticmethod
    def record_key(record: JobRecord) -> bytes:
        return record.job_id if record.role is Role.REQUESTER else record.attempt_job_id

    def put(
        self,
        record: JobRecord,
        *,
        manifest: JobManifest | None = None,
        blobs: Iterable[bytes] = (),
    ) -> None:
        """Persist ``record`` (and its manifest and blobs) in one synced batch."""
        puts = [(_job_key(record.role, self.record_key(record)), ledger.encode(record))]
        if manifest is not None:
            puts.append((_MANIFEST + record.job_id, ledger.encode(manifest)))
        puts += [(_BLOB + ledger.digest(blob), blob) for blob in blobs]
        self._write(puts)
        self._track(record, manifest)

    def _track(self, record: JobRecord, manifest: JobManifest | None) -> None:
        key = bytes([int(record.role)]) + self.record_key(record)
        if record.state.terminal:
            self._inputs_in_use.pop(key, None)
            return
        if key in self._inputs_in_use:
            return
        if manifest is None:
            manifest = self.manifest(record.job_id)
        roots = frozenset(ref.root for ref in manifest.inputs) if manifest is not None else ()
        self._inputs_in_use[key] = frozenset(roots)

    def inputs_in_use(self) -> set[bytes]:
        """Input roots an unfinished job still needs (a submit or a fetch in progress pins
        its own in ``inputs``)."""
        used: set[bytes] = set()
        for roots in self._inputs_in_use.values():
            used |= roots
        return used

    def get(self, role: Role, key: bytes) -> JobRecord | None:
        data = self._db.get(_job_key(role, key))
        if data is None:
            return None
        return self._decode(data)

    @staticmethod
    def _decode(data: bytes) -> JobRecord:
        try:
            return ledger.decode(JobRecord, data, max_bytes=record_bytes_max)
        except ledger.DecodeError as exc:
            raise StoreCorrupt(f"a job record does not decode: {exc}") from exc

    def records(self, role: Role | None = None) -> Iterator[JobRecord]:
        prefix = _JOB if role is None else _JOB + bytes([int(role)])
        with self._db.iterator(prefix=prefix) as iterator:
            for count, (_, value) in enumerate(iterator):
                if count >= jobs_listed_max:
                    return
                yield self._decode(value)

    def manifest(self, job_id: bytes) -> JobManifest | None:
        data = self._db.get(_MANIFEST + job_id)
        if data is None:
            return None
        try:
            return ledger.decode(JobManifest, data, max_bytes=message_bytes_max)
        except ledger.DecodeError as exc:
            raise StoreCorrupt(f"manifest of {job_id.hex()} does not decode: {exc}") from exc

    def blob(self, sha256: bytes) -> bytes | None:
        data: bytes | None = self._db.get(_BLOB + sha256)
        return data

    def put_blobs(self, blobs: Iterable[bytes]) -> None:
        self._write((_BLOB + ledger.digest(blob), blob) for blob in blobs)
