"""The interface other packages program against: publishing events to RPC subscribers."""

from __future__ import annotations

from typing import Any, Protocol


class EventPublisherAPI(Protocol):
    """Hands events to WebSocket subscribers of a topic without ever blocking the caller."""

    def publish(self, topic: str, payload: Any) -> bool: ...
