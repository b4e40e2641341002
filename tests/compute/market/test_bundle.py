"""The output bundle on disk (``_bundle``): sealing a job's files streams to a sealed
directory that a re-seal reproduces byte for byte; a requester's partial fetch resumes from
what it synced; the check and the open stream from disk; a wrong key, a malformed bundle and
a path that would escape the outputs directory are each caught; a full disk leaves nothing."""

from __future__ import annotations

import hashlib
import shutil
from typing import TYPE_CHECKING

import pytest

import ledger
from compute.market import _bundle
from compute.market.types import OutputsInfo
from compute.types import OutputFile

if TYPE_CHECKING:
    from pathlib import Path

JOB = hashlib.sha256(b"bundle-job").digest()
KEY = hashlib.sha256(b"bundle-key").digest()


def _job(tmp_path: Path, files: dict[str, bytes]) -> tuple[OutputsInfo, Path]:
    out = tmp_path / "job" / "work" / "out"
    listed = []
    for name, data in sorted(files.items()):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
        listed.append(OutputFile(name, len(data), hashlib.sha256(data).digest()))
    return OutputsInfo(tuple(listed), b"stdout\n", b"stderr\n"), out


def _fetch(sealed: Path, meta: _bundle.SealedMeta, dest: Path, ranges: list[int] | None = None):
    """Copy ranges of a sealed directory as a requester's fetch would (all: ``None``)."""
    partial = _bundle.PartialFetch(dest, meta)
    try:
        for first in partial.missing() if ranges is None else ranges:
            count, _ = _bundle.range_bytes(meta.output_bytes, first)
            chunks, hashes = _bundle.read_range(sealed, meta.output_bytes, first, count)
            partial.write(first, chunks, hashes)
        partial.sync()
    finally:
        partial.close()
    return partial


FILES = {
    "a.bin": bytes(range(256)) * 17000,  # several ranges
    "sub/b.txt": b"hello\n",
    "empty": b"",
}


def test_seal_fetch_check_open_round_trip_and_a_reseal_gives_the_same_bytes(
    tmp_path: Path,
) -> None:
    info, out = _job(tmp_path, FILES)
    sealed = tmp_path / "job" / "sealed"
    meta = _bundle.seal_outputs(JOB, KEY, info, out, sealed)
    assert meta.output_bytes == _bundle.bundle_bytes(info)
    first = (sealed / _bundle.CHUNKS).read_bytes()
    shutil.rmtree(sealed)
    assert _bundle.seal_outputs(JOB, KEY, info, out, sealed) == meta, "re-seal: same roots"
    assert (sealed / _bundle.CHUNKS).read_bytes() == first, "re-seal: same ciphertext"
    assert bytes(range(256)) * 4 not in first, "the ciphertext shows the plaintext"
    fetched = tmp_path / "req" / "sealed"
    _fetch(sealed, meta, fetched)
    _bundle.check_sealed_dir(fetched, meta.output_root, meta.plain_root, meta.output_bytes)
    dest = tmp_path / "req" / "out"
    opened = _bundle.open_sealed_dir(JOB, KEY, fetched, meta.output_bytes, dest)
    assert opened == info, opened
    for name, data in FILES.items():
        assert (dest / name).read_bytes() == data, name


def test_a_partial_fetch_resumes_with_what_it_synced_and_restarts_for_other_roots(
    tmp_path: Path,
) -> None:
    info, out = _job(tmp_path, FILES)
    sealed = tmp_path / "job" / "sealed"
    meta = _bundle.seal_outputs(JOB, KEY, info, out, sealed)
    fetched = tmp_path / "req" / "sealed"
    first = _fetch(sealed, meta, fetched, ranges=[0, 2 * _bundle.range_chunks])
    assert first.ranges > 3, "the bundle should span several ranges"
    again = _bundle.PartialFetch(fetched, meta)
    again.close()
    assert again.resumed == 2, "the synced ranges count as had after a restart"
    assert 0 not in again.missing() and _bundle.range_chunks in again.missing()
    _fetch(sealed, meta, fetched)
    _bundle.check_sealed_dir(fetched, meta.output_root, meta.plain_root, meta.output_bytes)
    other = _bundle.PartialFetch(fetched, _bundle.SealedMeta(bytes(32), bytes(32), 5))
    other.close()
    assert other.resumed == 0 and other.missing() == [0], "other roots start over"


