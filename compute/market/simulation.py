"""A seeded market simulation with a cheater zoo: real ``MarketService``s, one trio run.

Everything runs under a mock clock (``SimClock``, a ``trio.testing.MockClock`` with
``autojump_threshold=0``): an in-memory ``MarketNetAPI`` (``SimNetwork``) drops, delays (so
reorders) and duplicates gossip and request/response; ``SimLedger`` is a real chain over the
real ledger (``Mempool``, ``build_block``, ``apply_block``, an in-memory store, one sequencer,
block times from the mock clock); each node has a real ``JobStore`` in a temp directory and, as
a provider, a ``SimExecutor`` (compute's ``Executor`` with the process replaced by a wait in mock
time and outputs computed from the inputs). Either side restarts at any step: its service's
scope is cancelled and a new ``MarketService`` starts over the same store.

Each seed picks one member of the zoo (``ZOO``) to join two honest providers (one maybe slow)
and an honest requester; every cheat must be caught by the check meant for it, and after every
run the invariants hold (``check_invariants``). A seed fully determines a run, so a failure
replays with::

    .venv/bin/python -m compute.market.simulation --seed 1234
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar, cast

import trio
import trio.testing

import ledger
from compute import (
    JobOutcome,
    JobResult,
    LogTail,
    OfferConfig,
    OfferDirectory,
    OfferPublisher,
    OfferRejected,
    SlotAllocator,
    collect_outputs,
    outputs_digest,
    read_inventory,
)
from compute.exceptions import SandboxError
from compute.market._exchange import ProviderExchange
from compute.market._provider import Provider
from compute.market._requester import Requester
from compute.market._service import (
    JOBS_PURPOSE,
    PROTOCOL_AWARD,
    PROTOCOL_BID,
    PROTOCOL_OUTPUT,
    PROTOCOL_OUTPUTS,
    MarketService,
    ProviderSide,
)
from compute.market._wire import PROTOCOL_SEALED
from compute.market.abc import ChainAPI, Incoming, MarketNetAPI
from compute.market.exceptions import ChainRejected, MarketError, NetError
from compute.market.types import (
    STRATEGIES,
    Bid,
    InputRef,
    JobManifest,
    JobRecord,
    JobRequest,
    JobState,
    JobSubmission,
    MarketConfig,
    Requirements,
    Role,
    RunResult,
)
from ledger import Delivery, DeliveryAck, TradeStatus

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Sequence

    from trio_typing import TaskStatus

    from compute import Allocation, Executor, Inventory, JobSpec
    from compute.types import JobId as ExecJobId
    from compute.types import SandboxKind
    from ledger import Account, Receipt, Trade, Transaction

log = logging.getLogger("gpumesh.compute.market.simulation")
T = TypeVar("T")

CHAIN_ID = "gpumesh-market-sim"
BALANCE = 10**9
SIM_PARAMS = ledger.ChainParams.default()
"""The network's rules: fees, provider bonds, slashing, pro-rata cancels, minimum charge."""
BOND = 10 * SIM_PARAMS.provider_bond_min
"""What every provider (honest or not, unless its cheat is having none) has staked."""
OFFERS_PURPOSE = "offers"
OFFER_TYPE_TAG = "compute.offer/1"
block_interval_ms = 50
idle_block_interval_ms = 1_000
block_transactions_max = 1_000
block_bytes_max = 1024 * 1024
inbox_messages_max = 1_024
settle_margin_ms = 10_000
"""After the last deadline, how long the chain runs on so refunds and cancels can land."""
run_sim_ms_max = 240_000
"""A run whose honest jobs are not all final after this much simulated time fails."""
poll_ms = 50
livelock_steps_max = 50_000
"""Task steps at one simulated instant before a run counts as livelocked (a busy seed takes
a few thousand)."""
shm_dir = "/dev/shm"
fetch_then_cancel_polls_max = 200
squat_price_max = 40
squat_wall_ms = 2_000
squat_cost_max = squat_price_max * squat_wall_ms // 1000
trace_lines_max = 60


def sim_now_ms() -> int:
    """Wall-clock milliseconds in the simulation: genesis time plus the mock clock."""
    return ledger_genesis_time_ms + int(trio.current_time() * 1000)


ledger_genesis_time_ms = 1_700_000_000_000


async def _run_sync_inline(fn: Callable[..., T], *args: object, **_options: object) -> T:
    await trio.lowlevel.checkpoint()
    return fn(*args)


@contextlib.contextmanager
def threads_inline() -> Iterator[None]:
    """Run ``trio.to_thread.run_sync`` work on the trio thread while the simulation runs.

    A LevelDB write or a file read off the trio thread would let the mock clock jump (the run
    loop is idle while a thread works), firing timers in the meantime and making a seed's run
    depend on the machine's speed. Inline, such work takes no simulated time and the seed
    replays exactly. Only the simulation's own trio run is affected (it is restored after)."""
    saved = trio.to_thread.run_sync
    setattr(trio.to_thread, "run_sync", _run_sync_inline)  # noqa: B010
    try:
        yield
    finally:
        setattr(trio.to_thread, "run_sync", saved)  # noqa: B010


class LivelockGuard(trio.abc.Instrument):
    """Fails a run whose tasks keep running without simulated time ever passing (a loop that
    only checkpoints never lets the mock clock jump, so the run would hang in wall time)."""

    def __init__(self) -> None:
        self.scope: trio.CancelScope | None = None
        self.tripped = ""
        self._at = -1.0
        self._steps = 0
        self._tasks: dict[str, int] = {}

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        now = trio.current_time()
        if now != self._at:
            self._at, self._steps = now, 0
            self._tasks.clear()
            return
        self._steps += 1
        if self._steps > livelock_steps_max // 2:
            self._tasks[task.name] = self._tasks.get(task.name, 0) + 1
        if self._steps > livelock_steps_max and not self.tripped and self.scope is not None:
            busiest = sorted(self._tasks.items(), key=lambda kv: -kv[1])[:3]
            self.tripped = (
                f"livelock: {self._steps} task steps at t={now:.3f} s with no simulated time "
                f"passing; busiest tasks {busiest}"
            )
            self.scope.cancel()


class SimFailure(AssertionError):
    """Raised when a run breaks an invariant or a cheat goes uncaught."""


# --- the network ----------------------------------------------------------------------------


@dataclasses.dataclass
class Faults:
    drop_rate: float = 0.0
    duplicate_rate: float = 0.0
    delay_ms: tuple[int, int] = (1, 10)


@dataclasses.dataclass
class NetworkStatistics:
    gossip_sent: int = 0
    gossip_delivered: int = 0
    requests: int = 0
    dropped: int = 0
    duplicated: int = 0


class SimNetwork:
    """Seeded delivery between ``SimNet``s: loss, delay (so reordering) and duplicates of gossip
    and of requests/responses; a node that is down receives nothing."""

    def __init__(self, rng: random.Random, nursery: trio.Nursery) -> None:
        self.rng = rng
        self.faults = Faults()
        self.nets: dict[str, SimNet] = {}
        self.stats = NetworkStatistics()
        self._nursery = nursery

    def _delay_s(self) -> float:
        low, high = self.faults.delay_ms
        return self.rng.randint(low, high) / 1000

    def _lost(self) -> bool:
        return self.rng.random() < self.faults.drop_rate

    def gossip(self, src: SimNet, purpose: str, type_tag: str, payload: bytes) -> None:
        incoming = Incoming(src.address, src.local_peer_id, type_tag, payload)
        for net in list(self.nets.values()):
            if net is src or purpose not in net.topics:
                continue
            self.stats.gossip_sent += 1
            if self._lost():
                self.stats.dropped += 1
                continue
            self._nursery.start_soon(self._deliver, net.local_peer_id, purpose, incoming, 0.0)
            if self.rng.random() < self.faults.duplicate_rate:
                self.stats.duplicated += 1
                late = self.rng.uniform(0, 2)
                self._nursery.start_soon(self._deliver, net.local_peer_id, purpose, incoming, late)

    async def _deliver(self, dst: str, purpose: str, incoming: Incoming, extra_s: float) -> None:
        await trio.sleep(self._delay_s() + extra_s)
        net = self.nets.get(dst)
        if net is None or not net.deliver(purpose, incoming):
            self.stats.dropped += 1
            return
        self.stats.gossip_delivered += 1

    async def call(self, src: SimNet, dst: str, protocol: str, payload: bytes) -> bytes:
        """One request/response; a lost request or response never returns (the caller's
        timeout turns it into a ``NetError``, as a real stream would)."""
        self.stats.requests += 1
        await trio.sleep(self._delay_s())
        net = self.nets.get(dst)
        if net is None or self._lost():
            self.stats.dropped += 1
            await trio.sleep_forever()
        assert net is not None
        if self.rng.random() < self.faults.duplicate_rate:
            # The same request arrives twice (a retry on a flaky link): its answer is lost.
            self.stats.duplicated += 1
            self._nursery.start_soon(self._duplicate, net, src.local_peer_id, protocol, payload)
        ok, data = await net.serve(src.local_peer_id, protocol, payload)
        if self._lost():
            self.stats.dropped += 1
            await trio.sleep_forever()
        await trio.sleep(self._delay_s())
        if not ok:
            reason = data.decode("utf-8", "replace")
            src.refusals.append((protocol, reason))
            raise NetError(reason)
        return data

    async def _duplicate(self, net: SimNet, src_peer: str, protocol: str, payload: bytes) -> None:
        await trio.sleep(self.rng.uniform(0, 0.5))
        with trio.move_on_after(30):
            await net.serve(src_peer, protocol, payload)


