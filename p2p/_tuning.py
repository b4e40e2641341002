"""Measured hot spots in py-libp2p 0.8.1 gossip, cached without changing what they check.

Profiling 3 in-process nodes (docs/p2p.md) showed two per-RPC costs that repeat the same work
for every message:

- ``env_to_send_in_RPC(host)`` rebuilds the host's address set (``host.get_addrs()``) on every
  outgoing RPC just to see whether its cached signed peer record is still current: ~0.5 ms
  per send. We reuse the answer per host for ``local_record_ttl_s``.
- ``maybe_consume_signed_record`` verifies the sender's signed peer record (an Ed25519 check
  and a peerstore update) on every incoming RPC, though a peer attaches the same bytes each
  time: ~0.3 ms per receive. We remember records that verified, per (peer, record bytes), for
  ``remote_record_ttl_s``; anything new or different is still verified.

Both wrap the module-level names that ``libp2p.pubsub.pubsub`` and ``.gossipsub`` call.
The Kademlia DHT does the same per response: every peer in a FIND_NODE answer (up to 20)
carries its signed record, each verified again on every lookup (0.24 of a profiled node's
4.4 CPU seconds at 12 nodes); the same per-(peer, bytes) cache serves it.

- Yamux sends a WINDOW_UPDATE frame after almost every read (its auto-tuning credits any
  shortfall against the target window at once), so every 300-byte gossip frame cost a
  second frame back (its own Noise encryption and socket write, and on the other side a
  decryption and a parse), and it reads four environment variables per read to decide. We
  credit the way go-yamux does without auto-tuning: consumed bytes are returned in one
  update once they reach half the stream's window (128 KiB by default). Only when no
  ``PY_YAMUX_*`` variable is set (an operator's explicit tuning wins).

Issue 14, per frame (each message copy is one yamux frame in one Noise message):

- The TCP reader took every Noise message in two ``receive_some`` calls (its 2-byte length,
  then its body), each through a lock and two trio checkpoints. ``TrioTCPStream.read`` now
  reads up to ``tcp_read_chunk_bytes`` at once and serves later reads from what it buffered,
  so a burst of frames costs one system call and no await per frame already received.
- Yamux read each frame's header and body through ``read_exactly`` (a retry loop) and the
  body inside a fresh ``fail_after`` scope (plus an environment lookup for its timeout); a
  frame is one Noise message, so both are nearly always in the session's buffer already:
  ``_buffered_read_exactly``/``_lean_read_data_body`` take them from it directly, and fall
  back to the stock reads (timeout included) when they are not all there.
- ``Yamux._write_frame`` unpacked every outgoing header and formatted a debug line for it
  (the f-string is built even with debug logging off) before taking the connection's write
  lock; it now only takes the lock and writes.
- ``write_stream`` is pubsub's write: a yamux DATA frame that fits the send window goes
  straight to the connection's ``_write_frame``, skipping the net stream's state lock and
  the yamux stream's read/write and window locks (pubsub's sending loop is the only writer
  of its stream, and the window check and debit run with no await between them).
  Anything else (another muxer, a closed stream, a short window) takes the stock path.
- A full Kademlia bucket pings its oldest peer before taking a new one; a peer we are
  connected to counts as alive without a ping (``_ping_unless_connected``).
- The swarm tells its notifees of every stream opened and closed through a fresh nursery
  and one task per notifee (four: the tag store, identify, pubsub and ours), though each
  of those four only counts or checkpoints: eight task spawns per stream, ~4.5 streams
  per connection. ``_notify_inline`` awaits them one after another in the caller's task,
  each still in its own exception barrier; connection events keep the stock fan-out.
- Both ends of every yamux connection pinged the other every 30 s to measure the RTT,
  which only its window auto-tuning reads; with the batched window update above nothing
  does. 33 connections made that 2.3 of a nearly idle node's ~6 frames received a
  second at 34 nodes. Only the dialing end pings now (``_ping_from_initiator_only``),
  so each connection still sees traffic both ways every 30 s, as go-yamux's keepalive.
- multistream-select on every new stream and connection upgrade: the stock client wrote
  the multistream header, waited for its echo, then wrote the protocol and waited again:
  two frames out and a round trip more than needed per stream (~4.5 streams and two
  upgrades per connection). ``_pipelined_select_one_of`` writes header and first
  protocol in one write and reads both answers, as go-libp2p's ``SelectProtoOrFail`` and
  js-libp2p do; a refused first protocol falls back to the stock one-by-one tries.

Issue 14, part 5: the layers between a yamux frame and the socket. Each frame written went
through SecureSession, the Noise writer, the length-prefix writer, RawConnection,
TrioTCPStream (its lock) and trio's SocketStream (its conflict detector, a checkpoint after
the send): three scheduler passes and ~15 Python calls for one ``send``. Reads were the same
chain upwards, per Noise message.

- ``_lean_write_frame``: with the connection's write lock free, the frame is encrypted and
  handed to the socket in one step (lock taken without waiting, nonce order kept because
  nothing awaits between encryption and ``send``); only when the kernel's buffer is full
  does the rest go through the stock, waiting write, still under the lock.
- ``_fill_from_socket``: when yamux wants bytes and the secure session has none, the next
  Noise message is cut from the TCP stream's buffer (filled straight from the socket, with
  trio's own wait and yield rules) and decrypted into the session. End of stream and socket
  errors are left to the stock read, which sees the same buffered bytes.
- ``read_stream``: pubsub's read takes what its yamux stream has buffered without the net
  stream's and the connection's locks; a closing or reset stream takes the stock read.

Each falls back to the stock path for any other transport, security or muxer
(``_socket_path``).

Issue 14, part 6: py-libp2p's service manager found the parent of every task it started by
walking the whole task tree of the service through nested generators
(``TrioManager._find_parent_task``): O(tasks) per task started, and pubsub, the swarm and
identify start several per peer and per stream. ``_indexed_find_parent_task`` looks the
running task up by its trio task instead (``_indexed_task_run`` keeps the index), and still
answers None for a task outside this manager's tree.

Issue 14, part 7: ``_absorb`` delivers a plain DATA frame (no flags, an open stream, its body
buffered, the streams lock free) inside yamux's header read, so the stock loop's streams-lock
yield and debug f-strings are skipped; every other frame reaches the stock loop unchanged.
Multiaddr parsing, printing and ``value_for_protocol`` are cached by input (bounded).
"""

