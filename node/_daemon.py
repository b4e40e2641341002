"""The node daemon: composes p2p, consensus, ledger, compute and rpc into one trio service."""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

import trio

import consensus
import node as node_pkg
from compute import market
from ledger import Genesis, InvalidGenesis
from node._chain import ChainService, CommitEvent
from node._chain_rpc import block_json, register_chain_methods
from node._compute import ComputeService
from node._explorer import ExplorerIndex, register_explorer_methods
from node._job_logs import forward_job_logs, register_log_methods
from node._market import LedgerChain, MeshNet, register_market_methods
from node._metrics import NodeMetrics
from node.exceptions import ConfigError
from p2p import Mesh, P2PConfig
from rpc import TOPIC_JOBS, TOPIC_NEW_HEADS, TOPIC_PEERS, MethodRegistry, Result, RpcServer

if TYPE_CHECKING:
    # trio-typing (a py-libp2p dependency) shadows trio's own annotations for mypy.
    from trio_typing import TaskStatus

    from ledger import SigningKey
    from node._config import NodeConfig
    from node._home import Home
from node._json import to_json

log = logging.getLogger("node")
shutdown_grace_s = 5.0


class Node:
    """One gpumesh node. ``run`` starts every service, reports ready, runs until cancelled."""

    def __init__(self, home: Home, config: NodeConfig, key: SigningKey) -> None:
        self.home = home
        self.config = config
        self.key = key
        self.chain_id = config.node.chain_id
        self.started_at = time.time()
        try:
            self.genesis = Genesis.load(home.genesis_path)
        except (OSError, InvalidGenesis) as exc:
            raise ConfigError(f"cannot load {home.genesis_path}: {exc}") from None
        if self.genesis.chain_id != self.chain_id:
            raise ConfigError(
                f"[node] chain_id {self.chain_id!r} differs from genesis {self.genesis.chain_id!r}"
            )
        self.mesh = Mesh(key.seed, self.chain_id, self._p2p_config())
        self.chain = ChainService(
            genesis=self.genesis,
            data_dir=home.data_dir,
            key=key,
            mesh=self.mesh,
            config=self._consensus_config(),
        )
        self.compute = ComputeService(
            key=key,
            chain_id=self.chain_id,
            mesh=self.mesh,
            config=config.compute,
            images_dir=home.data_dir / "images",
        )
        self.market_net = MeshNet(self.mesh)
        try:
            self.job_store = market.JobStore(
                home.data_dir / "jobs", inputs_dir=home.data_dir / "blobs" / "inputs"
            )
        except market.StoreFormatError as exc:
            raise ConfigError(str(exc)) from None
        provider = None
        if self.compute.executor is not None:  # provider on and its sandbox works
            provider = market.ProviderSide(
                executor=self.compute.executor,
                allocator=self.compute.allocator,
                inventory=self.compute.inventory,
                offer_config=self.compute.offer_config,
            )
        self.market = market.MarketService(
            key,
            self.chain_id,
            self.market_net,
            LedgerChain(self.chain),
            self.job_store,
            self.compute.directory,
            provider,
            market.MarketConfig(
                stake=config.market.stake,
                fee=config.market.fee,
                bid_window_ms=config.market.bid_window_ms,
                bid_timeout_ms=config.market.bid_timeout_ms,
                spot_check_rate=config.market.spot_check_percent / 100,
                inputs_bytes_max=config.market.inputs_bytes_max,
                outputs_bytes_max=config.market.outputs_bytes_max,
                outputs_dir=str(home.data_dir / "blobs" / "outputs"),
                image_cache_bytes_max=config.images.cache_bytes_max,
                image_registry=config.images.registry,
            ),
            images=self.compute.images,
        )
        self.compute.images_in_use = self.market.images_in_use
        self.registry = MethodRegistry()
        self.rpc = RpcServer(
            self.registry,
            host=config.rpc.host,
            port=config.rpc.port,
            cookie_path=home.cookie_path,
            port_path=home.port_path,
        )
        self._register_methods()
        register_chain_methods(self.registry, self.chain)
        self.compute.register_methods(self.registry)
        register_market_methods(self.registry, self.market)
        register_log_methods(self.registry, self.market)
        self.metrics = NodeMetrics(
            mesh=self.mesh, chain=self.chain, market=self.market, compute=self.compute, rpc=self.rpc
        )
        self.explorer = ExplorerIndex(self.chain, home.data_dir / "explorer")
        register_explorer_methods(self.registry, self.chain, self.explorer)
        self.registry.register(
            "admin_metrics",
            self.metrics.render,
            description="Every counter of this node in the Prometheus text format (also served "
            "on GET /metrics).",
            result=Result("string", "The Prometheus text exposition."),
        )

    def _p2p_config(self) -> P2PConfig:
        c = self.config.p2p
        return dataclasses.replace(
            P2PConfig.default(),
            listen_host=c.listen_host,
            listen_port=c.listen_port,
            bootstrap=c.bootstrap,
            mdns=c.mdns,
            dht=c.dht,
            peers_max=c.peers_max,
        )

    def _consensus_config(self) -> consensus.ConsensusConfig:
        c = self.config.consensus
        return dataclasses.replace(
            consensus.ConsensusConfig.default(),
            create_empty_blocks=c.create_empty_blocks,
            timeout_propose_ms=c.timeout_propose_ms,
            timeout_commit_ms=c.timeout_commit_ms,
            empty_block_interval_ms=c.empty_block_interval_ms,
        )

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Two nurseries so shutdown runs in order: the RPC and application services stop first,
        # then the mesh leaves its peers (py-libp2p misbehaves if pubsub stops under traffic).
        try:
            async with trio.open_nursery() as mesh_nursery:
                await mesh_nursery.start(self.mesh.run)
                async with trio.open_nursery() as app_nursery:
                    await app_nursery.start(self.rpc.run)
                    await app_nursery.start(self.chain.run)
                    app_nursery.start_soon(self._forward_commits, self.chain.subscribe_commits())
                    await app_nursery.start(self.compute.run)
                    await app_nursery.start(self.market_net.run)
                    await app_nursery.start(self.market.run)  # type: ignore[arg-type]
                    await app_nursery.start(self.metrics.run)
                    await app_nursery.start(self.explorer.run)
                    app_nursery.start_soon(self._forward_job_events)
                    app_nursery.start_soon(forward_job_logs, self.market, self.rpc)
                    app_nursery.start_soon(
                        self.compute.release_finished_jobs, self.market.subscribe()
                    )
                    log.info(
                        "node ready",
                        extra={
                            "peer_id": self.mesh.peer_id,
                            "address": self.key.address.hex(),
                            "chain_id": self.chain_id,
                            "listen": ",".join(self.mesh.listen_addrs()),
                            "rpc_port": self.rpc.port,
                        },
                    )
                    app_nursery.start_soon(self._forward_peer_events)
                    task_status.started()
        finally:
            self.job_store.close()
            if self.compute.executor is not None:
                # Every job has ended by now: its reaper exits, its cgroup parents go.
                self.compute.executor.close()

    async def _forward_commits(self, commits: trio.MemoryReceiveChannel[CommitEvent]) -> None:
        async with commits:
            async for event in commits:
                self.rpc.publish(TOPIC_NEW_HEADS, block_json(event.block, full=False))

    async def _forward_job_events(self) -> None:
        async for record in self.market.subscribe():
            self.rpc.publish(TOPIC_JOBS, record.to_json())

    async def _forward_peer_events(self) -> None:
        async for event in self.mesh.peer_events():
            self.rpc.publish(
                TOPIC_PEERS,
                {"peer_id": event.peer_id, "kind": str(event.kind), "source": event.source},
            )

    # -- RPC methods ---------------------------------------------------------------------------

    def _register_methods(self) -> None:
        r = self.registry
        r.register(
            "node_info",
            self.rpc_node_info,
            description="Peer id, address, version, chain id, listen addresses, uptime.",
            result=Result("object", "Node identity and state."),
        )
        r.register(
            "net_peers",
            self.rpc_net_peers,
            description="Connected peers: peer id, addresses, how found, connected since.",
            result=Result("array", "One object per connected peer."),
        )
        r.register(
            "net_statistics",
            self.rpc_net_statistics,
            description="Gossip counters per topic (messages and rates in and out), rejections "
            "by reason and by peer, peers by discovery source, compute and chain counters.",
            result=Result("object"),
        )
        r.register(
            "net_peerCount",
            self.rpc_net_peer_count,
            description="How many peers this node is connected to.",
            result=Result("integer", "The number of connected peers."),
        )

    async def rpc_net_statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] = to_json(self.mesh.statistics())
        stats["compute"] = self.compute.statistics()
        stats["chain"] = {
            "tx_gossip_rejected": self.chain.gossip_rejected,
            "consensus_queue_dropped": self.chain.transport.dropped,
            "consensus_body_fetch_failures": self.chain.transport.fetch_failures,
            "commit_events_dropped": self.chain.commit_events_dropped,
            "consensus_gossip_rejected": self.chain.consensus_rejected,
            "consensus_body_fetches_dropped": self.chain.transport.fetches_dropped,
            "journal_restored": self.chain.journal_restored,
        }
        return stats

    async def rpc_node_info(self) -> dict[str, Any]:
        return {
            "peer_id": self.mesh.peer_id,
            "address": self.key.address.hex(),
            "version": node_pkg.__version__,
            "chain_id": self.chain_id,
            "listen_addrs": self.mesh.listen_addrs(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "home": str(self.home.root),
            "compute": self.compute.provider_json(),
        }

    async def rpc_net_peers(self) -> list[dict[str, Any]]:
        return [
            {
                "peer_id": p.peer_id,
                "addrs": list(p.addrs),
                "source": p.source,
                "connected_since_ms": p.connected_since_ms,
            }
            for p in self.mesh.peers()
        ]

    async def rpc_net_peer_count(self) -> int:
        return self.mesh.peer_count()


async def serve(home: Home, config: NodeConfig, key: SigningKey) -> None:
    """Run a node until SIGINT or SIGTERM, then shut it down within ``shutdown_grace_s``."""
    node = Node(home, config, key)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)

            async for signum in signals:
                log.info("shutting down", extra={"signal": signal.Signals(signum).name})
                break
            nursery.cancel_scope.cancel()
