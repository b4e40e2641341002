// Node.js 20 (and Debian bookworm's 18) lack Promise.withResolvers, which js-libp2p 2.x's
// dependencies (it-queue) call; imported first by peer.mjs so it exists before they load.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve
    let reject
    const promise = new Promise((res, rej) => {
      resolve = res
      reject = rej
    })
    return { promise, resolve, reject }
  }
}
