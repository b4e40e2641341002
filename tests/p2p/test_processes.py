"""Mesh nodes as real processes: a SIGKILLed node does not stop the others, and it rejoins."""

from __future__ import annotations

import pytest

from p2p.testing import NodeProcess, free_ports, multiaddr_of, seed_for

pytestmark = pytest.mark.slow
START_S = 60
GOSSIP_S = 30


def node(index: int, port: int, bootstrap: list[str]) -> NodeProcess:
    args = [
        "--index", str(index),
        "--seed-hex", seed_for(index, "proc").hex(),
        "--chain", "procchain",
        "--port", str(port),
        "--rate", "4",
        "--autostart", "0",
        "--print-recv",
        "--heartbeat-ms", "200",
    ]  # fmt: skip
    for addr in bootstrap:
        args += ["--bootstrap", addr]
    return NodeProcess(args)


def test_kill_9_node_others_keep_gossiping_and_restart_rejoins() -> None:
    ports = free_ports(3)
    anchor_addr = multiaddr_of("127.0.0.1", ports[0], seed_for(0, "proc"))
    nodes = [node(0, ports[0], []), node(1, ports[1], [anchor_addr])]
    victim = node(2, ports[2], [anchor_addr])
    restarted: NodeProcess | None = None
    try:
        anchor = nodes[0]
        for origin in (1, 2):
            anchor.wait_for(
                lambda e, o=origin: e.get("event") == "recv" and e["origin"] == o,
                START_S,
                f"node 0 receives gossip from node {origin}",
            )
        old_pid = victim.proc.pid
        victim.kill()
        # After the kill: node 1's newer messages keep arriving at node 0...
        first = anchor.wait_for(lambda e: e.get("event") == "recv" and e["origin"] == 1, 10, "x")
        anchor.wait_for(
            lambda e: (
                e.get("event") == "recv" and e["origin"] == 1 and e["seq"] >= first["seq"] + 8
            ),
            GOSSIP_S,
            "node 0 keeps receiving node 1's gossip (8 more messages) after node 2 was killed",
        )
        # ...and node 2, restarted with the same key and port, is heard from again.
        restarted = node(2, ports[2], [anchor_addr])
        event = anchor.wait_for(
            lambda e: e.get("event") == "recv" and e["origin"] == 2 and e["pid"] != old_pid,
            START_S,
            "node 0 receives gossip from the restarted node 2",
        )
        assert event["pid"] == restarted.proc.pid, f"the message came from the new process: {event}"
        restarted.wait_for(
            lambda e: e.get("event") == "recv" and e["origin"] == 1,
            GOSSIP_S,
            "the restarted node 2 receives node 1's gossip again",
        )
    finally:
        for proc in [*nodes, victim, *([restarted] if restarted else [])]:
            proc.stop()
