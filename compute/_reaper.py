"""The job reaper: a small process beside the daemon that kills the daemon's jobs when the
daemon dies, however it dies (``kill -9``, a crash, the OOM killer).

Why a process of its own: a job must not outlive the daemon that supervises it, and
``PR_SET_PDEATHSIG`` cannot promise that here. The "parent" it watches is the *thread* that
forked the child, and trio forks in a worker thread of its cache, which exits after 10 s idle
(the job is then SIGKILLed mid-run, the daemon alive). bubblewrap's ``--die-with-parent`` has the
same flaw for its first process, and a race of its own for the rest: its sandbox init sets the
signal only after its mount setup, so a bwrap killed in between leaves that init, and the job
it starts, running unsupervised.

The protocol is a pipe. The daemon holds its only write end (not inheritable, so no job holds
it); the reaper reads lines from it on stdin:

- ``+NAME``: the job cgroup ``NAME`` (under each parent given on the command line) now exists;
- ``-NAME``: it is gone (the executor killed and removed it itself).

End of file means the daemon is gone: the kernel closes the write end when the daemon's
process ends, so no death, not even one between a job's ``+`` and its start, goes unseen. The
reaper then kills every cgroup still held (every member, however it left the job's process
group or session), removes them, and exits. A daemon that closes the pipe after its jobs
ended has nothing held, and the reaper just exits.

Run as ``python -I -S _reaper.py VERSION PARENT...`` (``v2`` with one parent, or ``v1`` with one
per hierarchy): this file uses the standard library only and imports nothing of ours, so it
starts in milliseconds. ``compute._cgroups`` uses the same kill primitives for its own kills.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

kill_passes_max = 400
"""Kill passes over one cgroup before giving up on it (a fork can race each pass)."""
kill_pause_s = 0.005
name_bytes_max = 128
"""Longest cgroup name a line may carry (job ids are far shorter)."""


def members(dirs: Iterable[Path]) -> set[int]:
    """Every live process in the cgroup's directories (zombies are not members)."""
    found: set[int] = set()
    for path in dirs:
        try:
            text = (path / "cgroup.procs").read_text()
        except FileNotFoundError:
            continue
        found.update(int(pid) for pid in text.split())
    return found


def kill_once(version: str, dirs: Iterable[Path]) -> None:
    """One SIGKILL pass over every member. v2 has ``cgroup.kill`` (the kernel kills the whole
    tree, forks included); elsewhere a process stays listed while it exits, so the caller
    re-checks (and kills what a fork raced in) until the cgroup is empty."""
    dirs = list(dirs)
    if version == "v2" and dirs:
        kill_file = dirs[0] / "cgroup.kill"
        if kill_file.exists():
            try:
                fd = os.open(kill_file, os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return  # already removed
            try:
                os.write(fd, b"1")
            finally:
                os.close(fd)
            return
    for pid in members(dirs):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # exited between the listing and the kill


def kill_until_empty(version: str, dirs: Iterable[Path]) -> bool:
    """Kill passes until no member is left (at most ``kill_passes_max``); whether it emptied."""
    dirs = list(dirs)
    for _ in range(kill_passes_max):
        kill_once(version, dirs)
        if not members(dirs):
            return True
        time.sleep(kill_pause_s)
    return not members(dirs)


def reap(version: str, parents: list[Path], held: set[str]) -> tuple[int, list[str]]:
    """Kill and remove the held cgroups; how many were killed, and what could not be."""
    failed: list[str] = []
    for name in sorted(held):
        dirs = [parent / name for parent in parents]
        if not kill_until_empty(version, dirs):
            failed.append(f"{name}: {len(members(dirs))} processes left")
            continue
        for path in reversed(dirs):
            try:
                path.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                failed.append(f"{path}: {exc}")
    return len(held), failed


def read_held(lines: Iterable[bytes]) -> set[str]:
    """The cgroups held when the stream ends; a line that is not ``+NAME``/``-NAME`` with a
    plain name is ignored (only the daemon writes here, but the reaper must not die of it)."""
    held: set[str] = set()
    for line in lines:
        op, name = line[:1], line[1:].rstrip(b"\n")
        if not 0 < len(name) <= name_bytes_max or b"/" in name or name in (b".", b".."):
            continue
        text = name.decode("ascii", errors="replace")
        if op == b"+":
            held.add(text)
        elif op == b"-":
            held.discard(text)
    return held


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("v1", "v2"):
        print("usage: _reaper.py v1|v2 PARENT...", file=sys.stderr)
        return 2
    version, parents = argv[0], [Path(p) for p in argv[1:]]
    # The daemon's terminal, or a service manager stopping it, signals the daemon; the reaper
    # waits for the daemon to end instead, and then does its one job.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    held = read_held(sys.stdin.buffer)
    if not held:
        return 0
    count, failed = reap(version, parents, held)
    print(
        f"gpumesh job reaper: the daemon is gone; killed {count} job cgroup(s) under "
        f"{parents[0]}" + (f"; could not clear {failed}" if failed else ""),
        file=sys.stderr,
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
