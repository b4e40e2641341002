"""The dashboard and explorer in a real browser: headless Chromium against a live testnet.

Chromium is driven over the DevTools protocol (its page WebSocket); each page of the app sets
``document.body.dataset.view`` once it has rendered, and the test waits for that inside the
browser, then checks what the page shows against what JSON-RPC says.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

import ledger
from node import _testnet
from node._home import Home
from node.commands._common import open_subscription
from node.commands.dashboard import dashboard_url
from node.testing import free_port_block, wait_until
from rpc import RpcCallError, RpcClient

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
)
page_render_timeout_s = 30.0
browser_start_timeout_s = 30.0
job_wait_s = 60.0


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is missing (scripts/setup.sh installs it as root)")
    pytest.skip("chromium is not installed (scripts/setup.sh installs it as root)")


class Page:
    """One browser tab over CDP: evaluate JavaScript, wait for the app to render a route."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._ids = iter(range(1, 1_000_000))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._ws.send_message(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self._ws.get_message())
            if message.get("id") == call_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    async def navigate(self, url: str) -> None:
        """Load ``url`` and wait for its load event (so scripts run in the new document)."""
        await self.send("Page.enable")
        call_id = next(self._ids)
        await self._ws.send_message(
            json.dumps({"id": call_id, "method": "Page.navigate", "params": {"url": url}})
        )
        with trio.fail_after(page_render_timeout_s):
            while True:
                message = json.loads(await self._ws.get_message())
                if message.get("id") == call_id and "error" in message:
                    raise AssertionError(f"Page.navigate: {message['error']}")
                if message.get("method") == "Page.loadEventFired":
                    return

    async def evaluate(self, expression: str) -> Any:
        answer = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in answer:
            raise AssertionError(f"page script failed: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def search(self, text: str) -> None:
        """Type ``text`` into the search box and submit it."""
        await self.evaluate(
            f"document.getElementById('search-input').value = {json.dumps(text)};"
            "document.getElementById('search').dispatchEvent("
            "new SubmitEvent('submit', {cancelable: true})); true"
        )

    async def show(self, route: str) -> dict[str, Any]:
        """Go to ``#route`` and return what the page shows once it has rendered it."""
        await self.evaluate(f"location.hash = {json.dumps('#' + route)}; true")
        return await self.rendered(route)

    async def rendered(self, route: str) -> dict[str, Any]:
        with trio.fail_after(page_render_timeout_s):
            shown: dict[str, Any] = await self.evaluate(
                """new Promise((resolve) => {
                  const want = __WANT__;
                  const check = () => {
                    const view = document.body.dataset.view || "";
                    if (view === want || view.startsWith("error:") || view.startsWith("missing:")) {
                      const ids = {};
                      for (const node of document.querySelectorAll("[data-testid]")) {
                        ids[node.dataset.testid] = node.innerText;
                      }
                      resolve({view, text: document.getElementById("view").innerText, ids,
                               rows: Object.fromEntries([...document.querySelectorAll(
                                 "table[data-testid]")].map((t) => [t.dataset.testid,
                                 t.tBodies[0].rows.length]))});
                    } else {
                      setTimeout(check, 20);
                    }
                  };
                  check();
                })""".replace("__WANT__", json.dumps(route))
            )
        assert shown["view"] == route, f"page {route} did not render: {shown['text'][:500]}"
        return shown


@asynccontextmanager
async def browser() -> AsyncIterator[Page]:
    binary = chromium_path()
    profile = tempfile.mkdtemp(prefix="gpumesh-chromium-")
    try:
        # Its own session: chromium's helpers (renderer, crashpad) outlive the browser process
        # for a moment and write into the profile; a CI run failed removing it ('Default':
        # directory not empty). The whole group is stopped before the profile is removed.
        proc = await trio.lowlevel.open_process(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            wait_until(
                lambda: port_file.exists() and len(port_file.read_text().splitlines()) >= 2,
                timeout_s=browser_start_timeout_s,
                what="chromium's DevTools port",
            )
            port = int(port_file.read_text().splitlines()[0])

            def page_ws() -> str | None:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    targets = json.loads(r.read())
                pages = [t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"]
                return pages[0] if pages else None

            url = wait_until(page_ws, timeout_s=browser_start_timeout_s, what="a page target")
            async with open_websocket_url(url, max_message_size=16 * 2**20) as ws:
                page = Page(ws)
                await page.send("Runtime.enable")
                yield page
        finally:
            proc.terminate()
            with trio.move_on_after(10) as waited:
                await proc.wait()
            if waited.cancelled_caught:
                proc.kill()
                await proc.wait()
            await _kill_group(proc.pid)  # helpers still running in its session
    finally:
        shutil.rmtree(profile)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # not a process, or gone already
        if int(fields[2]) == pgid:
            members.append(int(entry))
    return members


async def _kill_group(pgid: int) -> None:
    """SIGKILL process group ``pgid`` and wait, on a pidfd each, until every member is gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for pid in _group_members(pgid):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            with trio.fail_after(10):
                await trio.lowlevel.wait_readable(pidfd)  # readable once the process exited
        finally:
            os.close(pidfd)


offer_wait_s = 90.0
"""A provider re-gossips its offer periodically; on a loaded machine the first may be missed."""


@pytest.fixture(scope="module")
def testnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_testnet.TestnetLayout]:
    directory = tmp_path_factory.mktemp("dashboard") / "net"
    layout = _testnet.init_testnet(
        directory,
        2,
        chain_id="dash-test",
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
        yield layout
    finally:
        _testnet.down(directory)


def get(url: str, host: str | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def test_static_files_are_served_without_token_but_only_to_loopback_hosts(
    testnet: _testnet.TestnetLayout,
) -> None:
    port = int(Home(testnet.nodes[0].home).port_path.read_text())
    status, content_type, body = get(f"http://127.0.0.1:{port}/")
    assert status == 200 and content_type.startswith("text/html") and b"app.js" in body
    status, content_type, _ = get(f"http://127.0.0.1:{port}/static/app.js")
    assert status == 200 and content_type.startswith("text/javascript")
    assert get(f"http://127.0.0.1:{port}/static/../pyproject.toml")[0] == 404
    assert get(f"http://127.0.0.1:{port}/static/nope.js")[0] == 404
    assert get(f"http://127.0.0.1:{port}/", host="evil.example")[0] == 403


def send_transfer(client: RpcClient, home: Home, to: str, amount: int) -> str:
    key = home.load_key()
    nonce = client.call("chain_account", {"address": key.address.hex()})["next_nonce"]
    tx = ledger.sign_object(
        ledger.Transfer(
            nonce=nonce, fee=1, recipient=ledger.Address(bytes.fromhex(to)), amount=amount
        ),
        key,
        client.call("node_info")["chain_id"],
    )
    digest: str = client.call("chain_sendTx", {"tx": ledger.encode(tx).hex()})["tx_hash"]

    def committed() -> bool:
        try:
            return bool(client.call("chain_tx", {"hash": digest})["height"])
        except RpcCallError:
            return False

    wait_until(committed, timeout_s=30, what="the transfer to commit")
    return digest


async def test_every_page_renders_what_json_rpc_says(testnet: _testnet.TestnetLayout) -> None:
    seller, buyer = testnet.nodes[0], testnet.nodes[1]
    home = Home(buyer.home)
    client = RpcClient.from_home(home.root)
    tx_hash = await trio.to_thread.run_sync(send_transfer, client, home, seller.address, 5)
    final = ("done", "failed", "cancelled", "refunded", "output_mismatch")
    # The job page must show the job's state whatever it is; give it a chance to finish first,
    # following the jobs topic (subscribed before submitting).
    with trio.move_on_after(job_wait_s):
        async with open_subscription(home.root, "jobs") as events:
            job = client.call(
                "job_submit",
                {
                    "argv": ["sh", "-c", "echo dashboard-job-output"],
                    "gpus": 1,
                    "max_price_per_gpu_second": 1000,
                    "max_wall_ms": 30_000,
                    "bid_window_ms": 200,
                },
            )
            while True:
                event = await events.next()
                if event["id"] == job["id"] and event["state"] in final:
                    break
    job_state = client.call("job_status", {"job_id": job["id"]})["state"]
    info = client.call("node_info")
    wait_until(
        lambda: (
            client.call("chain_accountSummary", {"address": buyer.address})["indexed_height"]
            >= client.call("chain_tx", {"hash": tx_hash})["height"]
        ),
        timeout_s=30,
        what="the explorer index",
    )

    origin = f"http://127.0.0.1:{int(home.port_path.read_text())}"
    token = home.cookie_path.read_text().strip()
    async with browser() as page:
        started = time.monotonic()
        await page.navigate(dashboard_url(origin, token))
        shown = await page.rendered("/")
        assert shown["ids"]["peer-id"] == info["peer_id"]
        assert shown["ids"]["peers"].endswith("1")
        assert shown["ids"]["offers"].endswith("1")
        account = client.call("chain_account", {"address": buyer.address})
        assert shown["ids"]["balance"].endswith(str(account["balance"]))
        assert int(shown["ids"]["height"]) >= 1
        fragment = await page.evaluate("location.hash")
        assert token not in fragment, "the token must leave the address bar"

        shown = await page.show("/blocks")
        head = client.call("chain_head")["height"]
        assert shown["rows"]["blocks"] in (min(25, head), min(25, head + 1))

        block = client.call("chain_block", {"height": 1})
        shown = await page.show("/block/1")
        assert shown["ids"]["block-height"] == "1"
        assert block["hash"] in shown["text"]

        shown = await page.show(f"/tx/{tx_hash}")
        assert tx_hash in shown["text"] and "transfer" in shown["text"]

        # Search by hash lands on the transaction; by height on the block.
        await page.show("/blocks")
        await page.search(tx_hash)
        await page.rendered(f"/tx/{tx_hash}")
        await page.search("1")
        await page.rendered("/block/1")

        shown = await page.show(f"/account/{buyer.address}")
        assert shown["ids"]["account"] == buyer.address
        assert tx_hash[:10] in shown["ids"]["account-txs"]

        shown = await page.show("/receipts")
        assert "receipts-provider" in shown["rows"] and "receipts-requester" in shown["rows"]

        shown = await page.show("/providers")
        assert shown["rows"]["providers"] == 1
        assert seller.address[:10] in shown["ids"]["providers"]
        shown = await page.show(f"/provider/{seller.address}")
        record = client.call("chain_account", {"address": seller.address})
        assert shown["ids"]["completed"].endswith(str(record.get("completed", 0)))
        assert "A100-80GB" in shown["ids"]["offer"]

        shown = await page.show("/jobs")
        assert job["id"][:10] in shown["ids"]["job-list"]
        shown = await page.show(f"/job/{job['id']}")
        now = client.call("job_status", {"job_id": job["id"]})["state"]
        assert shown["ids"]["job-state"] in (job_state, now), (shown["ids"], job_state, now)
        if job_state == "done":
            assert "dashboard-job-output" in shown["ids"]["job-stdout"]
        print(f"rendered 12 pages in {time.monotonic() - started:.1f} s")

        # A job page opened while the job is young follows it live (jobs topic, log refresh):
        # its state and output change in place, without reloading the page.
        slow = client.call(
            "job_submit",
            {
                "argv": ["sh", "-c", "echo started; sleep 2; echo finished"],
                "gpus": 1,
                "max_price_per_gpu_second": 1000,
                "max_wall_ms": 30_000,
                "bid_window_ms": 200,
            },
        )
        shown = await page.show(f"/job/{slow['id']}")
        first_state = shown["ids"]["job-state"]
        assert first_state not in final, f"the job ended before its page opened ({first_state})"
        with trio.fail_after(job_wait_s):
            live = await page.evaluate(
                """new Promise((resolve) => {
                  const final = new Set(__FINAL__);
                  const check = () => {
                    const state = document.querySelector("[data-testid=job-state]").innerText;
                    const out = document.querySelector("[data-testid=job-stdout]").innerText;
                    if (final.has(state) && (state !== "done" || out.includes("finished"))) {
                      resolve({state, out, view: document.body.dataset.view});
                    } else {
                      setTimeout(check, 50);
                    }
                  };
                  check();
                })""".replace("__FINAL__", json.dumps(list(final)))
            )
        assert live["view"] == f"/job/{slow['id']}", "the page must update in place"
        ended = client.call("job_status", {"job_id": slow["id"]})
        print(f"the job page followed {first_state} -> {live['state']} in place")
        assert live["state"] == ended["state"], (live, ended["state"])
        if ended["state"] == "done":
            assert "started" in live["out"] and "finished" in live["out"], live
    assert job_state == "done", (
        f"the job ended {job_state}: its page showed that, but it should run"
    )
