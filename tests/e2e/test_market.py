"""The job market across real node processes: many jobs, consistent settlement, failures."""

from __future__ import annotations

import base64
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from node import _testnet
from node._home import Home
from node.testing import free_port_block, wait_until
from rpc import RpcCallError, RpcClient
from tests.e2e import _nodes
from tests.e2e._nodes import FINAL

pytestmark = pytest.mark.slow

FEE_MAX = 10
"""The most one transaction of the market pays in fees on these testnets."""
GPUS = "A100-80GB:2,RTX4090:1"


def client(home: Home) -> RpcClient:
    return _nodes.client(home, 10.0)


def submit(home: Home, argv: list[str], **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "argv": argv,
        "gpus": 1,
        "max_price_per_gpu_second": 1000,
        "max_wall_ms": 20_000,
        "bid_window_ms": 200,
    }
    params.update(extra)
    job: dict[str, Any] = client(home).call("job_submit", params)
    return job


def status(home: Home, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = client(home).call("job_status", {"job_id": job_id})
    return job


def start_testnet(tmp_path: Path, name: str) -> tuple[Path, list[Home], Any]:
    directory = tmp_path / name
    layout = _testnet.init_testnet(
        directory,
        4,
        chain_id=f"e2e-{name}",
        validators=4,
        providers=3,
        simulate_gpus=GPUS,
        base_port=free_port_block(8),
    )
    homes = [Home(n.home) for n in layout.nodes]
    _testnet.up(directory)
    try:
        wait_until(
            lambda: all(
                sum(1 for o in client(h).call("market_offers") if o["gpus"]) == 3 for h in homes
            ),
            timeout_s=30,
            what="every node to list exactly the three GPU providers",
        )
    except AssertionError:
        for index, home in enumerate(homes):  # what each node saw, and its own complaints
            try:
                offers = [str(o)[:120] for o in client(home).call("market_offers") if o["gpus"]]
                peers = len(client(home).call("net_peers"))
            except (RpcCallError, OSError) as error:
                offers, peers = [f"(no answer: {error})"], -1
            print(f"node {index}: {peers} peers, GPU offers from {offers}")
            print(_nodes.log_warnings(home))
        _testnet.down(directory)  # the callers' finally is not reached yet: stop them here
        raise
    return directory, homes, layout


def supply(home: Home, addresses: list[str]) -> int:
    total = 0
    for address in addresses:
        account = client(home).call("chain_account", {"address": address})
        total += account["balance"] + account["locked"]
    return total


def test_fifty_jobs_from_two_nodes_settle_identically_everywhere(tmp_path: Path) -> None:
    directory, homes, layout = start_testnet(tmp_path, "fifty")
    addresses = [n.address for n in layout.nodes]
    try:
        supply_before = supply(homes[0], addresses)
        requesters = [homes[3], homes[0]]  # a GPU-less node and a provider, as requesters
        jobs: list[tuple[Home, str]] = []
        for i in range(50):
            home = requesters[i % 2]
            job = submit(home, ["sh", "-c", f"mkdir -p out; echo {i} > out/n.txt; echo job {i}"])
            jobs.append((home, job["id"]))
        finals = {}
        for home, job_id in jobs:
            finals[job_id] = wait_until(
                lambda home=home, job_id=job_id: (
                    s if (s := status(home, job_id))["state"] in FINAL else None
                ),
                timeout_s=180,
                what=f"job {job_id[:8]} to finish",
            )
        states = {j: f["state"] for j, f in finals.items()}
        errors = {j[:8]: f.get("error") for j, f in finals.items() if f["state"] != "done"}
        assert set(states.values()) == {"done"}, f"not all jobs done: {errors}"
        for home, job_id in jobs:
            result = client(home).call("job_result", {"job_id": job_id})
            i = jobs.index((home, job_id))
            assert base64.b64decode(result["outputs"]["n.txt"]).decode().strip() == str(i)
        # Every receipt and trade is the same on every node, and the money adds up.
        spent = {h.root: 0 for h in requesters}
        for home, job_id in jobs:
            attempt = finals[job_id]["attempt_job_id"]
            views = [client(h).call("chain_trade", {"job_id": attempt}) for h in homes]
            assert all(v == views[0] for v in views), f"trade {attempt[:8]} differs between nodes"
            receipts = [client(h).call("chain_receipt", {"job_id": attempt}) for h in homes]
            assert all(r == receipts[0] for r in receipts), "receipts differ between nodes"
            assert views[0]["paid"] == finals[job_id]["cost"]
            spent[home.root] += views[0]["paid"]
        wait_until(
            lambda: len({client(h).call("chain_head")["hash"] for h in homes}) == 1,
            timeout_s=30,
            what="every node at the same head",
        )
        assert supply(homes[1], addresses) == supply_before, "total supply changed"
        earned = sum(
            client(homes[2]).call("chain_account", {"address": a})["earned"] for a in addresses
        )
        assert earned == sum(spent.values()), "provider earnings != requester spend"
    finally:
        _testnet.down(directory)


def test_unsatisfiable_job_fails_fast_naming_the_requirement(tmp_path: Path) -> None:
    directory, homes, _ = start_testnet(tmp_path, "unsat")
    try:
        started = time.monotonic()
        with pytest.raises(RpcCallError) as excinfo:
            submit(homes[3], ["true"], gpus=4, model="H100-80GB")
        assert time.monotonic() - started < 2
        assert "H100" in excinfo.value.message or "4 GPU" in excinfo.value.message, (
            excinfo.value.message
        )
    finally:
        _testnet.down(directory)


def test_provider_killed_mid_job_is_retried_or_refunded_exactly(tmp_path: Path) -> None:
    directory, homes, layout = start_testnet(tmp_path, "kill")
    requester = homes[3]
    try:
        before = client(requester).call("chain_account", {"address": layout.nodes[3].address})
        job = submit(
            requester,
            ["sh", "-c", "sleep 3; mkdir -p out; echo ok > out/r.txt"],
            max_wall_ms=10_000,
            deadline_ms=int(time.time() * 1000) + 90_000,
        )
        running = wait_until(
            lambda: s if (s := status(requester, job["id"]))["state"] == "running" else None,
            timeout_s=30,
            what="the job to start running",
        )
        victim = next(Home(n.home) for n in layout.nodes if n.address == running["provider"])
        victim_before = client(requester).call("chain_account", {"address": running["provider"]})
        pid = _testnet.read_pid(victim)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        final = wait_until(
            lambda: s if (s := status(requester, job["id"]))["state"] in FINAL else None,
            timeout_s=150,
            what="the job to be retried elsewhere or refunded",
        )
        assert final["state"] in ("done", "refunded"), final
        after = client(requester).call("chain_account", {"address": layout.nodes[3].address})
        assert after["locked"] == before["locked"], "escrow left locked"
        # What the requester spent: the settled cost plus one fee per transaction it sent,
        # less what it was paid from the abandoning provider's slashed bond.
        victim_after = client(requester).call("chain_account", {"address": running["provider"]})
        slashed = victim_before.get("bonded", 0) - victim_after.get("bonded", 0)
        fees = after["nonce"] - before["nonce"]
        spent = before["balance"] - after["balance"]
        assert 0 <= spent + slashed - (final["cost"] or 0) <= fees * FEE_MAX, (
            f"the requester paid something other than the settled cost and fees: spent {spent}, "
            f"cost {final['cost']}, slashed to it {slashed}, {fees} transactions"
        )
    finally:
        _testnet.down(directory)


def test_requester_killed_while_its_job_runs_collects_the_result_after_restart(
    tmp_path: Path,
) -> None:
    directory, homes, layout = start_testnet(tmp_path, "requester")
    requester = homes[3]
    try:
        job = submit(
            requester,
            ["sh", "-c", "sleep 3; mkdir -p out; echo survived > out/r.txt"],
            max_wall_ms=15_000,
        )
        wait_until(
            lambda: status(requester, job["id"])["state"] == "running",
            timeout_s=30,
            what="the job to start running",
        )
        pid = _testnet.read_pid(requester)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _testnet._alive(pid), timeout_s=5, what="the requester to die")
        proc = _testnet.start_node(requester)
        _testnet.wait_ready([requester], [proc])
        final = wait_until(
            lambda: s if (s := status(requester, job["id"]))["state"] in FINAL else None,
            timeout_s=90,
            what="the restarted requester to finish its job",
        )
        assert final["state"] == "done", final
        result = client(requester).call("job_result", {"job_id": job["id"]})
        assert base64.b64decode(result["outputs"]["r.txt"]).decode().strip() == "survived"
        account = client(requester).call("chain_account", {"address": layout.nodes[3].address})
        assert account["locked"] == 0, "escrow left locked after the restart"
    finally:
        _testnet.down(directory)
