"""The issue-14 lean paths keep the stock behaviour they replace (p2p/_tuning.py, _mesh.py)."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from libp2p.custom_types import TProtocol
from libp2p.protocol_muxer.exceptions import MultiselectClientError, MultiselectError
from libp2p.protocol_muxer.multiselect import Multiselect
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.pubsub.pb import rpc_pb2
from libp2p.tools.anyio_service import Service, background_trio_service

from p2p import _tuning
from p2p._mesh import _framed, _take_frame


def test_coalesced_frames_split_back_into_the_same_rpcs() -> None:
    rpcs = [
        rpc_pb2.RPC(publish=[rpc_pb2.Message(data=bytes([i]) * (i * 97), topicIDs=["t"])])
        for i in range(1, 40)
    ]
    buffer = bytearray(b"".join(_framed(rpc) for rpc in rpcs))
    parsed = []
    while (frame := _take_frame(buffer, 1 << 20)) is not None:
        rpc = rpc_pb2.RPC()
        rpc.ParseFromString(frame)
        parsed.append(rpc)
    assert parsed == rpcs, "coalesced RPCs must come back whole and in order"
    assert not buffer


class _FakeSocketStream:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.calls = 0

    async def receive_some(self, n: int | None = None) -> bytes:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        return self.chunks.pop(0) if self.chunks else b""


async def test_buffered_tcp_read_serves_small_reads_from_one_receive() -> None:
    from libp2p.io.trio import TrioTCPStream

    fake = _FakeSocketStream([b"\x00\x05hello\x00\x03abc", b"tail"])
    stream = TrioTCPStream(fake)  # type: ignore[arg-type]
    reads = [await _tuning._buffered_tcp_read(stream, n) for n in (2, 5, 2, 3)]
    assert reads == [b"\x00\x05", b"hello", b"\x00\x03", b"abc"]
    assert fake.calls == 1, "frames already received must not cost another receive"
    assert await _tuning._buffered_tcp_read(stream, 100) == b"tail"
    assert await _tuning._buffered_tcp_read(stream, 100) == b"", "EOF still reads as b''"


class _FakeNetwork:
    def __init__(self, connected: set[str]) -> None:
        self.connected = connected

    def get_connections(self, peer_id: Any) -> list[object]:
        return [object()] if peer_id in self.connected else []


class _FakeHost:
    def __init__(self, connected: set[str]) -> None:
        self.network = _FakeNetwork(connected)

    def get_network(self) -> _FakeNetwork:
        return self.network


class _FakeBucket:
    def __init__(self, connected: set[str]) -> None:
        self.host = _FakeHost(connected)


async def test_full_bucket_counts_a_connected_peer_alive_without_a_ping(
    monkeypatch: Any,
) -> None:
    pinged: list[str] = []

    async def fake_ping(bucket: Any, peer_id: str) -> bool:
        pinged.append(peer_id)
        await trio.lowlevel.checkpoint()
        return False

    monkeypatch.setattr(_tuning, "_original_ping_peer", fake_ping)
    bucket = _FakeBucket({"connected"})
    assert await _tuning._ping_unless_connected(bucket, "connected") is True
    assert pinged == [], "a connected peer is alive: no ping stream"
    assert await _tuning._ping_unless_connected(bucket, "gone") is False
    assert pinged == ["gone"], "an unconnected peer is still pinged"


def test_score_decay_matches_py_libp2p() -> None:
    from libp2p.peer.id import ID
    from libp2p.pubsub.score import PeerScorer, ScoreParams

    from p2p._router import _decay_scores

    def populated() -> PeerScorer:
        scorer = PeerScorer(ScoreParams())
        for i in range(5):
            peer = ID(bytes([0, 1, i]))
            for topic in ("a", "b"):
                scorer.time_in_mesh[peer][topic] = 3.0 + i
                scorer.first_message_deliveries[peer][topic] = 7.0 * i
                scorer.mesh_message_deliveries[peer][topic] = 2.5
                scorer.invalid_messages[peer][topic] = 1.0 + i
            scorer.behavior_penalty[peer] = 4.0
            scorer.app_specific_scores[peer] = -1.0
            scorer.graft_flood_penalties[peer] = 2.0
            scorer.iwant_spam_penalties[peer] = 3.0
            scorer.ihave_spam_penalties[peer] = 5.0
            scorer.equivocation_penalties[peer] = 6.0
        return scorer

    tables = (
        "time_in_mesh",
        "first_message_deliveries",
        "mesh_message_deliveries",
        "invalid_messages",
        "behavior_penalty",
        "app_specific_scores",
        "graft_flood_penalties",
        "iwant_spam_penalties",
        "ihave_spam_penalties",
        "equivocation_penalties",
    )
    stock, ours = populated(), populated()
    for _ in range(3):
        stock.on_heartbeat()
        _decay_scores(ours)
    for name in tables:
        assert getattr(ours, name) == getattr(stock, name), f"{name} decays differently"


def test_an_rpc_with_the_senders_older_signed_record_is_handled_not_dropped() -> None:
    # py-libp2p refuses a signed peer record older than the stored one and, with it, the
    # whole pubsub RPC (its subscriptions too). An older but valid record of the sender's
    # own is let through, without replacing the newer one; forged or foreign records are
    # still refused.
    import multiaddr
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.envelope import seal_record
    from libp2p.peer.id import ID
    from libp2p.peer.peer_record import PeerRecord
    from libp2p.peer.peerstore import PeerStore

    from p2p.testing import seed_for

    sender = create_new_key_pair(seed_for(1, "stale-record"))
    other = create_new_key_pair(seed_for(2, "stale-record"))
    sender_id = ID.from_pubkey(sender.public_key)
    addrs = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/4001")]

    def record(seq: int, key: Any = sender, peer: ID = sender_id) -> bytes:
        sealed: bytes = seal_record(
            PeerRecord(peer, addrs, seq), key.private_key
        ).marshal_envelope()
        return sealed

    class _Host:
        def __init__(self) -> None:
            self.store = PeerStore()

        def get_peerstore(self) -> PeerStore:
            return self.store

    host = _Host()
    assert _tuning._cached_maybe_consume(rpc_pb2.RPC(senderRecord=record(20)), host, sender_id)
    older = rpc_pb2.RPC(senderRecord=record(10))
    assert not _tuning._original_consume(older, host, sender_id), "py-libp2p drops it"
    assert _tuning._cached_maybe_consume(older, host, sender_id), "we handle the RPC"
    stored = host.store.get_peer_record(sender_id)
    assert stored is not None and stored.record().seq == 20, "the newer record stays"
    foreign = rpc_pb2.RPC(senderRecord=record(5, key=other, peer=ID.from_pubkey(other.public_key)))
    assert not _tuning._cached_maybe_consume(foreign, host, sender_id), "not the sender's"
    forged = rpc_pb2.RPC(senderRecord=record(10)[:-3] + b"xyz")
    assert not _tuning._cached_maybe_consume(forged, host, sender_id), "bad signature"


class _MemoryPipe:
    """One end of an in-memory byte stream, as py-libp2p's multistream code reads it."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.writes = 0

    async def read(self, n: int | None = None) -> bytes:
        data: bytes = await self.stream.receive_some(n)
        return data

    async def write(self, data: bytes) -> None:
        self.writes += 1
        await self.stream.send_all(data)

    async def close(self) -> None:
        await self.stream.aclose()

    def get_remote_address(self) -> tuple[str, int] | None:
        return None


