"""A job's logs over RPC: ``job_logs`` (from offsets) and the ``jobLogs`` WebSocket topic.

``job_logs`` answers what the requester holds of a job's stdout and stderr from two offsets
(the sealed logs once the outputs are opened, else the live tail) and, for a job still
running, is the opt-in that makes the node pull its live logs (``compute.market._logs``).
Every new chunk is then published on ``jobLogs``; a client follows with both: subscribe,
read from offset 0, apply pushed chunks at their offsets, re-read on a gap.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from compute import market
from node._chain_rpc import hex_param
from node._market import JOB_NOT_FOUND, JOB_NOT_READY
from rpc import INVALID_PARAMS, Param, Result, RpcError

if TYPE_CHECKING:
    from rpc import MethodRegistry, RpcServer

TOPIC_JOB_LOGS = "jobLogs"
job_logs_bytes_max = 1024 * 1024
"""Most bytes of each stream one ``job_logs`` answer carries (a follower pages on)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def view_json(view: market.LogsView) -> dict[str, Any]:
    return {
        "job_id": view.job_id.hex(),
        "state": view.state,
        "source": view.source,
        "generation": view.generation,
        "ended": view.ended,
        "stdout": _b64(view.stdout),
        "stdout_offset": view.stdout_offset,
        "stdout_size": view.stdout_size,
        "stderr": _b64(view.stderr),
        "stderr_offset": view.stderr_offset,
        "stderr_size": view.stderr_size,
    }


def event_json(event: market.LogEvent) -> dict[str, Any]:
    return {
        "job_id": event.job_id.hex(),
        "generation": event.generation,
        "stream": event.stream or None,
        "offset": event.offset,
        "data": _b64(event.data),
        "ended": event.ended,
        "state": event.state,
    }


def register_log_methods(registry: MethodRegistry, service: market.MarketService) -> None:
    registry.add_topic(
        TOPIC_JOB_LOGS,
        "New stdout/stderr bytes of followed jobs: {job_id, generation, stream, offset, data "
        "(base64), ended, state}; stream null with ended: the job ended; stream null without: "
        "its tail started over (read again from 0).",
    )

    async def job_logs(
        job_id: str, stdout_offset: int = 0, stderr_offset: int = 0, bytes_max: int = 0
    ) -> dict[str, Any]:
        if min(stdout_offset, stderr_offset, bytes_max) < 0:
            raise RpcError(INVALID_PARAMS, "offsets and bytes_max must be >= 0")
        room = min(bytes_max or job_logs_bytes_max, job_logs_bytes_max)
        try:
            view = await service.logs(
                hex_param(job_id, "job_id"), stdout_offset, stderr_offset, room
            )
        except market.UnknownJob:
            raise RpcError(JOB_NOT_FOUND, "no such job requested from this node") from None
        except market.MarketError as exc:
            raise RpcError(JOB_NOT_READY, str(exc)) from None
        return view_json(view)

    registry.register(
        "job_logs",
        job_logs,
        description="A requested job's stdout and stderr (base64) from two offsets: the sealed "
        "logs once its outputs are opened, else the live tail pulled from the provider; asking "
        "for a running job's logs makes the node follow it (new bytes go out on jobLogs).",
        params=(
            Param("job_id", "string", True, "Job id, hex string of 32 bytes."),
            Param("stdout_offset", "integer", False, "Read stdout from this byte."),
            Param("stderr_offset", "integer", False, "Read stderr from this byte."),
            Param("bytes_max", "integer", False, "At most this much of each (0: 1 MiB)."),
        ),
        result=Result("object", "state, source, generation, ended, and per stream the bytes."),
    )


async def forward_job_logs(service: market.MarketService, server: RpcServer) -> None:
    """Publish every live-log chunk on ``jobLogs`` (``publish`` never blocks)."""
    async with service.subscribe_logs() as events:
        async for event in events:
            server.publish(TOPIC_JOB_LOGS, event_json(event))
