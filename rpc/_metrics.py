"""``GET /metrics``: the Prometheus text exposition, served like any other path.

rpc knows nothing of what the node measures: the node registers ``admin_metrics`` (a method
that returns the exposition text), and the HTTP side answers ``GET /metrics`` by running it on
the trio side, where the services' counters are consistent, then sending the text as
Prometheus expects it. The bearer token is required as on every path (Prometheus sends it
with ``authorization: {credentials_file: ...}``).
"""

from __future__ import annotations

from typing import Final

METRICS_METHOD: Final = "admin_metrics"
"""The method the node registers; its result is the exposition text (a JSON string)."""
METRICS_PATH: Final = "/metrics"
metrics_content_type: Final = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text format 0.0.4 (what prometheus_client's ``CONTENT_TYPE_LATEST`` is)."""
