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