class SimNet(MarketNetAPI):
    """One node's view of the ``SimNetwork``. Handlers run in the node's own nursery, so a
    node that stops (crash or restart) stops answering, mid-request too."""

    def __init__(
        self,
        network: SimNetwork,
        peer_id: str,
        address: bytes,
        refusals: list[tuple[str, str]] | None = None,
    ) -> None:
        self.network = network
        self.local_peer_id = peer_id
        self.address = address
        self.topics: dict[str, trio.MemorySendChannel[Incoming]] = {}
        self.handlers: dict[str, Callable[[str, bytes], Awaitable[bytes]]] = {}
        self.nursery: trio.Nursery | None = None
        self.dropped = 0
        self.refusals: list[tuple[str, str]] = [] if refusals is None else refusals
        """``(protocol, reason)`` of every request a peer refused (what a cheater hears)."""
        network.nets[peer_id] = self

    def detach(self) -> None:
        """The node went down: no handlers, no subscriptions, nothing delivered."""
        self.nursery = None
        self.handlers.clear()
        for send in self.topics.values():
            send.close()
        self.topics.clear()
        if self.network.nets.get(self.local_peer_id) is self:
            del self.network.nets[self.local_peer_id]

    async def publish(self, purpose: str, type_tag: str, payload: bytes) -> None:
        self.network.gossip(self, purpose, type_tag, payload)

    def subscribe(self, purpose: str) -> trio.MemoryReceiveChannel[Incoming]:
        assert purpose not in self.topics, f"{self.local_peer_id} subscribed {purpose} twice"
        send, receive = trio.open_memory_channel[Incoming](inbox_messages_max)
        self.topics[purpose] = send
        return receive

    def deliver(self, purpose: str, incoming: Incoming) -> bool:
        send = self.topics.get(purpose)
        if send is None:
            return False
        try:
            send.send_nowait(incoming)
        except trio.WouldBlock:
            self.dropped += 1
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def set_handler(self, protocol: str, handler: Callable[[str, bytes], Awaitable[bytes]]) -> None:
        self.handlers[protocol] = handler

    async def serve(self, src_peer: str, protocol: str, payload: bytes) -> tuple[bool, bytes]:
        """Run our handler for a peer's request in our nursery: ``(ok, response or error)``.
        A handler that raises anything but ``MarketError`` stops this node (as it would stop
        the daemon), which fails the run."""
        nursery = self.nursery
        handler = self.handlers.get(protocol)
        if nursery is None or handler is None:
            if nursery is None:
                await trio.sleep_forever()  # nobody is listening: the dial times out
            return False, f"protocol {protocol} not supported".encode()
        done = trio.Event()
        box: list[tuple[bool, bytes]] = []

        async def run() -> None:
            try:
                box.append((True, await handler(src_peer, payload)))
            except MarketError as exc:
                box.append((False, str(exc).encode()))
            done.set()

        nursery.start_soon(run)
        await done.wait()
        return box[0]

    async def request(self, peer_id: str, protocol: str, payload: bytes, timeout_s: float) -> bytes:
        with trio.move_on_after(timeout_s):
            return await self.network.call(self, peer_id, protocol, payload)
        raise NetError(f"request {protocol} to {peer_id} timed out after {timeout_s} s")


# --- the chain ------------------------------------------------------------------------------


class SimLedger:
    """The one chain of a run: a single sequencer over the real ledger, in memory, block times
    from the mock clock. A block every ``block_interval_ms`` while transactions wait, an empty
    one every ``idle_block_interval_ms`` so chain time passes deadlines."""

    def __init__(self, genesis: ledger.Genesis, proposer: bytes) -> None:
        self.genesis = genesis
        self.store = ledger.MemoryStore()
        self.state = self.store.load_state(genesis)
        self.mempool = ledger.Mempool(self.state)
        self.proposer = proposer
        self.blocks = 0
        self.rejected = 0
        self.agreed: dict[bytes, None] = {}
        """Every job id an Agreement was committed for, in order (open or closed since)."""
        self.failed: list[tuple[Transaction, str]] = []
        """Every transaction the mempool refused or a block included as failed, and why."""
        self.cancelled_by: dict[bytes, bytes] = {}
        """Who sent the Cancel that closed a trade (its requester or its provider)."""
        self._new_block = trio.Event()
        self._pending = trio.Event()

    def next_nonce(self, sender: bytes) -> int:
        nonce = self.state.account(sender).nonce
        pending = {tx.nonce for tx in self.mempool if tx.signer == sender}
        while nonce in pending:
            nonce += 1
        return nonce

    def submit(self, tx: Transaction) -> bytes:
        try:
            txh = self.mempool.add(tx)
        except ledger.MempoolRejected as exc:
            self.rejected += 1
            self.failed.append((tx, str(exc)))
            raise ChainRejected(str(exc)) from exc
        self._pending.set()
        return txh

    def commit_next(self) -> None:
        time_ms = max(self.state.time_ms + 1, sim_now_ms())
        txs = self.mempool.reap(block_transactions_max, block_bytes_max, time_ms=time_ms)
        block = ledger.build_block(
            self.state, self.state.height + 1, self.state.block_hash, time_ms, self.proposer, txs
        )
        new_state, results = ledger.apply_block(self.state, block)
        self.store.commit_block(block, None, new_state, results)
        for tx, result in zip(txs, results.tx_results, strict=True):
            if not result.ok:
                self.failed.append((tx, result.error))
            elif isinstance(tx, ledger.Agreement):
                self.agreed.setdefault(bytes(tx.terms.job_id), None)
            elif isinstance(tx, ledger.Cancel):
                self.cancelled_by[bytes(tx.job_id)] = bytes(tx.signer)
        self.state = new_state
        self.mempool.update(block, new_state)
        self.blocks += 1
        event, self._new_block = self._new_block, trio.Event()
        event.set()

    def trades(self) -> list[Trade]:
        """Every trade ever opened, as it stands now (closed trades leave the state)."""
        found = (self.store.trade(job_id) for job_id in self.agreed)
        return [trade for trade in found if trade is not None]

    async def wait_new_block(self) -> int:
        await self._new_block.wait()
        return self.state.height

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(idle_block_interval_ms / 1000):
                await self._pending.wait()
                await trio.sleep(block_interval_ms / 1000)
            self._pending = trio.Event()
            self.commit_next()


class SimChain(ChainAPI):
    """One node's ``ChainAPI`` onto the ``SimLedger`` (the chain service picks the nonce)."""

    def __init__(self, chain: SimLedger, address: bytes) -> None:
        self.chain = chain
        self.address = address

    async def submit(self, tx_builder: Callable[[int], Transaction]) -> bytes:
        return self.chain.submit(tx_builder(self.chain.next_nonce(self.address)))

    def trade(self, job_id: bytes) -> Trade | None:
        return self.chain.store.trade(job_id)

    def receipt(self, job_id: bytes) -> Receipt | None:
        record = self.chain.store.receipt(job_id)
        return None if record is None else record.receipt

    def account(self, address: bytes) -> Account:
        return self.chain.state.account(address)

    def params(self) -> ledger.ChainParams:
        return self.chain.state.params

    def fee_min(self) -> int:
        return self.chain.state.params.fee_min

    def head(self) -> tuple[int, int]:
        return self.chain.state.height, self.chain.state.time_ms

    async def wait_new_block(self) -> int:
        return await self.chain.wait_new_block()

    def tx_result(self, tx_hash: bytes) -> tuple[bool, bool, str] | None:
        record = self.chain.store.transaction(tx_hash)
        if record is not None:
            return True, record.ok, record.error
        if tx_hash in self.chain.mempool:
            return False, False, ""
        return None


