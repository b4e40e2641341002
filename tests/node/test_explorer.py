"""Explorer RPC on a live testnet: blocks by range, an account's transactions, receipts, totals."""

from __future__ import annotations

import pytest

import ledger
from node import _testnet
from node._home import Home
from node.testing import wait_until
from rpc import RpcCallError, RpcClient


def send(client: RpcClient, home: Home, to: str, amount: int) -> str:
    key = home.load_key()
    info = client.call("node_info")
    nonce = client.call("chain_account", {"address": key.address.hex()})["next_nonce"]
    tx = ledger.sign_object(
        ledger.Transfer(
            nonce=nonce, fee=1, recipient=ledger.Address(bytes.fromhex(to)), amount=amount
        ),
        key,
        info["chain_id"],
    )
    digest: str = client.call("chain_sendTx", {"tx": ledger.encode(tx).hex()})["tx_hash"]
    return digest


def committed(client: RpcClient, digest: str) -> dict[str, object] | None:
    try:
        found: dict[str, object] = client.call("chain_tx", {"hash": digest})
    except RpcCallError:
        return None
    return found


def test_explorer_pages_blocks_transactions_and_totals(testnet: _testnet.TestnetLayout) -> None:
    seller, buyer = testnet.nodes[0], testnet.nodes[1]
    home = Home(buyer.home)
    client = RpcClient.from_home(home.root)
    before = client.call("chain_accountSummary", {"address": seller.address})["totals"]
    first = send(client, home, seller.address, 11)
    wait_until(lambda: committed(client, first), timeout_s=30, what="the first transfer")
    second = send(client, home, seller.address, 22)
    done = wait_until(lambda: committed(client, second), timeout_s=30, what="the second transfer")
    height = done["height"]
    assert isinstance(height, int)
    wait_until(
        lambda: (
            client.call("chain_accountSummary", {"address": seller.address})["indexed_height"]
            >= height
        ),
        timeout_s=30,
        what="the explorer to index the transfer's block",
    )

    # Blocks, newest first, in pages that meet without gaps.
    page = client.call("chain_blocks", {"limit": 2})
    heights = [b["height"] for b in page["items"]]
    assert heights == [page["head"], page["head"] - 1]
    rest = client.call("chain_blocks", {"before": page["next_before"], "limit": 3})
    below = heights[-1] - 1
    assert [b["height"] for b in rest["items"]] == list(range(below, max(0, below - 3), -1))
    with pytest.raises(RpcCallError, match="limit must be"):
        client.call("chain_blocks", {"limit": 1000})

    # The buyer's transactions: both transfers, newest first, one per page.
    one = client.call("chain_accountTransactions", {"address": buyer.address, "limit": 1})
    assert [t["hash"] for t in one["items"]] == [second]
    assert one["items"][0]["kind"] == "transfer" and one["items"][0]["ok"] is True
    two = client.call(
        "chain_accountTransactions",
        {"address": buyer.address, "limit": 1, "cursor": one["next_cursor"]},
    )
    assert [t["hash"] for t in two["items"]] == [first]
    with pytest.raises(RpcCallError, match="cursor"):
        client.call("chain_accountTransactions", {"address": buyer.address, "cursor": "zz"})
    # The recipient sees them too.
    theirs = client.call("chain_accountTransactions", {"address": seller.address, "limit": 100})
    assert {first, second} <= {t["hash"] for t in theirs["items"]}

    after = client.call("chain_accountSummary", {"address": seller.address})
    assert after["totals"]["earned"] - before["earned"] == 33
    assert after["account"]["balance"] > 0
    spender = client.call("chain_accountSummary", {"address": buyer.address})["totals"]
    assert spender["spent"] >= 33 and spender["fees"] >= 2

    with pytest.raises(RpcCallError, match="exactly one"):
        client.call("chain_receipts", {})
    empty = client.call("chain_receipts", {"provider": buyer.address})
    assert empty == {"items": [], "next_cursor": None}

    methods = {m["name"] for m in client.call("rpc_discover")["methods"]}
    assert {
        "chain_blocks",
        "chain_accountTransactions",
        "chain_receipts",
        "chain_accountSummary",
    } <= methods


def test_a_settled_job_is_listed_by_provider_and_requester(
    testnet: _testnet.TestnetLayout,
) -> None:
    seller, buyer = testnet.nodes[0], testnet.nodes[1]
    client = RpcClient.from_home(buyer.home)
    job = client.call(
        "job_submit",
        {
            "argv": ["true"],
            "gpus": 1,
            "max_price_per_gpu_second": 1000,
            "max_wall_ms": 30_000,
            "bid_window_ms": 200,
        },
    )
    final = ("done", "failed", "cancelled", "refunded", "output_mismatch")
    status = wait_until(
        lambda: (s := client.call("job_status", {"job_id": job["id"]}))["state"] in final and s,
        timeout_s=60,
        what="the job to end",
    )
    assert status["state"] == "done", status
    attempt = status["attempt_job_id"]

    def listed(role: str, address: str) -> bool:
        items = client.call("chain_receipts", {role: address, "limit": 100})["items"]
        return any(i["job_id"] == attempt for i in items)

    wait_until(lambda: listed("provider", seller.address), timeout_s=30, what="by provider")
    assert listed("requester", buyer.address)
    summary = client.call("chain_accountSummary", {"address": seller.address})["totals"]
    assert summary["jobs_provided"] >= 1 and summary["earned"] >= status["cost"]
