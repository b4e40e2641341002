"""Connection set-up: who dials whom, and what a DHT walk teaches a node."""

from __future__ import annotations

import dataclasses

import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2p import Mesh, P2PConfig, PeerSource
from p2p.testing import seed_for, start_mesh, wait_until

CONNECT_S = 30


def _learn(mesh: Mesh, other: Mesh) -> None:
    """Hand ``mesh`` the other node as a DHT-learned dial candidate."""
    info = info_from_p2p_addr(multiaddr.Multiaddr(other.listen_addrs()[0]))
    mesh._add_candidate(info.peer_id, list(info.addrs), PeerSource.DHT)


def _ordered(a: Mesh, b: Mesh) -> tuple[Mesh, Mesh]:
    return (a, b) if a._id.to_bytes() < b._id.to_bytes() else (b, a)


async def test_two_peers_that_learn_of_each_other_open_one_connection_from_the_lower_id() -> None:
    # A tie-break far longer than the test: only the lower id may dial.
    config = dataclasses.replace(P2PConfig.for_tests(dht=False), dial_tiebreak_ms=600_000)
    async with trio.open_nursery() as nursery:
        a, _ = await start_mesh(nursery, seed_for(0, "dialing"), "testchain", config)
        b, _ = await start_mesh(nursery, seed_for(1, "dialing"), "testchain", config)
        low, high = _ordered(a, b)
        _learn(low, high)
        _learn(high, low)
        await wait_until(
            lambda: low.peer_count() == 1 and high.peer_count() == 1,
            CONNECT_S,
            "the two nodes are connected",
        )
        assert low.statistics()["dial_attempts"] == 1, "the lower peer id dials"
        assert high.statistics()["dial_attempts"] == 0, "the higher peer id waits"
        assert [p.source for p in high.peers()] == [PeerSource.INBOUND]
        assert low.statistics()["connections_opened"] == 1, "no second connection"
        nursery.cancel_scope.cancel()


async def test_the_higher_id_dials_after_the_tiebreak_when_the_lower_does_not_know_it() -> None:
    config = dataclasses.replace(P2PConfig.for_tests(dht=False), dial_tiebreak_ms=200)
    async with trio.open_nursery() as nursery:
        a, _ = await start_mesh(nursery, seed_for(0, "dialing"), "testchain", config)
        b, _ = await start_mesh(nursery, seed_for(1, "dialing"), "testchain", config)
        low, high = _ordered(a, b)
        _learn(high, low)
        await wait_until(
            lambda: low.peer_count() == 1 and high.peer_count() == 1,
            CONNECT_S,
            "the higher peer id dialed the lower one that did not know it",
        )
        assert high.statistics()["dial_attempts"] >= 1
        nursery.cancel_scope.cancel()


async def test_one_dht_walk_makes_candidates_of_every_peer_its_answers_named() -> None:
    # A hub that knows four peers; a newcomer that knows only the hub learns all four from
    # its first walk (they are in the answers, hence the peerstore), not one walk per peer.
    config = dataclasses.replace(
        P2PConfig.for_tests(peer_records=False),  # the DHT alone: records would introduce them
        dht_walk_fast_interval_ms=600_000,
        dht_walk_interval_ms=600_000,
    )
    async with trio.open_nursery() as nursery:
        hub, _ = await start_mesh(nursery, seed_for(0, "walk"), "testchain", config)
        spokes = []
        for index in range(1, 5):
            spoke_config = dataclasses.replace(config, bootstrap=(hub.listen_addrs()[0],))
            spoke, _ = await start_mesh(nursery, seed_for(index, "walk"), "testchain", spoke_config)
            spokes.append(spoke)
        await wait_until(lambda: hub.peer_count() == 4, CONNECT_S, "the hub has 4 peers")
        assert hub._dht is not None
        await wait_until(
            lambda: len(hub._dht.routing_table.get_peer_ids()) == 4,
            CONNECT_S,
            "the hub's routing table holds its 4 peers (added once identify gave their addresses)",
        )
        newcomer_config = dataclasses.replace(config, bootstrap=(hub.listen_addrs()[0],))
        newcomer, _ = await start_mesh(nursery, seed_for(9, "walk"), "testchain", newcomer_config)
        spoke_ids = {s._id for s in spokes}
        await wait_until(
            lambda: spoke_ids <= set(newcomer._candidates) | set(newcomer._connected),
            CONNECT_S,
            "the newcomer knows every spoke after its first walk",
        )
        await wait_until(
            lambda: newcomer.peer_count() == 5, CONNECT_S, "the newcomer connects to all 5"
        )
        assert newcomer.statistics()["dht_walks"] == 1
        nursery.cancel_scope.cancel()
