"""Sealed job outputs: how a provider commits to its outputs before the requester may read them.

The provider's output bundle (plaintext bytes) is cut into ``output_chunk_bytes`` chunks; chunk
``i`` is sealed with ChaCha20-Poly1305 under a fresh 32-byte key, nonce ``i`` (12 bytes, big
endian) and the job id as associated data. Two Merkle roots commit to the result:

- ``output_root`` over leaves ``sha256(0x00 || i u64 BE || sha256(ct_i) || sha256(pt_i))``:
  binds every ciphertext chunk to the plaintext hash it claims to decrypt to;
- ``plain_root`` over leaves ``sha256(0x02 || sha256(pt_i))``: the plaintext alone, which two
  honest providers of the same job agree on while their ciphertexts differ (``--verify N``).

Both trees have the same shape: a binary tree over the leaves in order, an odd node at the end of
a level promoted unchanged, interior nodes ``sha256(0x01 || left || right)``. The requester checks
the ciphertext against both roots before it acknowledges the delivery (``check_sealed``); the
provider's settling receipt reveals the key; ``open_sealed`` then decrypts, and a chunk that does
not open to its committed plaintext hash is slash evidence (``chunk_proof`` + ``verify_chunk``).

Everything here is pure except ``seal``'s fresh key (pass ``key`` to make it deterministic).

Bundles of any size stream: ``RootBuilder`` computes a root incrementally in O(log n) memory
(the tree's shape is that of its perfect left subtrees folded from the right), ``seal_chunk``
and ``check_chunk_shape`` work one chunk at a time, and ``merkle_proof_streaming`` builds a
proof from any re-readable source of leaves (a file on disk) in O(log n) memory and one pass
over the leaves. The in-memory ``seal``, ``check_sealed`` and ``open_sealed`` give the same
roots and bytes as their streaming pieces.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ledger.exceptions import OutputsError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

output_chunk_bytes = 1024
"""Plaintext bytes per sealed chunk (the last one may be shorter)."""
seal_tag_bytes = 16
"""What ChaCha20-Poly1305 adds to each chunk."""
sealed_chunk_bytes_max = output_chunk_bytes + seal_tag_bytes
output_key_bytes = 32
output_bytes_max = 2**40
"""Largest output bundle a delivery may claim (1 TiB: 2**30 chunks, proofs of 30 hashes)."""
proof_hashes_max = 64
"""Longest Merkle proof accepted: far above what ``output_bytes_max`` needs."""

_LEAF = b"\x00"
_NODE = b"\x01"
_PLAIN_LEAF = b"\x02"


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def chunk_count(output_bytes: int) -> int:
    """How many chunks a bundle of ``output_bytes`` is cut into (an empty one is one chunk)."""
    return max(1, -(-output_bytes // output_chunk_bytes))


def chunk_plain_bytes(output_bytes: int, index: int) -> int:
    """The plaintext size of chunk ``index`` of a bundle of ``output_bytes``."""
    return min(output_chunk_bytes, output_bytes - index * output_chunk_bytes)


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


def output_leaf(index: int, ciphertext: bytes, plain_hash: bytes) -> bytes:
    """Leaf ``index`` of the output tree: the chunk's ciphertext bound to its plaintext hash."""
    return _sha256(_LEAF + index.to_bytes(8, "big") + _sha256(ciphertext) + plain_hash)


def plain_leaf(plain_hash: bytes) -> bytes:
    return _sha256(_PLAIN_LEAF + plain_hash)


def output_leaves_from(
    first: int, ciphertexts: Sequence[bytes], plain_hashes: Sequence[bytes]
) -> list[bytes]:
    """``output_leaf`` of chunks ``first, first + 1, ...`` (one call for a whole range)."""
    sha256, leaf = hashlib.sha256, _LEAF
    return [
        sha256(leaf + i.to_bytes(8, "big") + sha256(ct).digest() + h).digest()
        for i, ct, h in zip(
            range(first, first + len(ciphertexts)), ciphertexts, plain_hashes, strict=True
        )
    ]


