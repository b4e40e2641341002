"""Limits of the RPC server: one frozen, validated object."""

from __future__ import annotations

import dataclasses

from rpc.exceptions import ConfigError

mebibyte = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class RpcConfig:
    """Every bound the RPC server enforces. ``default()`` for nodes, ``for_tests()`` for tests."""

    request_body_bytes_max: int = mebibyte
    """An HTTP body or WebSocket message larger than this is refused (HTTP 413 / close 1009)."""
    batch_calls_max: int = 100
    """A batch with more entries is answered with one -32600 error."""
    requests_in_flight_max: int = 128
    """HTTP requests handled at once; beyond it a request gets HTTP 503 at once, not a queue."""
    calls_in_flight_max: int = 64
    """Method handlers running at once on the trio side (a trio CapacityLimiter)."""
    call_timeout_s: float = 30.0
    """A handler still running after this is cancelled and the call answered with -32003."""
    websocket_connections_max: int = 64
    """Open WebSocket connections; beyond it an upgrade gets HTTP 503."""
    websocket_calls_in_flight_max: int = 16
    """Calls in progress per WebSocket connection; the reader waits (backpressure) beyond it."""
    subscriptions_per_connection_max: int = 32
    """Subscriptions one WebSocket connection may hold; beyond it -32006."""
    subscriber_queue_messages_max: int = 256
    """Outgoing messages queued per connection; a subscriber that overflows it is dropped."""
    publish_backlog_max: int = 4096
    """Published events waiting to cross from trio to the HTTP thread; beyond it they are
    dropped and counted, so ``publish`` never blocks the daemon."""
    websocket_heartbeat_s: float = 30.0
    """Ping period on WebSocket connections; a peer that does not answer within half of it is
    closed, so a dead or wedged client does not hold a connection slot forever."""
    header_read_timeout_s: float = 10.0
    """A connection that has not sent a whole request head this long after it opened (or
    after its last response) is closed: half-open and slow-header connections cannot pile up."""
    body_read_timeout_s: float = 10.0
    """A request body not received in full within this is answered with HTTP 408 and the
    connection closed, so stalled bodies cannot hold the in-flight slots."""
    shutdown_timeout_s: float = 0.5
    """Grace for in-flight HTTP requests and WebSocket close handshakes at shutdown."""
    slow_close_timeout_s: float = 2.0
    """How long a dropped slow subscriber gets to take its close frame before the socket is cut."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"[rpc] {field.name} must be a positive number, got {value!r}")
        if self.publish_backlog_max < self.subscriber_queue_messages_max:
            raise ConfigError("[rpc] publish_backlog_max must be >= subscriber_queue_messages_max")

    @classmethod
    def default(cls) -> RpcConfig:
        return cls()

    @classmethod
    def for_tests(cls) -> RpcConfig:
        """Small caps so tests reach every limit with little traffic."""
        return cls(
            request_body_bytes_max=64 * 1024,
            batch_calls_max=10,
            requests_in_flight_max=16,
            calls_in_flight_max=16,
            call_timeout_s=5.0,
            websocket_connections_max=4,
            websocket_calls_in_flight_max=4,
            subscriptions_per_connection_max=3,
            subscriber_queue_messages_max=8,
            publish_backlog_max=4096,
            header_read_timeout_s=2.0,
            body_read_timeout_s=2.0,
            shutdown_timeout_s=0.5,
            slow_close_timeout_s=5.0,
        )

    def replace(self, **changes: int | float) -> RpcConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
