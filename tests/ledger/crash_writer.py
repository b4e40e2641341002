"""Commit scripted blocks to a LevelDB store until killed; used by test_crash.py.

Usage: crash_writer.py DB_PATH SEED HEIGHT_MAX TXS_PER_BLOCK. Prints ``ready H`` once the store
is open at head H, then ``committing H`` just before each block's synced commit and
``committed H`` after it returns.
"""

from __future__ import annotations

import sys

import ledger
from ledger import testing as factory

KEYS = [factory.key_for(i, "crash") for i in range(12)]
GENESIS = factory.funded_genesis(KEYS, 1_000_000)


def main() -> None:
    path, seed, height_max, txs_per_block = sys.argv[1], *map(int, sys.argv[2:5])
    store = ledger.LevelDBStore(path)
    state = store.load_state(GENESIS)
    print(f"ready {state.height}", flush=True)
    while state.height < height_max:
        txs = factory.scripted_transactions(KEYS, state, seed, txs_per_block)
        block = factory.next_block(state, txs, KEYS[state.height % len(KEYS)].address)
        new_state, results = ledger.apply_block(state, block, verify_signatures=False)
        print(f"committing {block.height}", flush=True)
        store.commit_block(block, None, new_state, results)
        state = new_state
        print(f"committed {state.height}", flush=True)
    store.close()


if __name__ == "__main__":
    main()
