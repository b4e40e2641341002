"""Per-peer limits on real meshes: validator rejections ban, valid floods are rate limited,
request streams are capped per peer."""

from __future__ import annotations

import trio

from p2p import GossipMessage, P2PConfig, RequestError, Verdict
from p2p.testing import open_meshes, wait_until

CONNECT_S = 30
GOSSIP_S = 20


async def test_validator_rejections_score_the_forwarder_until_it_is_banned() -> None:
    config = P2PConfig.for_tests(gossip_ban_score_max=2.5)
    async with open_meshes(2, config=config) as (spammer, victim):

        def verdict(message: GossipMessage) -> Verdict:
            if message.payload.startswith(b"stale"):
                return Verdict.IGNORE
            return Verdict.REJECT if message.payload.startswith(b"bad") else Verdict.ACCEPT

        sub = victim.subscribe("jobs", validator=verdict)
        spammer.subscribe("jobs")
        topic = victim.topic("jobs")
        await wait_until(lambda: len(spammer._gossipsub.mesh.get(topic, ())) > 0, CONNECT_S, "mesh")
        for payload in (b"stale", b"good", b"stale2"):
            await spammer.publish("jobs", "t", payload)
        with trio.fail_after(GOSSIP_S):
            got = await sub.receive()
        assert got.payload == b"good", f"only ACCEPTed messages are delivered: {got.payload!r}"
        await wait_until(
            lambda: victim.rejected_by(spammer.peer_id).get("validator_ignored", 0) == 2,
            GOSSIP_S,
            f"IGNORE is counted: {victim.rejected_by(spammer.peer_id)}",
        )
        assert victim.ban_score(spammer.peer_id) == 0.0, "an IGNORE costs the peer nothing"
        for n in range(3):
            await spammer.publish("jobs", "t", b"bad %d" % n)
        await wait_until(
            lambda: victim.statistics()["peers_banned"] == 1,
            GOSSIP_S,
            f"3 validator rejections pass the ban score 2.5: {victim.statistics()['ban_scores']}"
            f" {victim.rejected_by(spammer.peer_id)}",
        )
        assert spammer.peer_id in victim.statistics()["banned"], "the ban is listed"
        await wait_until(
            lambda: victim.peer_count() == 0, GOSSIP_S, "the banned peer is disconnected"
        )
        rejected = victim.rejected_by(spammer.peer_id)
        assert rejected == {"validator_ignored": 2, "validator_rejected": 3}, rejected


async def test_valid_gossip_beyond_a_peers_rate_is_dropped_and_counted() -> None:
    async with open_meshes(2) as (flooder, victim):
        sub = victim.subscribe("txs", peer_rate_per_s=0.5, peer_burst=3)
        flooder.subscribe("txs")
        topic = victim.topic("txs")
        await wait_until(lambda: len(flooder._gossipsub.mesh.get(topic, ())) > 0, CONNECT_S, "mesh")
        for n in range(12):
            await flooder.publish("txs", "t", b"tx %d" % n)
        await wait_until(
            lambda: victim.statistics()["topics"][topic]["rate_limited"] >= 8,
            GOSSIP_S,
            f"messages over the burst are dropped: {victim.statistics()['topics'][topic]}",
        )
        got = []
        with trio.move_on_after(1):
            while True:
                got.append((await sub.receive()).payload)
        assert 3 <= len(got) <= 4, f"the burst (3, maybe one refilled token) arrives: {got}"
        assert got[:3] == [b"tx 0", b"tx 1", b"tx 2"], f"the first ones get through: {got}"
        stats = victim.statistics()
        assert stats["topics"][topic]["peer_rate_per_s"] == 0.5, "the topic's own limit applies"
        score = victim.ban_score(flooder.peer_id)
        assert 0 < score < 1, f"a short burst scores a little, far from a ban: {score}"
        assert stats["peers_banned"] == 0, "a rate-limited peer is not banned for a burst"


async def test_inbound_request_streams_are_capped_per_peer() -> None:
    config = P2PConfig.for_tests(inbound_streams_per_peer_max=2)
    async with open_meshes(2, config=config) as (client, server):
        release = trio.Event()

        async def slow(peer: str, request: bytes) -> bytes:
            await release.wait()
            return b"done:" + request

        server.set_handler("/gpumesh/testchain/slow/1", slow)
        await wait_until(lambda: client.peer_count() == 1, CONNECT_S, "client connected")
        outcomes: dict[int, bytes | str] = {}

        async def one(n: int) -> None:
            try:
                outcomes[n] = await client.request(
                    server.peer_id, "/gpumesh/testchain/slow/1", b"%d" % n, 15
                )
            except RequestError as exc:
                outcomes[n] = type(exc).__name__

        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(one, n)
            await wait_until(
                lambda: server.statistics()["requests"]["inbound_refused_peer_busy"] == 1,
                GOSSIP_S,
                f"the third concurrent stream is refused: {server.statistics()['requests']}",
            )
            await wait_until(lambda: len(outcomes) == 1, GOSSIP_S, "the refused caller learns it")
            release.set()
        answered = sorted(v for v in outcomes.values() if isinstance(v, bytes))
        assert len(answered) == 2, f"two requests are served: {outcomes}"
        # The server closes each stream after its answer is out: the caller may read the
        # answer before that close is done, so wait for the server to let go.
        await wait_until(
            lambda: server.statistics()["requests"]["inbound_in_flight_by_peer"] == {},
            GOSSIP_S,
            f"nothing held after they finish: {server.statistics()['requests']}",
        )
        requests = server.statistics()["requests"]
        assert requests["inbound_refused_by_peer"] == {client.peer_id: 1}, requests
        again = await client.request(server.peer_id, "/gpumesh/testchain/slow/1", b"x", 15)
        assert again == b"done:x", "the peer is served again once below its cap"
