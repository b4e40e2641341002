"""The job market in the node: p2p and chain adapters for compute.market, and its RPC methods."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from compute import market
from ledger import MempoolRejected
from node._chain_rpc import hex_param
from node._json import to_json
from p2p import P2PError, PeerId, RequestError, Verdict
from rpc import INVALID_PARAMS, Param, Result, RpcError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from trio_typing import TaskStatus

    from ledger import Account, ChainParams, Receipt, Trade, Transaction
    from node._chain import ChainService
    from p2p import GossipMessage, Mesh
    from rpc import MethodRegistry

log = logging.getLogger("node.market")

incoming_queue_max = 1024
jobs_peer_rate_per_s = 50.0
"""Job requests one peer may relay per second (a busy requester sends a few per job)."""
jobs_peer_burst = 200
JOB_NOT_FOUND = -32020
JOB_UNSATISFIABLE = -32021
JOB_NOT_READY = -32022
JOB_REJECTED = -32023
submit_call_timeout_s = 3600.0


class MeshNet(market.MarketNetAPI):
    """compute.market's view of the p2p mesh."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self.local_peer_id = mesh.peer_id
        self._pumps: list[tuple[trio.MemoryReceiveChannel[GossipMessage], Any]] = []
        self._nursery: trio.Nursery | None = None
        self.dropped = 0

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for source, sink in self._pumps:
                nursery.start_soon(self._pump, source, sink)
            task_status.started()
            await trio.sleep_forever()  # subscribe() adds pumps to this nursery later

    async def publish(self, purpose: str, type_tag: str, payload: bytes) -> None:
        try:
            await self._mesh.publish(purpose, type_tag, payload)
        except P2PError as exc:
            raise market.NetError(str(exc)) from exc

    def subscribe(self, purpose: str) -> trio.MemoryReceiveChannel[market.Incoming]:
        return self._pipe(self._mesh.subscribe(purpose))

    def _pipe(
        self, source: trio.MemoryReceiveChannel[GossipMessage]
    ) -> trio.MemoryReceiveChannel[market.Incoming]:
        send, receive = trio.open_memory_channel[market.Incoming](incoming_queue_max)
        if self._nursery is None:
            self._pumps.append((source, send))
        else:
            self._nursery.start_soon(self._pump, source, send)
        return receive

    async def _pump(
        self,
        source: trio.MemoryReceiveChannel[GossipMessage],
        sink: trio.MemorySendChannel[market.Incoming],
    ) -> None:
        async with source, sink:
            async for m in source:
                incoming = market.Incoming(
                    m.sender_public_key, m.sender_peer_id, m.type_tag, m.payload
                )
                try:
                    sink.send_nowait(incoming)
                except trio.WouldBlock:
                    # The market is behind: gossip is best effort and a blocked pump would
                    # only move the drop into the mesh's queue. Requesters re-send requests.
                    self.dropped += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the subscriber went away

    def subscribe_validated(
        self, purpose: str, validator: Callable[[market.Incoming], bool | None]
    ) -> trio.MemoryReceiveChannel[market.Incoming]:
        def check(m: GossipMessage) -> Verdict:
            incoming = market.Incoming(m.sender_public_key, m.sender_peer_id, m.type_tag, m.payload)
            try:
                verdict = validator(incoming)
            except Exception:
                # Our bug, not the peer's fault: drop the message without blame.
                log.exception("the %s validator broke on a message", purpose)
                return Verdict.IGNORE
            if verdict is None:
                return Verdict.IGNORE
            return Verdict.ACCEPT if verdict else Verdict.REJECT

        source = self._mesh.subscribe(
            purpose, check, peer_rate_per_s=jobs_peer_rate_per_s, peer_burst=jobs_peer_burst
        )
        return self._pipe(source)

    def set_handler(self, protocol: str, handler: Callable[[str, bytes], Awaitable[bytes]]) -> None:
        async def serve(peer: PeerId, request: bytes) -> bytes:
            try:
                return await handler(peer, request)
            except market.MarketError as exc:
                raise RequestError(str(exc)) from exc

        self._mesh.set_handler(protocol, serve)

    async def request(self, peer_id: str, protocol: str, payload: bytes, timeout_s: float) -> bytes:
        try:
            return await self._mesh.request(PeerId(peer_id), protocol, payload, timeout_s)
        except P2PError as exc:
            raise market.NetError(str(exc)) from exc


