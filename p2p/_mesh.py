"""The Mesh service: one libp2p host with discovery, validated gossip and request/response.

Lifecycle: ``await nursery.start(mesh.run)`` returns once the host listens and pubsub runs;
cancelling the nursery stops it. Shutdown order matters with py-libp2p 0.8.1: our own tasks
stop first, then peers are disconnected, then the DHT, gossipsub and pubsub services, and last
the host, so pubsub never sees traffic after its nursery closed.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import libp2p.pubsub.pubsub as pubsub_module
import multiaddr
import trio
from google.protobuf import message as protobuf_message
from libp2p import new_host
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.exceptions import BaseLibp2pError, ValidationError
from libp2p.io.exceptions import IOException, MessageTooLarge
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.stream.exceptions import StreamClosed, StreamEOF, StreamError, StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as Libp2pPeerInfo
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.peer.peerstore import PeerStoreError
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import GossipsubEvent, Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_uvarint

from p2p import _tuning
from p2p._envelope import (
    Envelope,
    decode_envelope,
    encode_envelope,
    envelope_overhead_bytes_max,
    message_id,
    sign_envelope,
    verify_envelope,
)
from p2p._identity import key_pair_from_seed, peer_id_bytes_of, peer_id_of, private_key_from_seed
from p2p._limits import BanScores, TokenBucket, reason_weights
from p2p._records import PEERS_PURPOSE, RECORD_TYPE_TAG, decode_record, encode_record
from p2p._reqresp import Handler, RequestResponse
from p2p._router import StrictNoSignGossipSub
from p2p._stats import Rejections, TopicCounters, rejected_peers_tracked_max
from p2p.abc import MeshAPI
from p2p.exceptions import (
    ConfigError,
    EnvelopeError,
    GossipTooLarge,
    NotRunning,
    P2PError,
    SignatureInvalid,
)
from p2p.types import (
    GossipMessage,
    PeerEvent,
    PeerEventKind,
    PeerId,
    PeerInfo,
    PeerSource,
    Verdict,
)

if TYPE_CHECKING:
    # trio-typing (a py-libp2p dependency) shadows trio's types; TaskStatus lives there.
    from trio_typing import TaskStatus

    from p2p.config import P2PConfig

logger = logging.getLogger("gpumesh.p2p")

Validator = Callable[[GossipMessage], bool | Verdict]
"""A subscriber's extra check, run before a message is accepted and forwarded: ``True`` or
``Verdict.ACCEPT`` passes it, ``False`` or ``Verdict.REJECT`` rejects it (and scores the
forwarding peer), ``Verdict.IGNORE`` drops it without blame."""

topic_prefix = "/gpumesh"
purpose_chars_max = 32
pubsub_rpc_overhead_bytes = 64 * 1024
peer_event_subscribers_max = 16
subscribers_per_topic_max = 16
shutdown_disconnect_s = 2.0
pubsub_read_chunk_bytes = 64 * 1024
pubsub_coalesce_bytes_max = 60 * 1024
"""Queued RPCs for one peer are written together up to this (one yamux frame is < 64 KiB)."""
varint_bytes_max = 10
connection_slack = 16
identify_poll_s = 0.05
record_topic_poll_s = 0.1
dht_probe_peers = 3
banned_peers_max = 1_024
dial_failure_reasons_max = 32
accepted_envelopes_max = 256
accepted_envelope_bytes_max = 64 * 1024
"""Larger accepted messages are decoded again on delivery and forwarded without origin."""


def topic_name(chain_id: str, purpose: str) -> str:
    """The gossipsub topic for ``purpose`` on ``chain_id``: ``/gpumesh/<chain>/<purpose>/1``."""
    return f"{topic_prefix}/{chain_id}/{purpose}/1"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclasses.dataclass(slots=True)
class _Candidate:
    """A peer we may dial, with its backoff state."""

    peer_id: ID
    addrs: list[multiaddr.Multiaddr]
    source: PeerSource
    permanent: bool
    failures: int = 0
    next_attempt: float = 0.0
    dialing: bool = False


@dataclasses.dataclass(slots=True)
class _Connected:
    source: PeerSource
    since_ms: int


@dataclasses.dataclass(slots=True)
class _Subscriber:
    send: trio.MemorySendChannel[GossipMessage]
    validator: Validator | None


class _Notifee(INotifee):  # type: ignore[misc]  # libp2p types are Any to mypy
    """Connection events from the swarm; awaited inline there, so this only records them."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        self._mesh._counters["streams_opened"] += 1
        await trio.lowlevel.checkpoint()

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        direction = getattr(conn, "direction", None)
        outbound = direction is not None and direction.name == "OUTBOUND"
        self._mesh._on_connected(conn.muxed_conn.peer_id, outbound=outbound)
        await trio.lowlevel.checkpoint()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._mesh._on_disconnected(conn.muxed_conn.peer_id)
        await trio.lowlevel.checkpoint()

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        await trio.lowlevel.checkpoint()

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        await trio.lowlevel.checkpoint()


