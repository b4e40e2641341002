"""The gossip envelope codec: canonical round trip, rejection of anything else."""

from __future__ import annotations

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from p2p import EnvelopeError, SignatureInvalid, decode_envelope, encode_envelope, sign_envelope
from p2p._envelope import verify_envelope

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
LIMIT = 1 << 20


@given(
    chain=st.text(min_size=1, max_size=20),
    tag=st.text(max_size=30),
    payload=st.binary(max_size=2048),
    ts=st.integers(min_value=0, max_value=2**63 - 1),
)
def test_round_trip_is_canonical_and_verifies(
    chain: str, tag: str, payload: bytes, ts: int
) -> None:
    envelope = sign_envelope(KEY, chain, tag, payload, ts)
    data = encode_envelope(envelope)
    decoded = decode_envelope(data, bytes_max=LIMIT)
    assert decoded == envelope, "decode(encode(x)) must give x back"
    assert encode_envelope(decoded) == data, "re-encoding must reproduce the same bytes"
    verify_envelope(decoded)


def test_tampered_payload_fails_signature() -> None:
    envelope = sign_envelope(KEY, "c", "t", b"pay", 1)
    forged = type(envelope)(**{**_fields(envelope), "payload": b"PAY"})
    with pytest.raises(SignatureInvalid):
        verify_envelope(decode_envelope(encode_envelope(forged), bytes_max=LIMIT))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"a": 1}),
        msgpack.packb(["c", "t", "not bytes", b"k" * 32, 1, b"s" * 64], use_bin_type=True),
        msgpack.packb(["c", "t", b"p", b"short", 1, b"s" * 64], use_bin_type=True),
        msgpack.packb(["c", "t", b"p", b"k" * 32, -1, b"s" * 64], use_bin_type=True),
        msgpack.packb(["c", "t", b"p", b"k" * 32, True, b"s" * 64], use_bin_type=True),
    ],
)
def test_malformed_inputs_are_rejected(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode_envelope(data, bytes_max=LIMIT)


def test_non_canonical_integer_encoding_is_rejected() -> None:
    envelope = sign_envelope(KEY, "c", "t", b"p", 5)
    canonical = encode_envelope(envelope)
    # 5 as a uint64 (0xcf + 8 bytes) instead of a positive fixint: same value, other bytes.
    wide = canonical.replace(b"\x05\xc4@", b"\xcf" + (5).to_bytes(8, "big") + b"\xc4@")
    assert wide != canonical, "test setup: the wide encoding must differ"
    with pytest.raises(EnvelopeError):
        decode_envelope(wide, bytes_max=LIMIT)


def test_oversized_is_rejected_before_parsing() -> None:
    data = encode_envelope(sign_envelope(KEY, "c", "t", b"x" * 5000, 1))
    with pytest.raises(EnvelopeError):
        decode_envelope(data, bytes_max=4096)


def _fields(envelope: object) -> dict[str, object]:
    return {name: getattr(envelope, name) for name in envelope.__dataclass_fields__}  # type: ignore[attr-defined]


def test_config_rejects_a_seen_window_shorter_than_message_lifetime() -> None:
    from p2p import ConfigError, P2PConfig

    with pytest.raises(ConfigError, match="gossip_seen_ttl_s"):
        P2PConfig(gossip_seen_ttl_s=60, gossip_message_age_max_ms=60_000)
    with pytest.raises(ConfigError, match="listen_host"):
        P2PConfig(listen_host="0.0.0.0")
    with pytest.raises(ConfigError, match="bootstrap"):
        P2PConfig(bootstrap=("/ip4/127.0.0.1/tcp/1",))