class LedgerChain(market.ChainAPI):
    """compute.market's view of the chain service."""

    def __init__(self, chain: ChainService) -> None:
        self._chain = chain

    async def submit(self, tx_builder: Callable[[int], Transaction]) -> bytes:
        tx = tx_builder(self._chain.next_nonce(self._chain.key.address))
        try:
            return await self._chain.submit(tx)
        except MempoolRejected as exc:
            raise market.ChainRejected(str(exc)) from exc

    def trade(self, job_id: bytes) -> Trade | None:
        return self._chain.trade(job_id)

    def receipt(self, job_id: bytes) -> Receipt | None:
        record = self._chain.receipt(job_id)
        return None if record is None else record.receipt

    def account(self, address: bytes) -> Account:
        return self._chain.account(address)

    def head(self) -> tuple[int, int]:
        return self._chain.head()

    def params(self) -> ChainParams:
        return self._chain.params

    async def wait_new_block(self) -> int:
        return await self._chain.wait_new_block()

    def tx_result(self, tx_hash: bytes) -> tuple[bool, bool, str] | None:
        status = self._chain.tx_status(tx_hash)
        if status.state == "committed":
            return True, status.ok, status.error
        if status.state == "pending":
            return False, False, ""
        return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class OutputsExportError(Exception):
    """Raised when a job's outputs cannot be copied where asked (the reason says why)."""


