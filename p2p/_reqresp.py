"""Request/response over libp2p streams: one stream per request, length-prefixed frames.

Wire format, both directions: a 4-byte big-endian length, then that many bytes. A response
frame starts with a status byte (0 = ok, 1 = the handler failed; the rest is a UTF-8 reason).
Sizes are checked from the length prefix before anything is read, so a peer cannot make us
buffer more than the limit. Inbound streams beyond ``inbound_streams_max`` in all, or beyond
``inbound_streams_per_peer_max`` from one peer, are reset at once rather than queued (and
counted, per peer), so a flood cannot pin memory and one peer cannot starve the others.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.host.exceptions import StreamFailure
from libp2p.peer.id import ID
from libp2p.protocol_muxer.exceptions import MultiselectClientError, ProtocolNotSupportedError

from p2p.exceptions import (
    FrameTooLarge,
    PeerUnreachable,
    ProtocolUnsupported,
    RemoteError,
    RequestError,
    RequestTimeout,
    StreamClosed,
)
from p2p.types import PeerId

if TYPE_CHECKING:
    from libp2p.abc import IHost, INetStream

logger = logging.getLogger("gpumesh.p2p.reqresp")

Handler = Callable[[PeerId, bytes], Awaitable[bytes]]
"""An inbound request handler: (requesting peer, request bytes) -> response bytes."""

length_prefix_bytes = 4
status_ok = 0
status_error = 1
error_reason_bytes_max = 512
handler_timeout_s = 30.0
refused_peers_tracked_max = 1_024


async def _read_exactly(stream: INetStream, count: int) -> bytes:
    chunks: list[bytes] = []
    remaining = count
    # Each read returns at least one byte or signals EOF, so this loop ends within `count`.
    while remaining > 0:
        chunk = await stream.read(remaining)
        if not chunk:
            raise StreamClosed(f"stream ended with {remaining} of {count} bytes unread")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


async def read_frame(stream: INetStream, bytes_max: int) -> bytes:
    header = await _read_exactly(stream, length_prefix_bytes)
    length = int.from_bytes(header, "big")
    if length > bytes_max:
        raise FrameTooLarge(f"frame of {length} bytes exceeds limit {bytes_max}")
    return await _read_exactly(stream, length) if length else b""


async def write_frame(stream: INetStream, body: bytes) -> None:
    await stream.write(len(body).to_bytes(length_prefix_bytes, "big") + body)


class RequestResponse:
    """Handlers for inbound requests and the ``request`` call for outbound ones."""

    def __init__(
        self,
        host: IHost,
        *,
        request_bytes_max: int,
        response_bytes_max: int,
        inbound_streams_max: int,
        inbound_streams_per_peer_max: int,
    ) -> None:
        self._host = host
        self._request_bytes_max = request_bytes_max
        self._response_bytes_max = response_bytes_max
        self._inbound = trio.Semaphore(inbound_streams_max)
        self._per_peer_max = inbound_streams_per_peer_max
        self._inbound_of: dict[PeerId, int] = {}
        self._refused_of: dict[PeerId, int] = {}
        self._handlers: dict[str, Handler] = {}
        self.inbound_refused_busy = 0
        self.inbound_refused_peer_busy = 0
        self.inbound_failed = 0
        self.inbound_served = 0

    def set_handler(self, protocol: str, handler: Handler) -> None:
        """Serve ``protocol`` (e.g. ``/gpumesh/<chain>/bid/1``) with ``handler``."""
        self._handlers[protocol] = handler

        async def on_stream(stream: INetStream) -> None:
            await self._serve(protocol, stream)

        self._host.set_stream_handler(TProtocol(protocol), on_stream)

    def statistics(self) -> dict[str, object]:
        return {
            "inbound_served": self.inbound_served,
            "inbound_failed": self.inbound_failed,
            "inbound_refused_busy": self.inbound_refused_busy,
            "inbound_refused_peer_busy": self.inbound_refused_peer_busy,
            "inbound_in_flight_by_peer": dict(self._inbound_of),
            "inbound_refused_by_peer": dict(self._refused_of),
        }

    def _refuse(self, peer: PeerId) -> None:
        if peer in self._refused_of or len(self._refused_of) < refused_peers_tracked_max:
            self._refused_of[peer] = self._refused_of.get(peer, 0) + 1

    async def _serve(self, protocol: str, stream: INetStream) -> None:
        peer = PeerId(stream.muxed_conn.peer_id.to_base58())
        held = self._inbound_of.get(peer, 0)
        if held >= self._per_peer_max:
            self.inbound_refused_peer_busy += 1
            self._refuse(peer)
            await _reset_quietly(stream)
            return
        try:
            self._inbound.acquire_nowait()
        except trio.WouldBlock:
            self.inbound_refused_busy += 1
            self._refuse(peer)
            await _reset_quietly(stream)
            return
        self._inbound_of[peer] = held + 1
        try:
            with trio.fail_after(handler_timeout_s):
                request = await read_frame(stream, self._request_bytes_max)
                handler = self._handlers[protocol]
                try:
                    response = await handler(peer, request)
                except RequestError as exc:
                    await self._reply_error(stream, str(exc))
                    return
                except Exception as exc:
                    # A handler bug must not take the node down; the caller learns the
                    # reason and the log keeps the traceback.
                    logger.exception("handler for %s failed on a request from %s", protocol, peer)
                    await self._reply_error(stream, f"{type(exc).__name__}: {exc}")
                    return
                if len(response) + 1 > self._response_bytes_max:
                    await self._reply_error(stream, "response exceeds the size limit")
                    return
                await write_frame(stream, bytes([status_ok]) + response)
                self.inbound_served += 1
                await stream.close()
        except (RequestError, BaseLibp2pError, trio.TooSlowError) as exc:
            self.inbound_failed += 1
            logger.debug("inbound %s request from %s failed: %s", protocol, peer, exc)
            await _reset_quietly(stream)
        finally:
            self._inbound.release()
            left = self._inbound_of[peer] - 1
            if left:
                self._inbound_of[peer] = left
            else:
                del self._inbound_of[peer]

    async def _reply_error(self, stream: INetStream, reason: str) -> None:
        self.inbound_failed += 1
        encoded = reason.encode("utf-8", "replace")[:error_reason_bytes_max]
        await write_frame(stream, bytes([status_error]) + encoded)
        await stream.close()

    async def request(
        self, peer_id: PeerId, protocol: str, payload: bytes, timeout_s: float
    ) -> bytes:
        """Send ``payload`` to ``peer_id`` on ``protocol`` and return the response bytes."""
        if len(payload) > self._request_bytes_max:
            raise FrameTooLarge(
                f"request of {len(payload)} bytes exceeds limit {self._request_bytes_max}"
            )
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError("timeout_s must be a positive finite number")
        try:
            remote = ID.from_base58(peer_id)
        except (ValueError, BaseLibp2pError) as exc:
            raise PeerUnreachable(f"not a peer id: {peer_id!r}") from exc
        stream: INetStream | None = None
        try:
            with trio.fail_after(timeout_s):
                try:
                    stream = await self._host.new_stream(remote, [TProtocol(protocol)])
                except StreamFailure as exc:
                    cause = exc.__cause__
                    # 0.8.1 wraps the peer's "na" as a MultiselectClientError with this text.
                    if isinstance(cause, ProtocolNotSupportedError) or (
                        isinstance(cause, MultiselectClientError) and "not supported" in str(cause)
                    ):
                        raise ProtocolUnsupported(f"{peer_id} does not serve {protocol}") from exc
                    raise PeerUnreachable(f"cannot open {protocol} to {peer_id}: {exc}") from exc
                except BaseLibp2pError as exc:
                    raise PeerUnreachable(f"cannot open {protocol} to {peer_id}: {exc}") from exc
                try:
                    await write_frame(stream, payload)
                    frame = await read_frame(stream, self._response_bytes_max)
                except BaseLibp2pError as exc:
                    raise StreamClosed(f"{protocol} stream to {peer_id} failed: {exc}") from exc
        except trio.TooSlowError:
            if stream is not None:
                await _reset_quietly(stream)
            raise RequestTimeout(f"{protocol} to {peer_id}: no answer in {timeout_s} s") from None
        except RequestError:
            if stream is not None:
                await _reset_quietly(stream)
            raise
        await _close_quietly(stream)
        if not frame:
            raise StreamClosed(f"{protocol} to {peer_id}: empty response frame")
        if frame[0] == status_ok:
            return frame[1:]
        raise RemoteError(frame[1:].decode("utf-8", "replace"))


async def _reset_quietly(stream: INetStream) -> None:
    # The stream is already broken or abandoned; a failing reset has nothing left to tell us.
    with trio.move_on_after(1):
        try:
            await stream.reset()
        except BaseLibp2pError as exc:
            logger.debug("stream reset failed: %s", exc)


async def _close_quietly(stream: INetStream) -> None:
    with trio.move_on_after(1):
        try:
            await stream.close()
        except BaseLibp2pError as exc:
            logger.debug("stream close failed: %s", exc)