from __future__ import annotations

import collections
import logging
import os
import struct
import time
import weakref
from typing import Any

import libp2p.kad_dht.kad_dht as kad_dht_module
import libp2p.kad_dht.peer_routing as peer_routing_module
import libp2p.kad_dht.routing_table as routing_table_module
import libp2p.kad_dht.utils as kad_utils_module
import libp2p.protocol_muxer.multiselect_client as multiselect_client_module
import libp2p.pubsub.gossipsub as gossipsub_module
import libp2p.pubsub.pubsub as pubsub_module
import libp2p.security.noise.io as noise_io_module
import libp2p.stream_muxer.yamux.yamux as yamux_module
import multiaddr.protocols as multiaddr_protocols
import trio
from google.protobuf.message import DecodeError
from libp2p.exceptions import BaseLibp2pError
from libp2p.io.exceptions import ConnectionClosedError, IOException
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.stream.net_stream import StreamState
from libp2p.network.swarm import Swarm
from libp2p.peer.envelope import consume_envelope
from libp2p.protocol_muxer.exceptions import (
    MultiselectClientError,
    MultiselectCommunicatorError,
    ProtocolNotSupportedError,
)
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.security.secure_session import SecureSession
from libp2p.tools.anyio_service.trio_manager import TrioManager
from libp2p.tools.anyio_service.trio_tasks import FunctionTask
from libp2p.utils import encode_delim
from multiaddr import Multiaddr

logger = logging.getLogger(__name__)

local_record_ttl_s = 5.0
remote_record_ttl_s = 60.0
remote_records_cached_max = 4_096
tcp_read_chunk_bytes = 64 * 1024

