"""A peer that writes a corrupt pubsub frame must not take the node down.

py-libp2p 0.8.1 lets a protobuf DecodeError escape its pubsub read loop; unguarded, one
garbage frame from any peer stopped the whole host (seen under load, when two large
publishes interleaved their yamux frames on one stream).
"""

from __future__ import annotations

import contextlib

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as x25519
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID, Transport
from libp2p.utils.varint import encode_varint_prefixed

from p2p.testing import open_meshes, seed_for, wait_until

GOSSIP_S = 20


async def test_garbage_pubsub_frame_is_dropped_and_node_keeps_serving() -> None:
    async with open_meshes(2) as (victim, honest):
        sub = victim.subscribe("blocks")
        honest.subscribe("blocks")
        key_pair = create_new_key_pair(seed_for(77, "corrupt"))
        host = new_host(
            key_pair=key_pair,
            sec_opt={TProtocol(PROTOCOL_ID): Transport(key_pair, x25519().private_key)},
        )
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(victim.listen_addrs()[0])))
            protocol = TProtocol(victim.config.gossip_protocols[0])
            for _ in range(3):
                stream = await host.new_stream(victim._host.get_id(), [protocol])
                # A well-formed length prefix around bytes that are not a pubsub RPC.
                await stream.write(encode_varint_prefixed(b"\xff\xff\xff\xff garbage \x00" * 4))
                # The victim resets the stream: that is the answer we expect.
                with trio.move_on_after(1), contextlib.suppress(BaseLibp2pError):
                    await stream.read(1)
        assert victim._running, "the victim's mesh stopped after a corrupt frame"
        await wait_until(
            lambda: len(honest._gossipsub.mesh.get(victim.topic("blocks"), ())) > 0,
            GOSSIP_S,
            "honest mesh",
        )
        await honest.publish("blocks", "t", b"still alive")
        with trio.fail_after(GOSSIP_S):
            got = await sub.receive()
        assert got.payload == b"still alive"
        assert victim.statistics()["corrupt_frames"] >= 1, "corrupt frames are counted"