async def _negotiate(offered: list[str], served: list[str]) -> tuple[object, int]:
    """Our client offering ``offered`` against py-libp2p's own listener serving ``served``."""
    client_end, server_end = trio.testing.memory_stream_pair()
    client, server = _MemoryPipe(client_end), _MemoryPipe(server_end)

    async def handler(stream: Any) -> None:
        await trio.lowlevel.checkpoint()

    listener = Multiselect({TProtocol(p): handler for p in served})
    outcome: dict[str, object] = {}

    async def serve() -> None:
        try:
            outcome["served"], _ = await listener.negotiate(MultiselectCommunicator(server), 5)
        except MultiselectError as error:
            outcome["served"] = error

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        try:
            chosen: object = await _tuning._pipelined_select_one_of(
                MultiselectClient(),
                [TProtocol(p) for p in offered],
                MultiselectCommunicator(client),
                5,
            )
        except MultiselectClientError as error:
            chosen = error
        await client.close()
    assert isinstance(chosen, Exception) or outcome["served"] == chosen, outcome
    return chosen, client.writes


async def test_pipelined_multistream_select_agrees_with_the_stock_listener() -> None:
    chosen, writes = await _negotiate(["/a/1", "/b/1"], ["/a/1", "/b/1"])
    assert (chosen, writes) == ("/a/1", 1), "header and first protocol go out in one write"
    chosen, writes = await _negotiate(["/a/2", "/a/1"], ["/a/1"])
    assert (chosen, writes) == ("/a/1", 2), "a refused first protocol falls back to the next"
    refused, _ = await _negotiate(["/x/1", "/y/1"], ["/a/1"])
    assert isinstance(refused, MultiselectClientError), refused
    assert "/x/1" in str(refused) and "/y/1" in str(refused), str(refused)