_original_env = pubsub_module.env_to_send_in_RPC
_original_dht_consume = kad_utils_module.maybe_consume_signed_record
_original_consume = pubsub_module.maybe_consume_signed_record
_original_ping_peer = routing_table_module.KBucket._ping_peer
_original_tcp_read = TrioTCPStream.read
_original_read_exactly = yamux_module.read_exactly
_original_read_data_body = yamux_module.Yamux._read_data_body
_original_handle_incoming = yamux_module.Yamux.handle_incoming
_original_notify = Swarm._notify
_original_measure_rtt_loop = yamux_module.Yamux._measure_rtt_loop
_original_select_one_of = multiselect_client_module.MultiselectClient.select_one_of
_original_task_run = FunctionTask.run
_original_find_parent_task = TrioManager._find_parent_task
_original_multiaddr_from_string = Multiaddr._from_string
_original_multiaddr_str = Multiaddr.__str__
_original_multiaddr_value_for_protocol = Multiaddr.value_for_protocol
multiaddr_cached_max = 4_096
_inline_notifications = frozenset({"opened_stream", "closed_stream"})
_yamux_data_bytes_max = yamux_module.MAX_MESSAGE_SIZE - yamux_module.HEADER_SIZE
_installed = False
io_counts = collections.Counter[str]()
"""Yamux frames written straight to the socket (``write_direct``: one send took all of it;
``write_waited``: the kernel's buffer was full and the rest went out through the stock wait),
through the stock layers (``write_stock``), and Noise messages read straight from the
socket (``read_direct``)."""
_local: weakref.WeakKeyDictionary[Any, tuple[float, tuple[bytes, bool]]] = (
    weakref.WeakKeyDictionary()
)
_remote: collections.OrderedDict[tuple[bytes, bytes], float] = collections.OrderedDict()


def _cached_env_to_send_in_rpc(host: Any) -> tuple[bytes, bool]:
    now = time.monotonic()
    cached = _local.get(host)
    if cached is not None and cached[0] > now:
        return cached[1]
    result: tuple[bytes, bool] = _original_env(host)
    _local[host] = (now + local_record_ttl_s, (result[0], False))
    return result


def _remember(key: tuple[bytes, bytes], now: float) -> None:
    _remote[key] = now
    _remote.move_to_end(key)
    while len(_remote) > remote_records_cached_max:
        _remote.popitem(last=False)


def _cached_dht_consume(msg: Any, host: Any, peer_id: Any = None) -> bool:
    # A top-level DHT message carries senderRecord (checked against the sending peer); a
    # peer entry in a response carries signedRecord (checked against its own id).
    if hasattr(msg, "senderRecord"):
        if not msg.HasField("senderRecord"):
            return True
        key = (b"s" + (b"" if peer_id is None else peer_id.to_bytes()), msg.senderRecord)
    else:
        if not msg.HasField("signedRecord"):
            return True
        key = (b"p" + msg.id, msg.signedRecord)
    now = time.monotonic()
    verified_at = _remote.get(key)
    if verified_at is not None and now - verified_at < remote_record_ttl_s:
        return True
    ok: bool = _original_dht_consume(msg, host, peer_id)
    if ok:
        _remember(key, now)
    return ok


def _cached_maybe_consume(msg: Any, host: Any, peer_id: Any) -> bool:
    if not msg.HasField("senderRecord"):
        return True
    key = (peer_id.to_bytes(), msg.senderRecord)
    now = time.monotonic()
    verified_at = _remote.get(key)
    if verified_at is not None and now - verified_at < remote_record_ttl_s:
        return True
    ok: bool = _original_consume(msg, host, peer_id)
    if not ok:
        ok = _is_stale_own_record(msg.senderRecord, host, peer_id)
    if ok:
        _remember(key, now)
    return ok