def test_the_check_refuses_a_flipped_byte_and_a_wrong_key_names_the_chunk(
    tmp_path: Path,
) -> None:
    info, out = _job(tmp_path, FILES)
    sealed = tmp_path / "job" / "sealed"
    meta = _bundle.seal_outputs(JOB, KEY, info, out, sealed)
    fetched = tmp_path / "req" / "sealed"
    _fetch(sealed, meta, fetched)
    chunks = bytearray((fetched / _bundle.CHUNKS).read_bytes())
    chunks[5000] ^= 1
    (fetched / _bundle.CHUNKS).write_bytes(bytes(chunks))
    with pytest.raises(ledger.OutputsError, match="output root"):
        _bundle.check_sealed_dir(fetched, meta.output_root, meta.plain_root, meta.output_bytes)
    _fetch(sealed, meta, tmp_path / "req2")
    dest = tmp_path / "req" / "out"
    wrong = _bundle.open_sealed_dir(JOB, bytes(32), tmp_path / "req2", meta.output_bytes, dest)
    assert wrong == 0, "a wrong key fails the first chunk"
    assert not dest.exists(), "nothing is left of a failed open"
    chunk, plain_hash, proof = _bundle.evidence(tmp_path / "req2", meta.output_bytes, 7)
    leaf = ledger.output_leaf(7, chunk, plain_hash)
    count = ledger.chunk_count(meta.output_bytes)
    assert ledger.merkle_verify(meta.output_root, leaf, 7, count, proof), "evidence verifies"


@pytest.mark.parametrize("path", ["../escape", "/abs", "a/../../b", "a//b", ""])
def test_an_output_path_that_would_escape_is_malformed(tmp_path: Path, path: str) -> None:
    data = b"x"
    info = OutputsInfo((OutputFile(path, 1, hashlib.sha256(data).digest()),), b"", b"")
    header = ledger.encode(info)
    plaintext = len(header).to_bytes(8, "big") + header + data
    sealed = tmp_path / "sealed"
    key, chunks, output_root, plain_root, plain_hashes = ledger.seal(JOB, plaintext, key=KEY)
    sealed.mkdir()
    (sealed / _bundle.CHUNKS).write_bytes(b"".join(chunks))
    (sealed / _bundle.PLAIN_HASHES).write_bytes(b"".join(plain_hashes))
    _bundle.check_sealed_dir(sealed, output_root, plain_root, len(plaintext))
    opened = _bundle.open_sealed_dir(JOB, key, sealed, len(plaintext), tmp_path / "d" / "out")
    assert isinstance(opened, str) and "path" in opened, opened
    assert not (tmp_path / "escape").exists() and not (tmp_path / "d" / "out").exists()


def test_a_file_that_does_not_match_its_digest_is_malformed(tmp_path: Path) -> None:
    info, out = _job(tmp_path, {"f": b"real"})
    lying = OutputsInfo((OutputFile("f", 4, bytes(32)),), b"", b"")
    sealed = tmp_path / "job" / "sealed"
    meta = _bundle.seal_outputs(JOB, KEY, lying, out, sealed)
    opened = _bundle.open_sealed_dir(JOB, KEY, sealed, meta.output_bytes, tmp_path / "o")
    assert isinstance(opened, str) and "SHA-256" in opened, opened
    assert info.files[0].sha256 != bytes(32)


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info, out = _job(tmp_path, FILES)
    monkeypatch.setattr(_bundle, "free_disk_margin_bytes", 2**62)
    sealed = tmp_path / "job" / "sealed"
    with pytest.raises(_bundle.DiskFull, match="not enough free disk"):
        _bundle.seal_outputs(JOB, KEY, info, out, sealed)
    assert not sealed.exists()
    meta = _bundle.SealedMeta(bytes(32), bytes(32), 10**6)
    with pytest.raises(_bundle.DiskFull):
        _bundle.PartialFetch(tmp_path / "req" / "sealed", meta)
    assert not (tmp_path / "req" / "sealed").exists()


def test_every_range_checks_on_arrival_with_its_proofs_and_a_tampered_one_does_not(
    tmp_path: Path,
) -> None:
    info, out = _job(tmp_path, FILES)
    sealed = tmp_path / "job" / "sealed"
    meta = _bundle.seal_outputs(JOB, KEY, info, out, sealed)
    ranges = _bundle.ranges_of(meta.output_bytes)
    assert ranges > 3
    for r in range(ranges):
        first = r * _bundle.range_chunks
        count, _ = _bundle.range_bytes(meta.output_bytes, first)
        chunks, hashes = _bundle.read_range(sealed, meta.output_bytes, first, count)
        proofs = _bundle.range_proofs(sealed, meta.output_bytes, first)
        _bundle.check_range(meta, first, chunks, hashes, *proofs)
    flipped = bytes([chunks[0] ^ 1]) + chunks[1:]
    with pytest.raises(ledger.OutputsError, match="output root"):
        _bundle.check_range(meta, first, flipped, hashes, *proofs)
    other = _bundle.range_proofs(sealed, meta.output_bytes, 0)
    with pytest.raises(ledger.OutputsError):
        _bundle.check_range(meta, first, chunks, hashes, *other)
    lying = hashes[:-1] + bytes([hashes[-1] ^ 1])
    with pytest.raises(ledger.OutputsError):
        _bundle.check_range(meta, first, chunks, lying, *proofs)
