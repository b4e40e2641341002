"""A p2p-only node process for benchmarks, process-level tests and network-namespace runs.

``python -m p2p._benchnode --seed-hex ... --port ...`` runs one Mesh and speaks JSON lines on
stdout: ``ready`` (peer id, addresses), ``peers`` (on every change), ``recv`` (with
``--print-recv``), and at the end ``result`` (counts, latencies, CPU, RSS). On stdin it takes
``start <duration_s>`` (publish at ``--rate`` for that long, then report and exit) and
``stop``. ``--autostart`` publishes from the start without waiting for a command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from typing import Any

import msgpack
import trio

from p2p._mesh import Mesh
from p2p.config import P2PConfig

purpose = "bench"
stdin_line_bytes_max = 4096
latencies_kept_max = 200_000
_profiler: Any = None


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclasses.dataclass
class _State:
    index: int
    rate: float
    size: int
    print_recv: bool
    phase: float = 0.0
    profile_window: bool = True
    sent: int = 0
    received: dict[int, int] = dataclasses.field(default_factory=dict)
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    measuring: bool = False
    publish_done: trio.Event = dataclasses.field(default_factory=trio.Event)


async def _receive(mesh: Mesh, state: _State, channel: trio.MemoryReceiveChannel[Any]) -> None:
    async for message in channel:
        origin, pid, seq, sent_ns, measured = msgpack.unpackb(message.payload)[:5]
        latency_ms = (time.time_ns() - sent_ns) / 1e6
        if measured:
            state.received[origin] = state.received.get(origin, 0) + 1
            if len(state.latencies_ms) < latencies_kept_max:
                state.latencies_ms.append(latency_ms)
        if state.print_recv:
            _emit("recv", origin=origin, pid=pid, seq=seq, latency_ms=round(latency_ms, 2))


async def _publish(mesh: Mesh, state: _State, duration_s: float) -> None:
    interval = 1.0 / state.rate
    deadline = trio.current_time() + duration_s if duration_s > 0 else float("inf")
    # Each node's first message waits its phase of the interval, so N nodes publishing at
    # rate/N each make one evenly spaced stream of messages network-wide, not a burst of N
    # messages at once every N/rate seconds (all nodes get "start" within milliseconds).
    next_at = trio.current_time() + state.phase * interval
    seq = 0
    pid = os.getpid()
    while next_at < deadline:
        await trio.sleep_until(next_at)
        header = [state.index, pid, seq, time.time_ns(), state.measuring]
        padding = b"\0" * max(0, state.size - 40)
        await mesh.publish(purpose, "bench", msgpack.packb([*header, padding]))
        state.sent += 1
        seq += 1
        next_at += interval
    await trio.sleep_until(deadline)
    state.publish_done.set()


async def _watch_peers(mesh: Mesh, started: float, full: int | None) -> None:
    last = -1
    events = mesh.peer_events()
    while True:
        count = mesh.peer_count()
        if full is not None and count >= full and _profiler is not None:
            _profiler.disable()  # --profile-connect: from start-up until connected to all
            full = None
        if count != last:
            by_source = mesh.statistics()["peers_by_source"]
            _emit("peers", count=count, by_source=by_source, t=round(time.monotonic() - started, 3))
            last = count
        with trio.move_on_after(1):
            await events.receive()


async def _commands(nursery: trio.Nursery, mesh: Mesh, state: _State, linger_s: float) -> None:
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    while True:
        chunk = await stream.receive_some(stdin_line_bytes_max)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            words = line.decode().split()
            if not words:
                continue
            if words[0] == "start":
                nursery.start_soon(_measure, nursery, mesh, state, float(words[1]), linger_s)
            elif words[0] == "stop":
                nursery.cancel_scope.cancel()
        if len(buffer) > stdin_line_bytes_max:
            buffer = b""


async def _measure(
    nursery: trio.Nursery, mesh: Mesh, state: _State, duration_s: float, linger_s: float
) -> None:
    if _profiler is not None and state.profile_window:
        _profiler.enable()  # the measured window only, not start-up and connecting
    cpu0, t0 = _cpu_s(), time.monotonic()
    state.measuring = True
    await _publish(mesh, state, duration_s)
    state.measuring = False
    await trio.sleep(linger_s)
    elapsed = time.monotonic() - t0
    if _profiler is not None and state.profile_window:
        _profiler.disable()
    _emit(
        "result",
        index=state.index,
        peer_id=mesh.peer_id,
        sent=state.sent,
        received=state.received,
        latencies_ms=[round(x, 2) for x in state.latencies_ms],
        cpu_percent=round(100 * (_cpu_s() - cpu0) / elapsed, 2),
        rss_mb=round(_rss_mb(), 1),
        peers=mesh.peer_count(),
        rejected=mesh.statistics()["rejected"]["by_reason"],
        pubsub_peers=len(mesh._pubsub.peers),
        gossip_mesh=len(mesh._gossipsub.mesh.get(mesh.topic(purpose), ())),
        topic_peers=len(mesh._pubsub.peer_topics.get(mesh.topic(purpose), ())),
        dropped=sum(t["dropped_queue_full"] for t in mesh.statistics()["topics"].values()),
        counters={
            key: mesh.statistics().get(key, 0)  # .get: the harness also runs older trees
            for key in (
                "dial_attempts",
                "dial_failures",
                "refused_peers_max",
                "dht_walks",
                "dht_probes",
                "records_published",
                "records_received",
                "connections_opened",
                "connections_closed",
                "streams_opened",
            )
        },
        dial_failures_by_reason=mesh.statistics()["dial_failures_by_reason"],
    )
    nursery.cancel_scope.cancel()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--seed-hex", required=True)
    parser.add_argument("--chain", default="benchchain")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--mdns", action="store_true")
    parser.add_argument("--no-dht", action="store_true")
    parser.add_argument("--rate", type=float, default=1.0, help="messages/s this node sends")
    parser.add_argument("--size", type=int, default=256, help="payload bytes")
    parser.add_argument(
        "--phase", type=float, default=0.0, help="first publish after this part of the interval"
    )
    parser.add_argument("--autostart", type=float, default=None, help="publish for N s (0=ever)")
    parser.add_argument("--linger", type=float, default=5.0)
    parser.add_argument("--print-recv", action="store_true")
    parser.add_argument("--heartbeat-ms", type=int, default=1000)
    parser.add_argument("--degree", type=int, nargs=3, default=[4, 3, 6])
    parser.add_argument("--degree-lazy", type=int, default=None, help="default: P2PConfig's")
    parser.add_argument("--protocols", default="/meshsub/1.1.0,/meshsub/1.0.0")
    parser.add_argument("--strict-signing", action="store_true")
    parser.add_argument("--no-caches", action="store_true", help="leave libp2p hot paths as is")
    parser.add_argument("--dial-backoff-ms", type=int, nargs=2, default=[250, 5_000])
    parser.add_argument("--profile", default=None, help="write cProfile stats here at exit")
    parser.add_argument(
        "--profile-connect",
        type=int,
        default=None,
        metavar="PEERS",
        help="profile from start-up until connected to PEERS peers, not the measured window",
    )
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> None:
    started = time.monotonic()
    config = dataclasses.replace(
        P2PConfig.default(),
        listen_host=args.host,
        listen_port=args.port,
        bootstrap=tuple(args.bootstrap),
        mdns=args.mdns,
        dht=not args.no_dht,
        gossip_heartbeat_ms=args.heartbeat_ms,
        gossip_degree=args.degree[0],
        gossip_degree_low=args.degree[1],
        gossip_degree_high=args.degree[2],
        gossip_degree_lazy=(
            P2PConfig.default().gossip_degree_lazy if args.degree_lazy is None else args.degree_lazy
        ),
        gossip_protocols=tuple(args.protocols.split(",")),
        gossip_strict_signing=args.strict_signing,
        libp2p_hot_path_caches=not args.no_caches,
        dial_interval_ms=250,
        backoff_initial_ms=args.dial_backoff_ms[0],
        backoff_max_ms=args.dial_backoff_ms[1],
    )
    mesh = Mesh(bytes.fromhex(args.seed_hex), args.chain, config)
    state = _State(args.index, args.rate, args.size, args.print_recv, args.phase)
    state.profile_window = args.profile_connect is None
    if _profiler is not None and args.profile_connect is not None:
        _profiler.enable()
    channel = mesh.subscribe(purpose)
    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.run)
        _emit("ready", peer_id=mesh.peer_id, addrs=mesh.listen_addrs(), pid=os.getpid())
        nursery.start_soon(_receive, mesh, state, channel)
        nursery.start_soon(_watch_peers, mesh, started, args.profile_connect)
        nursery.start_soon(_commands, nursery, mesh, state, args.linger)
        if args.autostart == 0:
            nursery.start_soon(_publish, mesh, state, 0.0)
        elif args.autostart is not None:
            nursery.start_soon(_measure, nursery, mesh, state, args.autostart, args.linger)


def main(argv: list[str] | None = None) -> None:
    global _profiler
    args = _parse(argv)
    if args.profile is None:
        trio.run(_main, args)
        return
    import cProfile
    import signal

    # CPU time, not wall time (the box is shared); enabled only while measuring.
    profiler = _profiler = cProfile.Profile(time.process_time)

    def dump_and_exit(signum: int, frame: object) -> None:
        # The harness SIGTERMs nodes still shutting down: keep what was measured.
        profiler.disable()
        profiler.dump_stats(args.profile)
        os._exit(0)

    signal.signal(signal.SIGTERM, dump_and_exit)
    try:
        trio.run(_main, args)
    finally:
        profiler.dump_stats(args.profile)


if __name__ == "__main__":
    main()
