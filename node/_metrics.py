"""What the node exports at ``GET /metrics``: every service's counters in Prometheus form.

Counters and gauges are read from each service's ``statistics()`` (and the chain's read API) at
scrape time, on the trio thread, so one scrape sees one consistent snapshot. The two
histograms need every observation, so a small service follows the chain's committed blocks
(block interval) and the market's job events (time spent in each stage, and how sandboxed runs
ended). ``render`` is registered as ``admin_metrics``; rpc serves it on ``/metrics``.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.core import Metric
    from trio_typing import TaskStatus

    from compute.market import JobRecord, MarketService
    from node._chain import ChainService
    from node._compute import ComputeService
    from p2p import Mesh
    from rpc import RpcServer

log = logging.getLogger("node.metrics")

namespace = "gpumesh"
block_interval_buckets_s = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)
stage_buckets_s = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
jobs_tracked_max = 4096
"""Jobs whose stage stamps are remembered between events (oldest forgotten first)."""


class _Snapshot(Collector):
    """Builds the counter and gauge families from the services' statistics on each scrape."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._p2p()
        yield from self._chain()
        yield from self._market()
        yield from self._rpc()

    def _p2p(self) -> Iterator[Metric]:
        stats: dict[str, Any] = self._m.mesh.statistics()
        peers = GaugeMetricFamily(
            f"{namespace}_peers", "Connected peers by how they were found.", labels=["source"]
        )
        for source, count in sorted(stats.get("peers_by_source", {}).items()):
            peers.add_metric([str(source)], count)
        yield peers
        yield GaugeMetricFamily(
            f"{namespace}_peers_known", "Peers known (candidates to dial).", stats["known_peers"]
        )
        incoming = CounterMetricFamily(
            f"{namespace}_gossip_messages_in", "Gossip messages received.", labels=["topic"]
        )
        outgoing = CounterMetricFamily(
            f"{namespace}_gossip_messages_out", "Gossip messages published.", labels=["topic"]
        )
        delivered = CounterMetricFamily(
            f"{namespace}_gossip_messages_delivered",
            "Gossip messages that passed validation and were delivered.",
            labels=["topic"],
        )
        limited = CounterMetricFamily(
            f"{namespace}_gossip_messages_dropped",
            "Valid gossip dropped by this node: full queue or a peer over its rate.",
            labels=["topic", "reason"],
        )
        rejected_topic = CounterMetricFamily(
            f"{namespace}_gossip_messages_rejected",
            "Gossip messages rejected (invalid, forged, too old...), by topic.",
            labels=["topic"],
        )
        for topic, c in sorted(stats.get("topics", {}).items()):
            incoming.add_metric([topic], c["in_total"])
            outgoing.add_metric([topic], c["out_total"])
            delivered.add_metric([topic], c["delivered_total"])
            limited.add_metric([topic, "queue_full"], c["dropped_queue_full"])
            limited.add_metric([topic, "rate_limited"], c.get("rate_limited", 0))
            # What arrived and was neither delivered nor dropped by us was rejected.
            rejected_topic.add_metric(
                [topic],
                c.get(
                    "rejected",
                    max(
                        0,
                        c["in_total"]
                        - c["delivered_total"]
                        - c["dropped_queue_full"]
                        - c.get("rate_limited", 0),
                    ),
                ),
            )
        yield from (incoming, outgoing, delivered, limited, rejected_topic)
        by_reason = CounterMetricFamily(
            f"{namespace}_gossip_rejected_by_reason",
            "Gossip messages rejected, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(stats.get("rejected", {}).get("by_reason", {}).items()):
            by_reason.add_metric([reason], count)
        yield by_reason
        yield CounterMetricFamily(
            f"{namespace}_gossip_corrupt_frames",
            "Undecodable pubsub frames from peers.",
            stats.get("corrupt_frames", 0),
        )
        yield GaugeMetricFamily(
            f"{namespace}_peers_banned",
            "Peers banned for bad gossip.",
            len(stats.get("banned", [])),
        )

    def _chain(self) -> Iterator[Metric]:
        chain = self._m.chain
        if not chain.ready:
            return
        height, time_ms = chain.head()
        yield GaugeMetricFamily(f"{namespace}_chain_height", "Last committed height.", height)
        yield GaugeMetricFamily(
            f"{namespace}_chain_head_time_seconds",
            "Block time of the last committed block (Unix seconds).",
            time_ms / 1000,
        )
        pool = chain.mempool_statistics()
        yield GaugeMetricFamily(
            f"{namespace}_mempool_transactions", "Transactions waiting.", pool.transactions
        )
        yield GaugeMetricFamily(f"{namespace}_mempool_bytes", "Bytes waiting.", pool.bytes)
        admitted = getattr(pool, "admitted", None)
        if isinstance(admitted, int):
            yield CounterMetricFamily(
                f"{namespace}_mempool_admitted", "Transactions admitted.", admitted
            )
        refused = CounterMetricFamily(
            f"{namespace}_mempool_refused",
            "Transactions refused at admission, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(pool.rejected.items()):
            refused.add_metric([reason], count)
        yield refused
        removed = CounterMetricFamily(
            f"{namespace}_mempool_removed",
            "Admitted transactions removed without being committed.",
            labels=["reason"],
        )
        removed.add_metric(["evicted"], pool.evicted)
        removed.add_metric(["invalid"], pool.dropped_invalid)
        yield removed
        dropped = CounterMetricFamily(
            f"{namespace}_chain_dropped",
            "Chain messages this node dropped or rejected, by what they were.",
            labels=["what"],
        )
        dropped.add_metric(["tx_gossip_rejected"], chain.gossip_rejected)
        dropped.add_metric(["consensus_gossip_rejected"], chain.consensus_rejected)
        dropped.add_metric(["consensus_queue_full"], chain.transport.dropped)
        dropped.add_metric(["consensus_body_fetch_failed"], chain.transport.fetch_failures)
        dropped.add_metric(["commit_event_subscriber_behind"], chain.commit_events_dropped)
        yield dropped
        committed = CounterMetricFamily(
            f"{namespace}_chain_transactions",
            "Transactions this node saw committed since it started, by result.",
            labels=["result"],
        )
        for result, count in sorted(self._m.transactions.items()):
            committed.add_metric([result], count)
        yield committed
        driver = chain.driver
        if driver is not None:
            status = driver.status()
            yield GaugeMetricFamily(
                f"{namespace}_consensus_height", "Height being decided.", status.height
            )
            yield GaugeMetricFamily(
                f"{namespace}_consensus_round", "Round within the height.", status.round
            )
            step = GaugeMetricFamily(
                f"{namespace}_consensus_step",
                "The step within the round: 1 for the current one.",
                labels=["step"],
            )
            for value in type(status.step):
                step.add_metric([value.name.lower()], 1 if value == status.step else 0)
            yield step
            yield GaugeMetricFamily(
                f"{namespace}_consensus_catching_up",
                "1 while a peer has shown a committed height above ours.",
                int(status.catching_up),
            )
            yield GaugeMetricFamily(
                f"{namespace}_consensus_validator",
                "1 when this node votes.",
                int(status.is_validator),
            )

    def _market(self) -> Iterator[Metric]:
        stats = self._m.market.statistics()
        jobs = GaugeMetricFamily(
            f"{namespace}_jobs", "Jobs on this node by role and state.", labels=["role", "state"]
        )
        counts = stats.get("jobs", {})
        assert isinstance(counts, dict)
        for label, count in sorted(counts.items()):
            role, _, state = str(label).partition("_")
            jobs.add_metric([role, state], count)
        yield jobs
        events = CounterMetricFamily(
            f"{namespace}_market_events",
            "Market counters since start (requests, bids, faults, output ranges fetched and "
            "resumed, ...), by name.",
            labels=["event"],
        )
        for name, value in sorted(stats.items()):
            if isinstance(value, int) and not isinstance(value, bool):
                events.add_metric([name], value)
        yield events
        runs = CounterMetricFamily(
            f"{namespace}_sandbox_runs",
            "Jobs this node ran in its sandbox since it started, by how they ended.",
            labels=["outcome"],
        )
        for outcome, count in sorted(self._m.sandbox_runs.items()):
            runs.add_metric([outcome], count)
        yield runs
        offers = self._m.compute.statistics().get("directory", {})
        if isinstance(offers, dict) and isinstance(offers.get("offers"), int):
            yield GaugeMetricFamily(
                f"{namespace}_offers", "Live offers in the market directory.", offers["offers"]
            )

    def _rpc(self) -> Iterator[Metric]:
        stats = self._m.rpc.statistics()
        calls = CounterMetricFamily(
            f"{namespace}_rpc_calls",
            "JSON-RPC calls by method and result (ok or the error code).",
            labels=["method", "result"],
        )
        for (method, result), count in sorted(stats.calls_by_method.items()):
            calls.add_metric([method, result], count)
        yield calls
        yield CounterMetricFamily(
            f"{namespace}_rpc_http_requests", "HTTP requests.", stats.http_requests
        )
        yield GaugeMetricFamily(
            f"{namespace}_rpc_websocket_connections",
            "Open WebSocket connections.",
            stats.websocket_connections,
        )
        yield GaugeMetricFamily(
            f"{namespace}_rpc_subscriptions", "Open subscriptions.", stats.subscriptions
        )


class NodeMetrics:
    """The node's Prometheus registry: snapshots of every service plus two histograms."""

    def __init__(
        self,
        *,
        mesh: Mesh,
        chain: ChainService,
        market: MarketService,
        compute: ComputeService,
        rpc: RpcServer,
    ) -> None:
        self.mesh = mesh
        self.chain = chain
        self.market = market
        self.compute = compute
        self.rpc = rpc
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(namespace="", registry=self.registry)
        self.block_interval = Histogram(
            f"{namespace}_block_interval_seconds",
            "Block time between consecutive committed blocks.",
            buckets=block_interval_buckets_s,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            f"{namespace}_market_stage_seconds",
            "Time a job spent in each market stage, by role.",
            labelnames=["role", "stage"],
            buckets=stage_buckets_s,
            registry=self.registry,
        )
        self.transactions: collections.Counter[str] = collections.Counter()
        self.sandbox_runs: collections.Counter[str] = collections.Counter()
        self._stamps_seen: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()
        self.registry.register(_Snapshot(self))

    async def render(self) -> str:
        """The exposition text (registered as ``admin_metrics``)."""
        await trio.lowlevel.checkpoint()
        return generate_latest(self.registry).decode()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        commits = self.chain.subscribe_commits()
        jobs = self.market.subscribe()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_commits, commits)
            nursery.start_soon(self._follow_jobs, jobs)
            task_status.started()

    async def _follow_commits(self, commits: trio.MemoryReceiveChannel[Any]) -> None:
        last_time_ms: int | None = None
        async with commits:
            async for event in commits:
                if last_time_ms is not None:
                    self.block_interval.observe(max(0, event.time_ms - last_time_ms) / 1000)
                last_time_ms = event.time_ms
                for result in event.tx_results:
                    self.transactions["ok" if result.ok else "failed"] += 1

    async def _follow_jobs(self, jobs: trio.MemoryReceiveChannel[JobRecord]) -> None:
        async with jobs:
            async for record in jobs:
                self.observe_job(record)

    def observe_job(self, record: JobRecord) -> None:
        """Observe the stages ``record`` completed since its last event."""
        role = record.role.name.lower()
        key = (record.job_id.hex(), role)
        seen = self._stamps_seen.pop(key, 0)
        stamps = record.stamps
        for before, after in zip(
            stamps[max(0, seen - 1) : -1], stamps[max(1, seen) :], strict=True
        ):
            self.stage_seconds.labels(role, before.state.label).observe(
                max(0, after.at_ms - before.at_ms) / 1000
            )
        if record.state.terminal:
            if role == "provider" and any(s.state.label == "running" for s in stamps):
                self.sandbox_runs[record.state.label] += 1
            return
        self._stamps_seen[key] = len(stamps)
        while len(self._stamps_seen) > jobs_tracked_max:
            self._stamps_seen.popitem(last=False)