def _is_stale_own_record(raw: bytes, host: Any, peer_id: Any) -> bool:
    """True when ``raw`` is the sender's own valid record, only older than one we hold.

    py-libp2p refuses a record with a lower sequence number than the stored one, and then
    ignores the whole pubsub RPC that carried it: subscriptions included. Every side makes
    a new record (a new sequence number) for identify and for pubsub, and ours reuses one
    for ``local_record_ttl_s``, so identify's newer record often lands first. A market
    cluster lost a provider's subscription to job requests this way (it never came
    again). A stale record of the sender's own signing says nothing wrong: keep the newer
    one and handle the RPC.
    """
    try:
        _envelope, record = consume_envelope(raw, "libp2p-peer-record")
    except (ValueError, DecodeError, BaseLibp2pError):  # a bad envelope: refused as before
        return False
    if record.peer_id != peer_id:
        return False
    stored = host.get_peerstore().get_peer_record(peer_id)
    return stored is not None and stored.record().seq >= record.seq


async def _batched_window_update(stream: Any, *, bytes_read: int = 0) -> None:
    # Runs right after the read took the bytes out of the buffer; nothing else touches
    # these counters between here and the update (one trio thread, no await before it).
    if bytes_read <= 0:
        return
    stream._pending_recv_release += bytes_read
    if stream._pending_recv_release < stream.target_recv_window // 2:
        return
    increment = stream._pending_recv_release
    stream._pending_recv_release = 0
    stream.recv_window += increment
    await stream.send_window_update(increment)


async def _ping_unless_connected(bucket: Any, peer_id: Any) -> bool:
    # A full bucket pings its oldest peer before it would take a new one; every FIND_NODE
    # answer (20 peers) hit this for each peer not in the table, a new stream per ping on
    # both sides. A peer we hold a connection to is alive: no ping needed (go-libp2p-kad-dht
    # decides on connectedness too). Unconnected peers are still pinged.
    if bucket.host.get_network().get_connections(peer_id):
        return True
    alive: bool = await _original_ping_peer(bucket, peer_id)
    return alive


async def _buffered_tcp_read(stream: Any, n: int | None = None) -> bytes:
    # Only the connection's one reader task (the muxer, or the handshake before it) reads.
    buffered: bytearray | None = getattr(stream, "_gpumesh_read_buffer", None)
    if buffered:
        if n is None or n < 0 or n >= len(buffered):
            out = bytes(buffered)
            buffered.clear()
            return out
        out = bytes(buffered[:n])
        del buffered[:n]
        return out
    if n == 0:
        return b""
    chunk: bytes = await _original_tcp_read(stream, tcp_read_chunk_bytes)
    if n is None or n < 0 or len(chunk) <= n:
        return chunk
    if buffered is None:
        stream._gpumesh_read_buffer = bytearray(chunk[n:])
    else:
        buffered += chunk[n:]
    return chunk[:n]


async def _buffered_read_exactly(reader: Any, n: int, *args: Any, **kwargs: Any) -> bytes:
    # Yamux reads each frame's 12-byte header and then its body from the Noise session; a
    # frame arrives in one Noise message, so both are usually in the session's buffer
    # already: take them without the retry loop (and, for bodies, the timeout scope).
    if type(reader) is SecureSession:
        muxer = reader.__dict__.get("_gpumesh_absorbing")
        while True:
            available = reader.high_watermark - reader.low_watermark
            if available == 0:
                path = _socket_path(reader)
                if path is not None and await _fill_from_socket(reader, path):
                    available = reader.high_watermark - reader.low_watermark
            if available < n:
                break
            buffered: bytes = reader._drain(n)
            if n != yamux_module.HEADER_SIZE or muxer is None:
                return buffered
            if not _absorb(muxer, reader, buffered):
                return buffered
            io_counts["frames_absorbed"] += 1
    data: bytes = await _original_read_exactly(reader, n, *args, **kwargs)
    return data


