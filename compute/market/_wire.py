"""The market's wire: protocol names, decoding of what peers send, and the request barrier.

Decode, then validate, then act: every message from a peer goes through ``decode`` or
``decode_signed`` (bounded size, canonical codec, signature) before any role looks at it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, TypeVar

import ledger
from compute.exceptions import ComputeError
from compute.market.exceptions import MarketError, NetError
from compute.market.types import message_bytes_max, text_chars_max

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

log = logging.getLogger("gpumesh.compute.market")
T = TypeVar("T")

JOBS_PURPOSE = "jobs"
PROTOCOL_BID = "/gpumesh/market/bid/1"
PROTOCOL_AWARD = "/gpumesh/market/award/1"
PROTOCOL_INPUT = "/gpumesh/market/input/2"
"""Provider -> requester: one chunk of an input blob (``_blobs.BlobChunkAsk``)."""
PROTOCOL_INPUT_INDEX = "/gpumesh/market/input-index/1"
"""Provider -> requester: one page of an input blob's chunk index (``_blobs.BlobIndexAsk``)."""
PROTOCOL_OUTPUTS = "/gpumesh/market/outputs/1"
PROTOCOL_OUTPUT = "/gpumesh/market/output/1"
PROTOCOL_LOGS = "/gpumesh/market/logs/1"
"""Retired: plaintext outputs and logs were once served on these three; nothing serves them now
(outputs travel sealed, live logs on ``PROTOCOL_LOG_TAIL``). Tests and the simulation's
output grabber still ask them, to show that nothing answers before payment."""
PROTOCOL_CANCEL = "/gpumesh/market/cancel/1"
PROTOCOL_STATUS = "/gpumesh/market/status/1"
PROTOCOL_SEALED = "/gpumesh/market/sealed/2"
"""Requester -> provider: the provider's signed delivery of an attempt's sealed outputs."""
PROTOCOL_SEALED_CHUNKS = "/gpumesh/market/sealed-chunks/2"
"""Requester -> provider: a range of the sealed (encrypted) output chunks."""
PROTOCOL_DELIVERY_ACK = "/gpumesh/market/delivery-ack/1"
"""Requester -> provider: the requester's signed ack of a checked delivery."""
PROTOCOL_DELIVERED = "/gpumesh/market/delivered/1"
"""Provider -> requester: notice that an attempt's sealed outputs are ready."""
PROTOCOL_LOG_TAIL = "/gpumesh/market/log-tail/1"
"""Requester -> provider: a running attempt's stdout/stderr from two offsets (``_logs``)."""


class Mismatch(Exception):
    """A peer's bytes do not match what was promised (digest or size)."""


def decode_signed(cls: type[T], data: bytes, chain_id: str) -> T:
    """Decode a signed message and check its signature; ``NetError`` if either fails."""
    try:
        obj = ledger.decode(cls, data, max_bytes=message_bytes_max)
    except ledger.DecodeError as exc:
        raise NetError(f"malformed {cls.__name__}: {exc}") from exc
    if not ledger.verify_object(obj, chain_id):  # type: ignore[arg-type]
        raise NetError(f"{cls.__name__} signature does not verify")
    return obj


def decode(cls: type[T], data: bytes, bytes_max: int = message_bytes_max) -> T:
    try:
        return ledger.decode(cls, data, max_bytes=bytes_max)
    except ledger.DecodeError as exc:
        raise NetError(f"malformed {cls.__name__}: {exc}") from exc


def first_message(group: BaseExceptionGroup[BaseException]) -> str:
    """The first leaf of ``group`` as a reason a user can act on."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
        leaf = leaf.exceptions[0]
    if isinstance(leaf, MarketError | ComputeError):
        return (str(leaf) or type(leaf).__name__)[:text_chars_max]
    return f"{type(leaf).__name__}: {leaf}"[:text_chars_max]


def guarded(
    protocol: str,
    handler: Callable[[str, bytes], Awaitable[bytes]],
    counters: dict[str, int],
) -> Callable[[str, bytes], Awaitable[bytes]]:
    """The fault barrier of one request: a refusal (``MarketError``) goes back to the peer
    as its reason; anything else is logged with its traceback and answered with a generic
    error, and the node goes on serving. Cancellation passes through."""

    async def serve(peer_id: str, data: bytes) -> bytes:
        try:
            return await handler(peer_id, data)
        except MarketError:
            raise
        except Exception as exc:
            counters["handler_faults"] = counters.get("handler_faults", 0) + 1
            log.exception("handler %s failed on a request from %s", protocol, peer_id)
            raise NetError(f"internal error serving {protocol}") from exc

    return serve
