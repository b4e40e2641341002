"""Two nodes in separate network namespaces, no bootstrap: mDNS alone must join them."""

from __future__ import annotations

import pytest

from p2p.testing import NodeProcess, netns_available, netns_bridge, seed_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(not netns_available(), reason="needs root and `ip netns` (iproute2)"),
]
FIND_S = 60


def test_two_namespaces_find_each_other_by_mdns_and_gossip() -> None:
    with netns_bridge(2) as spaces:
        nodes = []
        try:
            for index, (namespace, address) in enumerate(spaces):
                args = [
                    "--index", str(index),
                    "--seed-hex", seed_for(index, "mdns").hex(),
                    "--chain", "mdnschain",
                    "--host", address,
                    "--port", "7700",
                    "--mdns",
                    "--rate", "2",
                    "--autostart", "0",
                    "--print-recv",
                    "--heartbeat-ms", "200",
                ]  # fmt: skip
                nodes.append(NodeProcess(args, prefix=["ip", "netns", "exec", namespace]))
            found = []
            for index, proc in enumerate(nodes):
                event = proc.wait_for(
                    lambda e: e.get("event") == "peers" and e["count"] == 1,
                    FIND_S,
                    f"node {index} connected to the node in the other namespace",
                )
                assert event["by_source"]["bootstrap"] == 0, f"no bootstrap was configured: {event}"
                found.append(event["by_source"])
                proc.wait_for(
                    lambda e, i=index: e.get("event") == "recv" and e["origin"] == 1 - i,
                    FIND_S,
                    f"node {index} receives gossip from the other namespace",
                )
            assert any(s["mdns"] == 1 for s in found), f"one side dialed an mDNS find: {found}"
        finally:
            for proc in nodes:
                proc.stop()
