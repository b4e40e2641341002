"""GET /metrics on a live testnet: Prometheus text that agrees with JSON-RPC, behind the token."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from node import _testnet
from node._home import Home
from node.testing import wait_until
from rpc import RpcClient


def scrape(home: Home, token: str | None) -> tuple[int, str, str]:
    port = int(home.port_path.read_text())
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def samples(text: str) -> dict[str, list[Sample]]:
    by_name: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            by_name.setdefault(sample.name, []).append(sample)
    return by_name


def value(found: dict[str, list[Sample]], name: str, **labels: str) -> float:
    matching = [
        s for s in found.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matching) == 1, f"want one {name}{labels}, found {matching}"
    return matching[0].value


def test_metrics_agree_with_json_rpc_and_need_the_token(
    testnet: _testnet.TestnetLayout,
) -> None:
    home = Home(testnet.nodes[0].home)
    token = home.cookie_path.read_text().strip()
    client = RpcClient.from_home(home.root)
    # A few blocks so the block interval histogram has observations.
    wait_until(lambda: client.call("chain_head")["height"] >= 3, timeout_s=30, what="3 blocks")

    status, _, _ = scrape(home, None)
    assert status == 401, "/metrics must need the bearer token"
    status, _, _ = scrape(home, "wrong")
    assert status == 401

    client.call("node_info")
    before = client.call("chain_head")["height"]
    status, content_type, text = scrape(home, token)
    after = client.call("chain_head")["height"]
    assert status == 200, text
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    found = samples(text)

    height = value(found, "gpumesh_chain_height")
    assert before <= height <= after, f"metrics height {height}, JSON-RPC {before}..{after}"
    peers = sum(s.value for s in found["gpumesh_peers"])
    assert peers == client.call("net_peerCount") == 1
    by_source = {s.labels["source"]: s.value for s in found["gpumesh_peers"]}
    assert set(by_source) >= {"bootstrap", "mdns", "dht"}, by_source

    assert value(found, "gpumesh_block_interval_seconds_count") >= 2
    assert value(found, "gpumesh_block_interval_seconds_bucket", le="+Inf") >= 2
    assert value(found, "gpumesh_rpc_calls_total", method="node_info", result="ok") >= 1
    assert value(found, "gpumesh_consensus_validator") == 1
    steps = {s.labels["step"]: s.value for s in found["gpumesh_consensus_step"]}
    assert sum(steps.values()) == 1, steps
    assert value(found, "gpumesh_mempool_transactions") >= 0
    assert value(found, "gpumesh_offers") == 1
    out = {s.labels["topic"]: s.value for s in found["gpumesh_gossip_messages_out_total"]}
    assert out["/gpumesh/node-test/consensus/1"] > 0, out
    dropped = {s.labels["what"] for s in found["gpumesh_chain_dropped_total"]}
    assert {"tx_gossip_rejected", "consensus_queue_full"} <= dropped, dropped
    assert value(found, "process_resident_memory_bytes") > 10 * 2**20
    assert value(found, "process_cpu_seconds_total") > 0


def test_a_job_shows_in_jobs_by_state_and_stage_latency(
    testnet: _testnet.TestnetLayout,
) -> None:
    buyer, seller = (Home(n.home) for n in (testnet.nodes[1], testnet.nodes[0]))
    client = RpcClient.from_home(buyer.root)
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
    wait_until(
        lambda: client.call("job_status", {"job_id": job["id"]})["state"] in final,
        timeout_s=60,
        what="the job to end",
    )
    state = client.call("job_status", {"job_id": job["id"]})["state"]
    token = buyer.cookie_path.read_text().strip()
    found = samples(scrape(buyer, token)[2])
    assert value(found, "gpumesh_jobs", role="requester", state=state) >= 1
    assert (
        value(found, "gpumesh_market_stage_seconds_count", role="requester", stage="bidding") >= 1
    )
    if state != "done":
        pytest.fail(f"the job ended {state}; sandbox outcome cannot be checked")
    seller_found = samples(scrape(seller, seller.cookie_path.read_text().strip())[2])
    assert value(seller_found, "gpumesh_sandbox_runs_total", outcome="done") >= 1
