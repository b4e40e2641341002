"""Errors of the p2p package: one base, ``P2PError``, and a subclass per expected failure."""

from __future__ import annotations


class P2PError(Exception):
    """Raised when the p2p layer cannot do what was asked (base of every p2p error)."""


class ConfigError(P2PError, ValueError):
    """Raised when a ``P2PConfig`` value is out of range; the message names the key."""


class EnvelopeError(P2PError):
    """Raised when gossip bytes are not a canonical, well-formed envelope."""


class SignatureInvalid(EnvelopeError):
    """Raised when an envelope's signature does not verify against its sender key."""


class NotRunning(P2PError):
    """Raised when the mesh is used before ``run()`` has started it (or after it stopped)."""


class RequestError(P2PError):
    """Raised when a request/response exchange fails (base of the request errors)."""


class RequestTimeout(RequestError):
    """Raised when the peer does not answer a request within its timeout."""


class PeerUnreachable(RequestError):
    """Raised when no stream can be opened to the peer (not connected, refused, or gone)."""


class ProtocolUnsupported(RequestError):
    """Raised when the peer does not speak the requested protocol."""


class FrameTooLarge(RequestError):
    """Raised when a request or response exceeds its size limit."""


class RemoteError(RequestError):
    """Raised when the peer's handler failed or refused the request; carries its message."""


class StreamClosed(RequestError):
    """Raised when the peer closed or reset the stream before a whole frame arrived."""


class GossipTooLarge(P2PError):
    """Raised when a payload to publish would exceed ``gossip_message_bytes_max``."""
