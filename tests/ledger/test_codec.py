from __future__ import annotations

import dataclasses
from typing import ClassVar

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger import DecodeError, SigningKey, decode, encode, sign_object, verify_object


@dataclasses.dataclass(frozen=True)
class Inner:
    name: str
    blob: bytes


@dataclasses.dataclass(frozen=True)
class Outer:
    TYPE_TAG: ClassVar[str] = "test/outer"
    amount: int
    flag: bool
    inners: tuple[Inner, ...]
    note: str | None
    signer: bytes = b""
    signature: bytes = b""


outers = st.builds(
    Outer,
    amount=st.integers(min_value=-(2**63), max_value=2**64 - 1),
    flag=st.booleans(),
    inners=st.lists(st.builds(Inner, st.text(), st.binary()), max_size=4).map(tuple),
    note=st.none() | st.text(),
)


@given(outers)
def test_round_trip(value: Outer) -> None:
    assert decode(Outer, encode(value)) == value


def test_rejects_wrong_types_and_garbage() -> None:
    good = encode(Outer(1, True, (), None))
    with pytest.raises(DecodeError, match="expected int"):
        decode(Outer, msgpack.packb(["1", True, [], None, b"", b""]))
    with pytest.raises(DecodeError, match="expected int"):
        decode(Outer, msgpack.packb([True, True, [], None, b"", b""]))
    with pytest.raises(DecodeError):
        decode(Outer, good[:-1])
    with pytest.raises(DecodeError):
        decode(Outer, good + b"\x00")
    with pytest.raises(DecodeError, match="exceeds the cap"):
        decode(Outer, good, max_bytes=3)


def test_rejects_non_canonical_integer_width() -> None:
    # 1 encoded as a uint64 instead of a positive fixint: same value, different bytes.
    wide = b"\x96" + b"\xcf" + (1).to_bytes(8, "big") + b"\xc3\x90\xc0\xc4\x00\xc4\x00"
    with pytest.raises(DecodeError, match="canonical"):
        decode(Outer, wide)


def test_signature_binds_chain_and_type() -> None:
    key = SigningKey.generate()
    obj = sign_object(Outer(5, False, (), "x"), key, "chain-a")
    assert obj.signer == key.address
    assert verify_object(obj, "chain-a")
    assert not verify_object(obj, "chain-b")
    assert not verify_object(dataclasses.replace(obj, amount=6), "chain-a")

    @dataclasses.dataclass(frozen=True)
    class Other(Outer):
        TYPE_TAG: ClassVar[str] = "test/other"

    assert not verify_object(
        Other(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}), "chain-a"
    )