# --- the executor ---------------------------------------------------------------------------


def expected_outputs(argv: Sequence[str], inputs: Sequence[tuple[str, bytes]]) -> dict[str, bytes]:
    """What an honest run of a simulated job produces: a function of its command and inputs."""
    h = hashlib.sha256()
    for arg in argv:
        h.update(b"a" + len(arg).to_bytes(4, "big") + arg.encode())
    for name, data in sorted(inputs):
        h.update(b"i" + len(name).to_bytes(4, "big") + name.encode() + ledger.digest(data))
    return {"result.txt": h.hexdigest().encode() + b"\n"}


def _inputs(spec: JobSpec) -> list[tuple[str, bytes]]:
    """A job's inputs with their bytes, given inline or as files (a provider's fetched blobs)."""
    files = [(name, Path(source).read_bytes()) for name, source in spec.input_files]
    return [*spec.inputs, *files]


class SimExecutor:
    """compute's executor seam with the process replaced: the job's directory is laid out for
    real, as ``Executor`` lays it out (so a hostile input name hits the disk as it would), the
    run is a wait of ``duration_ms`` in mock time, and the outputs are ``outputs_for(spec)``."""

    sandbox: SandboxKind = "process"

    def __init__(self, work_root: Path, *, duration_ms: int) -> None:
        self.work_root = work_root
        work_root.mkdir(parents=True, exist_ok=True)
        self.duration_ms = duration_ms
        self.runs = 0

    def job_dir(self, job_id: ExecJobId) -> Path:
        return self.work_root / job_id

    def remove_job_dir(self, job_id: ExecJobId) -> None:
        shutil.rmtree(self.job_dir(job_id))

    def log_tail(self, job_id: ExecJobId, stream: str, offset: int, bytes_max: int) -> LogTail:
        """A simulated job writes its stdout only at the end (it comes with the result)."""
        return LogTail(b"", offset, 0, running=False)

    def outputs_for(self, spec: JobSpec) -> dict[str, bytes]:
        return expected_outputs(spec.argv, _inputs(spec))

    def _setup_dir(self, job_id: ExecJobId, spec: JobSpec) -> Path:
        job_dir = self.job_dir(job_id)
        try:
            job_dir.mkdir()
        except FileExistsError:
            raise SandboxError(f"job directory for {job_id!r} already exists") from None
        work = job_dir / "work"
        (work / "out").mkdir(parents=True)
        for name, data in _inputs(spec):
            target = work / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return work

    async def run(
        self, job_id: ExecJobId, spec: JobSpec, allocation: Allocation | None = None
    ) -> JobResult:
        spec.validate()
        work = self._setup_dir(job_id, spec)
        started = trio.current_time()
        duration_ms = min(self.duration_ms, spec.limits.wall_time_ms)
        await trio.sleep(duration_ms / 1000)
        self.runs += 1
        out_dir = work / "out"
        for name, data in self.outputs_for(spec).items():
            (out_dir / name).write_bytes(data)
        files, _ = collect_outputs(
            out_dir,
            files_max=spec.limits.output_files_max,
            bytes_max=spec.limits.output_bytes_max,
        )
        wall_ms = int((trio.current_time() - started) * 1000)
        slots = allocation.slot_count if allocation is not None else 1
        return JobResult(
            job_id=job_id,
            outcome=JobOutcome.SUCCEEDED,
            reason="exited 0",
            exit_code=0,
            signal=None,
            stdout=b"sim\n",
            stderr=b"",
            outputs=files,
            outputs_digest=outputs_digest(files),
            output_dir=out_dir,
            wall_ms=wall_ms,
            usage_gpu_ms=wall_ms * slots,
            gpu_uuids=allocation.gpu_uuids if allocation is not None else (),
            sandbox=self.sandbox,
        )


# --- nodes ----------------------------------------------------------------------------------


def seeded_key(seed: int, index: int) -> ledger.SigningKey:
    return ledger.SigningKey(hashlib.sha256(f"gpumesh-market-sim/{seed}/{index}".encode()).digest())


ServiceFactory = type[MarketService]