def export_outputs(view: market.JobResultView, dest: Path) -> list[str]:
    """Copy the job's output files from the node's outputs directory into ``dest`` (blocking).
    Each file goes to a temporary name first, renamed once whole; on any failure (a full
    disk included) the files copied so far by this call are removed again."""
    source = Path(view.output_dir)
    total = sum(f.size_bytes for f in view.files)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest).free
    except OSError as exc:
        raise OutputsExportError(f"cannot write to {dest}: {exc}") from None
    if free < total:
        raise OutputsExportError(f"{dest} has {free} bytes free; the outputs need {total}")
    root = dest.resolve()
    written: list[Path] = []
    tmp: Path | None = None
    try:
        for file in view.files:
            target = (root / file.path).resolve()
            if root not in target.parents:
                raise OutputsExportError(f"refusing to write output {file.path!r} outside {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            if (source / file.path).exists():
                shutil.copyfile(source / file.path, tmp)
            else:  # a small job done before outputs went to disk: inline only
                tmp.write_bytes(view.outputs[file.path])
            tmp.replace(target)
            tmp = None
            written.append(target)
    except (OSError, KeyError) as exc:
        for path in [*written, *([tmp] if tmp is not None else [])]:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise OutputsExportError(f"the outputs could not be copied to {dest}: {exc}") from None
    return [file.path for file in view.files]


def _job_id(text: Any) -> bytes:
    return hex_param(text, "job_id")


def _version(text: Any, name: str) -> tuple[int, int]:
    if text in (None, ""):
        return (0, 0)
    parts = str(text).split(".")
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
        raise RpcError(INVALID_PARAMS, f"{name} must look like 12.1")
    return int(parts[0]), int(parts[1]) if len(parts) == 2 else 0


def _role(text: Any) -> market.Role | None:
    if text in (None, "", "all"):
        return None
    if text not in ("requester", "provider"):
        raise RpcError(INVALID_PARAMS, 'role must be "requester", "provider" or "all"')
    return market.Role.REQUESTER if text == "requester" else market.Role.PROVIDER


def register_market_methods(registry: MethodRegistry, service: market.MarketService) -> None:
    def find(job_id: Any, role: Any = None) -> market.JobRecord:
        raw = _job_id(job_id)
        roles = (
            [_role(role)]
            if role not in (None, "", "all")
            else [market.Role.REQUESTER, market.Role.PROVIDER]
        )
        for r in roles:
            try:
                return service.get(raw, r or market.Role.REQUESTER)
            except market.UnknownJob:
                continue
        raise RpcError(JOB_NOT_FOUND, f"no job {raw.hex()} on this node")

    async def job_submit(
        argv: list[str],
        max_price_per_gpu_second: int,
        inputs: dict[str, str] | None = None,
        input_paths: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        gpus: int = 0,
        min_vram_bytes: int = 0,
        model: str = "",
        min_compute_capability: str = "",
        min_cuda_version: str = "",
        max_wall_ms: int = 60_000,
        deadline_ms: int = 0,
        bid_window_ms: int = 0,
        strategy: str = "cheapest",
        sandbox: str = "",
        memory_bytes: int = 0,
        disk_bytes: int = 0,
        verify: int = 1,
        outputs_bytes_max: int = market.outputs_bytes_default,
        image: str = "",
    ) -> dict[str, Any]:
        try:
            decoded_inputs = tuple(
                (name, base64.b64decode(data, validate=True))
                for name, data in (inputs or {}).items()
            )
        except (ValueError, TypeError) as exc:
            raise RpcError(INVALID_PARAMS, f"inputs must map names to base64: {exc}") from None
        if not all(isinstance(a, str) for a in argv):
            raise RpcError(INVALID_PARAMS, "argv must be a list of strings")
        paths = tuple((input_paths or {}).items())
        if not all(isinstance(n, str) and isinstance(p, str) for n, p in paths):
            raise RpcError(INVALID_PARAMS, "input_paths must map names to absolute paths")
        try:
            requirements = market.Requirements(
                gpus=gpus,
                min_vram_bytes=min_vram_bytes,
                model=model,
                min_compute_capability=_version(min_compute_capability, "min_compute_capability"),
                min_cuda_version=_version(min_cuda_version, "min_cuda_version"),
                sandbox=sandbox,
                memory_bytes=memory_bytes,
                disk_bytes=disk_bytes,
            )
        except ValueError as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from None
        submission = market.JobSubmission(
            argv=tuple(argv),
            inputs=decoded_inputs,
            input_paths=paths,
            env=tuple(sorted((env or {}).items())),
            requirements=requirements,
            max_price_per_gpu_second=max_price_per_gpu_second,
            max_wall_ms=max_wall_ms,
            deadline_ms=deadline_ms,
            bid_window_ms=bid_window_ms,
            strategy=strategy,
            verify=verify,
            outputs_bytes_max=outputs_bytes_max,
            image=str(image),
        )
        try:
            record = await service.submit(submission)
        except market.Unsatisfiable as exc:
            raise RpcError(JOB_UNSATISFIABLE, str(exc)) from None
        except market.InvalidSubmission as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from None
        return dict(record.to_json())

    async def job_status(job_id: str, role: str | None = None) -> dict[str, Any]:
        return dict(find(job_id, role).to_json())

    async def job_list(role: str | None = None) -> list[dict[str, Any]]:
        return [dict(r.to_json()) for r in service.list(_role(role))]

    async def job_cancel(job_id: str) -> dict[str, Any]:
        try:
            return dict((await service.cancel(_job_id(job_id))).to_json())
        except market.UnknownJob:
            raise RpcError(JOB_NOT_FOUND, "no such job requested from this node") from None
        except market.MarketError as exc:
            raise RpcError(JOB_REJECTED, str(exc)) from None

    async def result_view(job_id: str) -> market.JobResultView:
        try:
            return await service.result(_job_id(job_id))
        except market.UnknownJob:
            raise RpcError(JOB_NOT_FOUND, "no such job requested from this node") from None
        except market.JobNotReady as exc:
            raise RpcError(JOB_NOT_READY, str(exc)) from None
        except market.MarketError as exc:
            raise RpcError(JOB_NOT_READY, str(exc)) from None

    async def job_result(job_id: str) -> dict[str, Any]:
        view = await result_view(job_id)
        return {
            "job_id": view.job_id.hex(),
            "state": view.state.name.lower(),
            "outputs": {name: _b64(data) for name, data in view.outputs.items()},
            "outputs_inline": len(view.outputs) == len(view.files),
            "files": [
                {"path": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256.hex()}
                for f in view.files
            ],
            "outputs_dir": view.output_dir,
            "stdout": _b64(view.stdout),
            "stderr": _b64(view.stderr),
            "receipt": None if view.receipt is None else to_json(view.receipt),
        }

    async def job_outputs(job_id: str, dir: str) -> dict[str, Any]:
        view = await result_view(job_id)
        if not isinstance(dir, str) or not os.path.isabs(dir):
            raise RpcError(INVALID_PARAMS, "dir must be an absolute path on this node's machine")
        try:
            written = await trio.to_thread.run_sync(export_outputs, view, Path(dir))
        except OutputsExportError as exc:
            raise RpcError(JOB_REJECTED, str(exc)) from None
        return {"dir": dir, "files": written, "bytes": sum(f.size_bytes for f in view.files)}

    async def market_bids(job_id: str) -> list[dict[str, Any]]:
        try:
            return [dict(b.to_json()) for b in service.bids(_job_id(job_id))]
        except market.UnknownJob:
            raise RpcError(JOB_NOT_FOUND, "no such job requested from this node") from None

    job_id_param = Param("job_id", "string", True, "Job id, hex string of 32 bytes.")
    registry.register(
        "job_submit",
        job_submit,
        description="Submit a job: it is matched, bid on, locked in escrow, run and settled.",
        params=(
            Param("argv", "array", True, "The command and its arguments."),
            Param("max_price_per_gpu_second", "integer", True, "Price cap per GPU-second."),
            Param("inputs", "object", False, "Small input files: name -> base64 content."),
            Param(
                "input_paths",
                "object",
                False,
                "Input files on the node's machine: name -> absolute path (the node copies "
                "each into its blob store before it answers).",
            ),
            Param("env", "object", False, "Extra environment variables."),
            Param("gpus", "integer", False, "GPUs needed; 0 = a CPU-only job."),
            Param("min_vram_bytes", "integer", False, "Per-GPU VRAM at least this."),
            Param("model", "string", False, "GPU model, e.g. A100-80GB."),
            Param("min_compute_capability", "string", False, 'e.g. "8.0".'),
            Param("min_cuda_version", "string", False, 'e.g. "12.1".'),
            Param("max_wall_ms", "integer", False, "Wall-time limit of the job."),
            Param("deadline_ms", "integer", False, "Unix ms by which it must settle."),
            Param("bid_window_ms", "integer", False, "How long to collect bids."),
            Param("strategy", "string", False, "cheapest|soonest|least-loaded|reputation."),
            Param("sandbox", "string", False, 'Sandbox the provider must use: "bwrap"|"process".'),
            Param("memory_bytes", "integer", False, "Memory cap of the job (0: provider default)."),
            Param("disk_bytes", "integer", False, "Disk cap of the job dir (0: provider default)."),
            Param("verify", "integer", False, "Run on N providers; pay only the majority."),
            Param(
                "outputs_bytes_max",
                "integer",
                False,
                "The most output bytes the job may deliver (default 64 MiB); its trade's "
                "deadline allows for moving them.",
            ),
            Param("image", "string", False, "Run in this image of the node's store (a ref)."),
        ),
        result=Result("object", "The job record."),
        # It answers once the input files are copied into the blob store: 16 GiB take a
        # minute or more on a loaded disk, past the server's usual call timeout.
        call_timeout_s=submit_call_timeout_s,
    )
    registry.register(
        "job_status",
        job_status,
        description="A job's record: state, provider, price, cost, receipt, timestamps.",
        params=(job_id_param, Param("role", "string", False, "requester|provider|all")),
        result=Result("object"),
    )
    registry.register(
        "job_list",
        job_list,
        description="Jobs on this node, as requester and as provider.",
        params=(Param("role", "string", False, "requester|provider|all"),),
        result=Result("array"),
    )
    registry.register(
        "job_cancel",
        job_cancel,
        description="Cancel a job: a cancel transaction refunds the escrow, the job is killed.",
        params=(job_id_param,),
        result=Result("object"),
    )
    registry.register(
        "job_result",
        job_result,
        description="A finished job's output list, where the files lie on this node, stdout, "
        "stderr and receipt; the files' bytes (base64) only when they add up to 1 MiB at most.",
        params=(job_id_param,),
        result=Result("object"),
    )
    registry.register(
        "job_outputs",
        job_outputs,
        description="Copy a finished job's output files into a directory on this node's "
        "machine (made if missing; files there of the same names are replaced).",
        params=(job_id_param, Param("dir", "string", True, "Absolute path of the directory.")),
        result=Result("object", "The directory, the paths written and their total bytes."),
    )
    registry.register(
        "market_bids",
        market_bids,
        description="The bids a job received.",
        params=(job_id_param,),
        result=Result("array"),
    )
