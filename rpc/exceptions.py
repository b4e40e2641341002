"""Errors raised by the rpc package."""

from __future__ import annotations

from typing import Any


class RpcException(Exception):
    """Base class of every error the rpc package raises on purpose."""


class RpcError(RpcException):
    """Raised by a method handler to answer a call with a JSON-RPC error object.

    ``data`` must be JSON-serialisable; it is sent as the error's ``data`` member.
    """

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class RpcCallError(RpcException):
    """Raised by ``RpcClient`` when the server answers a call with a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.data = data


class RpcTransportError(RpcException, OSError):
    """Raised by ``RpcClient`` when the server cannot be reached or answers with something that
    is not a JSON-RPC response (it is an ``OSError``, like the connection errors beside it)."""


class RegistryError(RpcException):
    """Raised when a method or topic registration is malformed; the message names what."""


class ConfigError(RpcException):
    """Raised when an ``RpcConfig`` value is out of range; the message names ``[rpc] key``."""


class UnknownTopic(RpcException):
    """Raised when ``publish`` names a topic that was never registered."""
