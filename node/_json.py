"""Ledger and wire objects as JSON for RPC answers: bytes as hex, enums by name."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


def to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return out
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple | list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {(k.hex() if isinstance(k, bytes) else str(k)): to_json(v) for k, v in value.items()}
    return value


def hex_bytes(text: Any, name: str, length: int | None = None) -> bytes:
    """Parse a hex parameter (optional 0x prefix); ValueError names the parameter."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a hex string")
    try:
        data = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise ValueError(f"{name} is not valid hex") from None
    if length is not None and len(data) != length:
        raise ValueError(f"{name} must be {length} bytes ({2 * length} hex digits)")
    return data
