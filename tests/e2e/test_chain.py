"""A 4-validator chain in processes: agreement, kill -9, halt without fork, catch-up."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import ledger
from node import _testnet
from node._chain_rpc import NOT_READY
from node._home import Home
from node.testing import free_port_block, wait_until
from rpc import RpcCallError, RpcClient

pytestmark = pytest.mark.slow


def client(home: Home) -> RpcClient:
    return RpcClient.from_home(home.root, timeout_s=5.0)


def send_transfer(home: Home, to: bytes, amount: int, chain_id: str) -> str:
    key = home.load_key()
    nonce = client(home).call("chain_account", {"address": key.address.hex()})["next_nonce"]
    tx = ledger.sign_object(
        ledger.Transfer(nonce=nonce, fee=1, recipient=ledger.Address(to), amount=amount),
        key,
        chain_id,
    )
    result = client(home).call("chain_sendTx", {"tx": ledger.encode(tx).hex()})
    return str(result["tx_hash"])


def committed(home: Home, tx_hash: str) -> bool:
    try:
        record = client(home).call("chain_tx", {"hash": tx_hash})
    except RpcCallError:
        return False
    assert record["ok"], f"transaction failed: {record['error']}"
    return True


def height(home: Home) -> int:
    return int(client(home).call("chain_head")["height"])


def reached(home: Home, target: int) -> bool:
    """Whether the node's head is at ``target`` or above; False while its chain service is
    still starting (a restarted node answers RPC before its chain is open)."""
    try:
        return height(home) >= target
    except RpcCallError as exc:
        if exc.code != NOT_READY:
            raise
        return False


def hashes(home: Home, top: int) -> list[str]:
    return [client(home).call("chain_block", {"height": h})["hash"] for h in range(1, top + 1)]


def kill(home: Home) -> None:
    pid = _testnet.read_pid(home)
    assert pid is not None, f"no running node at {home.root}"
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _testnet._alive(pid), timeout_s=5, what="the killed node to exit")


def restart(home: Home) -> None:
    proc = _testnet.start_node(home)
    _testnet.wait_ready([home], [proc])


def test_four_validators_agree_tolerate_one_crash_halt_at_two_and_catch_up(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "net"
    layout = _testnet.init_testnet(directory, 4, chain_id="e2e-chain", base_port=free_port_block(8))
    homes = [Home(n.home) for n in layout.nodes]
    addresses = [bytes.fromhex(n.address) for n in layout.nodes]
    chain_id = layout.chain_id
    try:
        _testnet.up(directory)
        wait_until(
            lambda: all(client(h).call("net_peerCount") == 3 for h in homes),
            timeout_s=20,
            what="a full mesh of 4",
        )
        # Transfers submitted at every node are committed, and every node agrees.
        sent = [
            send_transfer(homes[i], addresses[(i + 1) % 4], 100 + i, chain_id) for i in range(4)
        ]
        for h in homes:
            wait_until(
                lambda h=h: all(committed(h, t) for t in sent),
                timeout_s=30,
                what=f"all 4 transfers committed at {h.root.name}",
            )
        top = min(height(h) for h in homes)
        reference = hashes(homes[0], top)
        for h in homes[1:]:
            assert hashes(h, top) == reference, f"{h.root.name} has a different chain"
        balances = [client(homes[0]).call("chain_account", {"address": a.hex()}) for a in addresses]
        for h in homes[1:]:
            other = [client(h).call("chain_account", {"address": a.hex()}) for a in addresses]
            assert [b["balance"] for b in other] == [b["balance"] for b in balances]

        # One validator of four killed: the other three still hold > 2/3 of the power.
        kill(homes[3])
        tx = send_transfer(homes[0], addresses[1], 7, chain_id)
        wait_until(
            lambda: committed(homes[1], tx),
            timeout_s=30,
            what="a transfer to commit with one validator down",
        )

        # Two of four killed: no quorum. The chain must halt, not fork.
        kill(homes[2])
        stalled_at = height(homes[0])
        tx = send_transfer(homes[0], addresses[1], 9, chain_id)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            assert not committed(homes[0], tx), "committed without a 2/3 quorum"
            time.sleep(0.2)
        assert height(homes[0]) == height(homes[1]) == stalled_at

        # One returns: quorum again; the pending transfer commits.
        restart(homes[2])
        wait_until(
            lambda: committed(homes[0], tx),
            timeout_s=60,
            what="the halted chain to resume once a third validator returned",
        )
        # The other returns and catches up to the same chain by block sync.
        restart(homes[3])
        target = height(homes[0])
        wait_until(
            lambda: reached(homes[3], target),
            timeout_s=60,
            what="the restarted validator to catch up",
        )
        status = client(homes[3]).call("consensus_status")
        assert hashes(homes[3], target) == hashes(homes[0], target), "catch-up forked"
        assert status["last_committed_height"] >= target
    finally:
        _testnet.down(directory)
