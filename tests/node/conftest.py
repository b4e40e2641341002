"""A live two-node testnet shared by the node tests that need one (started once per session)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from node import _testnet
from node.testing import free_port_block, wait_until
from rpc import RpcClient

offer_wait_s = 90.0
"""A provider re-gossips its offer periodically; on a loaded machine the first may be missed."""


@pytest.fixture(scope="session")
def testnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_testnet.TestnetLayout]:
    """node0 validates and sells a simulated GPU; node1 buys."""
    directory = tmp_path_factory.mktemp("testnet") / "net"
    layout = _testnet.init_testnet(
        directory,
        2,
        chain_id="node-test",
        validators=1,
        providers=1,
        simulate_gpus="A100-80GB:1",
        base_port=free_port_block(4),
    )
    try:
        _testnet.up(directory)
        buyer = RpcClient.from_home(layout.nodes[1].home)
        wait_until(
            lambda: any(o["gpus"] for o in buyer.call("market_offers")),
            timeout_s=offer_wait_s,
            what="the provider's offer at the buyer",
        )
        wait_until(
            lambda: buyer.call("chain_head")["height"] >= 1, timeout_s=30, what="a first block"
        )
        yield layout
    finally:
        _testnet.down(directory)