def plain_leaves(plain_hashes: Sequence[bytes]) -> list[bytes]:
    """``plain_leaf`` of each plaintext hash."""
    sha256, prefix = hashlib.sha256, _PLAIN_LEAF
    return [sha256(prefix + h).digest() for h in plain_hashes]


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """The root of the binary tree over ``leaves`` (odd node promoted); needs one leaf."""
    assert leaves, "a Merkle tree needs at least one leaf"
    level = list(leaves)
    while len(level) > 1:
        paired = [_sha256(_NODE + level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


class RootBuilder:
    """A Merkle root (same tree as ``merkle_root``) over leaves added one at a time, keeping
    only the roots of the perfect subtrees so far: O(log n) memory for n leaves."""

    __slots__ = ("_peaks", "count")

    def __init__(self) -> None:
        self._peaks: list[tuple[int, bytes]] = []  # (height, root), heights strictly falling
        self.count = 0

    def add(self, leaf: bytes) -> None:
        height, node = 0, leaf
        peaks = self._peaks
        while peaks and peaks[-1][0] == height:
            _, left = peaks.pop()
            node = _sha256(_NODE + left + node)
            height += 1
        peaks.append((height, node))
        self.count += 1

    def add_many(self, leaves: Sequence[bytes]) -> None:
        """``add`` for each leaf; a power-of-two run starting at a multiple of its length is
        one perfect subtree, hashed level by level in bulk (the same root, fewer steps)."""
        size = len(leaves)
        if size < 2 or size & (size - 1) or self.count % size:
            for leaf in leaves:
                self.add(leaf)
            return
        sha256, node = hashlib.sha256, _NODE
        level = list(leaves)
        while len(level) > 1:
            pairs = zip(level[::2], level[1::2], strict=True)
            level = [sha256(node + a + b).digest() for a, b in pairs]
        height, top = size.bit_length() - 1, level[0]
        peaks = self._peaks
        while peaks and peaks[-1][0] == height:
            _, left = peaks.pop()
            top = _sha256(_NODE + left + top)
            height += 1
        peaks.append((height, top))
        self.count += size

    def root(self) -> bytes:
        """The root over every leaf added (needs one). An odd node promoted unchanged level
        by level is the same as folding the perfect subtrees' roots from the right."""
        assert self._peaks, "a Merkle tree needs at least one leaf"
        node = self._peaks[-1][1]
        for _, left in reversed(self._peaks[:-1]):
            node = _sha256(_NODE + left + node)
        return node


def merkle_root_streaming(leaves: Iterable[bytes]) -> bytes:
    builder = RootBuilder()
    for leaf in leaves:
        builder.add(leaf)
    return builder.root()


def merkle_proof_streaming(
    read_leaves: Callable[[int, int], Iterable[bytes]], count: int, index: int
) -> tuple[bytes, ...]:
    """``merkle_proof`` of leaf ``index`` of ``count``, where ``read_leaves(first, end)``
    yields leaves ``first..end-1`` (read again from disk for each sibling subtree). Each
    sibling is the root of an aligned range of leaves (the last range of a level may be
    short), so the proof costs one pass over the leaves and O(log n) memory."""
    assert 0 <= index < count, "no such leaf"
    proof: list[bytes] = []
    width, position, level_count = 1, index, count
    while level_count > 1:
        sibling = position ^ 1
        if sibling < level_count:
            first = sibling * width
            proof.append(merkle_root_streaming(read_leaves(first, min(first + width, count))))
        position //= 2
        level_count = (level_count + 1) // 2
        width *= 2
    return tuple(proof)


def merkle_proof(leaves: Sequence[bytes], index: int) -> tuple[bytes, ...]:
    """The sibling hashes from leaf ``index`` up to the root (a promoted node has none)."""
    assert 0 <= index < len(leaves), "no such leaf"
    proof: list[bytes] = []
    level = list(leaves)
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):
            proof.append(level[sibling])
        paired = [_sha256(_NODE + level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
        index //= 2
    return tuple(proof)


def merkle_verify(root: bytes, leaf: bytes, index: int, count: int, proof: Sequence[bytes]) -> bool:
    """Whether ``proof`` leads from ``leaf`` at ``index`` of ``count`` leaves to ``root``."""
    if not 0 <= index < count or len(proof) > proof_hashes_max:
        return False
    node, used = leaf, 0
    while count > 1:
        sibling = index ^ 1
        if sibling < count:
            if used == len(proof):
                return False
            other = proof[used]
            used += 1
            node = _sha256(_NODE + other + node) if index % 2 else _sha256(_NODE + node + other)
        index //= 2
        count = (count + 1) // 2
    return used == len(proof) and node == root


def _split(plaintext: bytes) -> list[bytes]:
    view = memoryview(plaintext)
    return [
        bytes(view[i : i + output_chunk_bytes])
        for i in range(0, max(len(plaintext), 1), output_chunk_bytes)
    ]


def seal_chunk(aead: ChaCha20Poly1305, job_id: bytes, index: int, plain: bytes) -> bytes:
    """Chunk ``index`` sealed (``aead`` is ``ChaCha20Poly1305(key)``)."""
    return aead.encrypt(_nonce(index), plain, job_id)


def sealed_offset(index: int) -> int:
    """Where sealed chunk ``index`` starts in the chunks laid end to end (only the last chunk
    may be short, so every earlier one is ``sealed_chunk_bytes_max``)."""
    return index * sealed_chunk_bytes_max


def sealed_bytes(output_bytes: int) -> int:
    """The size of a bundle's sealed chunks laid end to end."""
    return output_bytes + seal_tag_bytes * chunk_count(output_bytes)


def sealed_chunk_bytes(output_bytes: int, index: int) -> int:
    return max(chunk_plain_bytes(output_bytes, index), 0) + seal_tag_bytes


def seal(
    job_id: bytes, plaintext: bytes, *, key: bytes | None = None
) -> tuple[bytes, tuple[bytes, ...], bytes, bytes, tuple[bytes, ...]]:
    """Seal ``plaintext`` for ``job_id``: ``(key, ciphertext chunks, output_root, plain_root,
    plain hashes)``. The key is fresh random bytes unless given."""
    key = os.urandom(output_key_bytes) if key is None else key
    assert len(key) == output_key_bytes, "the key must be 32 bytes"
    aead = ChaCha20Poly1305(key)
    chunks = _split(plaintext)
    plain_hashes = tuple(_sha256(chunk) for chunk in chunks)
    sealed = tuple(aead.encrypt(_nonce(i), chunk, job_id) for i, chunk in enumerate(chunks))
    output_root = merkle_root(output_leaves(sealed, plain_hashes))
    plain_root = merkle_root([plain_leaf(h) for h in plain_hashes])
    return key, sealed, output_root, plain_root, plain_hashes


def output_leaves(ciphertexts: Sequence[bytes], plain_hashes: Sequence[bytes]) -> list[bytes]:
    return [
        output_leaf(i, ct, h)
        for i, (ct, h) in enumerate(zip(ciphertexts, plain_hashes, strict=True))
    ]


def check_sealed(
    job_id: bytes,
    ciphertexts: Sequence[bytes],
    plain_hashes: Sequence[bytes],
    output_root: bytes,
    plain_root: bytes,
    output_bytes: int,
) -> None:
    """What a requester checks before it acknowledges a delivery: every chunk is there, of the
    size ``output_bytes`` implies, and the chunks and plaintext hashes give both committed roots.
    Raises ``OutputsError`` naming the first problem. (``job_id`` is the associated data the
    key will need; the chunks cannot be checked against it before the key is known.)"""
    del job_id
    if not 0 <= output_bytes <= output_bytes_max:
        raise OutputsError(f"output_bytes {output_bytes} is out of range")
    count = chunk_count(output_bytes)
    if len(ciphertexts) != count or len(plain_hashes) != count:
        raise OutputsError(
            f"{len(ciphertexts)} chunks and {len(plain_hashes)} plain hashes for {count} chunks"
        )
    for i, (ct, plain_hash) in enumerate(zip(ciphertexts, plain_hashes, strict=True)):
        expected = max(chunk_plain_bytes(output_bytes, i), 0) + seal_tag_bytes
        if len(ct) != expected:
            raise OutputsError(f"chunk {i} is {len(ct)} bytes, not {expected}")
        if len(plain_hash) != 32:
            raise OutputsError(f"plain hash {i} is not 32 bytes")
    if merkle_root(output_leaves(ciphertexts, plain_hashes)) != output_root:
        raise OutputsError("the chunks do not match the delivery's output root")
    if merkle_root([plain_leaf(h) for h in plain_hashes]) != plain_root:
        raise OutputsError("the plain hashes do not match the delivery's plain root")


def open_chunk(job_id: bytes, key: bytes, index: int, ciphertext: bytes) -> bytes | None:
    """Chunk ``index`` decrypted with ``key``, or None when it does not open."""
    if len(key) != output_key_bytes:
        return None
    try:
        return ChaCha20Poly1305(key).decrypt(_nonce(index), ciphertext, job_id)
    except InvalidTag:
        return None


def chunk_opener(job_id: bytes, key: bytes) -> Callable[[int, bytes], bytes | None]:
    """``open_chunk`` with the key set up once: ``opener(index, ciphertext)``."""
    if len(key) != output_key_bytes:
        return lambda index, ciphertext: None
    decrypt = ChaCha20Poly1305(key).decrypt

    def opener(index: int, ciphertext: bytes) -> bytes | None:
        try:
            return decrypt(index.to_bytes(12, "big"), ciphertext, job_id)
        except InvalidTag:
            return None

    return opener


def chunk_is_bad(
    job_id: bytes, key: bytes, index: int, ciphertext: bytes, plain_hash: bytes
) -> bool:
    """Whether the revealed ``key`` fails chunk ``index``: it does not open, or opens to a
    plaintext whose hash is not the committed one. What a bad-key slash proves."""
    plaintext = open_chunk(job_id, key, index, ciphertext)
    return plaintext is None or _sha256(plaintext) != plain_hash


def open_sealed(
    job_id: bytes, key: bytes, ciphertexts: Sequence[bytes], plain_hashes: Sequence[bytes]
) -> bytes | int:
    """The plaintext bundle, or the index of the first chunk that does not open to its
    committed plaintext hash (evidence for a bad-key slash)."""
    if len(key) != output_key_bytes:
        return 0
    aead = ChaCha20Poly1305(key)
    parts: list[bytes] = []
    for i, (ct, plain_hash) in enumerate(zip(ciphertexts, plain_hashes, strict=True)):
        try:
            chunk = aead.decrypt(_nonce(i), ct, job_id)
        except InvalidTag:
            return i
        if _sha256(chunk) != plain_hash:
            return i
        parts.append(chunk)
    return b"".join(parts)
