"""A stock js-libp2p 2.x peer (Node.js, from npm) reads our gossip and we read its.

The peer (tests/p2p/js_peer/peer.mjs: TCP, Noise, Yamux, identify, @chainsafe gossipsub in
StrictNoSign mode) dials one of our nodes, identifies it, sees its four topics, subscribes,
receives an offer and decodes and verifies our msgpack envelope; it then publishes its own
envelope, signed with its libp2p key, which our node accepts. scripts/setup.sh installs
Node.js and the npm packages; under CI=true a missing piece fails the test, never skips it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from p2p import GossipMessage
from p2p.testing import open_meshes, seed_for, wait_until

pytestmark = pytest.mark.slow
JS_PEER = Path(__file__).parent / "js_peer"
INTEROP_S = 60
PURPOSES = ("offers", "jobs", "txs", "consensus")
publish_interval_s = 0.3
js_line_bytes_max = 1024 * 1024


def node_or_skip() -> str:
    node = shutil.which("node")
    missing = []
    if node is None:
        missing.append("node (Node.js)")
    if not (JS_PEER / "node_modules" / "libp2p").is_dir():
        missing.append(f"npm packages in {JS_PEER / 'node_modules'}")
    if missing:
        why = f"js interop needs {', '.join(missing)}: run scripts/setup.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    assert node is not None
    return node


class JsPeer:
    """The Node.js process and the JSON lines it has printed so far."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []
        self.stderr = b""

    async def read_stdout(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        while chunk := await self.process.stdout.receive_some(65536):
            buffer += chunk
            assert len(buffer) < js_line_bytes_max, "the js peer printed an endless line"
            *lines, buffer = buffer.split(b"\n")
            self.events.extend(json.loads(line) for line in lines if line.strip())

    async def read_stderr(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.receive_some(65536):
            self.stderr = (self.stderr + chunk)[-8192:]

    def first(self, event: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == event), None)

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]

    def describe(self) -> str:
        return f"js events so far: {self.events[-8:]}; stderr: {self.stderr[-2000:]!r}"


async def test_js_libp2p_peer_reads_our_offers_and_we_read_its_gossip() -> None:
    node = node_or_skip()
    async with open_meshes(1) as (mesh,):
        subs = {purpose: mesh.subscribe(purpose) for purpose in PURPOSES}
        offer_payload = msgpack.packb({"offer": 1, "gpus": ["H200"], "price": 7})
        args = {
            "dial": mesh.listen_addrs()[0],
            "chain": mesh.chain_id,
            "topics": [mesh.topic(p) for p in PURPOSES],
            "publish_topic": mesh.topic("offers"),
            "seed_hex": seed_for(1, "js-peer").hex(),
        }
        process = await trio.lowlevel.open_process(
            [node, str(JS_PEER / "peer.mjs"), json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        js = JsPeer(process)
        got_from_js: list[GossipMessage] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(js.read_stdout)
                nursery.start_soon(js.read_stderr)

                async def publish_offers() -> None:
                    # Gossip is fire and forget: offer until the js peer has one.
                    while not js.of("recv"):
                        await mesh.publish("offers", "offer", offer_payload)
                        await trio.sleep(publish_interval_s)

                async def receive_from_js() -> None:
                    got_from_js.append(await subs["offers"].receive())

                await wait_until(
                    lambda: js.first("identified") is not None,
                    INTEROP_S,
                    "the js peer dialed and identified our node",
                )
                await wait_until(
                    lambda: len(js.of("subscribers")) == len(PURPOSES),
                    INTEROP_S,
                    "the js peer sees our node subscribed to all four topics",
                )
                nursery.start_soon(publish_offers)
                nursery.start_soon(receive_from_js)
                await wait_until(
                    lambda: (
                        (bool(js.of("recv")) and bool(got_from_js)) or process.poll() is not None
                    ),
                    INTEROP_S,
                    "gossip crossed both ways",
                )
                nursery.cancel_scope.cancel()
        finally:
            if process.returncode is None:
                process.kill()
            with trio.move_on_after(10):
                await process.wait()

    assert js.of("recv") and got_from_js, f"gossip did not cross both ways: {js.describe()}"
    identified = js.first("identified")
    assert identified is not None and identified["peer_id"] == mesh.peer_id, js.describe()
    assert "/meshsub/1.1.0" in identified["protocols"], f"our gossipsub: {identified}"
    received = js.of("recv")[0]
    assert received["topic"] == mesh.topic("offers"), f"on the offers topic: {received}"
    assert received["type"] == "unsigned", f"StrictNoSign: no from/seqno/signature: {received}"
    assert received["verified"], f"the js peer verified our envelope signature: {received}"
    assert received["envelope"] == {
        "chain_id": mesh.chain_id,
        "type_tag": "offer",
        "payload_hex": offer_payload.hex(),
        "sender_hex": mesh.public_key.hex(),
        "timestamp_ms": received["envelope"]["timestamp_ms"],
    }, f"the js peer decoded our envelope: {received}"
    ready = js.first("ready")
    assert ready is not None
    message = got_from_js[0]
    assert message.sender_peer_id == ready["peer_id"], "the envelope's signer is the js peer"
    assert message.type_tag == "js-hello", f"the js peer's envelope: {message}"
    assert message.payload.startswith(b"hello from js"), f"its payload: {message.payload!r}"
    assert mesh.statistics()["rejected"]["by_reason"] == {}, "nothing the js peer sent failed"