class _GuardedPubsub(Pubsub):  # type: ignore[misc]  # libp2p types are Any to mypy
    """Pubsub whose read loop survives a peer's corrupt frame.

    py-libp2p 0.8.1 parses each inbound RPC with protobuf and lets ``DecodeError`` escape the
    read loop, which stops the whole host: one garbage frame from any peer (or two large
    concurrent publishes whose yamux frames interleave on one stream) took a node down. We
    reset that peer's stream, count it, and drop the peer from pubsub as the library does
    for an oversized frame; the peer may reconnect with a clean stream.
    """

    corrupt_frames = 0
    fast_reader = False
    """Read frames through our buffered loop (``_read_rpcs``) instead of py-libp2p's."""

    async def publish(self, topic_id: str | list[str], data: bytes) -> None:
        """Publish in the StrictNoSign format unless libp2p's strict signing is on.

        No ``from``, ``seqno``, ``signature`` or ``key``: stock peers configured for
        StrictNoSign (js-libp2p's and go-libp2p's gossipsub, Ethereum clients) drop a message
        that has any of them, and our envelope already carries the origin's signature.
        """
        if self.strict_signing:
            await super().publish(topic_id, data)
            return
        topics = [topic_id] if isinstance(topic_id, str) else list(topic_id)
        await self.push_msg(self.my_id, rpc_pb2.Message(data=data, topicIDs=topics))

    def get_hello_packet(self) -> rpc_pb2.RPC:
        packet: rpc_pb2.RPC = super().get_hello_packet()
        hellos: dict[object, frozenset[str]] = self.__dict__.setdefault("_hello_topics", {})
        hellos[trio.lowlevel.current_task()] = frozenset(
            sub.topicid for sub in packet.subscriptions if sub.subscribe
        )
        return packet

    async def _handle_new_peer(self, peer_id: ID) -> None:
        """py-libp2p's, then tell the peer of subscriptions its hello missed.

        The stock version builds the hello (our topics), awaits its write, and only then
        registers the peer; a topic subscribed during that write is in neither the hello
        nor the announcement, which goes to registered peers only. The peer never learned
        of it: a market cluster's requester lost a provider's subscription to job
        requests this way (docs/p2p.md). Once the peer is registered, announce to it
        whatever changed since its hello was built.
        """
        task = trio.lowlevel.current_task()
        hellos: dict[object, frozenset[str]] = self.__dict__.setdefault("_hello_topics", {})
        try:
            await super()._handle_new_peer(peer_id)
        finally:
            sent = hellos.pop(task, None)
        queue = self.peer_queues.get(peer_id)
        if sent is None or queue is None:
            return
        now = set(self.topic_ids)
        for topic, subscribe in [(t, True) for t in now - sent] + [(t, False) for t in sent - now]:
            packet, subopt = self._build_announce_rpc(topic, subscribe)
            self._enqueue_or_retry_announce(peer_id, queue, packet, subopt)
        if now != sent:
            # Peers told of a subscription that changed while their hello was written.
            self.hello_catch_ups = getattr(self, "hello_catch_ups", 0) + 1

    async def validate_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        """Run our (synchronous) topic validators on every copy that is not yet seen.

        The stock version caches each verdict by message id for 5 minutes, so a second peer
        forwarding a rejected message was never counted against, and a message we dropped
        for a reason that was not the content's (a peer over its rate, an IGNORE) stayed
        refused when an honest peer sent it later. It also formats the whole message into
        each error text. Accepted messages are marked seen right after this, so nothing is
        validated twice.
        """
        for topic_validator in self.get_msg_validators(msg):
            assert not topic_validator.is_async, "the mesh registers only sync validators"
            if not topic_validator.validator(msg_forwarder, msg):
                raise ValidationError("rejected by a topic validator")

    async def handle_sending_messages(self, peer_id: ID, stream: Any, queue: Any) -> None:
        """py-libp2p's per-peer sending loop, writing whatever is queued in one frame.

        The stock loop writes each queued RPC on its own (a yamux frame, a Noise message and
        a socket write each, through four locks). Here every RPC already queued when the
        loop wakes is framed and written together, up to ``pubsub_coalesce_bytes_max``, and
        the write skips the stream's locks where that is safe (``_tuning.write_stream``).
        """
        if not self.fast_reader:
            await super().handle_sending_messages(peer_id, stream, queue)
            return
        try:
            while True:
                rpc = await queue.pop()
                if rpc is None:
                    return  # the queue was closed: the peer is gone
                frames = [_framed(rpc)]
                size = len(frames[0])
                while size < pubsub_coalesce_bytes_max:
                    more = queue._queue.pop()
                    if more is None:
                        break
                    frames.append(_framed(more))
                    size += len(frames[-1])
                await _tuning.write_stream(stream, b"".join(frames))
        except (StreamClosed, StreamReset):
            logger.debug("pubsub stream to %s closed or reset", peer_id)
            self._handle_dead_peer(peer_id)
        except (
            BaseLibp2pError,
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as exc:
            logger.debug("sending to %s failed: %s", peer_id, exc)
            self._handle_dead_peer(peer_id)

    async def continuously_read_stream(self, stream: Any) -> None:
        try:
            if self.fast_reader:
                await self._read_rpcs(stream)
            else:
                await super().continuously_read_stream(stream)
        except protobuf_message.DecodeError as exc:
            peer_id = stream.muxed_conn.peer_id
            type(self).corrupt_frames += 1
            self.corrupt_frames_here = getattr(self, "corrupt_frames_here", 0) + 1
            logger.warning("corrupt pubsub frame from %s: %s", peer_id, exc)
            with trio.move_on_after(1):
                try:
                    await stream.reset()
                except BaseLibp2pError:
                    pass  # the stream is already broken; the reset had nothing to do
            self._handle_dead_peer(peer_id)

    async def _read_rpcs(self, stream: Any) -> None:
        """py-libp2p's read loop, with fewer awaits and tasks per message.

        The stock loop reads each varint length prefix one byte per ``stream.read(1)``
        (every read a trip through the stream, yamux and its window lock) and then spawns a
        task per message to push it. Profiling showed both among the per-message costs
        (docs/p2p.md). Here one read takes whatever has arrived, every complete frame in the
        buffer is handled, and messages are pushed inline (validation is synchronous and
        forwarding only queues). The size limit is checked on the length prefix, before any
        body is buffered, as before.
        """
        peer_id = stream.muxed_conn.peer_id
        buffer = bytearray()
        try:
            while self.manager.is_running:
                frame = _take_frame(buffer, self.max_inbound_rpc_size)
                if frame is None:
                    chunk = await _tuning.read_stream(stream, pubsub_read_chunk_bytes)
                    if not chunk:
                        return
                    buffer += chunk
                    continue
                await self._handle_rpc(peer_id, stream, frame)
        except MessageTooLarge as error:
            logger.warning("pubsub RPC from %s exceeds the size limit: %s", peer_id, error)
            with trio.move_on_after(1):
                try:
                    await stream.reset()
                except BaseLibp2pError:
                    pass  # the stream is already broken; the reset had nothing to do
            self._handle_dead_peer(peer_id)
        except (StreamEOF, StreamError, IOException, RawConnError) as exc:
            # The peer went away or the connection closed: pubsub's notifee cleans up.
            logger.debug("pubsub stream from %s ended: %s", peer_id, exc)

    async def _handle_rpc(self, peer_id: ID, stream: Any, frame: bytes) -> None:
        rpc = rpc_pb2.RPC()
        rpc.ParseFromString(frame)
        # The module-level name, so that p2p._tuning's cache (when installed) applies.
        if not pubsub_module.maybe_consume_signed_record(rpc, self.host, peer_id):
            logger.debug("invalid signed peer record from %s; RPC ignored", peer_id)
            return
        for msg in rpc.publish:
            if self._is_subscribed_to_msg(msg) and self.manager.is_running:
                await self.push_msg(peer_id, msg)
        if rpc.subscriptions:
            if len(rpc.subscriptions) > self.max_subscriptions_per_rpc:
                logger.debug("%s sent too many subscriptions in one RPC", peer_id)
            else:
                for subscription in rpc.subscriptions:
                    self.handle_subscription(peer_id, subscription)
        if rpc.HasField("control"):
            await self.router.handle_rpc(rpc, peer_id)
        if stream.metric_send_channel is not None:
            event = GossipsubEvent()
            event.peer_id = peer_id.pretty()
            event.message_size = len(frame)
            event.publish = bool(rpc.publish)
            event.subopts = bool(rpc.subscriptions)
            event.control = rpc.HasField("control")
            await stream.metric_send_channel.send(event)


def _framed(rpc: rpc_pb2.RPC) -> bytes:
    body: bytes = rpc.SerializeToString()
    prefix: bytes = encode_uvarint(len(body))
    return prefix + body


def _take_frame(buffer: bytearray, bytes_max: int) -> bytes | None:
    """Cut one varint-length-prefixed frame off ``buffer``; None if it is not all there."""
    length = 0
    for index in range(min(len(buffer), varint_bytes_max)):
        byte = buffer[index]
        length |= (byte & 0x7F) << (7 * index)
        if byte & 0x80:
            continue
        if length > bytes_max:
            raise MessageTooLarge(f"pubsub RPC of {length} bytes, limit {bytes_max}")
        end = index + 1 + length
        if len(buffer) < end:
            return None
        frame = bytes(buffer[index + 1 : end])
        del buffer[:end]
        return frame
    if len(buffer) >= varint_bytes_max:
        raise protobuf_message.DecodeError("pubsub RPC length prefix is not a varint")
    return None


class Mesh(MeshAPI):
    """A node's presence on the p2p network (see ``p2p/__init__.py`` for the tour)."""

    def __init__(self, seed: bytes, chain_id: str, config: P2PConfig) -> None:
        if not chain_id or "/" in chain_id:
            raise ConfigError(f"[p2p] chain_id: must be non-empty without '/' (got {chain_id!r})")
        self.chain_id = chain_id
        self.config = config
        _configure_libp2p_logging()
        if config.libp2p_hot_path_caches:
            _tuning.apply()
        self._key_pair = key_pair_from_seed(seed)
        self._signer = private_key_from_seed(seed)
        self.public_key: bytes = self._signer.public_key().public_bytes_raw()
        self.peer_id: PeerId = peer_id_of(self.public_key)
        self._id = ID(peer_id_bytes_of(self.public_key))

        noise_key = create_x25519_key_pair()
        # Noise only: a default host would also accept /plaintext/2.0.0 dialers.
        self._host = new_host(
            key_pair=self._key_pair,
            sec_opt={
                TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(
                    self._key_pair, noise_privkey=noise_key.private_key
                )
            },
            muxer_preference="YAMUX",
            enable_mDNS=config.mdns,
            # One connection per peer skips the 250 ms fallback-dial wait in dial_peer.
            connection_config=ConnectionConfig(
                max_connections_per_peer=1,
                dial_timeout=config.dial_timeout_ms / 1000,
                min_connections=0,
                # The peer table enforces peers_max; the slack admits transient DHT dials.
                low_watermark=config.peers_max + connection_slack,
                high_watermark=config.peers_max + connection_slack,
                max_connections=config.peers_max + connection_slack,
            ),
        )
        gossipsub_options: dict[str, Any] = dict(
            protocols=[TProtocol(p) for p in config.gossip_protocols],
            degree=config.gossip_degree,
            degree_low=config.gossip_degree_low,
            degree_high=config.gossip_degree_high,
            time_to_live=config.gossip_fanout_ttl_s,
            gossip_window=config.gossip_window,
            gossip_history=config.gossip_history,
            heartbeat_initial_delay=0.1,
            heartbeat_interval=config.gossip_heartbeat_ms / 1000,
            do_px=False,
            prune_back_off=config.gossip_prune_backoff_s,
            adaptive_gossip_enabled=False,
            # Rates are ours to bound (publish pacing); its 10 msg/s cap drops silently.
            spam_protection_enabled=False,
            # Every test and LAN peer may share one IP; diversity would refuse to form a mesh.
            eclipse_protection_enabled=False,
        )
        self._gossipsub = (
            GossipSub(**gossipsub_options)
            if config.gossip_strict_signing
            else StrictNoSignGossipSub(
                id_of=_message_id_of,
                origin_of=self._origin_of,
                fast_publish=config.libp2p_hot_path_caches,
                degree_lazy=config.gossip_degree_lazy,
                **gossipsub_options,
            )
        )
        self._pubsub = _GuardedPubsub(
            self._host,
            self._gossipsub,
            seen_ttl=config.gossip_seen_ttl_s,
            strict_signing=config.gossip_strict_signing,
            msg_id_constructor=_message_id_of,
            max_inbound_rpc_size=max(
                2 * config.gossip_message_bytes_max + pubsub_rpc_overhead_bytes, 1024 * 1024
            ),
        )
        self._pubsub.fast_reader = config.libp2p_hot_path_caches
        self._dht: KadDHT | None = (
            KadDHT(self._host, DHTMode.SERVER, enable_random_walk=False) if config.dht else None
        )
        self._reqresp = RequestResponse(
            self._host,
            request_bytes_max=config.request_bytes_max,
            response_bytes_max=config.response_bytes_max,
            inbound_streams_max=config.inbound_streams_max,
            inbound_streams_per_peer_max=config.inbound_streams_per_peer_max,
        )
        self._host.get_network().register_notifee(_Notifee(self))
        _disable_auto_connector(self._host.get_network())
        _shorten_negative_dial_cache(self._host.get_network(), config.backoff_initial_ms / 1000)

        self._running = False
        self._nursery: trio.Nursery | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._candidates: dict[ID, _Candidate] = {}
        self._connected: dict[ID, _Connected] = {}
        self._dialing_sources: dict[ID, PeerSource] = {}
        self._peers_changed = trio.Event()
        self._dial_wanted = trio.Event()
        self._peer_event_sends: list[trio.MemorySendChannel[PeerEvent]] = []
        self._subscribers: dict[str, list[_Subscriber]] = {}
        self._draining: set[str] = set()
        self._topic_counters: dict[str, TopicCounters] = {}
        self._rejections = Rejections()
        self._ban_scores = BanScores(
            config.gossip_ban_score_half_life_s, rejected_peers_tracked_max
        )
        self._topic_limits: dict[str, tuple[float, int]] = {}
        # Envelopes that passed _check, by data, for the router (origin) and _drain (no
        # second decode); bounded, oldest dropped first.
        self._accepted: collections.OrderedDict[bytes, Envelope] = collections.OrderedDict()
        self._buckets: dict[ID, dict[str, TokenBucket]] = {}
        self._banned: dict[ID, None] = {}
        self._dial_failures: collections.Counter[str] = collections.Counter()
        self._publish_lock = trio.Lock()
        self._publish_next_s = 0.0
        self._counters: dict[str, int] = {
            "dial_attempts": 0,
            "dial_failures": 0,
            "refused_peers_max": 0,
            "peer_events_dropped": 0,
            "dht_walks": 0,
            "dht_probes": 0,
            "dht_walk_failures": 0,
            "mdns_discovered": 0,
            "peers_banned": 0,
            "connections_opened": 0,
            "connections_closed": 0,
            "streams_opened": 0,
            "peers_joined": 0,
            "records_published": 0,
            "records_received": 0,
        }
        self._records: trio.MemoryReceiveChannel[GossipMessage] | None = None
        self._record_published_ms: int | None = None
        if config.peer_records:
            self._records = self.subscribe(
                PEERS_PURPOSE,
                self._validate_record,
                peer_rate_per_s=config.peer_record_rate_per_s,
                peer_burst=config.peer_record_burst,
            )
            if isinstance(self._gossipsub, StrictNoSignGossipSub):
                self._gossipsub.flood_topics.add(self.topic(PEERS_PURPOSE))
        for addr in config.bootstrap:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            if info.peer_id != self._id:
                self._candidates[info.peer_id] = _Candidate(
                    info.peer_id, list(info.addrs), PeerSource.BOOTSTRAP, permanent=True
                )

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, discover, gossip; ``task_status.started()`` once listening."""
        listen = multiaddr.Multiaddr(
            f"/ip4/{self.config.listen_host}/tcp/{self.config.listen_port}"
        )
        self._trio_token = trio.lowlevel.current_trio_token()
        if self.config.mdns:
            peerDiscovery.register_peer_discovered_handler(self._on_mdns_thread)
        try:
            async with self._host.run([listen]), self._services():
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    for topic in self._subscribers:
                        await self._start_draining(topic)
                    nursery.start_soon(self._dial_loop)
                    if self._dht is not None:
                        nursery.start_soon(self._dht_walk_loop)
                    self._running = True
                    if self._records is not None:
                        nursery.start_soon(self._publish_records)
                        nursery.start_soon(self._take_records, self._records)
                    task_status.started()
                    try:
                        await trio.sleep_forever()
                    finally:
                        self._running = False
                        nursery.cancel_scope.cancel()
                        await self._disconnect_all()
        finally:
            self._running = False
            self._nursery = None
            if self.config.mdns:
                peerDiscovery.unregister_peer_discovered_handler(self._on_mdns_thread)
            for sends in self._subscribers.values():
                for sub in sends:
                    sub.send.close()
            for send in self._peer_event_sends:
                send.close()

    @contextlib.asynccontextmanager
    async def _services(self) -> AsyncIterator[None]:
        async with background_trio_service(self._pubsub):
            async with background_trio_service(self._gossipsub):
                await self._pubsub.wait_until_ready()
                if self._dht is None:
                    yield
                    return
                async with background_trio_service(self._dht):
                    yield

    async def _disconnect_all(self) -> None:
        # Shielded: this runs while we are being cancelled, and pubsub must see its peers
        # leave before its own service stops (else "Nursery is closed to new arrivals").
        # Peers close side by side: py-libp2p's Yamux.close sleeps 0.1 s, so 33 peers one
        # after another would outlast the bound and leave the rest open.
        with trio.CancelScope(shield=True), trio.move_on_after(shutdown_disconnect_s):
            async with trio.open_nursery() as nursery:
                for peer, conns in list(self._host.get_network().connections.items()):
                    nursery.start_soon(self._close_peer, peer, list(conns))

    async def _close_peer(self, peer: ID, conns: list[INetConn]) -> None:
        # The swarm's own service closes its connections when it is cancelled too, beside
        # us and unshielded: SwarmConn.close() marks the connection closed, then is cut at
        # its first checkpoint with the socket still open, and every later close() returns
        # at once. The peer saw no FIN and kept a dead connection (the flaky restart test).
        # The muxer's close is idempotent and always closes the secured connection, so
        # close it directly first, then let the swarm forget the peer.
        for conn in conns:
            try:
                await conn.muxed_conn.close()
            except BaseLibp2pError as exc:
                logger.debug("closing a connection to %s at shutdown failed: %s", peer, exc)
        try:
            await self._host.disconnect(peer)
        except BaseLibp2pError as exc:
            logger.debug("disconnect from %s at shutdown failed: %s", peer, exc)

    # ---- identity and peers ----------------------------------------------------------------

    def listen_addrs(self) -> list[str]:
        """Dialable multiaddrs of this node, each ending in ``/p2p/<peer id>``."""
        return [f"{addr}" for addr in self._host.get_addrs()]

    def peers(self) -> list[PeerInfo]:
        store = self._host.get_peerstore()
        out = []
        for peer, state in self._connected.items():
            try:
                addrs = tuple(str(a) for a in store.addrs(peer))
            except PeerStoreError:  # connected before its addresses were recorded
                addrs = ()
            out.append(PeerInfo(PeerId(peer.to_base58()), addrs, state.source, state.since_ms))
        return out

    def peer_count(self) -> int:
        return len(self._connected)

    async def wait_for_peers(self, count: int) -> None:
        """Block until at least ``count`` peers are connected (wrap in a timeout)."""
        while len(self._connected) < count:
            await self._peers_changed.wait()

    def peer_events(self) -> trio.MemoryReceiveChannel[PeerEvent]:
        """A bounded feed of connect/disconnect events; slow readers lose events (counted)."""
        if len(self._peer_event_sends) >= peer_event_subscribers_max:
            self._peer_event_sends = [s for s in self._peer_event_sends if not _is_closed(s)]
            if len(self._peer_event_sends) >= peer_event_subscribers_max:
                raise P2PError(f"at most {peer_event_subscribers_max} peer event subscribers")
        send, receive = trio.open_memory_channel[PeerEvent](self.config.peer_events_queue_max)
        self._peer_event_sends.append(send)
        return receive

    def _emit(self, event: PeerEvent) -> None:
        alive = []
        for send in self._peer_event_sends:
            try:
                send.send_nowait(event)
                alive.append(send)
            except trio.WouldBlock:
                self._counters["peer_events_dropped"] += 1
                alive.append(send)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        self._peer_event_sends = alive
        self._peers_changed.set()
        self._peers_changed = trio.Event()

    def _on_connected(self, peer: ID, *, outbound: bool) -> None:
        self._counters["connections_opened"] += 1
        if peer in self._connected:
            return
        if peer in self._banned:
            if self._nursery is not None:
                self._nursery.start_soon(self._disconnect_quietly, peer)
            return
        if len(self._connected) >= self.config.peers_max:
            self._counters["refused_peers_max"] += 1
            if self._nursery is not None:
                self._nursery.start_soon(self._disconnect_quietly, peer)
            return
        source = self._dialing_sources.pop(peer, None)
        candidate = self._candidates.get(peer)
        if source is None and outbound and candidate is not None:
            # Notifications run in their own tasks and may trail (or race) our dial.
            source = candidate.source
        if source is None:
            # Outbound dials we did not start are the DHT's lookups reaching new peers.
            source = PeerSource.DHT if outbound else PeerSource.INBOUND
        self._connected[peer] = _Connected(source, _now_ms())
        self._counters["peers_joined"] += 1
        if candidate is not None:
            candidate.failures = 0
        self._emit(PeerEvent(PeerEventKind.CONNECTED, PeerId(peer.to_base58()), source, _now_ms()))
        if self._dht is not None and self._nursery is not None:
            self._nursery.start_soon(self._add_to_dht, peer)

    def _on_disconnected(self, peer: ID) -> None:
        self._counters["connections_closed"] += 1
        # A banned peer's redial may already be open (it is being closed): it is gone anyway.
        if peer not in self._banned and self._host.get_network().get_connections(peer):
            return
        self._buckets.pop(peer, None)
        state = self._connected.pop(peer, None)
        if state is None:
            return
        self._dial_wanted.set()
        self._emit(
            PeerEvent(PeerEventKind.DISCONNECTED, PeerId(peer.to_base58()), state.source, _now_ms())
        )

    async def _disconnect_quietly(self, peer: ID) -> None:
        try:
            await self._host.disconnect(peer)
        except BaseLibp2pError as exc:
            logger.debug("disconnect from %s failed: %s", peer, exc)

    async def _add_to_dht(self, peer: ID) -> None:
        assert self._dht is not None
        store = self._host.get_peerstore()
        with trio.move_on_after(self.config.dial_timeout_ms / 1000):
            # The routing table takes a peer only with its addresses in the peerstore. A
            # peer that dialed us has none until identify has run (it runs after the
            # connected notification), so add_peer skipped every inbound peer: a node's
            # table held only the peers it had dialed, and a DHT walk through it could not
            # learn of the others (a hub with 4 inbound spokes answered with none).
            # A 50 ms poll for each of 33 peers at start-up was 4% of the CPU of forming a
            # 34-node mesh (26,000 wake-ups); doubling it to 0.8 s made a newcomer's first
            # lookup miss peers its bootstrap had not yet tabled (a CI failure), so it stays.
            while not _has_addrs(store, peer):
                if peer not in self._connected:
                    return
                await trio.sleep(identify_poll_s)
            try:
                await self._dht.add_peer(peer)
            except (BaseLibp2pError, OSError) as exc:
                logger.debug("adding %s to the DHT routing table failed: %s", peer, exc)

    # ---- discovery and dialing -------------------------------------------------------------

    def _add_candidate(
        self,
        peer: ID,
        addrs: list[multiaddr.Multiaddr],
        source: PeerSource,
        *,
        dial_after_ms: int | None = None,
    ) -> None:
        if peer == self._id or not addrs or peer in self._banned:
            return
        existing = self._candidates.get(peer)
        if existing is not None:
            existing.addrs = list(addrs)
            if dial_after_ms == 0 and existing.failures == 0 and not existing.dialing:
                # A record says it is ours to dial: cut a tie-break wait short (not a backoff).
                with contextlib.suppress(RuntimeError):
                    existing.next_attempt = min(existing.next_attempt, trio.current_time())
                self._dial_wanted.set()
            return
        if len(self._candidates) >= self.config.known_peers_max:
            evictable = [
                c
                for c in self._candidates.values()
                if not c.permanent and not c.dialing and c.peer_id not in self._connected
            ]
            if not evictable:
                return
            worst = max(evictable, key=lambda c: c.failures)
            del self._candidates[worst.peer_id]
        candidate = _Candidate(peer, list(addrs), source, permanent=False)
        if dial_after_ms is not None:
            # The caller decided who dials (peer records); 0 is at once.
            with contextlib.suppress(RuntimeError):
                candidate.next_attempt = trio.current_time() + dial_after_ms / 1000
        elif self.config.dial_tiebreak_ms > 0 and self._id.to_bytes() > peer.to_bytes():
            # Peers that find each other through the DHT or mDNS learn of each other at
            # about the same time; both dialing makes two connections, each a full Noise
            # handshake, identify and pubsub hello on both sides, and one is thrown away.
            # The lower peer id dials at once, the higher one only if no connection came
            # by then.
            with contextlib.suppress(RuntimeError):  # outside trio.run: no clock, no delay
                candidate.next_attempt = trio.current_time() + self.config.dial_tiebreak_ms / 1000
        self._candidates[peer] = candidate
        self._dial_wanted.set()

    async def _dial_loop(self) -> None:
        assert self._nursery is not None
        in_flight = trio.CapacityLimiter(self.config.dials_in_flight_max)
        while True:
            now = trio.current_time()
            waiting = False
            if len(self._connected) < self.config.peers_max:
                for candidate in list(self._candidates.values()):
                    if candidate.dialing or candidate.peer_id in self._connected:
                        continue
                    if candidate.next_attempt > now or in_flight.available_tokens == 0:
                        waiting = True
                        continue
                    candidate.dialing = True
                    await in_flight.acquire_on_behalf_of(candidate.peer_id)
                    self._nursery.start_soon(self._dial, candidate, in_flight)
            # A new candidate, a freed dial slot or a lost peer wakes the loop at once; the
            # periodic pass only serves backoffs and tie-break delays, so a node connected
            # to all it knows does not scan its table every dial_interval_ms.
            if waiting:
                with trio.move_on_after(self.config.dial_interval_ms / 1000):
                    await self._dial_wanted.wait()
            else:
                await self._dial_wanted.wait()
            self._dial_wanted = trio.Event()

    async def _dial(self, candidate: _Candidate, in_flight: trio.CapacityLimiter) -> None:
        peer = candidate.peer_id
        self._counters["dial_attempts"] += 1
        self._dialing_sources[peer] = candidate.source
        ok = False
        reason = "timeout"
        try:
            with trio.move_on_after(self.config.dial_timeout_ms / 1000):
                await self._host.connect(Libp2pPeerInfo(peer, candidate.addrs))
                ok = True
        except (BaseLibp2pError, OSError) as exc:
            logger.debug("dial %s (%s) failed: %s", peer, candidate.source, exc)
            reason = _dial_failure_reason(exc)
        finally:
            # The swarm may report the connection after connect() returns: keep the source
            # for _on_connected to take, unless the dial failed or it was already taken.
            if not ok or peer in self._connected:
                self._dialing_sources.pop(peer, None)
            candidate.dialing = False
            in_flight.release_on_behalf_of(candidate.peer_id)
            self._dial_wanted.set()
        if ok:
            candidate.failures = 0
            candidate.next_attempt = 0.0
            return
        self._counters["dial_failures"] += 1
        if reason in self._dial_failures or len(self._dial_failures) < dial_failure_reasons_max:
            self._dial_failures[reason] += 1
        candidate.failures += 1
        backoff_ms = min(
            self.config.backoff_initial_ms * 2 ** min(candidate.failures - 1, 30),
            self.config.backoff_max_ms,
        )
        # Jitter spreads the redials of many nodes that lost the same peer at once.
        candidate.next_attempt = trio.current_time() + backoff_ms / 1000 * random.uniform(0.8, 1.2)

    async def _dht_walk_loop(self) -> None:
        # Walks are expensive for everyone (each opens a FIND_NODE stream to ~k peers, and
        # each of them serves it) and delay gossip while they run.
        assert self._dht is not None
        if self.config.peer_records:
            await self._backup_walks()
            return
        # Without peer records, walks are how a node learns of the network: walk every
        # dht_walk_fast_interval_ms while walks find new peers; after a dry walk, wait
        # until a new peer connects (its routing table may know peers we do not), at most
        # dht_walk_interval_ms. A newcomer walks and dials on its own, so a fully connected
        # node has nothing to look for. (Issue 14: dry walks on a doubling schedule were
        # most of an idle node's CPU at 12 nodes and kept running during the benchmark.)
        # The first walk starts as soon as a first peer is connected (a node that just
        # joined through one bootstrap peer learns the rest from it), not a period later.
        # A dry walk's wait doubles from dht_walk_fast_interval_ms up to the cap, though: a
        # node that missed a few peers at start (every walk it made came back before they
        # were up) must not wait the whole cap to find them (seen at 34 nodes: 146 s to a
        # full mesh instead of 25 s).
        dry = 0
        while True:
            while not self._connected:
                await self._peers_changed.wait()
            joined_before = self._counters["peers_joined"]
            if await self._dht_walk():
                dry = 0
            else:
                dry = min(dry + 1, 16)
                wait_ms = min(
                    self.config.dht_walk_fast_interval_ms * 2**dry,
                    self.config.dht_walk_interval_ms,
                )
                with trio.move_on_after(wait_ms / 1000):
                    while self._counters["peers_joined"] == joined_before:
                        await self._peers_changed.wait()
            await trio.sleep(self.config.dht_walk_fast_interval_ms / 1000)

    async def _backup_walks(self) -> None:
        # With peer records every node of the topic announces itself, and the peers that
        # receive a record dial it: walks only catch what records missed (a record lost
        # while the gossip mesh was forming, peers of a partition that healed). So the
        # first walk waits dht_walk_first_ms after the first connection, a walk that found
        # someone new is followed by another soon (records did miss something), and dry
        # walks back off from dht_walk_interval_ms to dht_walk_interval_max_ms. A new peer
        # connecting no longer starts a walk: its record did the announcing.
        assert self._dht is not None
        while not self._connected:
            await self._peers_changed.wait()
        # No lookup at the first connection: its candidates were dialed from both ends at
        # once (48-66 duplicate connections in a 34-node start, each closed again inside
        # the measured window). It had been kept while it hid a lost subscription, which
        # was py-libp2p's hello race (_GuardedPubsub._handle_new_peer), now fixed.
        await trio.sleep(self.config.dht_walk_first_ms / 1000)
        dry = 0
        found_before = False
        cap_ms = max(self.config.dht_walk_interval_ms, self.config.dht_walk_interval_max_ms)
        while True:
            while not self._connected:
                await self._peers_changed.wait()
            # A probe (a few FIND_NODE queries to connected peers) rather than a lookup (~k
            # queries): it only has to notice that someone is missing; if it does, full
            # lookups follow until they find nothing new.
            if await self._dht_walk(probe=dry > 0 or not found_before):
                found_before = True
                dry = 0
                await trio.sleep(self.config.dht_walk_fast_interval_ms / 1000)
                continue
            found_before = False
            wait_ms = min(self.config.dht_walk_interval_ms * 2**dry, cap_ms)
            dry = min(dry + 1, 16)
            await trio.sleep(wait_ms / 1000)

    async def _dht_walk(self, *, probe: bool = False) -> bool:
        """One lookup (or with ``probe``, one FIND_NODE to each of ``dht_probe_peers``
        random connected peers); feeds unknown peers to the dial loop. True if any was new."""
        assert self._dht is not None
        self._counters["dht_probes" if probe else "dht_walks"] += 1
        # Alternate our own id (fills our neighbourhood) with random keys (the far buckets),
        # as Kademlia's bucket refresh does.
        key = self._id.to_bytes() if self._counters["dht_walks"] % 2 else os.urandom(32)
        found: list[ID] = []
        routing = self._dht.peer_routing
        with trio.move_on_after(self.config.dial_timeout_ms / 1000):
            try:
                if probe:
                    asked = list(self._connected)
                    random.shuffle(asked)
                    for peer in asked[:dht_probe_peers]:
                        # py-libp2p's per-peer query (the lookup's own step): the answer's
                        # peers and addresses go to the peerstore as in a lookup.
                        found += await routing._query_peer_for_closest(peer, os.urandom(32))
                else:
                    found = await routing.find_closest_peers_network(key)
            except (BaseLibp2pError, OSError) as exc:
                self._counters["dht_walk_failures"] += 1
                logger.debug("DHT walk failed: %s", exc)
        store = self._host.get_peerstore()
        new = False
        # Every FIND_NODE answer of the walk (up to k peers each, with addresses) went into
        # the peerstore, not only the k closest that the lookup returns: take them all, so
        # one walk teaches a node most of a small network instead of one walk per k peers.
        # The candidate table stays bounded (known_peers_max) and dials are paced as ever.
        # Only the lookup's own result decides whether walking again may pay (the walk
        # schedule's question); the rest of the peerstore is taken without asking.
        looked_up = set(found) | set(self._dht.routing_table.get_peer_ids())
        for peer in dict.fromkeys([*looked_up, *store.peers_with_addrs()]):
            if peer in self._candidates or peer == self._id:
                continue
            try:
                addrs = [a for a in store.addrs(peer) if _is_dialable(a)]
            except PeerStoreError:
                continue
            if addrs:
                self._add_candidate(peer, addrs, PeerSource.DHT)
                new = new or (peer in looked_up and peer in self._candidates)
        return new

    # ---- peer records (p2p/_records.py) ------------------------------------------------------

    def _validate_record(self, message: GossipMessage) -> Verdict:
        if message.type_tag != RECORD_TYPE_TAG:
            return Verdict.REJECT
        try:
            decode_record(message.payload)
        except EnvelopeError:
            return Verdict.REJECT
        return Verdict.ACCEPT

    async def _publish_records(self) -> None:
        """Our record once a first peer shares the topic, then every interval."""
        topic = self.topic(PEERS_PURPOSE)
        addrs = [str(a) for a in self._host.get_addrs()]
        record = encode_record([a.rsplit("/p2p/", 1)[0] for a in addrs])
        # Not before our bootstrap dials have settled: a peer that reads our record dials us
        # at once (its record is older), and one we are still dialing would make that a
        # second connection (a market cluster whose nodes bootstrap to all earlier ones
        # lost pubsub subscriptions to the duplicate's close).
        with trio.move_on_after(self.config.dial_timeout_ms / 1000):
            while any(
                c.dialing or (c.peer_id not in self._connected and c.failures == 0)
                for c in self._candidates.values()
                if c.source is PeerSource.BOOTSTRAP
            ):
                with trio.move_on_after(record_topic_poll_s):
                    await self._peers_changed.wait()
        while True:
            while not self._pubsub.peer_topics.get(topic):
                # The peers' hello (their subscriptions) follows the connection; wake on
                # peer changes, and poll briefly since the hello has no event of its own.
                with trio.move_on_after(record_topic_poll_s):
                    await self._peers_changed.wait()
            self._record_published_ms = _now_ms()
            await self.publish(PEERS_PURPOSE, RECORD_TYPE_TAG, record)
            self._counters["records_published"] += 1
            if self._counters["records_published"] == 1:
                # The first went out while the gossip meshes around us were still forming
                # (forwarders with no mesh peers yet pass it on only by IHAVE): at 34 nodes
                # starting together a quarter of the first records never arrived, and each
                # node that missed some found them with lookups. Once more, soon.
                await trio.sleep(self.config.peer_record_repeat_ms / 1000)
                continue
            await trio.sleep(self.config.peer_record_interval_ms / 1000)

    async def _take_records(self, records: trio.MemoryReceiveChannel[GossipMessage]) -> None:
        async for message in records:
            self._counters["records_received"] += 1
            peer = ID(peer_id_bytes_of(message.sender_public_key))
            # Who dials: the pair's older record, a rule both ends evaluate alike. A peer
            # whose record is newer than our latest joined after we announced, so it may
            # not know of us: we dial it at once. A peer whose record is older will have
            # ours (or has it coming) and dials us: we give it peer_record_tiebreak_ms, long
            # enough for a handshake on a starved CPU, before we dial it ourselves. (Both
            # dialing makes two connections and closes one: at 34 nodes with the lower id
            # dialing and 1.5 s for the higher, duplicates were a third of all connections.)
            # Before our first record we only wait: everyone dials a newcomer.
            ours = self._record_published_ms
            dial_now = ours is not None and (ours, self._id.to_bytes()) < (
                message.timestamp_ms,
                peer.to_bytes(),
            )
            self._add_candidate(
                peer,
                # Validated already; decoding again is cheaper than holding the result.
                decode_record(message.payload),
                PeerSource.GOSSIP,
                dial_after_ms=0 if dial_now else self.config.peer_record_tiebreak_ms,
            )

    def _on_mdns_thread(self, info: Libp2pPeerInfo) -> None:
        # Runs on zeroconf's thread: hand the peer to trio and let the dial loop connect.
        token = self._trio_token
        if token is None:
            return
        try:
            token.run_sync_soon(self._on_mdns_peer, info)
        except trio.RunFinishedError:
            pass

    def _on_mdns_peer(self, info: Libp2pPeerInfo) -> None:
        # Finds arrive from the moment mDNS starts, before run() reports started: keep them.
        if info.peer_id == self._id:
            return
        self._counters["mdns_discovered"] += 1
        addrs = [a for a in info.addrs if _is_dialable(a)]
        self._add_candidate(info.peer_id, addrs, PeerSource.MDNS)

    # ---- gossip ----------------------------------------------------------------------------

    def topic(self, purpose: str) -> str:
        return topic_name(self.chain_id, purpose)

    def subscribe(
        self,
        purpose: str,
        validator: Validator | None = None,
        *,
        peer_rate_per_s: float | None = None,
        peer_burst: int | None = None,
    ) -> trio.MemoryReceiveChannel[GossipMessage]:
        """Receive validated messages of ``purpose`` from other nodes (not our own).

        ``peer_rate_per_s`` / ``peer_burst`` set this topic's per-peer token bucket
        (default ``gossip_peer_rate_per_s`` / ``gossip_peer_burst``); the last call that
        names them wins.
        """
        if not purpose or "/" in purpose or len(purpose) > purpose_chars_max:
            raise P2PError(f"bad gossip purpose {purpose!r}")
        if peer_rate_per_s is not None and not peer_rate_per_s > 0:
            raise P2PError(f"peer_rate_per_s must be > 0 (got {peer_rate_per_s!r})")
        if peer_burst is not None and peer_burst < 1:
            raise P2PError(f"peer_burst must be >= 1 (got {peer_burst!r})")
        topic = self.topic(purpose)
        if peer_rate_per_s is not None or peer_burst is not None:
            rate, burst = self._limits_of(topic)
            self._topic_limits[topic] = (
                rate if peer_rate_per_s is None else peer_rate_per_s,
                burst if peer_burst is None else peer_burst,
            )
            for buckets in self._buckets.values():
                buckets.pop(topic, None)
        subscribers = self._subscribers.setdefault(topic, [])
        subscribers[:] = [s for s in subscribers if not _is_closed(s.send)]
        if len(subscribers) >= subscribers_per_topic_max:
            raise P2PError(f"at most {subscribers_per_topic_max} subscribers per topic")
        send, receive = trio.open_memory_channel[GossipMessage](self.config.subscription_queue_max)
        subscribers.append(_Subscriber(send, validator))
        self._topic_counters.setdefault(topic, TopicCounters())
        if topic not in self._draining:
            self._pubsub.set_topic_validator(topic, self._validator_for(topic), False)
            if self._nursery is not None:
                self._nursery.start_soon(self._start_draining, topic)
        return receive

    async def _start_draining(self, topic: str) -> None:
        if topic in self._draining:
            return
        self._draining.add(topic)
        subscription = await self._pubsub.subscribe(topic)
        assert self._nursery is not None
        self._nursery.start_soon(self._drain, topic, subscription)

    async def _drain(self, topic: str, subscription: Any) -> None:
        # libp2p's subscription channel holds 32 and drops silently: empty it at once into
        # the subscribers' own (larger, bounded, counted) queues.
        counters = self._topic_counters[topic]
        async for msg in subscription:
            envelope = self._accepted.pop(msg.data, None)
            if envelope is None:
                envelope = _decoded(msg.data, self._envelope_bytes_max())
            if envelope is None or envelope.sender == self.public_key:
                continue
            message = _gossip_message(topic, envelope, msg.data)
            counters.incoming.add(time.monotonic())
            for sub in self._subscribers.get(topic, []):
                try:
                    sub.send.send_nowait(message)
                    counters.delivered += 1
                except trio.WouldBlock:
                    counters.dropped_queue_full += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    def _envelope_bytes_max(self) -> int:
        return self.config.gossip_message_bytes_max

    def _limits_of(self, topic: str) -> tuple[float, int]:
        return self._topic_limits.get(
            topic, (self.config.gossip_peer_rate_per_s, self.config.gossip_peer_burst)
        )

    def _within_rate(self, forwarder: ID, topic: str) -> bool:
        now = time.monotonic()
        buckets = self._buckets.get(forwarder)
        if buckets is None:
            if forwarder not in self._connected:
                # Not (or no longer) in the peer table: do not grow state for it.
                return True
            buckets = self._buckets[forwarder] = {}
        bucket = buckets.get(topic)
        if bucket is None:
            rate, burst = self._limits_of(topic)
            bucket = buckets[topic] = TokenBucket(rate, burst, now)
        return bucket.take(now)

    def _validator_for(self, topic: str) -> Callable[[ID, rpc_pb2.Message], bool]:
        counters = self._topic_counters.setdefault(topic, TopicCounters())

        def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            ours = forwarder == self._id
            if not ours and not self._within_rate(forwarder, topic):
                reason: str | None = "rate_limited"
                counters.rate_limited += 1
            else:
                reason = self._check(topic, msg)
            if reason is None:
                return True
            if ours:
                return False
            peer = forwarder.to_base58()
            self._rejections.add(peer, reason)
            weight = reason_weights.get(reason, 1.0)
            if weight > 0:
                score = self._ban_scores.add(peer, weight, time.monotonic())
                if score >= self.config.gossip_ban_score_max:
                    self._ban(forwarder, score)
            return False

        return validate

    def _ban(self, peer: ID, score: float) -> None:
        if peer in self._banned or peer == self._id:
            return
        counts = self._rejections.of_peer(peer.to_base58())
        if len(self._banned) >= banned_peers_max:
            self._banned.pop(next(iter(self._banned)))
        self._banned[peer] = None
        self._counters["peers_banned"] += 1
        logger.warning("banning %s (score %.1f): %s", peer, score, counts)
        # Pubsub drops its traffic from now on and tears its connection down; we also stop
        # dialing it and refuse it in _on_connected.
        self._pubsub.add_to_blacklist(peer)
        self._candidates.pop(peer, None)
        if self._nursery is not None:
            self._nursery.start_soon(self._disconnect_quietly, peer)

    def _check(self, topic: str, msg: rpc_pb2.Message) -> str | None:
        """None when ``msg`` may be delivered and forwarded, else the reason to reject it."""
        data = msg.data
        if not self.config.gossip_strict_signing and (
            msg.HasField("from_id")
            or msg.HasField("seqno")
            or msg.HasField("signature")
            or msg.HasField("key")
        ):
            # StrictNoSign: the origin is our envelope's signer, nothing else may claim it.
            return "signed_fields"
        if len(data) > self.config.gossip_message_bytes_max:
            return "oversized"
        try:
            envelope = decode_envelope(data, bytes_max=self.config.gossip_message_bytes_max)
        except SignatureInvalid:
            return "bad_signature"
        except EnvelopeError:
            return "malformed"
        if envelope.chain_id != self.chain_id:
            return "wrong_chain"
        try:
            verify_envelope(envelope)
        except SignatureInvalid:
            return "bad_signature"
        if self.config.gossip_strict_signing:
            # libp2p checked its signature over from_id: tie that peer to our signer.
            if msg.from_id != peer_id_bytes_of(envelope.sender):
                return "author_mismatch"
        now = _now_ms()
        if envelope.timestamp_ms > now + self.config.gossip_clock_skew_ms:
            return "from_future"
        if envelope.timestamp_ms < now - self.config.gossip_message_age_max_ms:
            return "too_old"
        subscribers = self._subscribers.get(topic, [])
        if any(s.validator is not None for s in subscribers):
            message = _gossip_message(topic, envelope, data)
            for sub in subscribers:
                if sub.validator is None:
                    continue
                try:
                    verdict = sub.validator(message)
                except Exception:
                    # A validator bug must reject the message, not crash the node's reader.
                    logger.exception("gossip validator for %s raised", topic)
                    return "validator_error"
                if verdict is Verdict.IGNORE:
                    return "validator_ignored"
                if verdict is False or verdict is Verdict.REJECT:
                    return "validator_rejected"
                assert verdict is True or verdict is Verdict.ACCEPT, (
                    f"gossip validator for {topic} returned {verdict!r}"
                )
        if len(data) <= accepted_envelope_bytes_max:
            self._accepted[data] = envelope
            while len(self._accepted) > accepted_envelopes_max:
                self._accepted.popitem(last=False)
        return None

    def _origin_of(self, msg: rpc_pb2.Message) -> ID | None:
        """The signer of an accepted message's envelope, as a libp2p peer id."""
        envelope = self._accepted.get(msg.data)
        return None if envelope is None else ID(peer_id_bytes_of(envelope.sender))

    async def publish(self, purpose: str, type_tag: str, payload: bytes) -> bytes:
        """Sign and gossip ``payload``; returns its message id. Paced to the publish rate."""
        if not self._running:
            raise NotRunning("mesh is not running")
        size = len(payload) + envelope_overhead_bytes_max
        if size > self.config.gossip_message_bytes_max:
            raise GossipTooLarge(
                f"payload of {len(payload)} bytes exceeds the gossip limit "
                f"{self.config.gossip_message_bytes_max - envelope_overhead_bytes_max}"
            )
        topic = self.topic(purpose)
        async with self._publish_lock:
            now = trio.current_time()
            if self._publish_next_s > now:
                await trio.sleep_until(self._publish_next_s)
                now = trio.current_time()
            self._publish_next_s = max(now, self._publish_next_s) + (
                1.0 / self.config.gossip_publish_rate_max_per_s
            )
            envelope = sign_envelope(self._signer, self.chain_id, type_tag, payload, _now_ms())
            data = encode_envelope(envelope)
            await self._pubsub.publish(topic, data)
        self._topic_counters.setdefault(topic, TopicCounters()).outgoing.add(time.monotonic())
        return message_id(data)

    # ---- request / response ----------------------------------------------------------------

    def set_handler(self, protocol: str, handler: Handler) -> None:
        """Serve ``protocol`` with ``handler(peer_id, request) -> response``."""
        self._reqresp.set_handler(protocol, handler)

    async def request(
        self, peer_id: PeerId, protocol: str, payload: bytes, timeout_s: float | None = None
    ) -> bytes:
        """One request/response exchange with ``peer_id``; raises a ``RequestError``."""
        if not self._running:
            raise NotRunning("mesh is not running")
        timeout = self.config.request_timeout_s_default if timeout_s is None else timeout_s
        return await self._reqresp.request(peer_id, protocol, payload, timeout)

    # ---- statistics ------------------------------------------------------------------------

    def rejected_by(self, peer_id: PeerId) -> dict[str, int]:
        """Rejected gossip counted against ``peer_id`` (the peer that forwarded it to us)."""
        return self._rejections.of_peer(peer_id)

    def ban_score(self, peer_id: PeerId) -> float:
        """``peer_id``'s current (decayed) ban score; it is banned at ``gossip_ban_score_max``."""
        return self._ban_scores.score(peer_id, time.monotonic())

    def statistics(self) -> dict[str, Any]:
        now = time.monotonic()
        by_source: dict[str, int] = {s.value: 0 for s in PeerSource}
        for state in self._connected.values():
            by_source[state.source.value] += 1
        return {
            "peer_id": self.peer_id,
            "corrupt_frames": getattr(self._pubsub, "corrupt_frames_here", 0),
            "hello_catch_ups": getattr(self._pubsub, "hello_catch_ups", 0),
            "peers": len(self._connected),
            "peers_by_source": by_source,
            "known_peers": len(self._candidates),
            "topics": {
                topic: {
                    "in_per_s": c.incoming.per_second(now),
                    "out_per_s": c.outgoing.per_second(now),
                    "in_total": c.incoming.total,
                    "out_total": c.outgoing.total,
                    "delivered_total": c.delivered,
                    "dropped_queue_full": c.dropped_queue_full,
                    "rate_limited": c.rate_limited,
                    "peer_rate_per_s": self._limits_of(topic)[0],
                    "peer_burst": self._limits_of(topic)[1],
                }
                for topic, c in self._topic_counters.items()
            },
            "rejected": {
                "by_reason": dict(self._rejections.by_reason),
                "by_peer": {p: dict(c) for p, c in self._rejections.by_peer.items()},
            },
            "dial_failures_by_reason": dict(self._dial_failures),
            "ban_scores": self._ban_scores.snapshot(now),
            "banned": [p.to_base58() for p in self._banned],
            "requests": self._reqresp.statistics(),
            **self._counters,
        }


def _message_id_of(msg: rpc_pb2.Message) -> bytes:
    return message_id(msg.data)


def _decoded(data: bytes, bytes_max: int) -> Envelope | None:
    try:
        return decode_envelope(data, bytes_max=bytes_max)
    except EnvelopeError:
        return None


def _gossip_message(topic: str, envelope: Envelope, data: bytes) -> GossipMessage:
    return GossipMessage(
        topic=topic,
        sender_public_key=envelope.sender,
        sender_peer_id=peer_id_of(envelope.sender),
        type_tag=envelope.type_tag,
        payload=envelope.payload,
        timestamp_ms=envelope.timestamp_ms,
        message_id=message_id(data),
    )


def _is_closed(send: trio.MemorySendChannel[Any]) -> bool:
    return send.statistics().open_receive_channels == 0


def _has_addrs(store: Any, peer: ID) -> bool:
    try:
        return bool(store.addrs(peer))
    except PeerStoreError:
        return False


def _is_dialable(addr: multiaddr.Multiaddr) -> bool:
    text = str(addr)
    return "/tcp/" in text and "/ip4/0.0.0.0/" not in text


def _disable_auto_connector(network: Any) -> None:
    """Turn off the swarm's auto-connector.

    It dials every peerstore entry (mDNS and DHT fill the peerstore) up to the connection
    watermark as soon as the swarm starts, bypassing ``peers_max`` and our per-peer discovery
    sources; our dial loop does that job. ``stop()`` alone races the swarm's own ``start()``,
    so its entry points are replaced on the instance before the swarm runs.
    """
    connector = network.auto_connector

    async def disabled(*args: Any) -> None:
        await trio.lowlevel.checkpoint()

    connector.maybe_connect = disabled
    connector.run_background_task = disabled


def _dial_failure_reason(exc: BaseException) -> str:
    """A short, bounded label for why a dial failed (the innermost cause's type)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc)
    if "negative cache" in text:
        return "negative_cache"
    return type(exc).__name__


def _shorten_negative_dial_cache(network: Any, ttl_s: float) -> None:
    """Let a failed peer be redialed after ``ttl_s`` instead of py-libp2p's 60 s.

    The swarm refuses every dial to a peer for 60 s after one dial to it failed. When nodes
    start together, most first dials find the peer not listening yet, so each later retry
    (ours back off from ``backoff_initial_ms``, the DHT's come on their own) failed at once
    for a minute: 3,190 of 3,856 dials in a 34-node start, and full connectivity took
    minutes. Our dial loop keeps its own per-peer backoff; the swarm's cache only needs to
    stop a burst of parallel DHT dials to one dead peer.
    """
    cache = getattr(network, "_negative_peer_cache", None)
    if cache is not None and hasattr(cache, "_ttl"):
        cache._ttl = ttl_s


class _ForwardToOurs(logging.Handler):
    """libp2p's logger does not propagate; re-emit its records under ``gpumesh.p2p.libp2p``."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING:
            return
        logging.getLogger("gpumesh.p2p.libp2p").handle(record)


def _configure_libp2p_logging() -> None:
    root = logging.getLogger("libp2p")
    # An application that routes libp2p's records itself (node/_logging makes the logger
    # propagate to its one root handler) owns its levels: forwarding them as well, or resetting
    # the levels it chose, would print each warning twice and ignore `libp2p=...`.
    if root.propagate or any(isinstance(h, _ForwardToOurs) for h in root.handlers):
        return
    root.addHandler(_ForwardToOurs())
    root.setLevel(logging.WARNING)
    # Routine disconnects and empty DHT reads log at WARNING/ERROR there; they are not news.
    for noisy in (
        "libp2p.kad_dht",
        "libp2p.pubsub",
        "libp2p.network",
        "libp2p.host",
        "libp2p.protocol_muxer",
    ):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
