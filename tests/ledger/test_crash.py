"""Crash safety: SIGKILL a process at random moments while it commits blocks, many times.

After every kill the store must open, load a state whose root matches a reference replay of the
same scripted chain at the store's head, and hold at least every block the writer reported as
committed (the batch is synced before ``commit_block`` returns).
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ledger
from ledger import testing as factory
from tests.ledger.crash_writer import GENESIS, KEYS

WRITER = Path(__file__).with_name("crash_writer.py")
REPO = Path(__file__).resolve().parents[2]
kills = 20
height_max = 10_000
txs_per_block = 150
kill_delay_ms_max = 600
ready_timeout_s = 60.0
commit_aim_ms_max = 6


def read_line(process: subprocess.Popen[bytes], deadline: float) -> str:
    """One line of the writer's output, waiting at most until ``deadline``."""
    assert process.stdout is not None
    remaining = deadline - time.monotonic()
    readable, _, _ = select.select([process.stdout], [], [], max(remaining, 0))
    assert readable, "the writer did not report in time"
    return process.stdout.readline().decode()


@pytest.mark.slow
def test_sigkill_during_commits_leaves_a_consistent_store(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    db = tmp_path / "ledger"
    reference = [GENESIS.initial_state()]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for round_number in range(kills):
        reported = -1
        with subprocess.Popen(
            [sys.executable, str(WRITER), str(db), str(seed), str(height_max), str(txs_per_block)],
            stdout=subprocess.PIPE,
            env=env,
        ) as process:
            try:
                line = read_line(process, time.monotonic() + ready_timeout_s)
                assert line.startswith("ready"), f"writer said {line!r}"
                # The kill point: a random moment into the commit loop; on odd rounds, aimed
                # at the write itself (a few ms after the writer says it starts a commit).
                kill_at = time.monotonic() + rng.uniform(0, kill_delay_ms_max / 1000)
                aim_at_write = round_number % 2 == 1
                while True:
                    remaining = kill_at - time.monotonic()
                    if remaining <= 0 and not aim_at_write:
                        break
                    readable, _, _ = select.select([process.stdout], [], [], max(remaining, 0))
                    if not readable:
                        continue
                    word, number = read_line(process, time.monotonic() + ready_timeout_s).split()
                    if word == "committed":
                        reported = int(number)
                    elif aim_at_write and time.monotonic() >= kill_at:
                        time.sleep(rng.uniform(0, commit_aim_ms_max / 1000))
                        break
                process.send_signal(signal.SIGKILL)
            finally:
                process.kill()
                process.wait()
        store = ledger.LevelDBStore(db)
        try:
            state = store.load_state(GENESIS)  # raises if the accounts disagree with the head
            height = state.height
            assert height >= reported, f"seed {seed}: reported block {reported} was lost"
            while len(reference) <= height:
                previous = reference[-1]
                txs = factory.scripted_transactions(KEYS, previous, seed, txs_per_block)
                proposer = KEYS[previous.height % len(KEYS)].address
                reference.append(factory.commit_next(None, previous, txs, proposer)[0])
            assert state.root == reference[height].root, (
                f"seed {seed}, round {round_number}: root at height {height} differs from replay"
            )
            if height:
                block = store.block(height)
                assert block is not None and block.hash() == state.block_hash, "head block"
                assert store.block(height + 1) is None, "a block past the head"
        finally:
            store.close()
    print(f"seed {seed}: {len(reference) - 1} blocks committed across {kills} kills")
    assert len(reference) > kills, f"seed {seed}: the writer barely committed anything"