async def test_frames_written_straight_to_a_full_socket_arrive_whole_and_in_order() -> None:
    # Yamux frames go from the cipher straight to the socket (_tuning._lean_write_frame);
    # when the kernel's buffer is full the rest of a frame goes out first, under the
    # connection's write lock. Four streams write at once into a small send buffer while
    # the reader waits: every byte must arrive, per stream, in order.
    import socket

    from p2p.testing import open_meshes

    chunks, chunk_bytes = 24, 24 * 1024

    def pattern(index: int) -> bytes:
        return bytes((index + 7 * k) % 251 for k in range(chunks * chunk_bytes))

    async def write(stream: Any, data: bytes) -> None:
        # No wait needed for the buffer to fill: one 24 KiB frame overfills a 4 KiB buffer.
        for k in range(chunks):
            await stream.write(data[k * chunk_bytes : (k + 1) * chunk_bytes])

    async with open_meshes(2) as (a, b):
        await a.wait_for_peers(1)
        conn = a._host.get_network().get_connections(b._id)[0].muxed_conn
        path = _tuning._socket_path(conn.secured_conn)
        assert path is not None, "a Noise-over-TCP yamux connection takes the direct path"
        path[1].stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        before = dict(_tuning.io_counts)
        received, _ = await _four_streams(a, b, pattern, write, _stock_read)
        for index, data in received.items():
            assert data == pattern(index), f"stream {index} arrived changed"
        counts = _tuning.io_counts
        assert counts["write_direct"] > before.get("write_direct", 0)
        assert counts["write_waited"] > before.get("write_waited", 0), "the socket never filled"
        assert counts["read_direct"] > before.get("read_direct", 0)


async def _stock_read(stream: Any, n: int) -> bytes:
    data: bytes = await stream.read(n)
    return data


async def _four_streams(
    a: Any,
    b: Any,
    pattern: Any,
    write: Any,
    read: Any,
) -> tuple[dict[int, bytearray], list[int]]:
    """Four streams from ``a`` to ``b`` at once, stream ``i`` carrying ``pattern(i)`` (whose
    first byte is ``i``) through ``write``; ``b`` reads each with ``read`` to its end.
    What arrived, by first byte, and each receiving stream's window once it ended."""
    from libp2p.network.stream.exceptions import StreamEOF

    protocol = TProtocol("/gpumesh-test/four-streams/1")
    received: dict[int, bytearray] = {}
    windows: list[int] = []
    done = trio.Semaphore(0)

    async def sink(stream: Any) -> None:
        data = bytearray()
        while True:
            try:
                chunk = await read(stream, 65536)
            except StreamEOF:
                break
            if not chunk:
                break
            data += chunk
        received[data[0]] = data
        windows.append(stream.muxed_stream.recv_window)
        done.release()

    async def send(index: int) -> None:
        stream = await a._host.new_stream(b._id, [protocol])
        await write(stream, pattern(index))
        await stream.close()

    b._host.set_stream_handler(protocol, sink)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for index in range(1, 5):
                nursery.start_soon(send, index)
        for _ in range(4):
            await done.acquire()
    assert sorted(received) == [1, 2, 3, 4]
    return received, windows