def _absorb(muxer: Any, reader: Any, header: bytes) -> bool:
    """Deliver a plain DATA frame to its open stream, as ``Yamux.handle_incoming`` would.

    The stock loop gives every frame a pass through its 300 lines: five debug f-strings (the
    peer id formatted into each, debug logging off or not), the body read, and the streams
    lock, whose acquire always yields to the scheduler, so each gossip copy cost its reader
    two scheduler passes. A DATA frame with no flags, for a stream that is open, whose body
    is already in the session's buffer, with the streams lock free, is handled here in the
    same step: appended to the stream's buffer, debited from its receive window (clamped at
    0 with the stock warning) and its reader woken. Anything else (flags, other frame types,
    an unknown stream, an oversized length, a body still on the wire) is left to the stock
    loop: False, and the header goes back to it unchanged.
    """
    _, typ, flags, stream_id, length = struct.unpack(yamux_module.YAMUX_HEADER_FORMAT, header)
    if (
        typ != yamux_module.TYPE_DATA
        or flags
        or length == 0
        or length > yamux_module.MAX_WINDOW_SIZE
        or reader.high_watermark - reader.low_watermark < length
        or muxer.streams_lock.locked()
    ):
        return False
    stream = muxer.streams.get(stream_id)
    buffer = muxer.stream_buffers.get(stream_id)
    event = muxer.stream_events.get(stream_id)
    if stream is None or buffer is None or event is None:
        return False
    buffer.extend(reader._drain(length))
    stream.recv_window -= length
    if stream.recv_window < 0:
        logger.warning(
            "Stream %s: peer exceeded receive window by %d bytes", stream_id, -stream.recv_window
        )
        stream.recv_window = 0
    event.set()
    return True


async def _absorbing_handle_incoming(self: Any) -> None:
    reader = self.secured_conn
    if type(reader) is not SecureSession:
        await _original_handle_incoming(self)
        return
    reader._gpumesh_absorbing = self
    try:
        await _original_handle_incoming(self)
    finally:
        reader._gpumesh_absorbing = None


async def _lean_read_data_body(conn: Any, length: int) -> bytes:
    reader = conn.secured_conn
    if type(reader) is SecureSession and reader.high_watermark - reader.low_watermark >= length:
        buffered: bytes = reader._drain(length)
        return buffered
    # The stock body read goes through read_exactly too: a 12-byte body is not a header.
    muxer = reader.__dict__.get("_gpumesh_absorbing") if type(reader) is SecureSession else None
    if muxer is not None:
        reader._gpumesh_absorbing = None
    try:
        data: bytes = await _original_read_data_body(conn, length)
    finally:
        if muxer is not None:
            reader._gpumesh_absorbing = muxer
    return data


async def _lean_write_frame(conn: Any, data: bytes) -> None:
    await trio.lowlevel.checkpoint_if_cancelled()
    path = _socket_path(conn.secured_conn)
    lock = conn._write_lock
    if (
        path is None
        or lock.locked()
        or len(data) > noise_io_module.MAX_PLAINTEXT_LENGTH
        or path[1].write_lock.locked()
        or path[1].stream.socket.did_shutdown_SHUT_WR
        or path[1].stream.socket.fileno() == -1
    ):
        io_counts["write_stock"] += 1
        async with lock:
            await conn.secured_conn.write(data)
        return
    noise_state, tcp = path
    sock = tcp.stream.socket
    # From the lock checks to the send nothing awaits: the frame is encrypted and handed to
    # the kernel in this task's step, in nonce order, under the connection's write lock.
    lock.acquire_nowait()
    try:
        encrypted: bytes = noise_state.encrypt(data)
        wire = len(encrypted).to_bytes(2, "big") + encrypted
        try:
            sent: int = sock._sock.send(wire)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            raise ConnectionClosedError(
                f"TCP connection reset by remote peer: {error}", transport="tcp"
            ) from error
        if sent < len(wire):
            io_counts["write_waited"] += 1
            await tcp.write(wire[sent:])  # the kernel's buffer is full: wait for it as stock
        else:
            io_counts["write_direct"] += 1
    finally:
        lock.release()


