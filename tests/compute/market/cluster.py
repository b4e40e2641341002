"""In-process market nodes for tests: real p2p meshes on loopback adapted to ``MarketNetAPI``,
one real ``LocalChain`` (ledger store on disk) shared by all, real executors and job stores.

Node 0 is the requester (no provider side); nodes 1..n provide simulated GPUs. Each node's
mesh and each node's market service run in their own cancel scopes, so a test can stop a
node (it vanishes from the network) or restart just its market service on the same store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import trio

import ledger
import p2p
from compute import (
    Executor,
    OfferConfig,
    OfferDirectory,
    OfferPublisher,
    OfferRejected,
    SlotAllocator,
    read_inventory,
)
from compute.market import (
    JobRecord,
    JobState,
    JobStore,
    MarketConfig,
    MarketService,
    ProviderSide,
    Role,
)
from compute.market._wire import PROTOCOL_SEALED, PROTOCOL_SEALED_CHUNKS
from compute.market.testing import LocalChain
from ledger.testing import funded_genesis
from node._market import MeshNet
from p2p.testing import seed_for, start_mesh, wait_until

CHAIN_ID = "gpumesh-market-test"
BALANCE = 10**12
PARAMS = ledger.ChainParams(provider_bond_min=1_000, charge_min=1)
"""The chain's rules in tests: a provider bond and a minimum charge, as on a real network (no
fee and no slash yet: the money checks here count neither)."""
BOND = 10_000
"""Every genesis account's bond (on top of ``BALANCE``), so every provider may be awarded."""
NAMESPACE = "market-test"
DEFAULT_PROVIDERS = (("RTX4090:2", 30), ("RTX4090:1", 50), ("A100-80GB:1", 40))
"""``(simulate_gpus, price per GPU-second)`` of providers 1, 2 and 3."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class TamperingNet(MeshNet):
    """A byzantine provider's wire: flips a byte of every sealed output range it serves (the
    last plaintext hash: the chunks no longer match the committed root)."""

    def set_handler(self, protocol: str, handler: Callable[[str, bytes], Awaitable[bytes]]) -> None:
        if protocol in (PROTOCOL_SEALED, PROTOCOL_SEALED_CHUNKS):

            async def tampered(peer_id: str, request: bytes) -> bytes:
                data = await handler(peer_id, request)
                return data[:-1] + bytes([data[-1] ^ 0xFF]) if data else data

            super().set_handler(protocol, tampered)
            return
        super().set_handler(protocol, handler)


@dataclasses.dataclass
class Node:
    index: int
    key: ledger.SigningKey
    mesh: p2p.Mesh
    scopes: list[trio.CancelScope]
    net: MeshNet
    directory: OfferDirectory
    store_path: Path
    provider: ProviderSide | None
    config: MarketConfig
    store: JobStore | None = None
    service: MarketService | None = None
    service_scope: trio.CancelScope | None = None
    service_stopped: trio.Event = dataclasses.field(default_factory=trio.Event)

    @property
    def market(self) -> MarketService:
        assert self.service is not None, f"node {self.index} has no running market service"
        return self.service


@dataclasses.dataclass
class Cluster:
    chain: LocalChain
    nodes: list[Node]
    nursery: trio.Nursery

    @property
    def requester(self) -> Node:
        return self.nodes[0]

    async def start_service(self, node: Node, *, clock_ms: Callable[[], int] = now_ms) -> None:
        node.store = JobStore(node.store_path)
        node.service = MarketService(
            node.key,
            CHAIN_ID,
            node.net,
            self.chain,
            node.store,
            node.directory,
            node.provider,
            node.config,
            clock_ms=clock_ms,
        )
        scope = trio.CancelScope()
        node.service_scope = scope
        service = node.service

        stopped = trio.Event()
        node.service_stopped = stopped

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await service.run(task_status=task_status)
            finally:
                stopped.set()

        await self.nursery.start(run)

    async def stop_service(self, node: Node) -> None:
        assert node.service_scope is not None and node.store is not None
        node.service_scope.cancel()
        # The service's nursery unwinds first (the executor kills its job on the way out).
        await node.service_stopped.wait()
        node.store.close()
        node.service = None
        node.store = None

    def diagnostics(self) -> str:
        lines = []
        for n in self.nodes:
            market = n.service.statistics() if n.service is not None else "stopped"
            topics = {
                t.rsplit("/", 2)[-2]: (v["in_total"], v["out_total"], v["dropped_queue_full"])
                for t, v in n.mesh.statistics()["topics"].items()
            }
            lines.append(f"node {n.index}: peers {n.mesh.peer_count()} {market} {topics}")
        return "\n".join(lines)

    async def stop_node(self, node: Node) -> None:
        """The node vanishes: its market service, offers and mesh stop, no goodbye."""
        await self.stop_service(node)
        for scope in node.scopes:
            scope.cancel()

    async def wait_state(
        self,
        node: Node,
        job_id: bytes,
        states: set[JobState],
        timeout_s: float,
        role: Role = Role.REQUESTER,
    ) -> JobRecord:
        def reached() -> bool:
            try:
                state = node.market.get(job_id, role).state
            except KeyError:
                return False
            if state.terminal and state not in states:
                raise AssertionError(
                    f"job ended {state.label}, not {sorted(s.label for s in states)}: "
                    f"{node.market.get(job_id, role).to_json()}\n{self.diagnostics()}"
                )
            return state in states

        try:
            await wait_until(reached, timeout_s, f"job reaches {sorted(s.label for s in states)}")
        except AssertionError:
            try:
                now = node.market.get(job_id, role).to_json()
            except KeyError:
                now = {"state": "unknown to this node"}
            raise AssertionError(
                f"job {job_id.hex()[:12]} on node {node.index} did not reach "
                f"{sorted(s.label for s in states)} in {timeout_s} s; it is {now}"
            ) from None
        return node.market.get(job_id, role)


@contextlib.asynccontextmanager
async def open_cluster(
    tmp_path: Path,
    *,
    providers: tuple[tuple[str, int], ...] = DEFAULT_PROVIDERS,
    config: MarketConfig | None = None,
    tampering: frozenset[int] = frozenset(),
) -> AsyncIterator[Cluster]:
    """A requester (node 0) and one provider per ``(simulate_gpus, price)``, all on one chain."""
    config = config or MarketConfig.for_tests()
    count = 1 + len(providers)
    keys = [ledger.SigningKey(seed_for(i, NAMESPACE)) for i in range(count)]
    genesis = funded_genesis(keys, BALANCE, chain_id=CHAIN_ID, params=PARAMS, bonded=BOND)
    chain = LocalChain(genesis, ledger.LevelDBStore(tmp_path / "chain"), proposer=keys[0].address)
    p2p_config = p2p.P2PConfig.for_tests()
    nodes: list[Node] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(chain.run)
            cluster = Cluster(chain, nodes, nursery)
            for index in range(count):
                bootstrap = tuple(n.mesh.listen_addrs()[0] for n in nodes)
                scopes: list[trio.CancelScope] = []
                mesh, scope = await start_mesh(
                    nursery,
                    seed_for(index, NAMESPACE),
                    CHAIN_ID,
                    dataclasses.replace(p2p_config, bootstrap=bootstrap),
                )
                assert mesh.public_key == keys[index].address, "mesh key and ledger key must agree"
                net_cls = TamperingNet if index in tampering else MeshNet
                scopes.append(scope)
                net_nursery, net_scope = await nursery.start(_scoped_nursery)
                scopes.append(net_scope)
                net = net_cls(mesh)  # the node's own adapter, so these tests cover it too
                await net_nursery.start(net.run)
                directory = OfferDirectory(CHAIN_ID)
                provider = None
                if index > 0:
                    spec, price = providers[index - 1]
                    inventory = read_inventory(simulate_gpus=spec, simulate_seed=str(index))
                    allocator = SlotAllocator(inventory.gpus)
                    offer_config = dataclasses.replace(
                        OfferConfig.for_tests(), price_per_gpu_second=price
                    )
                    executor = Executor(
                        tmp_path / f"jobs-{index}", sandbox="process", sandbox_uid=None
                    )
                    provider = ProviderSide(executor, allocator, inventory, offer_config)
                    publisher = OfferPublisher(
                        key=keys[index],
                        chain_id=CHAIN_ID,
                        inventory=inventory,
                        allocator=allocator,
                        config=offer_config,
                        sandbox="process",
                        publish=_offer_publisher(mesh),
                    )

                    scopes.append(_start_scoped(nursery, publisher.run))
                scopes.append(
                    _start_scoped(nursery, lambda m=mesh, d=directory: _feed_directory(m, d))
                )
                node = Node(
                    index,
                    keys[index],
                    mesh,
                    scopes,
                    net,
                    directory,
                    tmp_path / f"store-{index}",
                    provider,
                    config,
                )
                nodes.append(node)
            for node in nodes:
                await cluster.start_service(node)
            providers_count = len(providers)
            await wait_until(
                lambda: len(nodes[0].directory.offers(now_ms())) == providers_count,
                20,
                f"the requester sees all {providers_count} provider offers",
            )
            jobs_topic = nodes[0].mesh.topic("jobs")
            await wait_until(
                # Private, but the only way to know the providers' subscriptions reached us.
                lambda: (
                    len(nodes[0].mesh._pubsub.peer_topics.get(jobs_topic, ())) >= providers_count
                ),
                20,
                "the requester knows every provider subscribes to job requests",
            )
            try:
                yield cluster
            finally:
                nursery.cancel_scope.cancel()
    finally:
        # The stores close only once every task that could write to them has ended.
        for node in nodes:
            if node.store is not None:
                node.store.close()
        chain.store.close()


def _offer_publisher(mesh: p2p.Mesh) -> Callable[[bytes], Awaitable[None]]:
    async def publish(data: bytes) -> None:
        try:
            await mesh.publish("offers", "compute.offer/1", data)
        except p2p.P2PError as exc:
            raise RuntimeError(str(exc)) from exc

    return publish


async def _feed_directory(mesh: p2p.Mesh, directory: OfferDirectory) -> None:
    async with mesh.subscribe("offers") as receive:
        async for message in receive:
            try:
                directory.add(message.payload, now_ms())
            except OfferRejected as exc:
                raise AssertionError(f"a test provider sent an invalid offer: {exc}") from exc


def _start_scoped(nursery: trio.Nursery, fn: Callable[[], Awaitable[object]]) -> trio.CancelScope:
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            await fn()

    nursery.start_soon(run)
    return scope


async def _scoped_nursery(
    task_status: trio.TaskStatus[tuple[trio.Nursery, trio.CancelScope]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A nursery for a node's helper tasks, stopped with the node."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            task_status.started((nursery, scope))
            await trio.sleep_forever()