async def test_the_indexed_parent_lookup_agrees_with_the_stock_walk() -> None:
    """Service tasks started from tasks of two services (nested three deep) and from outside
    any: each gets the parent the stock walk over the whole tree finds."""
    _tuning.apply()
    stock = _tuning._original_find_parent_task
    seen: list[tuple[object, object]] = []
    both_up = trio.Event()
    checked = trio.Event()

    class Tree(Service):  # type: ignore[misc]  # libp2p is Any to mypy
        async def run(self) -> None:
            for _ in range(3):
                self.manager.run_task(self.branch, 2)
            await trio.sleep_forever()

        async def branch(self, depth: int) -> None:
            if depth:
                for _ in range(2):
                    self.manager.run_task(self.branch, depth - 1)
            await both_up.wait()
            me = trio.lowlevel.current_task()
            for manager in managers:
                seen.append((stock(manager, me), _tuning._indexed_find_parent_task(manager, me)))
            if len(seen) >= 2 * 2 * 21:
                checked.set()
            await trio.sleep_forever()

    managers: list[Any] = []
    with trio.fail_after(10):
        async with background_trio_service(Tree()) as one, background_trio_service(Tree()) as two:
            managers.extend([one, two])
            both_up.set()
            assert _tuning._indexed_find_parent_task(one, trio.lowlevel.current_task()) is None
            await checked.wait()
            one.cancel()
            two.cancel()
    assert seen and all(a is b for a, b in seen), "the lookup found another parent"
    assert sum(a is not None for a, _ in seen) == len(seen) // 2, "one manager each"


def test_cached_multiaddrs_parse_print_and_fail_as_the_stock_ones() -> None:
    import multiaddr.protocols as multiaddr_protocols
    import pytest
    from multiaddr import Multiaddr
    from multiaddr.exceptions import ProtocolLookupError, StringParseError

    _tuning.apply()
    text = "/ip4/10.1.2.3/tcp/4001/p2p/12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"
    stock = Multiaddr.__new__(Multiaddr)
    stock.registry = multiaddr_protocols.REGISTRY
    _tuning._original_multiaddr_from_string(stock, text)
    for _ in range(2):  # the first parse fills the caches, the second is served from them
        addr = Multiaddr(text)
        assert addr.to_bytes() == stock.to_bytes()
        assert str(addr) == text == _tuning._original_multiaddr_str(addr)
        assert str(Multiaddr(addr.to_bytes())) == text
        assert addr.value_for_protocol("tcp") == "4001"
        assert addr.value_for_protocol("ip4") == "10.1.2.3"
        with pytest.raises(ProtocolLookupError):
            addr.value_for_protocol("udp")
        with pytest.raises(StringParseError):
            Multiaddr("/ip4/300.1.2.3/tcp/1")  # an error is never cached as an answer
    assert Multiaddr("/ip4/10.1.2.3/tcp/4002") != Multiaddr("/ip4/10.1.2.3/tcp/4001")
    for index in range(_tuning.multiaddr_cached_max + 10):  # bounded
        Multiaddr(f"/ip4/10.0.{index // 250}.{index % 250}/tcp/1")
    assert len(_tuning._multiaddr_bytes_of) <= _tuning.multiaddr_cached_max


async def test_data_frames_absorbed_in_the_header_read_arrive_whole_and_in_order() -> None:
    # Plain DATA frames for open streams are delivered inside yamux's header read
    # (_tuning._absorb); opening (SYN), closing (FIN) and large frames split over several
    # Noise messages still go through the stock loop. Four streams interleave writes of
    # 1 byte, 12 bytes (a body the size of a header), 300 bytes and 100 KiB.
    from p2p.testing import open_meshes

    sizes = [1, 12, 300, 12, 100 * 1024, 12, 1] * 6

    def pattern(index: int) -> bytes:
        total = sum(sizes)
        return bytes([index]) + bytes((index + 13 * k) % 251 for k in range(total - 1))

    async def write(stream: Any, data: bytes) -> None:
        at = 0
        for size in sizes:
            await stream.write(data[at : at + size])
            at += size
            await trio.lowlevel.checkpoint()

    async with open_meshes(2) as (a, b):
        await a.wait_for_peers(1)
        before = _tuning.io_counts["frames_absorbed"]
        # Read as pubsub does (_tuning.read_stream): the stock read holds the streams lock
        # across a yield on every call, and a frame that finds it held takes the stock path.
        received, windows = await _four_streams(a, b, pattern, write, _tuning.read_stream)
        for index, data in received.items():
            assert data == pattern(index), f"stream {index} arrived changed"
        assert all(window >= 0 for window in windows), windows
        assert _tuning.io_counts["frames_absorbed"] > before + 50, "nothing took the lean path"