def _socket_path(secured: Any) -> tuple[Any, Any] | None:
    """The Noise cipher and TCP stream under a secure session, when they are the stock ones.

    Cached on the session; None (the stock paths) for any other transport or security layer.
    """
    try:
        cached: tuple[Any, Any] | None = secured._gpumesh_socket_path
        return cached
    except AttributeError:
        pass
    path = None
    noise: Any = getattr(secured, "conn", None) if type(secured) is SecureSession else None
    if type(noise) is noise_io_module.NoiseTransportReadWriter:
        packets: Any = noise.read_writer
        raw: Any = getattr(packets, "read_write_closer", None)
        tcp: Any = getattr(raw, "stream", None)
        if (
            type(packets) is noise_io_module.NoisePacketReadWriter
            and packets.size_len_bytes == 2
            and type(raw) is RawConnection
            and type(tcp) is TrioTCPStream
            and type(tcp.stream) is trio.SocketStream
        ):
            path = (noise.noise_state, tcp)
    secured._gpumesh_socket_path = path
    return path


async def _fill_from_socket(session: Any, path: tuple[Any, Any]) -> bool:
    """Put the next Noise message, decrypted, into an empty secure session's buffer.

    Reads the socket directly into the TCP stream's buffer (the one ``_buffered_tcp_read``
    serves) and decrypts in place of the four read layers between them. False, with every
    byte read left in that buffer, when the stock path must answer instead (end of stream,
    a socket error, another reader).
    """
    noise_state, tcp = path
    if tcp.read_lock.locked():
        return False
    buffered: bytearray | None = getattr(tcp, "_gpumesh_read_buffer", None)
    if buffered is None:
        buffered = tcp._gpumesh_read_buffer = bytearray()
    sock = tcp.stream.socket
    while True:
        if len(buffered) >= 2:
            end = 2 + ((buffered[0] << 8) | buffered[1])
            if len(buffered) >= end:
                plaintext: bytes = noise_state.decrypt(bytes(buffered[2:end]))
                del buffered[:end]
                if not plaintext:
                    raise ConnectionClosedError("Connection closed")  # as SecureSession.read
                session._fill(plaintext)
                io_counts["read_direct"] += 1
                return True
        if sock.fileno() == -1:
            return False
        try:
            chunk: bytes = sock._sock.recv(tcp_read_chunk_bytes)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock._sock)
            try:
                chunk = sock._sock.recv(tcp_read_chunk_bytes)
            except BlockingIOError:
                continue
            except OSError:
                return False
        except OSError:
            return False
        else:
            # Data was already there: yield once, as trio's own receive does.
            await trio.lowlevel.cancel_shielded_checkpoint()
        if not chunk:
            return False
        buffered += chunk


async def read_stream(stream: Any, n: int) -> bytes:
    """Read up to ``n`` bytes from a net stream: straight from its yamux buffer when it can.

    pubsub's read loop is the only reader of its stream. The stock read takes the net
    stream's state lock and the connection's stream lock (a scheduler pass each) and formats
    several debug lines per read; here the bytes already buffered for an open yamux stream
    are taken directly and the window credited as the stock read does. A stream that is
    closing, reset or on another muxer takes the stock path, with its errors.
    """
    muxed: Any = getattr(stream, "muxed_stream", None)
    if _installed and type(muxed) is yamux_module.YamuxStream:
        conn = muxed.conn
        sid = muxed.stream_id
        while (
            stream._state is StreamState.OPEN
            and not (muxed.closed or muxed.reset_received or muxed.recv_closed)
            and not conn.event_shutting_down.is_set()
            and sid in conn.streams
        ):
            buffer = conn.stream_buffers.get(sid)
            event = conn.stream_events.get(sid)
            if buffer is None or event is None:
                break
            if buffer:
                data = bytes(buffer[:n])
                del buffer[:n]
                await muxed._auto_tune_and_send_window_update(bytes_read=len(data))
                return data
            await event.wait()
            if conn.stream_events.get(sid) is event:
                conn.stream_events[sid] = trio.Event()
    stock: bytes = await stream.read(n)
    return stock


