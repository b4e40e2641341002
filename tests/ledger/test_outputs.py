"""Sealed outputs: seal -> check -> open round trips, Merkle proofs for every shape, and every
tampering a provider could try is caught before or after the key is revealed."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import _outputs as outputs

JOB = hashlib.sha256(b"outputs-job").digest()
KEY = bytes(range(32))


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=5 * outputs.output_chunk_bytes + 7))
def test_seal_check_open_round_trip(plaintext: bytes) -> None:
    key, chunks, output_root, plain_root, plain_hashes = outputs.seal(JOB, plaintext)
    assert len(key) == 32 and len(chunks) == outputs.chunk_count(len(plaintext)), "shape"
    outputs.check_sealed(JOB, chunks, plain_hashes, output_root, plain_root, len(plaintext))
    assert outputs.open_sealed(JOB, key, chunks, plain_hashes) == plaintext, "round trip"
    if len(plaintext) >= 32:
        assert plaintext[:32] not in b"".join(chunks), "the ciphertext shows the plaintext"


def test_two_sealings_share_the_plain_root_not_the_output_root() -> None:
    plaintext = b"same result" * 500
    first = outputs.seal(JOB, plaintext)
    second = outputs.seal(JOB, plaintext)
    assert first[3] == second[3], "honest providers agree on the plain root"
    assert first[2] != second[2], "their fresh keys give different output roots"


@settings(max_examples=80, deadline=None)
@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=40), st.data())
def test_every_leaf_has_a_proof_and_only_that_leaf(
    leaves: list[bytes], data: st.DataObject
) -> None:
    root = outputs.merkle_root(leaves)
    index = data.draw(st.integers(0, len(leaves) - 1))
    proof = outputs.merkle_proof(leaves, index)
    assert outputs.merkle_verify(root, leaves[index], index, len(leaves), proof), "honest proof"
    forged = bytes(32) if leaves[index] != bytes(32) else b"\1" * 32
    assert not outputs.merkle_verify(root, forged, index, len(leaves), proof), "other leaf"
    if len(leaves) > 1:
        other = (index + 1) % len(leaves)
        if leaves[other] != leaves[index]:
            assert not outputs.merkle_verify(root, leaves[index], other, len(leaves), proof)
    assert not outputs.merkle_verify(root, leaves[index], index, len(leaves), (*proof, root))


def _sealed(plaintext: bytes) -> tuple[bytes, list[bytes], bytes, bytes, list[bytes]]:
    key, chunks, output_root, plain_root, plain_hashes = outputs.seal(JOB, plaintext, key=KEY)
    return key, list(chunks), output_root, plain_root, list(plain_hashes)


def test_check_sealed_refuses_what_does_not_match_the_roots() -> None:
    plaintext = b"x" * 3000
    _, chunks, output_root, plain_root, plain_hashes = _sealed(plaintext)
    size = len(plaintext)
    outputs.check_sealed(JOB, chunks, plain_hashes, output_root, plain_root, size)
    flipped = [chunks[0], bytes([chunks[1][0] ^ 1]) + chunks[1][1:], chunks[2]]
    with pytest.raises(outputs.OutputsError, match="output root"):
        outputs.check_sealed(JOB, flipped, plain_hashes, output_root, plain_root, size)
    with pytest.raises(outputs.OutputsError, match="3 chunks"):
        outputs.check_sealed(JOB, chunks[:2], plain_hashes[:2], output_root, plain_root, size)
    with pytest.raises(outputs.OutputsError, match="chunk 2 is 968 bytes, not 967"):
        outputs.check_sealed(JOB, chunks, plain_hashes, output_root, plain_root, size - 1)
    with pytest.raises(outputs.OutputsError, match="plain root"):
        outputs.check_sealed(JOB, chunks, plain_hashes, output_root, output_root, size)


def test_a_chunk_sealed_under_another_key_or_plaintext_is_caught_after_the_reveal() -> None:
    plaintext = b"y" * 2500
    key, chunks, _, _, plain_hashes = _sealed(plaintext)
    # A cheat seals chunk 1 under another key and commits honestly to the rest.
    other = outputs.seal(JOB, plaintext, key=bytes(32))[1]
    chunks[1] = other[1]
    assert outputs.open_sealed(JOB, key, chunks, plain_hashes) == 1, "first bad chunk"
    assert outputs.chunk_is_bad(JOB, key, 1, chunks[1], plain_hashes[1]), "evidence holds"
    assert not outputs.chunk_is_bad(JOB, key, 0, chunks[0], plain_hashes[0]), "good chunk"
    # A cheat claims a plaintext hash the chunk does not decrypt to.
    _, chunks, _, _, plain_hashes = _sealed(plaintext)
    plain_hashes[2] = hashlib.sha256(b"what the requester wanted").digest()
    assert outputs.open_sealed(JOB, key, chunks, plain_hashes) == 2, "hash mismatch caught"
    assert outputs.chunk_is_bad(JOB, key, 2, chunks[2], plain_hashes[2]), "evidence holds"
    # The job id is bound: chunks of another job do not open under this one.
    assert outputs.open_chunk(hashlib.sha256(b"other").digest(), key, 0, chunks[0]) is None
    assert outputs.open_sealed(JOB, b"short", chunks, plain_hashes) == 0, "a bad key opens nothing"
