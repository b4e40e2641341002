"""Subscriptions reach every peer, even one whose pubsub stream is being opened."""

from __future__ import annotations

import dataclasses
from typing import Any

import trio

from p2p import P2PConfig
from p2p.testing import seed_for, start_mesh, wait_until

CONNECT_S = 30


class _HeldStream:
    """A pubsub stream whose first write (py-libp2p's hello) waits until released."""

    def __init__(self, stream: Any, written: trio.Event, release: trio.Event) -> None:
        self._stream = stream
        self._written = written
        self._release = release

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def write(self, data: bytes) -> None:
        if not self._written.is_set():
            self._written.set()
            await self._release.wait()
        await self._stream.write(data)


async def test_a_topic_subscribed_while_the_hello_is_written_reaches_that_peer() -> None:
    # py-libp2p builds its hello (our topics) before the awaited write and registers the
    # peer after it; a subscription in between went to registered peers only, so this
    # peer never learned of it (a market requester lost a provider's job topic this way).
    # Hold the anchor's hello to the newcomer, subscribe meanwhile, then let it go.
    base = P2PConfig.for_tests(peer_records=False)
    async with trio.open_nursery() as nursery:
        anchor, _ = await start_mesh(nursery, seed_for(0), "testchain", base)
        anchor.subscribe("blocks")
        written, release = trio.Event(), trio.Event()
        host = anchor._host
        open_stream = host.new_stream

        async def new_stream(peer_id: Any, protocols: Any) -> Any:
            stream = await open_stream(peer_id, protocols)
            if any("meshsub" in str(p) for p in protocols):
                return _HeldStream(stream, written, release)
            return stream

        host.new_stream = new_stream
        config = dataclasses.replace(base, bootstrap=tuple(anchor.listen_addrs()))
        newcomer, _ = await start_mesh(nursery, seed_for(1), "testchain", config)
        with trio.fail_after(CONNECT_S):
            await written.wait()
        late = anchor.topic("jobs")
        anchor.subscribe("jobs")
        await wait_until(
            lambda: late in anchor._pubsub.topic_ids, CONNECT_S, "the anchor subscribed"
        )
        release.set()
        peer_topics = newcomer._pubsub.peer_topics
        await wait_until(
            lambda: anchor._host.get_id() in peer_topics.get(late, ()),
            CONNECT_S,
            "the newcomer learns the anchor's late topic",
        )
        assert anchor.statistics()["hello_catch_ups"] == 1, anchor.statistics()
        blocks = anchor.topic("blocks")
        assert anchor._host.get_id() in peer_topics.get(blocks, ()), "the hello's topic too"
        nursery.cancel_scope.cancel()
