"""Structured logs, plain or JSON, with per-subsystem levels.

Subsystems are the packages: ``node``, ``p2p``, ``consensus``, ``ledger``, ``compute``, ``rpc``,
plus ``libp2p`` (py-libp2p's own). A level for a subsystem applies to every logger of it,
whichever of the two names our packages use (``p2p`` and ``gpumesh.p2p``, ``compute`` and
``gpumesh.compute``...). Every record reaches the one handler on the root logger exactly once:
py-libp2p turns propagation off on import, so it is turned back on here and its own handlers
removed (the mesh leaves a logger that propagates alone).
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


library_prefix = "gpumesh."
"""The prefix our packages' loggers may carry (``gpumesh.p2p``); levels apply to both names."""
libp2p_level_default = logging.CRITICAL
"""py-libp2p logs routine disconnects and empty DHT reads at WARNING and ERROR: off unless
asked for (``libp2p=warning``)."""


def logger_names(subsystem: str) -> tuple[str, ...]:
    """The logger names a level for ``subsystem`` (or a dotted child of one) applies to."""
    if subsystem.split(".", 1)[0] == "libp2p" or subsystem.startswith(library_prefix):
        return (subsystem,)
    return (subsystem, library_prefix + subsystem)


def setup_logging(fmt: str = "plain", levels: str = "info", stream: TextIO | None = None) -> None:
    """One handler on the root logger; ``levels`` like ``"info,p2p=debug,libp2p=error"``."""
    parsed = parse_levels(levels)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(parsed.get("", logging.INFO))
    # Forget levels an earlier call (or a library) set, so this spec alone decides.
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger):
            continue
        ours = name.split(".", 1)[0] in SUBSYSTEMS or name.startswith(library_prefix)
        if ours:
            logger.setLevel(logging.NOTSET)
        if name == "libp2p" or name.startswith("libp2p."):
            logger.handlers[:] = []
            logger.propagate = True
            logger.setLevel(logging.NOTSET)
    libp2p = logging.getLogger("libp2p")
    libp2p.handlers[:] = []
    libp2p.propagate = True
    libp2p.setLevel(parsed.get("libp2p", libp2p_level_default))
    for name, level in parsed.items():
        for logger_name in logger_names(name) if name else ():
            logging.getLogger(logger_name).setLevel(level)