async def write_stream(stream: Any, data: bytes) -> None:
    """Write ``data`` to a net stream: one yamux DATA frame when it can, else the stock path."""
    muxed: Any = getattr(stream, "muxed_stream", None)
    if (
        _installed
        and type(muxed) is yamux_module.YamuxStream
        and stream._state is StreamState.OPEN
        and not (muxed.send_closed or muxed.closed)
        and len(data) <= min(muxed.send_window, _yamux_data_bytes_max)
    ):
        muxed.send_window -= len(data)
        header = struct.pack(
            yamux_module.YAMUX_HEADER_FORMAT,
            0,
            yamux_module.TYPE_DATA,
            0,
            muxed.stream_id,
            len(data),
        )
        await muxed.conn._write_frame(header + data)
        return
    await stream.write(data)


async def _notify_inline(swarm: Any, method: str, *args: Any) -> None:
    if method not in _inline_notifications:
        await _original_notify(swarm, method, *args)
        return
    for notifee in list(swarm.notifees):
        try:
            await getattr(notifee, method)(swarm, *args)
        except Exception:  # the stock fan-out's barrier: one notifee's fault is logged
            logger.exception("notifee %s.%s raised", type(notifee).__name__, method)


async def _ping_from_initiator_only(conn: Any) -> None:
    if conn.is_initiator_value:
        await _original_measure_rtt_loop(conn)


async def _pipelined_select_one_of(
    client: Any,
    protocols: Any,
    communicator: Any,
    negotiate_timeout: int = multiselect_client_module.DEFAULT_NEGOTIATE_TIMEOUT,
) -> Any:
    if not protocols or type(communicator) is not MultiselectCommunicator:
        return await _original_select_one_of(client, protocols, communicator, negotiate_timeout)
    header = multiselect_client_module.MULTISELECT_PROTOCOL_ID
    first = protocols[0]
    first_str = first if first is not None else ""
    with trio.move_on_after(negotiate_timeout):
        try:
            await communicator.read_writer.write(
                encode_delim(header.encode()) + encode_delim(first_str.encode())
            )
        except (IOException, AssertionError, ValueError) as error:
            raise MultiselectClientError(f"handshake write failed: {error}") from error
        try:
            echoed = await communicator.read()
            if echoed != header:
                raise MultiselectClientError(
                    f"multiselect protocol ID mismatch: expected {header}, got {echoed!r}"
                )
            response = await communicator.read()
        except MultiselectCommunicatorError as error:
            raise MultiselectClientError(f"negotiation read failed: {error}") from error
        if response == first_str:
            return first
        if response == multiselect_client_module.PROTOCOL_NOT_FOUND_MSG:
            refused = [f"protocol not supported: {first}, response={response!r}"]
            rest = list(protocols[1:])
        elif response == header:  # the peer restarted the handshake: the stock retries
            await client.handshake(communicator)
            refused, rest = [], list(protocols)
        else:
            raise MultiselectClientError(
                f"unrecognized response: {response!r}, expected {first_str!r} or "
                f"{multiselect_client_module.PROTOCOL_NOT_FOUND_MSG!r}, protocol={first}"
            )
        for protocol in rest:
            try:
                return await client.try_select(communicator, protocol)
            except ProtocolNotSupportedError as error:
                refused.append(str(error))
        raise MultiselectClientError(
            multiselect_client_module._build_protocols_not_supported_message(
                protocols, negotiate_timeout, refused
            )
        )
    raise MultiselectClientError(
        f"response timed out after {negotiate_timeout}s, protocols tried: {list(protocols)}"
    )


_running_tasks: dict[trio.lowlevel.Task, Any] = {}
"""Every running service ``FunctionTask``, by the trio task it runs in."""


async def _indexed_task_run(self: Any) -> None:
    trio_task = trio.lowlevel.current_task()
    outer = _running_tasks.get(trio_task)  # one task per trio task, unless run is awaited
    _running_tasks[trio_task] = self
    try:
        await _original_task_run(self)
    finally:
        if outer is None:
            del _running_tasks[trio_task]
        else:
            _running_tasks[trio_task] = outer