class SimNode:
    """One simulated machine: a key, a job store and job directories that survive restarts,
    and a market service (with its allocator, offers and directory) that does not."""

    def __init__(
        self,
        *,
        name: str,
        key: ledger.SigningKey,
        world: World,
        root: Path,
        service_cls: ServiceFactory = MarketService,
        inventory: Inventory | None = None,
        price: int = 30,
        duration_ms: int = 300,
        executor_cls: type[SimExecutor] = SimExecutor,
        honest: bool = True,
    ) -> None:
        self.name = name
        self.key = key
        self.world = world
        self.store_path = root / f"store-{name}"
        self.service_cls = service_cls
        self.inventory = inventory
        self.offer_config = dataclasses.replace(OfferConfig.for_tests(), price_per_gpu_second=price)
        self.executor = (
            executor_cls(root / f"jobs-{name}", duration_ms=duration_ms)
            if inventory is not None
            else None
        )
        self.honest = honest
        self.chain = SimChain(world.ledger, key.address)
        self.directory = OfferDirectory(CHAIN_ID)
        self.net: SimNet | None = None
        self.refusals: list[tuple[str, str]] = []
        """What peers refused this node's requests with, across restarts."""
        self.service: MarketService | None = None
        self.allocator: SlotAllocator | None = None
        self.restarts = 0
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    @property
    def address(self) -> bytes:
        return self.key.address

    @property
    def up(self) -> bool:
        return self._scope is not None

    @property
    def market(self) -> MarketService:
        assert self.service is not None, f"{self.name} is down"
        return self.service

    async def start(self) -> None:
        assert self._scope is None, f"{self.name} is already running"
        from compute.market._store import JobStore

        net = SimNet(self.world.network, self.name, self.key.address, self.refusals)
        store = JobStore(self.store_path)
        self.directory = OfferDirectory(CHAIN_ID)
        provider: ProviderSide | None = None
        publisher: OfferPublisher | None = None
        if self.inventory is not None:
            assert self.executor is not None
            self.allocator = SlotAllocator(self.inventory.gpus)
            # The market types the executor as compute's Executor; the sim's has its interface.
            executor = cast("Executor", self.executor)
            provider = ProviderSide(executor, self.allocator, self.inventory, self.offer_config)

            async def publish(data: bytes) -> None:
                await net.publish(OFFERS_PURPOSE, OFFER_TYPE_TAG, data)

            publisher = OfferPublisher(
                key=self.key,
                chain_id=CHAIN_ID,
                inventory=self.inventory,
                allocator=self.allocator,
                config=self.offer_config,
                sandbox="process",
                publish=publish,
                clock_ms=sim_now_ms,
            )
        service = self.service_cls(
            self.key,
            CHAIN_ID,
            net,
            self.chain,
            store,
            self.directory,
            provider,
            self.world.config,
            clock_ms=sim_now_ms,
        )
        offers = net.subscribe(OFFERS_PURPOSE)
        scope = trio.CancelScope()
        stopped = trio.Event()
        directory = self.directory

        async def serve(task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    async with trio.open_nursery() as nursery:
                        net.nursery = nursery
                        nursery.start_soon(_feed_directory, offers, directory)
                        if publisher is not None:
                            await nursery.start(publisher.run)  # type: ignore[arg-type]
                        await nursery.start(service.run)  # type: ignore[arg-type]
                        nursery.start_soon(self._trace, service.subscribe())
                        task_status.started()
                        await trio.sleep_forever()
            finally:
                net.detach()
                store.close()
                stopped.set()

        self.net = net
        self.service = service
        self._scope = scope
        self._stopped = stopped
        await self.world.nursery.start(serve)
        self.world.on_start(self)

    async def _trace(self, events: trio.MemoryReceiveChannel[JobRecord]) -> None:
        async with events:
            async for record in events:
                self.world.trace.append(
                    f"{trio.current_time():8.3f} {self.name} {record.role.name[0]} "
                    f"{record.job_id.hex()[:6]}/{record.attempt} {record.state.label} "
                    f"{record.error[:100]}"
                )

    async def stop(self) -> None:
        """Stop abruptly: the service and its tasks go, the store and job directories stay."""
        assert self._scope is not None, f"{self.name} is not running"
        self._scope.cancel()
        await self._stopped.wait()
        self._scope = None
        self.service = None
        self.net = None
        self.restarts += 1


async def _feed_directory(
    receive: trio.MemoryReceiveChannel[Incoming], directory: OfferDirectory
) -> None:
    async with receive:
        async for message in receive:
            try:
                directory.add(message.payload, sim_now_ms())
            except OfferRejected as exc:
                log.debug("offer from %s rejected: %s", message.sender_peer_id, exc)


# --- the world and its invariants -----------------------------------------------------------


@dataclasses.dataclass
class HonestJob:
    """A job the honest requester submitted, and what its outputs must be."""

    job_id: bytes
    submission: JobSubmission
    cancel: bool = False


class World:
    """Everything of one run: network, chain, nodes, the honest jobs, what the cheat did."""

    def __init__(
        self,
        seed: int,
        root: Path,
        nursery: trio.Nursery,
        config: MarketConfig,
        genesis: ledger.Genesis,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.root = root
        self.nursery = nursery
        self.config = config
        self.network = SimNetwork(self.rng, nursery)
        self.ledger = SimLedger(genesis, genesis.validators[0].address)
        self.nodes: list[SimNode] = []
        self.jobs: list[HonestJob] = []
        self.notes: list[str] = []
        self.trace: list[str] = []
        """Every job state change on every node, with its simulated time (for failures)."""
        self._start_hooks: list[Callable[[SimNode], None]] = []

    def on_start(self, node: SimNode) -> None:
        for hook in self._start_hooks:
            hook(node)

    def node(self, name: str) -> SimNode:
        return next(n for n in self.nodes if n.name == name)

    @property
    def troubled(self) -> bool:
        """Whether restarts or message loss may have cost an honest job its chance: then it
        may end refunded or failed (paying nothing) instead of done."""
        return bool(self.notes) or self.network.stats.dropped > 0

    @property
    def requester(self) -> SimNode:
        return self.nodes[0]

    @property
    def honest_providers(self) -> list[SimNode]:
        return [n for n in self.nodes[1:] if n.honest and n.inventory is not None]

    def fail(self, message: str) -> SimFailure:
        return SimFailure(f"seed {self.seed}: {message}\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        lines = [f"  t={trio.current_time():.3f}s notes: {self.notes}", "  trace:"]
        lines += [f"    {line}" for line in self.trace[-trace_lines_max:]]
        for node in self.nodes:
            if node.service is None:
                lines.append(f"  {node.name}: down")
                continue
            jobs = [
                f"{r.role.name[0]}:{r.job_id.hex()[:6]}/{r.attempt}:{r.state.label}"
                + (f"({r.error[:80]})" if r.error else "")
                for r in node.service.list()
            ]
            lines.append(f"  {node.name}: {node.service.statistics()} {jobs}")
        for trade in self.ledger.trades():
            job_id = trade.terms.job_id
            provider = next((n.name for n in self.nodes if n.address == trade.terms.provider), "?")
            lines.append(
                f"  trade {job_id.hex()[:6]} {provider} {trade.status.name.lower()} "
                f"paid {trade.paid} deadline +{trade.terms.deadline_ms - ledger_genesis_time_ms}"
            )
        return "\n".join(lines)

    def trades_of(self, job_id: bytes) -> list[Trade]:
        from compute.market._service import attempt_job_id

        attempts = {attempt_job_id(job_id, attempt) for attempt in range(32)}
        return [t for t in self.ledger.trades() if t.terms.job_id in attempts]

    def group(self, job_id: bytes) -> list[JobRecord]:
        """The requester's records of a job: the job itself and, verified, its replicas."""
        requester = self.requester
        if requester.service is None:
            return []
        return [
            r
            for r in requester.service.list(Role.REQUESTER)
            if r.job_id == job_id or (r.group_id and r.group_id == job_id)
        ]

    def record(self, job_id: bytes) -> JobRecord | None:
        requester = self.requester
        if requester.service is None:
            return None
        try:
            return requester.service.get(job_id)
        except KeyError:
            return None


async def check_invariants(world: World) -> None:
    """What must hold after every run, whatever the cheat and the faults did."""
    state = world.ledger.state
    if state.total_supply() != state.supply:
        raise world.fail(f"supply changed: {state.supply} at genesis, {state.total_supply()} now")
    for job_id, trade in state.trades.items():
        if trade.status is TradeStatus.OPEN and trade.terms.deadline_ms < state.time_ms:
            late_ms = state.time_ms - trade.terms.deadline_ms
            raise world.fail(
                f"escrow of trade {job_id.hex()[:12]} is locked {late_ms} ms past its deadline"
            )
    honest_providers = {n.address: n.name for n in world.honest_providers}
    for address, name in honest_providers.items():
        if getattr(state.account(address), "slashed", 0):
            raise world.fail(f"honest provider {name} was slashed")
    for trade in world.ledger.trades():
        provider = honest_providers.get(trade.terms.provider)
        if provider is not None and trade.status is TradeStatus.SETTLED and trade.paid <= 0:
            raise world.fail(
                f"honest provider {provider} settled {trade.terms.job_id.hex()[:12]} unpaid"
            )
    honest = {n.address for n in world.nodes if n.honest}
    for job in world.jobs:
        short = job.job_id.hex()[:12]
        group = world.group(job.job_id)
        if not group:
            raise world.fail(f"honest job {short} is unknown to its requester")
        running = [r for r in group if not r.state.terminal]
        if running:
            raise world.fail(f"honest job {short} is still {running[0].state.label}")
        if job.cancel:
            continue
        paid = sum(t.paid for r in group for t in world.trades_of(r.job_id))
        try:
            result = await world.requester.market.result(job.job_id)
        except MarketError as exc:
            # Done or refunded: a job may end unfinished only if it paid nothing for it, and
            # only when faults cost it its chance or (verified) it ran out of distinct
            # providers (three here, one of them the cheater).
            if paid or not (world.troubled or job.submission.verify > 1):
                states = [r.state.label for r in group]
                raise world.fail(
                    f"honest job {short} ended {states} (paid {paid}): {exc}; {group[0].error}"
                ) from exc
            continue
        expected = expected_outputs(job.submission.argv, job.submission.inputs)
        if result.outputs != expected:
            raise world.fail(f"honest job {short} got outputs {result.outputs}, not {expected}")
        for record in group:
            for trade in world.trades_of(record.job_id):
                taken = trade.terms.job_id == record.attempt_job_id and (
                    record.state is JobState.DONE
                )
                billed = trade.status is TradeStatus.SETTLED
                if billed and trade.terms.provider in honest and not taken:
                    raise world.fail(
                        f"honest job {short} paid attempt {trade.terms.job_id.hex()[:12]} "
                        "whose outputs it never got"
                    )


# --- the cheater zoo ------------------------------------------------------------------------


class Cheat:
    """One dishonest peer: the nodes it runs, what it does during the run, and the check that
    must catch it (``verify`` asserts the specific outcome)."""

    name: ClassVar[str]
    caught_by: ClassVar[str]
    jobs_verify: ClassVar[int] = 1
    """``--verify`` of the honest requester's jobs in this cheat's seeds."""

    @classmethod
    def balance(cls) -> int:
        """What the cheater's key holds at genesis (0: unfunded)."""
        return BALANCE

    @classmethod
    def bonded(cls) -> int:
        """The cheater's stake at genesis (a provider needs ``provider_bond_min``)."""
        return BOND

    def __init__(self, world: World, key: ledger.SigningKey) -> None:
        self.world = world
        self.key = key
        self.engaged = False
        """Whether the cheat actually reached a victim this run (for coverage figures)."""

    def nodes(self) -> list[SimNode]:
        return []

    def final(self) -> bool:
        """Whether whatever the cheat started has run its course (checked before verify)."""
        return True

    async def act(self) -> None:
        """What the cheater does once every node is up (raw peers act here)."""

    async def verify(self) -> None:
        raise NotImplementedError


class NoCheat(Cheat):
    name = "honest"
    caught_by = "nothing to catch: honest providers only (one of them maybe slow)"

    async def verify(self) -> None:
        return


class _NoShowProvider(Provider):
    """Takes awards (signs terms, holds the slot), then never runs them nor lets them go."""

    async def drive(self, aid: bytes) -> None:
        await trio.sleep_forever()


class _NoShowService(MarketService):
    provider_cls = _NoShowProvider


class NoShow(Cheat):
    name = "no-show"
    caught_by = "the requester refunds the trade past its deadline (and the refund slashes)"

    def nodes(self) -> list[SimNode]:
        inventory = read_inventory(simulate_gpus="RTX4090:2", simulate_seed="no-show")
        return [
            SimNode(
                name="cheater",
                key=self.key,
                world=self.world,
                root=self.world.root,
                service_cls=_NoShowService,
                inventory=inventory,
                price=10,
                honest=False,
            )
        ]

    async def verify(self) -> None:
        state = self.world.ledger.state
        trades = [t for t in self.world.ledger.trades() if t.terms.provider == self.key.address]
        self.engaged = bool(trades)
        for trade in trades:
            if trade.status is not TradeStatus.REFUNDED:
                raise self.world.fail(
                    f"no-show's trade {trade.terms.job_id.hex()[:12]} is "
                    f"{trade.status.name.lower()}, not refunded"
                )
        account = state.account(self.key.address)
        if account.earned:
            raise self.world.fail(f"the no-show earned {account.earned}")
        slashed = getattr(account, "slashed", None)
        if slashed is not None and trades and slashed < len(trades):
            raise self.world.fail(f"the no-show abandoned {len(trades)} trades, slashed {slashed}")


HOSTILE_INPUTS: tuple[tuple[str, ...], ...] = (
    ("out",),
    ("out/x.txt",),
    ("../escape.txt",),
    ("a/../../b",),
    ("/etc/passwd",),
    ("in.txt", "in.txt"),
    ("dir", "dir/file"),
)


class HostileRequester(Requester):
    """Submits whatever it likes: none of the requester's own manifest checks run."""

    def check_submission(self, sub: JobSubmission, refs: tuple[InputRef, ...]) -> JobManifest:
        return JobManifest(tuple(sub.argv), tuple(sub.env), refs)


class HostileRequesterService(MarketService):
    requester_cls = HostileRequester


class CrashingManifest(Cheat):
    name = "crashing-manifest"
    caught_by = "the provider checks the manifest on the award and refuses it before a slot"

    def nodes(self) -> list[SimNode]:
        node = SimNode(
            name="cheater",
            key=self.key,
            world=self.world,
            root=self.world.root,
            service_cls=HostileRequesterService,
            honest=False,
        )
        self.node = node
        return [node]

    async def act(self) -> None:
        rng = self.world.rng
        names = rng.choice(HOSTILE_INPUTS)
        argv: tuple[str, ...] = () if rng.random() < 0.15 else ("sim-job", "hostile")
        submission = JobSubmission(
            argv=argv,
            inputs=tuple((name, b"x" * (i + 1)) for i, name in enumerate(names)),
            requirements=Requirements(gpus=1),
            max_price_per_gpu_second=100,
            max_wall_ms=2_000,
            deadline_ms=sim_now_ms() + 12_000,
        )
        self.names = names
        self.job_id = (await _submit(self.world, self.node, submission)).job_id

    def final(self) -> bool:
        job_id = getattr(self, "job_id", None)
        if job_id is None or self.node.service is None:
            return False
        return self.node.service.get(job_id).state.terminal

    async def verify(self) -> None:
        world = self.world
        if world.trades_of(self.job_id):
            raise world.fail(f"a trade opened for the hostile manifest {self.names}")
        for provider in world.honest_providers:
            taken = [r for r in provider.market.list(Role.PROVIDER) if r.job_id == self.job_id]
            if taken:
                raise world.fail(
                    f"{provider.name} took a slot for the hostile manifest {self.names}: "
                    f"{taken[0].state.label}"
                )
        refusals = [reason for protocol, reason in self.node.refusals if protocol == PROTOCOL_AWARD]
        # Other refusals (a deadline grown short, no free slot) come first on some awards;
        # what matters is that no award was taken and the manifest check refused some.
        self.engaged = any("bad manifest" in r for r in refusals)
        if refusals and not self.engaged and world.network.stats.dropped == 0:
            raise world.fail(f"no award of {self.names} was refused as a bad manifest: {refusals}")


class UnfundedFlooder(Cheat):
    name = "unfunded-flooder"
    caught_by = "providers bid only for requesters whose spendable balance covers the job"

    @classmethod
    def balance(cls) -> int:
        return 0

    requests = 24

    async def act(self) -> None:
        world = self.world
        self.bids = 0
        net = SimNet(world.network, "flooder", self.key.address)
        net.nursery = world.nursery

        async def hold(peer_id: str, data: bytes) -> bytes:
            self.bids += 1
            await trio.sleep_forever()  # a bid handler that never answers
            raise AssertionError("unreachable")

        net.set_handler(PROTOCOL_BID, hold)
        for i in range(self.requests):
            now = sim_now_ms()
            request = ledger.sign_object(
                JobRequest(
                    chain_id=CHAIN_ID,
                    created_ms=now,
                    requirements=Requirements(gpus=1),
                    max_price_per_gpu_second=1_000,
                    max_wall_ms=2_000,
                    deadline_ms=now + 60_000,
                    bid_window_ms=10_000,
                    manifest_digest=ledger.digest(b"flood %d" % i),
                    inputs_bytes=0,
                ),
                self.key,
                CHAIN_ID,
            )
            await net.publish(JOBS_PURPOSE, JobRequest.TYPE_TAG, ledger.encode(request))
            await trio.sleep(0.1)

    async def verify(self) -> None:
        self.engaged = True
        if self.bids:
            raise self.world.fail(f"providers sent {self.bids} bids to an unfunded requester")


class _SquattingRequester(Requester):
    """Takes the provider's signed terms, then never opens the trade: the slots stay held."""

    async def lock(self, record: JobRecord) -> None:
        await trio.sleep_forever()


class _SquatterService(MarketService):
    requester_cls = _SquattingRequester


class AwardSquatter(Cheat):
    name = "award-squatter"
    caught_by = (
        "providers hold an unopened award only award_open_timeout_ms, and only while the "
        "requester's balance covers all its unopened awards there in total"
    )
    jobs = 6
    balance_awards = 1
    """The squatter can pay for this many awards' escrow at once, no more."""

    def nodes(self) -> list[SimNode]:
        self.node = SimNode(
            name="cheater",
            key=self.key,
            world=self.world,
            root=self.world.root,
            service_cls=_SquatterService,
            honest=False,
        )
        self.held_max = 0
        self.job_ids: list[bytes] = []
        return [self.node]

    @classmethod
    def balance(cls) -> int:
        return cls.balance_awards * squat_cost_max + sim_config().fee + 2 * squat_cost_max // 3

    async def act(self) -> None:
        world = self.world
        world.nursery.start_soon(self._watch)
        for i in range(self.jobs):
            submission = JobSubmission(
                argv=("sim-job", f"squat-{i}"),
                requirements=Requirements(gpus=1),
                max_price_per_gpu_second=squat_price_max,
                max_wall_ms=squat_wall_ms,
                deadline_ms=sim_now_ms() + 20_000,
            )
            self.job_ids.append((await _submit(world, self.node, submission)).job_id)
            await trio.sleep(world.rng.uniform(0, 0.3))

    async def _watch(self) -> None:
        """Sample what each provider holds for the squatter (the check is 'in total')."""
        while True:
            for provider in self.world.nodes:
                if provider.service is None or provider.inventory is None:
                    continue
                held = sum(
                    r.terms.max_cost
                    for r in provider.service.list(Role.PROVIDER)
                    if r.counterparty == self.key.address
                    and r.state is JobState.AWARDED
                    and r.terms is not None
                )
                self.held_max = max(self.held_max, held)
            await trio.sleep(poll_ms / 1000)

    def final(self) -> bool:
        return all(
            r.state is not JobState.AWARDED
            for p in self.world.honest_providers
            if p.service is not None
            for r in p.service.list(Role.PROVIDER)
            if r.counterparty == self.key.address
        )

    async def verify(self) -> None:
        world = self.world
        if any(t.terms.requester == self.key.address for t in world.ledger.trades()):
            raise world.fail("the squatter opened a trade")
        held = [
            r
            for p in world.honest_providers
            for r in p.market.list(Role.PROVIDER)
            if r.counterparty == self.key.address
        ]
        self.engaged = bool(held)
        for record in held:
            if record.state is not JobState.FAILED or "never opened" not in record.error:
                raise world.fail(
                    f"a squatted award ended {record.state.label} ({record.error}), not failed "
                    "as never opened"
                )
        balance = world.ledger.state.account(self.key.address).balance
        if self.held_max > balance:
            raise world.fail(
                f"a provider held squatted awards worth {self.held_max} at once; the squatter "
                f"could pay {balance}"
            )


class _UnstakedProvider(Provider):
    """Bids like any provider but never puts a bond at risk."""

    async def keep_bonded(self) -> None:
        await trio.sleep_forever()


class _UnstakedService(MarketService):
    provider_cls = _UnstakedProvider


class UnstakedBidder(Cheat):
    name = "unstaked-bidder"
    caught_by = "a bid is accepted only from a signer whose bond covers provider_bond_min"

    @classmethod
    def bonded(cls) -> int:
        return 0

    def nodes(self) -> list[SimNode]:
        inventory = read_inventory(simulate_gpus="RTX4090:1", simulate_seed="unstaked")
        self.node = SimNode(
            name="cheater",
            key=self.key,
            world=self.world,
            root=self.world.root,
            service_cls=_UnstakedService,
            inventory=inventory,
            price=10,
            honest=False,
        )
        return [self.node]

    async def verify(self) -> None:
        world = self.world
        if any(t.terms.provider == self.key.address for t in world.ledger.trades()):
            raise world.fail("a requester opened a trade with an unstaked provider")
        # A bid may also come too late for its window; the bond check must refuse the rest.
        refused = [r for p, r in self.node.refusals if p == PROTOCOL_BID]
        self.engaged = any("bond" in r for r in refused)


class _LyingBidProvider(Provider):
    """Bids what its offer does not say: a tenth of its price, or slots it does not have."""

    def make_bid(self, job_id: bytes, request: JobRequest, now_ms: int) -> Bid | None:
        bid = super().make_bid(job_id, request, now_ms)
        if bid is None:
            return None
        lie = int.from_bytes(job_id[:1], "big") % 3
        changes: dict[str, object] = {"signer": b"", "signature": b""}
        if lie == 0:
            changes["price_per_gpu_second"] = max(bid.price_per_gpu_second // 10, 1)
        elif lie == 1:
            changes["free_slots"] = bid.free_slots + 7
        else:
            changes["model"] = "H100-80GB"
        return self.ctx.sign(dataclasses.replace(bid, **changes))  # type: ignore[arg-type]


class _LyingBidService(MarketService):
    provider_cls = _LyingBidProvider


class ContradictingBid(Cheat):
    name = "contradicting-bid"
    caught_by = "a bid is accepted only if it agrees with its signer's live offer"

    def nodes(self) -> list[SimNode]:
        inventory = read_inventory(simulate_gpus="RTX4090:1", simulate_seed="liar")
        self.node = SimNode(
            name="cheater",
            key=self.key,
            world=self.world,
            root=self.world.root,
            service_cls=_LyingBidService,
            inventory=inventory,
            price=30,
            honest=False,
        )
        return [self.node]

    async def verify(self) -> None:
        world = self.world
        if any(t.terms.provider == self.key.address for t in world.ledger.trades()):
            raise world.fail("a requester took a bid that contradicts its signer's offer")
        refused = [r for p, r in self.node.refusals if p == PROTOCOL_BID]
        self.engaged = any("offer" in r for r in refused)


class _ForgedAckExchange(ProviderExchange):
    """Claims the payment without the requester's ack: a Receipt whose DeliveryAck it signed
    itself, for a delivery of all-zero roots."""

    async def wait_ack(self, record: JobRecord) -> DeliveryAck | None:
        aid = record.attempt_job_id
        zero = self.ctx.sign(
            Delivery(
                job_id=ledger.JobId(aid),
                output_root=bytes(32),
                plain_root=bytes(32),
                output_bytes=0,
                wall_ms=record.request.max_wall_ms,
                exit_status=0,
            )
        )
        forged = self.ctx.sign(DeliveryAck(delivery=zero))
        self.acks[aid] = forged
        return forged


class _ZeroReceiptProvider(Provider):
    """Runs nothing, then settles with a forged ack of a zero delivery."""

    exchange_cls = _ForgedAckExchange

    async def run_job(self, record: JobRecord) -> None:
        self._release(record)
        fake = RunResult(
            outcome="succeeded",
            reason="",
            exit_status=0,
            wall_ms=record.request.max_wall_ms,
            outputs_digest=bytes(32),
            files=(),
            stdout=b"",
            stderr=b"",
        )
        self.book.update(record, state=JobState.SETTLING, result=fake)


class _ZeroReceiptService(MarketService):
    provider_cls = _ZeroReceiptProvider


class _WithholdingExchange(ProviderExchange):
    """Runs the job, then never hands over its (sealed) outputs."""

    async def on_sealed(self, peer_id: str, data: bytes) -> bytes:
        raise NetError("outputs withheld")

    async def on_sealed_chunks(self, peer_id: str, data: bytes) -> bytes:
        raise NetError("outputs withheld")


class _WithholdingProvider(Provider):
    exchange_cls = _WithholdingExchange


class _WithholdingService(MarketService):
    provider_cls = _WithholdingProvider


class _UnpaidProviderCheat(Cheat):
    """A provider that must never be paid (it did no work, or kept the work to itself)."""

    service_cls: ClassVar[type[MarketService]]

    def nodes(self) -> list[SimNode]:
        inventory = read_inventory(simulate_gpus="RTX4090:1", simulate_seed=self.name)
        self.node = SimNode(
            name="cheater",
            key=self.key,
            world=self.world,
            root=self.world.root,
            service_cls=self.service_cls,
            inventory=inventory,
            price=10,
            honest=False,
        )
        return [self.node]

    async def verify(self) -> None:
        world = self.world
        trades = [t for t in world.ledger.trades() if t.terms.provider == self.key.address]
        self.engaged = bool(trades)
        for trade in trades:
            if trade.status is TradeStatus.SETTLED:
                raise world.fail(
                    f"{self.name} was paid {trade.paid} for {trade.terms.job_id.hex()[:12]}"
                )
        account = world.ledger.state.account(self.key.address)
        if account.earned:
            raise world.fail(f"{self.name} earned {account.earned}")


class ZeroReceipt(_UnpaidProviderCheat):
    name = "zero-receipt"
    caught_by = "a Receipt settles only with the requester's DeliveryAck of the delivered outputs"
    service_cls = _ZeroReceiptService

    async def verify(self) -> None:
        await super().verify()
        refused = [
            error
            for tx, error in self.world.ledger.failed
            if isinstance(tx, ledger.Receipt) and tx.signer == self.key.address
        ]
        self.engaged = bool(refused)
        other = [e for e in refused if "ack" not in e]
        if other:
            raise self.world.fail(f"the forged receipts failed for other reasons: {other}")


class OutputWithholding(_UnpaidProviderCheat):
    name = "output-withholding"
    caught_by = "the requester acks (and so lets the provider settle) only outputs it fetched"
    service_cls = _WithholdingService


class FetchThenCancelRequester(Requester):
    """While its trade is open, grabs whatever the provider serves of the outputs, then
    cancels the trade instead of letting it settle."""

    grabbed: list[bytes]

    async def watch_trade(self, record: JobRecord) -> None:
        ctx = self.ctx
        aid = record.attempt_job_id
        peer = record.counterparty_peer_id
        trade = ctx.chain.trade(aid)
        if trade is None or trade.status is not TradeStatus.OPEN:
            await super().watch_trade(record)  # too late to cheat on this one
            return
        for _ in range(fetch_then_cancel_polls_max):
            trade = ctx.chain.trade(aid)
            if trade is None or trade.status is not TradeStatus.OPEN:
                break
            try:
                data = await ctx.request(peer, PROTOCOL_SEALED, aid)
            except NetError:
                await trio.sleep(poll_ms / 1000)
                continue
            self.grabbed.append(data)
            for protocol in (PROTOCOL_OUTPUTS, PROTOCOL_OUTPUT):
                try:  # whatever else a provider might hand out before it is paid
                    self.grabbed.append(await ctx.request(peer, protocol, aid))
                except NetError:
                    continue
            break
        record = self.book[record.job_id]
        self.book.update(record, cancel_requested=True)
        await self.cancel_trade(self.book[record.job_id])


class FetchThenCancel(Cheat):
    name = "fetch-then-cancel"
    caught_by = (
        "outputs travel encrypted and the key only in the settling Receipt; a Cancel pays "
        "the provider pro rata for the time since the trade opened"
    )

    def nodes(self) -> list[SimNode]:
        grabbed: list[bytes] = []
        self.grabbed = grabbed

        class Grabber(FetchThenCancelRequester):
            pass

        Grabber.grabbed = grabbed

        class Service(MarketService):
            requester_cls = Grabber

        self.node = SimNode(
            name="cheater",
            key=self.key,
            world=self.world,
            root=self.world.root,
            service_cls=Service,
            honest=False,
        )
        return [self.node]

    async def act(self) -> None:
        submission = JobSubmission(
            argv=("sim-job", "grab"),
            inputs=(("in.txt", self.world.rng.randbytes(64)),),
            requirements=Requirements(gpus=1),
            max_price_per_gpu_second=100,
            max_wall_ms=2_000,
            deadline_ms=sim_now_ms() + 30_000,
        )
        self.submission = submission
        self.job_id = (await _submit(self.world, self.node, submission)).job_id

    def final(self) -> bool:
        job_id = getattr(self, "job_id", None)
        if job_id is None or self.node.service is None:
            return False
        return self.node.service.get(job_id).state.terminal

    async def verify(self) -> None:
        world = self.world
        expected = expected_outputs(self.submission.argv, self.submission.inputs)
        for data in self.grabbed:
            for plain in expected.values():
                if plain.strip() in data:
                    raise world.fail("the requester got the outputs of a trade it then cancelled")
        self.engaged = bool(self.grabbed)
        for trade in world.trades_of(self.job_id):
            by = world.ledger.cancelled_by.get(trade.terms.job_id)
            # A provider gives up a trade it got no ack for by its own Cancel (paid nothing).
            if trade.status is TradeStatus.CANCELLED and by == self.key.address:
                if trade.paid <= 0:
                    raise world.fail(
                        f"the requester's cancel of {trade.terms.job_id.hex()[:12]} paid the "
                        "provider nothing"
                    )


class _CheapExecutor(SimExecutor):
    """Skips the work: every job's output is the same cheap guess."""

    def outputs_for(self, spec: JobSpec) -> dict[str, bytes]:
        return {"result.txt": b"0\n"}


class CheapWork(Cheat):
    name = "cheap-work"
    caught_by = (
        "--verify 2: a delivery the majority of replicas contradicts is never acked, and "
        "SlashOutvoted slashes its provider"
    )
    jobs_verify = 2

    def nodes(self) -> list[SimNode]:
        inventory = read_inventory(simulate_gpus="RTX4090:1", simulate_seed="cheap")
        self.node = SimNode(
            name="cheater",
            key=self.key,
            world=self.world,
            root=self.world.root,
            inventory=inventory,
            price=10,
            executor_cls=_CheapExecutor,
            honest=False,
        )
        return [self.node]

    async def verify(self) -> None:
        world = self.world
        trades = [t for t in world.ledger.trades() if t.terms.provider == self.key.address]
        for trade in trades:
            if trade.status is TradeStatus.SETTLED:
                raise world.fail(f"cheap work was paid {trade.paid}")
        account = world.ledger.state.account(self.key.address)
        self.engaged = bool(trades)
        # SlashOutvoted needs the cheater's signed delivery and two settled replicas that
        # agree: count the groups that had both.
        delivered = {r.job_id for r in self.node.market.list(Role.PROVIDER) if r.result is not None}
        outvoted = 0
        for job in world.jobs:
            records = world.group(job.job_id)
            group = [t for r in records for t in world.trades_of(r.job_id)]
            cheated = any(r.job_id in delivered for r in records)
            settled = [t for t in group if t.status is TradeStatus.SETTLED]
            outvoted += cheated and len(settled) >= 2
        if account.slashed < outvoted:
            raise world.fail(
                f"cheap work outvoted by --verify 2 in {outvoted} job(s) was slashed "
                f"{account.slashed} time(s)"
            )


class CheapWorkUnverified(Cheat):
    """A provider that returns cheap wrong work to a requester that did not ask for
    ``--verify``: nothing in the protocol can tell, so the run must fail (the invariants'
    own test; never part of the zoo)."""

    name = "cheap-work-unverified"
    caught_by = "nothing: the honest requester's output check fails the run"

    def nodes(self) -> list[SimNode]:
        inventory = read_inventory(simulate_gpus="RTX4090:1", simulate_seed="cheap")
        return [
            SimNode(
                name="cheater",
                key=self.key,
                world=self.world,
                root=self.world.root,
                inventory=inventory,
                price=1,
                executor_cls=_CheapExecutor,
                honest=False,
            )
        ]

    async def verify(self) -> None:
        self.engaged = any(t.terms.provider == self.key.address for t in self.world.ledger.trades())


ZOO: dict[str, type[Cheat]] = {
    cls.name: cls
    for cls in (
        NoCheat,
        NoShow,
        CrashingManifest,
        UnfundedFlooder,
        AwardSquatter,
        UnstakedBidder,
        ContradictingBid,
        ZeroReceipt,
        OutputWithholding,
        FetchThenCancel,
        CheapWork,
    )
}
"""The cheats whose checks have landed: every CI seed runs one of them."""
PENDING: dict[str, type[Cheat]] = {cls.name: cls for cls in (CheapWorkUnverified,)}
"""Cheats whose checks have not landed yet (``--cheat NAME`` runs one)."""


# --- the scenario ---------------------------------------------------------------------------


def sim_config() -> MarketConfig:
    return MarketConfig.for_tests(
        bid_window_ms=400,
        attempt_slack_ms=3_000,
        award_open_timeout_ms=3_000,
        reservation_ms=2_000,
        request_timeout_s=2.0,
    )


@dataclasses.dataclass(frozen=True)
class SimResult:
    seed: int
    cheat: str
    engaged: bool
    jobs: int
    states: tuple[str, ...]
    faults: tuple[float, float, int]
    restarts: int
    blocks: int
    network: NetworkStatistics
    sim_seconds: float
    state_root: str
    """The ledger's state root at the end: equal runs of one seed end on equal roots."""


async def _submit(world: World, node: SimNode, submission: JobSubmission) -> JobRecord:
    """Submit once the node knows an offer that fits (a node that just restarted has an
    empty offer directory for a heartbeat)."""
    from compute.market.exceptions import Unsatisfiable

    last = ""
    for _ in range(200):
        if node.service is not None:
            try:
                return await node.service.submit(submission)
            except Unsatisfiable as exc:
                last = str(exc)
        await trio.sleep(0.1)
    raise world.fail(f"{node.name} could not submit for 20 s: {last}")


async def _wait_for(world: World, what: str, done: Callable[[], bool], timeout_ms: int) -> None:
    with trio.move_on_after(timeout_ms / 1000):
        while not done():  # noqa: ASYNC110 - a poll in mock time costs no wall time
            await trio.sleep(poll_ms / 1000)
        return
    raise world.fail(f"{what} did not happen within {timeout_ms} ms of simulated time")


async def _restart(world: World, node: SimNode, down_ms: int) -> None:
    if not node.up:
        return
    await node.stop()
    await trio.sleep(down_ms / 1000)
    await node.start()


async def _chaos(world: World) -> None:
    """Restarts of honest nodes, each at a random moment or when one of its jobs reaches a
    random state (so at any step of either side's protocol)."""
    rng = world.rng
    honest = [n for n in world.nodes if n.honest]
    for _ in range(rng.choice((0, 0, 1, 2))):
        node = rng.choice(honest)
        down_ms = rng.choice((0, 50, 500, 1_500))
        if rng.random() < 0.4:
            await trio.sleep(rng.uniform(0, 6))
        else:
            target = rng.choice(list(JobState)[:5])
            if not node.up:
                continue
            with trio.move_on_after(rng.uniform(2, 15)):
                events = node.market.subscribe()
                async with events:
                    async for record in events:
                        if record.state is target:
                            break
        world.notes.append(f"restart {node.name} down {down_ms} ms")
        world.trace.append(f"{trio.current_time():8.3f} {node.name} restart, down {down_ms} ms")
        await _restart(world, node, down_ms)


async def simulate(
    seed: int, root: Path, *, cheat: str | None = None, guard: LivelockGuard | None = None
) -> SimResult:
    """One seeded run: an honest requester's jobs among two honest providers and one cheat."""
    rng = random.Random(seed)
    names = list(ZOO)
    cheat_name = cheat if cheat is not None else names[seed % len(names)]
    cheat_cls = ZOO.get(cheat_name) or PENDING[cheat_name]
    keys = [seeded_key(seed, i) for i in range(4)]
    balances = [(BALANCE, 0), (BALANCE, BOND), (BALANCE, BOND)]
    balances.append((cheat_cls.balance(), cheat_cls.bonded()))
    genesis = ledger.Genesis(
        chain_id=CHAIN_ID,
        genesis_time_ms=ledger_genesis_time_ms,
        accounts=tuple(
            ledger.GenesisAccount(k.address, balance, bonded)
            for k, (balance, bonded) in zip(keys, balances, strict=True)
            if balance or bonded
        ),
        params=SIM_PARAMS,
        validators=(ledger.Validator(keys[0].address, 1),),
    )
    async with trio.open_nursery() as nursery:
        if guard is not None:
            guard.scope = nursery.cancel_scope
        world = World(seed, root, nursery, sim_config(), genesis)
        world.rng = rng
        world.network.rng = rng
        await nursery.start(world.ledger.run)
        slow = rng.random() < 0.5
        world.nodes = [
            SimNode(name="requester", key=keys[0], world=world, root=root),
            SimNode(
                name="p1",
                key=keys[1],
                world=world,
                root=root,
                inventory=read_inventory(simulate_gpus="RTX4090:2", simulate_seed="p1"),
                price=rng.randint(25, 40),
                duration_ms=rng.randint(100, 600),
            ),
            SimNode(
                name="p2",
                key=keys[2],
                world=world,
                root=root,
                inventory=read_inventory(simulate_gpus="RTX4090:1", simulate_seed="p2"),
                price=rng.randint(25, 40),
                duration_ms=1_500 if slow else rng.randint(100, 600),
            ),
        ]
        the_cheat = cheat_cls(world, keys[3])
        world.nodes += the_cheat.nodes()
        for node in world.nodes:
            await node.start()
        providers = sum(1 for n in world.nodes if n.inventory is not None)
        await _wait_for(
            world,
            "every node sees every provider's offer",
            lambda: all(
                len(n.directory.offers(sim_now_ms())) >= providers - (n.inventory is not None)
                for n in world.nodes
            ),
            10_000,
        )
        faults = Faults(
            drop_rate=rng.choice((0.0, 0.0, 0.02, 0.1)),
            duplicate_rate=rng.choice((0.0, 0.05, 0.2)),
            delay_ms=(1, rng.choice((5, 30, 100))),
        )
        world.network.faults = faults
        started = trio.current_time()

        async def honest_jobs() -> None:
            for i in range(rng.randint(1, 3)):
                await trio.sleep(rng.uniform(0, 1.5))
                submission = JobSubmission(
                    argv=("sim-job", f"{seed}-{i}"),
                    inputs=(("in.txt", rng.randbytes(rng.randint(1, 300))),),
                    requirements=Requirements(gpus=1),
                    max_price_per_gpu_second=100,
                    max_wall_ms=2_000,
                    deadline_ms=sim_now_ms() + 60_000,
                    strategy="cheapest" if rng.random() < 0.6 else rng.choice(STRATEGIES),
                    verify=cheat_cls.jobs_verify,
                )
                record = await _submit(world, world.requester, submission)
                world.jobs.append(HonestJob(record.job_id, submission))

        async with trio.open_nursery() as scenario:
            scenario.start_soon(honest_jobs)
            scenario.start_soon(the_cheat.act)
            scenario.start_soon(_chaos, world)

        def settled() -> bool:
            return the_cheat.final() and all(
                (group := world.group(j.job_id)) and all(r.state.terminal for r in group)
                for j in world.jobs
            )

        await _wait_for(world, "every honest job is final", settled, run_sim_ms_max)
        # Heal: no more faults, everyone up; let the chain pass every deadline.
        world.network.faults = Faults()
        for node in world.nodes:
            if not node.up:
                await node.start()
        deadlines = [t.terms.deadline_ms for t in world.ledger.trades()]
        until_ms = max(deadlines, default=0) + settle_margin_ms

        def closed() -> bool:
            state = world.ledger.state
            return state.time_ms > until_ms or all(
                t.status is not TradeStatus.OPEN for t in state.trades.values()
            )

        await _wait_for(
            world, "every trade closes", closed, max(until_ms - sim_now_ms(), 0) + 5_000
        )
        await check_invariants(world)
        await the_cheat.verify()
        result = SimResult(
            seed=seed,
            cheat=cheat_name,
            engaged=the_cheat.engaged,
            jobs=len(world.jobs),
            states=tuple(
                r.state.label for j in world.jobs if (r := world.record(j.job_id)) is not None
            ),
            faults=(faults.drop_rate, faults.duplicate_rate, faults.delay_ms[1]),
            restarts=sum(n.restarts for n in world.nodes),
            blocks=world.ledger.blocks,
            network=world.network.stats,
            sim_seconds=round(trio.current_time() - started, 3),
            state_root=world.ledger.state.root.hex(),
        )
        nursery.cancel_scope.cancel()
    return result


def run_seed(seed: int, *, cheat: str | None = None) -> SimResult:
    """Run one seed in a fresh trio run with a seeded scheduler and the simulation clock."""
    # trio shuffles runnable tasks with this module-level RNG; seeding it, and having trio order
    # each batch by task creation first (as pytest-trio turns on; otherwise the order depends
    # on object addresses), makes a seed replay the same in any process.
    trio._core._run._r.seed(seed)
    trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    # Job stores sync every write; on a memory file system that costs little (the soak runs
    # thousands of seeds), and nothing of a run depends on the disk.
    scratch = shm_dir if os.access(shm_dir, os.W_OK) else None
    guard = LivelockGuard()
    with tempfile.TemporaryDirectory(prefix="gpumesh-market-sim-", dir=scratch) as tmp:
        try:
            with threads_inline():
                result: SimResult = trio.run(
                    lambda: simulate(seed, Path(tmp), cheat=cheat, guard=guard),
                    clock=trio.testing.MockClock(autojump_threshold=0),
                    instruments=[guard],
                )
        except BaseException as error:
            if guard.tripped:
                raise SimFailure(f"seed {seed}: {guard.tripped}") from error
            if not isinstance(error, BaseExceptionGroup):
                raise
            group = error
            failure = _first_assertion(group)
            if failure is None:
                raise
            raise failure from group
    if guard.tripped:
        raise SimFailure(f"seed {seed}: {guard.tripped}")
    return result


def _first_assertion(error: BaseException) -> AssertionError | None:
    if isinstance(error, AssertionError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _first_assertion(inner)
            if found is not None:
                return found
    return None


def replay_command(seed: int, cheat: str | None = None) -> str:
    tail = f" --cheat {cheat}" if cheat else ""
    return f".venv/bin/python -m compute.market.simulation --seed {seed}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run market simulation seeds (the zoo).")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds from --seed")
    parser.add_argument("--cheat", default=None, choices=[*ZOO, *PENDING], help="force a cheat")
    parser.add_argument("--verbose", action="store_true", help="log the services' warnings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL)
    failures = 0
    started_all = time.perf_counter()
    by_cheat: dict[str, dict[str, int]] = {}
    for seed in range(args.seed, args.seed + args.seeds):
        started = time.perf_counter()
        try:
            result = run_seed(seed, cheat=args.cheat)
        except AssertionError as exc:
            failures += 1
            print(json.dumps({"seed": seed, "ok": False, "error": str(exc)}), flush=True)
            print(f"replay: {replay_command(seed, args.cheat)}", file=sys.stderr)
            continue
        counts = by_cheat.setdefault(result.cheat, {"passed": 0, "engaged": 0})
        counts["passed"] += 1
        counts["engaged"] += result.engaged
        record = dataclasses.asdict(result)
        record.update(ok=True, wall_s=round(time.perf_counter() - started, 3))
        print(json.dumps(record), flush=True)
    summary = {
        "seeds": args.seeds,
        "passed": args.seeds - failures,
        "wall_s": round(time.perf_counter() - started_all, 1),
        "cheats": by_cheat,
    }
    print(json.dumps(summary), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
