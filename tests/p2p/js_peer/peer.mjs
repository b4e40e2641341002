// A stock js-libp2p 2.x peer (TCP, Noise, Yamux, identify, @chainsafe/libp2p-gossipsub in
// StrictNoSign mode) for tests/p2p/test_js_interop.py.
//
//   node peer.mjs '{"dial": "/ip4/.../p2p/12D3...", "chain": "c", "topics": ["/gpumesh/c/offers/1"],
//                   "publish_topic": "/gpumesh/c/offers/1", "seed_hex": "<64 hex>"}'
//
// Prints one JSON object per line on stdout: "ready", "connected", "identified" (the remote's
// protocols), "subscribers" (when the remote appears on a topic), "recv" (each gossip message,
// with our decoding of the gpumesh envelope and whether its signature verifies), "published".
// It publishes its own gpumesh envelope (signed with its libp2p key) every 300 ms once the
// remote is subscribed to publish_topic, and exits on "stop" on stdin or after 120 s.
import './polyfill.mjs'
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { gossipsub } from '@chainsafe/libp2p-gossipsub'
import { generateKeyPairFromSeed, publicKeyFromRaw } from '@libp2p/crypto/keys'
import { multiaddr } from '@multiformats/multiaddr'
import { encode, decode } from '@msgpack/msgpack'

const GOSSIP_DOMAIN = 'gpumesh-gossip/1'
const PUBLISH_INTERVAL_MS = 300
const LIFETIME_MS = 120_000

const args = JSON.parse(process.argv[2])
const hex = (bytes) => Buffer.from(bytes).toString('hex')
const emit = (event, fields = {}) => process.stdout.write(JSON.stringify({ event, ...fields }) + '\n')

const privateKey = await generateKeyPairFromSeed('Ed25519', Buffer.from(args.seed_hex, 'hex'))
const node = await createLibp2p({
  privateKey,
  addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: {
    identify: identify(),
    pubsub: gossipsub({
      globalSignaturePolicy: 'StrictNoSign',
      allowPublishToZeroTopicPeers: true,
      emitSelf: false
    })
  }
})
const pubsub = node.services.pubsub
emit('ready', { peer_id: node.peerId.toString() })

// The envelope as p2p/_envelope.py encodes it: msgpack [chain, tag, payload, sender, ts, sig],
// the signature over msgpack [domain, chain, tag, payload, ts].
async function verifyEnvelope (items) {
  const [chain, tag, payload, sender, ts, signature] = items
  const signed = encode([GOSSIP_DOMAIN, chain, tag, payload, ts])
  return await publicKeyFromRaw(sender).verify(signed, signature)
}

async function makeEnvelope (tag, payload) {
  const ts = Date.now()
  const signed = encode([GOSSIP_DOMAIN, args.chain, tag, payload, ts])
  const signature = await privateKey.sign(signed)
  return encode([args.chain, tag, payload, privateKey.publicKey.raw, ts, signature])
}

pubsub.addEventListener('message', async (evt) => {
  const msg = evt.detail
  let decoded = null
  let verified = false
  try {
    const items = decode(msg.data)
    verified = await verifyEnvelope(items)
    decoded = {
      chain_id: items[0],
      type_tag: items[1],
      payload_hex: hex(items[2]),
      sender_hex: hex(items[3]),
      timestamp_ms: Number(items[4])
    }
  } catch (err) {
    decoded = { error: String(err) }
  }
  emit('recv', { topic: msg.topic, type: msg.type, envelope: decoded, verified })
})

for (const topic of args.topics) pubsub.subscribe(topic)

const remote = await node.dial(multiaddr(args.dial))
emit('connected', { remote: remote.remotePeer.toString() })

node.addEventListener('peer:identify', (evt) => {
  emit('identified', { peer_id: evt.detail.peerId.toString(), protocols: evt.detail.protocols })
})

const seen = new Set()
let sent = 0
const timer = setInterval(async () => {
  for (const topic of args.topics) {
    const subscribed = pubsub.getSubscribers(topic).some((p) => p.equals(remote.remotePeer))
    if (subscribed && !seen.has(topic)) {
      seen.add(topic)
      emit('subscribers', { topic, remote_subscribed: true })
    }
  }
  if (seen.has(args.publish_topic)) {
    const data = await makeEnvelope('js-hello', Buffer.from(`hello from js ${sent}`))
    try {
      const result = await pubsub.publish(args.publish_topic, data)
      sent += 1
      emit('published', { recipients: result.recipients.length })
    } catch (err) {
      emit('publish_error', { error: String(err) })
    }
  }
}, PUBLISH_INTERVAL_MS)

async function shutdown () {
  clearInterval(timer)
  await node.stop()
  process.exit(0)
}
process.stdin.on('data', (chunk) => { if (chunk.toString().includes('stop')) shutdown() })
process.stdin.on('end', shutdown)
setTimeout(shutdown, LIFETIME_MS)
