"""Structured logs, plain or JSON, with per-subsystem levels.

Subsystems are logger names: ``node``, ``p2p``, ``consensus``, ``ledger``, ``compute``, ``rpc``,
and ``libp2p`` (py-libp2p's own, which it sets to not propagate: we attach our handler to it).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

SUBSYSTEMS = ("node", "p2p", "consensus", "ledger", "compute", "rpc", "libp2p")
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value if isinstance(value, int | float | str | bool) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s")
        self.converter = time.gmtime
        self.default_time_format = "%Y-%m-%dT%H:%M:%S"
        self.default_msec_format = "%s.%03d"

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = {
            k: v
            for k, v in vars(record).items()
            if k not in _STANDARD_ATTRS and not k.startswith("_")
        }
        if extras:
            text += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return text


def parse_levels(spec: str) -> dict[str, int]:
    """``"info,p2p=debug"`` -> {"": INFO, "p2p": DEBUG}; raises ValueError naming the bad part."""
    levels: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, level = part.rpartition("=")
        value = logging.getLevelName(level.upper())
        if not isinstance(value, int):
            raise ValueError(f"unknown log level {level!r} in {spec!r}")
        levels[name] = value
    return levels


def setup_logging(fmt: str = "plain", levels: str = "info", stream: TextIO | None = None) -> None:
    parsed = parse_levels(levels)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(parsed.get("", logging.INFO))
    # py-libp2p logs routine disconnects at ERROR; keep it at WARNING-and-up unless asked.
    libp2p_level = parsed.get("libp2p", logging.CRITICAL)
    for name in SUBSYSTEMS:
        logger = logging.getLogger(name)
        logger.setLevel(parsed.get(name, libp2p_level if name == "libp2p" else root.level))
    libp2p = logging.getLogger("libp2p")
    libp2p.handlers[:] = [handler]
    libp2p.propagate = False
    for name, level in parsed.items():
        if name:
            logging.getLogger(name).setLevel(level)
