"""Live logs across real daemons: `gpumesh job logs -f` and the jobLogs WebSocket topic show a
job's lines while it is still running, then end with the job."""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from node import _testnet
from node._home import Home
from node.commands._common import open_subscription
from node.testing import free_port_block, wait_until
from rpc import RpcClient
from tests.e2e import _nodes
from tests.e2e._nodes import FINAL

pytestmark = pytest.mark.slow

LINES = 20
SCRIPT = f"for i in $(seq 1 {LINES}); do echo line $i; echo err $i >&2; sleep 0.3; done"
"""A line to each stream every 0.3 s for 6 s: the follower must see the first ones long
before the job ends (a pull every 0.5 s)."""
EXPECTED_OUT = "".join(f"line {i}\n" for i in range(1, LINES + 1))
EXPECTED_ERR = "".join(f"err {i}\n" for i in range(1, LINES + 1))


@pytest.fixture(scope="module")
def testnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_testnet.TestnetLayout]:
    """node0 validates and sells a simulated GPU; node1 buys."""
    directory = tmp_path_factory.mktemp("live-logs") / "net"
    layout = _testnet.init_testnet(
        directory,
        2,
        chain_id="e2e-live-logs",
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
            timeout_s=90,
            what="the provider's offer at the buyer",
        )
        yield layout
    finally:
        _testnet.down(directory)


def buyer(testnet: _testnet.TestnetLayout) -> Home:
    return Home(testnet.nodes[1].home)


def client(home: Home) -> RpcClient:
    return _nodes.client(home, 10.0)


def submit(home: Home) -> str:
    job: dict[str, Any] = client(home).call(
        "job_submit",
        {
            "argv": ["sh", "-c", SCRIPT],
            "gpus": 1,
            "max_price_per_gpu_second": 1000,
            "max_wall_ms": 60_000,
            "bid_window_ms": 300,
        },
    )
    return str(job["id"])


def state_of(home: Home, job_id: str) -> str:
    return str(client(home).call("job_status", {"job_id": job_id})["state"])


def test_job_logs_follow_prints_lines_while_the_job_runs_and_exits_at_its_end(
    testnet: _testnet.TestnetLayout,
) -> None:
    home = buyer(testnet)
    job_id = submit(home)
    errors: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-m", "node", "job", "logs", "-f", "--home", str(home.root), job_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as follow:
        watchdog = threading.Timer(180, follow.kill)
        watchdog.start()
        stdout, stderr = follow.stdout, follow.stderr
        assert stdout is not None and stderr is not None
        reader = threading.Thread(target=lambda: errors.append(stderr.read()))
        reader.start()
        try:
            first = stdout.readline()
            state_at_first = state_of(home, job_id)
            rest = stdout.read()  # not communicate(): it would skip what readline buffered
            follow.wait(timeout=180)
            reader.join(timeout=10)
        finally:
            watchdog.cancel()
            follow.kill()
    err = "".join(errors)
    assert first == "line 1\n", f"the follower's first line: {first!r} (stderr: {err})"
    assert state_at_first not in FINAL, (
        f"the first line came only once the job was {state_at_first}: the logs were not live"
    )
    assert follow.returncode == 0, f"logs -f exited {follow.returncode}: {err}"
    assert first + rest == EXPECTED_OUT, f"stdout as followed: {first + rest!r}"
    assert err == EXPECTED_ERR, f"stderr as followed: {err!r}"
    # The job is over, and what is read now is the sealed (checked, paid-for) logs.
    assert state_of(home, job_id) == "done"
    view = client(home).call("job_logs", {"job_id": job_id})
    assert (view["source"], view["ended"]) == ("sealed", True), view
    assert base64.b64decode(view["stdout"]).decode() == EXPECTED_OUT
    # From an offset: only the bytes past it.
    tail = client(home).call("job_logs", {"job_id": job_id, "stdout_offset": 7, "bytes_max": 7})
    assert base64.b64decode(tail["stdout"]) == b"line 2\n", tail


async def test_the_job_logs_topic_pushes_chunks_in_order_before_the_job_ends(
    testnet: _testnet.TestnetLayout,
) -> None:
    home = buyer(testnet)
    stdout = bytearray()
    first_state = ""
    with trio.fail_after(180):
        async with open_subscription(home.root, "jobLogs") as events:
            job_id = await trio.to_thread.run_sync(submit, home)
            # Asking for a running job's logs is the opt-in: the node follows it from now on.
            view = await trio.to_thread.run_sync(
                lambda: client(home).call("job_logs", {"job_id": job_id})
            )
            assert view["source"] in ("none", "live") and not view["ended"], view
            while True:
                event = await events.next()
                if event["job_id"] != job_id:
                    continue
                if event["ended"]:
                    break
                if event["stream"] != "stdout":
                    continue
                assert event["offset"] == len(stdout), f"a gap or a repeat: {event}"
                stdout += base64.b64decode(event["data"])
                if not first_state:
                    first_state = await trio.to_thread.run_sync(state_of, home, job_id)
    assert first_state and first_state not in FINAL, f"the first chunk came when {first_state}"
    assert event["state"] in FINAL or event["state"] == "settling", event
    # The live tail may stop short of the end (the sealed logs carry the rest).
    assert EXPECTED_OUT.encode().startswith(bytes(stdout)) and stdout, bytes(stdout)
