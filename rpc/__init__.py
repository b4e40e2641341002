"""JSON-RPC 2.0 on localhost: HTTP and WebSocket, bearer-cookie auth, method registry, client.

Where things live:
- ``_registry``: ``MethodRegistry`` (trio handlers grouped by namespace, with ``Param`` and
  ``Result`` schemas) and the OpenRPC document ``rpc_discover`` serves; the standard topics.
- ``_server``: ``RpcServer``, the trio service; it owns the HTTP thread, the cookie and port
  files, and runs method handlers in its own nursery.
- ``_app``: the asyncio side (aiohttp on its own thread): HTTP, WebSocket, subscriptions, auth
  and Host checks. asyncio never leaves this module.
- ``_protocol``: JSON-RPC framing and error codes, pure. ``_config``: ``RpcConfig`` limits.
- ``_client``: ``RpcClient``, synchronous, standard library only (for the CLI and scripts).
- ``_files``: atomic writes of the cookie (0600) and port (0644) files.
- ``_metrics``: what ``GET /metrics`` serves (the node's ``admin_metrics`` method) and how.
- ``_static``: the dashboard's files in ``static/``, served at ``/`` and ``/static/<name>``.
- ``abc``: ``EventPublisherAPI``. ``exceptions``: ``RpcException`` and its subclasses.

rpc imports nothing else of gpumesh: the node hands it handlers, and publishes events to it.
``RpcServer`` (and with it aiohttp and trio) is imported lazily, on first use: importing
``RpcClient`` stays cheap for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rpc._client import RpcClient
from rpc._config import RpcConfig
from rpc._files import COOKIE_FILE_NAME, PORT_FILE_NAME
from rpc._protocol import (
    CALL_TIMEOUT,
    CLOSE_SLOW_SUBSCRIBER,
    FORBIDDEN,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NOT_SUPPORTED,
    PARSE_ERROR,
    SERVER_BUSY,
    SHUTTING_DOWN,
    SUBSCRIPTION_LIMIT,
    UNAUTHORIZED,
)
from rpc._registry import (
    NAMESPACES,
    STANDARD_TOPICS,
    TOPIC_JOBS,
    TOPIC_NEW_HEADS,
    TOPIC_PEERS,
    Handler,
    JsonType,
    Method,
    MethodRegistry,
    Param,
    Result,
)
from rpc.abc import EventPublisherAPI
from rpc.exceptions import (
    ConfigError,
    RegistryError,
    RpcCallError,
    RpcError,
    RpcException,
    RpcTransportError,
    UnknownTopic,
)

if TYPE_CHECKING:
    from rpc._server import RpcServer, RpcStatistics


def __getattr__(name: str) -> Any:
    # The server pulls in aiohttp and trio (about 0.3 s of imports); a CLI that only needs
    # RpcClient should not pay for them, so the server is imported on first use.
    if name in ("RpcServer", "RpcStatistics"):
        from rpc import _server

        return getattr(_server, name)
    raise AttributeError(f"module 'rpc' has no attribute {name!r}")


__all__ = [
    "CALL_TIMEOUT",
    "CLOSE_SLOW_SUBSCRIBER",
    "COOKIE_FILE_NAME",
    "FORBIDDEN",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "NAMESPACES",
    "NOT_SUPPORTED",
    "PARSE_ERROR",
    "PORT_FILE_NAME",
    "SERVER_BUSY",
    "SHUTTING_DOWN",
    "STANDARD_TOPICS",
    "SUBSCRIPTION_LIMIT",
    "TOPIC_JOBS",
    "TOPIC_NEW_HEADS",
    "TOPIC_PEERS",
    "UNAUTHORIZED",
    "ConfigError",
    "EventPublisherAPI",
    "Handler",
    "JsonType",
    "Method",
    "MethodRegistry",
    "Param",
    "RegistryError",
    "Result",
    "RpcCallError",
    "RpcClient",
    "RpcConfig",
    "RpcError",
    "RpcException",
    "RpcServer",
    "RpcStatistics",
    "RpcTransportError",
    "UnknownTopic",
]