def _indexed_find_parent_task(self: Any, trio_task: trio.lowlevel.Task) -> Any:
    """``TrioManager._find_parent_task`` by lookup: the stock one walks every task of the
    service, with nested generators, each time a task starts (6% of a node's busy samples while
    a 34-node mesh connects: pubsub alone runs several tasks per peer). Same answer: the
    running task of this trio task, if it is in this manager's tree."""
    task = _running_tasks.get(trio_task)
    if task is None:
        return None
    root = task
    while root.parent is not None:
        root = root.parent
    return task if root in self._root_tasks else None


# Multiaddrs are immutable (their bytes are their value), and a connection parses and prints
# the same few dozen addresses again and again: identify's listen addresses, the peerstore's,
# every peer record's, the swarm's remote address. Successful answers are remembered by their
# input, for the stock registry only; errors are never cached, so bad input still raises.
_multiaddr_bytes_of: dict[str, bytes] = {}
_multiaddr_text_of: dict[bytes, str] = {}
_multiaddr_values: dict[tuple[bytes, Any], Any] = {}


def _remember_multiaddr(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= multiaddr_cached_max:
        cache.clear()  # bounded; the working set refills in one connection's worth of calls
    cache[key] = value


def _cached_multiaddr_from_string(self: Any, addr: str) -> None:
    if self.registry is not multiaddr_protocols.REGISTRY:
        _original_multiaddr_from_string(self, addr)
        return
    known = _multiaddr_bytes_of.get(addr)
    if known is not None:
        self._bytes = known
        return
    _original_multiaddr_from_string(self, addr)
    _remember_multiaddr(_multiaddr_bytes_of, addr, self._bytes)


def _cached_multiaddr_str(self: Any) -> str:
    known = _multiaddr_text_of.get(self._bytes)
    if known is not None:
        return known
    text: str = _original_multiaddr_str(self)
    _remember_multiaddr(_multiaddr_text_of, self._bytes, text)
    return text


def _cached_value_for_protocol(self: Any, proto: Any) -> Any:
    if self.registry is not multiaddr_protocols.REGISTRY:
        return _original_multiaddr_value_for_protocol(self, proto)
    try:
        key = (self._bytes, proto)
        return _multiaddr_values[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable protocol argument: the stock lookup says what is wrong
        return _original_multiaddr_value_for_protocol(self, proto)
    value = _original_multiaddr_value_for_protocol(self, proto)
    _remember_multiaddr(_multiaddr_values, key, value)
    return value


def apply() -> None:
    """Install the caches and the lean I/O paths (idempotent)."""
    global _installed
    for module in (pubsub_module, gossipsub_module):
        if hasattr(module, "env_to_send_in_RPC"):
            module.env_to_send_in_RPC = _cached_env_to_send_in_rpc
        if hasattr(module, "maybe_consume_signed_record"):
            module.maybe_consume_signed_record = _cached_maybe_consume
    for module in (kad_dht_module, peer_routing_module):
        module.maybe_consume_signed_record = _cached_dht_consume
    routing_table_module.KBucket._ping_peer = _ping_unless_connected
    TrioTCPStream.read = _buffered_tcp_read
    yamux_module.Yamux._write_frame = _lean_write_frame
    yamux_module.read_exactly = _buffered_read_exactly
    yamux_module.Yamux._read_data_body = _lean_read_data_body
    yamux_module.Yamux.handle_incoming = _absorbing_handle_incoming
    Swarm._notify = _notify_inline
    multiselect_client_module.MultiselectClient.select_one_of = _pipelined_select_one_of
    FunctionTask.run = _indexed_task_run
    TrioManager._find_parent_task = _indexed_find_parent_task
    Multiaddr._from_string = _cached_multiaddr_from_string
    Multiaddr.__str__ = _cached_multiaddr_str
    Multiaddr.value_for_protocol = _cached_value_for_protocol
    _installed = True
    if not any(name.startswith("PY_YAMUX_") for name in os.environ):
        yamux_module.YamuxStream._auto_tune_and_send_window_update = _batched_window_update
        yamux_module.Yamux._measure_rtt_loop = _ping_from_initiator_only
