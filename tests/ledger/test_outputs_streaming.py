"""The streaming pieces of sealed outputs agree with the in-memory ones: ``RootBuilder`` gives
``merkle_root``, ``merkle_proof_streaming`` gives ``merkle_proof`` for every shape, and the
chunk-at-a-time sealing gives ``seal``'s chunks and roots."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

import ledger

JOB = hashlib.sha256(b"streaming-job").digest()
KEY = bytes(range(32))


def _leaves(count: int) -> list[bytes]:
    return [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(count)]


def test_the_streamed_root_and_proofs_match_the_in_memory_tree_for_every_shape() -> None:
    for count in range(1, 130):
        leaves = _leaves(count)
        builder = ledger.RootBuilder()
        for leaf in leaves:
            builder.add(leaf)
        root = ledger.merkle_root(leaves)
        assert builder.root() == root, f"root of {count} leaves"
        read = leaves.__getitem__
        for index in range(count):
            proof = ledger.merkle_proof_streaming(lambda a, b, r=read: r(slice(a, b)), count, index)
            assert proof == ledger.merkle_proof(leaves, index), f"proof {index} of {count}"
            assert ledger.merkle_verify(root, leaves[index], index, count, proof)


def test_a_proof_reads_each_leaf_at_most_once() -> None:
    count, reads = 1000, [0]
    leaves = _leaves(count)

    def read(first: int, end: int) -> list[bytes]:
        reads[0] += end - first
        return leaves[first:end]

    ledger.merkle_proof_streaming(read, count, 617)
    assert reads[0] < count, f"{reads[0]} leaves read for one proof of {count}"


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=4 * ledger.output_chunk_bytes + 5))
def test_sealing_a_chunk_at_a_time_gives_seals_bytes_and_roots(plaintext: bytes) -> None:
    _, chunks, output_root, plain_root, plain_hashes = ledger.seal(JOB, plaintext, key=KEY)
    aead = ChaCha20Poly1305(KEY)
    outputs, plains = ledger.RootBuilder(), ledger.RootBuilder()
    size = ledger.output_chunk_bytes
    for i in range(ledger.chunk_count(len(plaintext))):
        plain = plaintext[i * size : (i + 1) * size]
        sealed = ledger.seal_chunk(aead, JOB, i, plain)
        assert sealed == chunks[i], f"chunk {i}"
        assert len(sealed) == ledger.sealed_chunk_bytes(len(plaintext), i)
        outputs.add(ledger.output_leaf(i, sealed, plain_hashes[i]))
        plains.add(ledger.plain_leaf(plain_hashes[i]))
    assert (outputs.root(), plains.root()) == (output_root, plain_root)
    assert ledger.sealed_bytes(len(plaintext)) == sum(len(c) for c in chunks)


def test_bulk_leaves_and_aligned_runs_give_the_same_root() -> None:
    for count in (1, 2, 3, 64, 100, 1024, 1025, 2500):
        leaves = _leaves(count)
        builder = ledger.RootBuilder()
        for start in range(0, count, 64):  # aligned runs of 64, the last one short
            builder.add_many(leaves[start : start + 64])
        assert builder.root() == ledger.merkle_root(leaves), f"{count} leaves in runs of 64"
        odd = ledger.RootBuilder()
        odd.add(leaves[0])
        odd.add_many(leaves[1:])  # not aligned: one at a time
        assert odd.root() == ledger.merkle_root(leaves), f"{count} leaves, unaligned"
    plain, ct = hashlib.sha256(b"p").digest(), b"c" * 40
    assert ledger.output_leaves_from(5, [ct], [plain]) == [ledger.output_leaf(5, ct, plain)]
    assert ledger.plain_leaves([plain]) == [ledger.plain_leaf(plain)]
    opener = ledger.chunk_opener(JOB, KEY)
    sealed = ledger.seal_chunk(ChaCha20Poly1305(KEY), JOB, 3, b"x")
    assert opener(3, sealed) == b"x" and opener(4, sealed) is None
    assert ledger.chunk_opener(JOB, b"short")(3, sealed) is None
