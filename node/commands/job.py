"""`gpumesh job ...`: submit, follow, inspect and cancel jobs."""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node._tables import render_pairs, render_table, short
from node.commands._common import (
    add_command,
    call,
    emit,
    open_subscription,
    parse_duration_ms,
    parse_size,
)
from node.commands._follow import LogPrinter, follow_logs, show_logs
from node.exceptions import NodeError

if TYPE_CHECKING:
    from node.commands._common import Subparsers

FINAL_STATES = frozenset({"done", "failed", "cancelled", "refunded", "output_mismatch"})
PROGRESS = ("bidding", "awarded", "locked", "running", "settling", "done")
wait_max_s = 24 * 3600
logs_after_end_s = 10.0
"""How long ``submit --wait`` still waits for the last log bytes once the job has ended."""
TOPIC_JOB_LOGS = "jobLogs"
input_files_max = 1000
"""Files one job may take as inputs (a directory's files count one each)."""
submit_timeout_s = 30.0
submit_bytes_per_s = 20 * 1024 * 1024
"""A slow disk's copy rate (input files into the node's blob store), for the call's timeout."""


def register(sub: Subparsers) -> None:
    p = sub.add_parser("job", help="submit and follow compute jobs")
    jsub = p.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    j = add_command(
        jsub, "submit", cmd_submit, help="submit a job: gpumesh job submit [options] -- CMD ..."
    )
    j.add_argument("--gpus", type=int, default=0, help="GPUs needed (0: a CPU-only job)")
    j.add_argument("--min-vram", default=None, help="per-GPU VRAM, e.g. 24GB")
    j.add_argument("--model", default="", help="GPU model, e.g. A100-80GB")
    j.add_argument("--cuda", default="", help="minimum CUDA version, e.g. 12.1")
    j.add_argument(
        "--max-price", type=int, default=1000, help="max price per GPU-second (default 1000)"
    )
    j.add_argument("--max-time", default="60s", help="wall-time limit, e.g. 90s, 10m")
    j.add_argument("--deadline", default=None, help="settle within, e.g. 10m (default 1h)")
    j.add_argument("--bid-window", default=None, help="how long to collect bids, e.g. 500ms")
    j.add_argument(
        "--strategy",
        default="cheapest",
        choices=["cheapest", "soonest", "least-loaded", "reputation"],
    )
    j.add_argument(
        "--sandbox", choices=["bwrap", "process"], default=None, help="require this sandbox"
    )
    j.add_argument(
        "--verify",
        type=int,
        default=1,
        metavar="N",
        help="run on N providers, pay only those whose outputs agree with the majority",
    )
    j.add_argument("--memory", default=None, help="memory cap of the job, e.g. 2GB")
    j.add_argument(
        "--max-output", default=None, help="the most output the job may deliver (default 64MB)"
    )
    j.add_argument("--disk", default=None, help="disk cap of the job directory, e.g. 10GB")
    j.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="PATH",
        help="an input file, or a directory (each file in it an input; repeatable)",
    )
    j.add_argument(
        "--image",
        default="",
        metavar="REF",
        help="run in this image of the node's store (gpumesh image ls); the command may be "
        "empty to run the image's entrypoint/Cmd",
    )
    j.add_argument("--output-dir", type=Path, default=None, help="write outputs here")
    j.add_argument("--wait", action="store_true", help="follow the job until it ends")
    j.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the command")

    j = add_command(jsub, "status", cmd_status, help="a job's state, provider, price and receipt")
    j.add_argument("job_id")
    j = add_command(
        jsub, "result", cmd_result, help="a finished job's outputs, stdout, stderr and receipt"
    )
    j.add_argument("job_id")
    j.add_argument(
        "--out",
        "--output-dir",
        dest="output_dir",
        type=Path,
        default=None,
        help="write the output files into this directory",
    )
    j = add_command(jsub, "outputs", cmd_outputs, help="write a finished job's output files")
    j.add_argument("job_id")
    j.add_argument("--out", dest="output_dir", type=Path, required=True, metavar="DIR")
    j = add_command(jsub, "logs", cmd_logs, help="a job's stdout and stderr so far")
    j.add_argument("job_id")
    j.add_argument(
        "-f", "--follow", action="store_true", help="follow them while the job runs, until it ends"
    )
    j = add_command(jsub, "cancel", cmd_cancel, help="cancel a job (refunds the escrow)")
    j.add_argument("job_id")
    j = add_command(jsub, "list", cmd_list, help="jobs on this node")
    j.add_argument("--role", choices=["requester", "provider", "all"], default="all")


def describe(job: dict[str, Any]) -> str:
    pairs: list[tuple[str, Any]] = [("job", job.get("id")), ("state", job.get("state"))]
    for key in ("provider", "price_per_gpu_second", "max_cost", "cost", "error"):
        if job.get(key) not in (None, ""):
            pairs.append((key.replace("_", " "), job[key]))
    receipt = job.get("receipt")
    if receipt:
        pairs.append(("receipt", json.dumps(receipt)))
    return render_pairs(pairs)


def cmd_list(args: argparse.Namespace) -> int:
    jobs = call(args.home, "job_list", {"role": args.role})
    rows = [
        (
            short(j["id"], 8),
            j.get("role"),
            j["state"],
            short(j.get("provider") or "", 6),
            j.get("cost"),
        )
        for j in jobs
    ]
    return emit(args, jobs, render_table(["JOB", "ROLE", "STATE", "PROVIDER", "COST"], rows))


def cmd_status(args: argparse.Namespace) -> int:
    job = call(args.home, "job_status", {"job_id": args.job_id})
    return emit(args, job, describe(job))


def cmd_cancel(args: argparse.Namespace) -> int:
    job = call(args.home, "job_cancel", {"job_id": args.job_id})
    return emit(args, job, describe(job))


def cmd_logs(args: argparse.Namespace) -> int:
    if args.follow:
        import trio

        view = trio.run(follow_job_logs, args.home, args.job_id)
        if args.json:
            print(json.dumps({k: v for k, v in view.items() if k not in ("stdout", "stderr")}))
        return 0 if view["state"] == "done" else 1
    logs = call(args.home, "job_logs", {"job_id": args.job_id})
    text = base64.b64decode(logs["stdout"]).decode(errors="replace")
    err = base64.b64decode(logs["stderr"]).decode(errors="replace")
    return emit(args, logs, text + (f"\n--- stderr ---\n{err}" if err else ""))


def cmd_result(args: argparse.Namespace) -> int:
    result = call(args.home, "job_result", {"job_id": args.job_id})
    if args.output_dir is not None:
        write_outputs(args.home, args.job_id, args.output_dir, result)
    return emit(args, result, show_result(result, args.output_dir))


def cmd_outputs(args: argparse.Namespace) -> int:
    written = write_outputs(args.home, args.job_id, args.output_dir)
    return emit(args, written, f"{len(written['files'])} output files written to {args.output_dir}")


def write_outputs(
    home: Path, job_id: str, output_dir: Path, result: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The daemon (on this machine) copies the outputs into ``output_dir``: no bytes go
    through the RPC. A result that came inline is written here instead when the daemon
    cannot see the directory (a node on another machine)."""
    target = output_dir.absolute()
    try:
        written: dict[str, Any] = call(home, "job_outputs", {"job_id": job_id, "dir": str(target)})
    except NodeError:
        if result is None or not result.get("outputs_inline", True):
            raise
        return {"dir": str(target), "files": _write_inline(result, output_dir)}
    return written


def _write_inline(result: dict[str, Any], output_dir: Path) -> list[str]:
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, data in result["outputs"].items():
        target = (output_dir / name).resolve()
        if output_dir.resolve() not in target.parents:
            raise NodeError(f"refusing to write output {name!r} outside {output_dir}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(data))
    return list(result["outputs"])


def show_result(result: dict[str, Any], output_dir: Path | None) -> str:
    lines = [f"state: {result['state']}"]
    files = result.get("files") or [{"path": name} for name in result["outputs"]]
    if output_dir is not None:
        lines.append(f"{len(files)} output files written to {output_dir}")
    else:
        shown = [
            f"{f['path']} ({f['size_bytes']} B)" if "size_bytes" in f else f["path"] for f in files
        ]
        lines.append("outputs: " + (", ".join(shown) or "(none)"))
        if result.get("outputs_dir") and files:
            lines.append(f"on this node in {result['outputs_dir']} (--out DIR copies them)")
    stdout = base64.b64decode(result["stdout"]).decode(errors="replace")
    if stdout:
        lines.append("--- stdout ---\n" + stdout.rstrip())
    if result.get("receipt"):
        lines.append("receipt: " + json.dumps(result["receipt"]))
    return "\n".join(lines)


def input_paths(given: list[str]) -> dict[str, str]:
    """``--input`` FILE or DIR: input name -> absolute path, for the daemon to copy (it runs
    on this machine; no bytes go through the RPC). A file is named by its base name; a
    directory's regular files by their path under the directory's parent (``--input data``
    gives ``data/a.txt``, ``data/sub/b.txt``)."""
    found: dict[str, str] = {}

    def add(name: str, path: Path) -> None:
        if name in found:
            raise NodeError(f"two inputs are both named {name!r}")
        if len(found) >= input_files_max:
            raise NodeError(f"more than {input_files_max} input files")
        found[name] = str(path)

    for text in given:
        path = Path(text).absolute()
        if path.is_file():
            add(path.name, path)
        elif path.is_dir():
            for file in sorted(_files_under(path)):
                add(file.relative_to(path.parent).as_posix(), file)
        else:
            raise NodeError(f"input {text} is not a file or a directory")
    return found


def _files_under(top: Path) -> list[Path]:
    """The regular files under ``top`` (symlinks to files followed, not to directories)."""
    files = []
    for root, _dirs, names in os.walk(top):
        for name in names:
            file = Path(root) / name
            if file.is_file():
                files.append(file)
                if len(files) > input_files_max:
                    raise NodeError(f"{top} holds more than {input_files_max} files")
    return files


def submit_job(home: Path, params: dict[str, Any]) -> dict[str, Any]:
    """``job_submit``: the node copies the input files before it answers, so the call may
    take as long as that copy (about ``submit_bytes_per_s``) on top of the usual time."""
    total = sum(os.stat(path).st_size for path in params.get("input_paths", {}).values())
    job: dict[str, Any] = call(
        home, "job_submit", params, timeout_s=submit_timeout_s + total / submit_bytes_per_s
    )
    return job


def submit_params(args: argparse.Namespace) -> dict[str, Any]:
    """The ``job_submit`` params from the command line (flags added by other modules included)."""
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command and not args.image:
        raise NodeError("give the command after --, e.g. gpumesh job submit -- echo hi")
    params: dict[str, Any] = {
        "argv": command,
        "input_paths": input_paths(args.input),
        "gpus": args.gpus,
        "model": args.model,
        "min_cuda_version": args.cuda,
        "max_price_per_gpu_second": args.max_price,
        "max_wall_ms": parse_duration_ms(args.max_time),
        "strategy": args.strategy,
    }
    if args.min_vram:
        params["min_vram_bytes"] = parse_size(args.min_vram)
    if args.sandbox:
        params["sandbox"] = args.sandbox
    if args.memory:
        params["memory_bytes"] = parse_size(args.memory)
    if args.disk:
        params["disk_bytes"] = parse_size(args.disk)
    if args.verify != 1:
        params["verify"] = args.verify
    if args.max_output:
        params["outputs_bytes_max"] = parse_size(args.max_output)
    if args.image:
        params["image"] = args.image
    if args.deadline:
        params["deadline_ms"] = int(time.time() * 1000) + parse_duration_ms(args.deadline)
    if args.bid_window:
        params["bid_window_ms"] = parse_duration_ms(args.bid_window)
    return params


def cmd_submit(args: argparse.Namespace) -> int:
    params = submit_params(args)
    if not args.wait:
        job = submit_job(args.home, params)
        return emit(args, job, describe(job))
    import trio

    job = trio.run(follow_submit, args.home, params, not args.json)
    if job["state"] == "done":
        result = call(args.home, "job_result", {"job_id": job["id"]})
        if args.output_dir is not None:
            write_outputs(args.home, job["id"], args.output_dir, result)
        if args.json:
            job["result"] = result
        else:  # its stdout was shown as it came
            print(show_result({**result, "stdout": ""}, args.output_dir))
    rc = emit(args, job, describe(job))
    return rc if job["state"] == "done" else 1


class _Progress:
    """Prints one line per state change to stderr."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.started = time.monotonic()
        self.last = ""

    def see(self, job: dict[str, Any]) -> None:
        state = str(job.get("state"))
        if not self.show or state == self.last:
            return
        self.last = state
        marks = (
            " > ".join((f"[{p}]" if p == state else p) for p in PROGRESS)
            if state in PROGRESS
            else state
        )
        print(f"{time.monotonic() - self.started:7.2f}s  {marks}", file=sys.stderr, flush=True)


async def follow_submit(home: Path, params: dict[str, Any], show: bool) -> dict[str, Any]:
    """Submit a job and follow it on the node's ``jobs`` topic until it reaches a final state.

    The subscription is open before the job is submitted, so no state change can be missed;
    the job's own record is read once more after the final event, for the fields (receipt,
    cost) that only ``job_status`` carries in full.
    """
    import trio

    progress = _Progress(show)
    with trio.move_on_after(wait_max_s) as scope:
        async with (
            open_subscription(home, "jobs") as events,
            open_subscription(home, TOPIC_JOB_LOGS) as logs,
            trio.open_nursery() as nursery,
        ):
            job: dict[str, Any] = await trio.to_thread.run_sync(submit_job, home, params)
            job_id = job["id"]
            progress.see(job)
            if show:  # the job's stdout and stderr as they come (its live logs)
                nursery.start_soon(show_logs, home, job_id, logs)
            while job["state"] not in FINAL_STATES:
                event = await events.next()
                if event.get("id") == job_id and event.get("role", "requester") == "requester":
                    job = event
                    progress.see(job)
            nursery.cancel_scope.deadline = trio.current_time() + logs_after_end_s
    if scope.cancelled_caught:
        raise NodeError(f"gave up waiting for the job after {wait_max_s} s")
    final: dict[str, Any] = await trio.to_thread.run_sync(
        call, home, "job_status", {"job_id": job_id}
    )
    return final


async def follow_job_logs(home: Path, job_id: str) -> dict[str, Any]:
    """``job logs -f``: the job's stdout and stderr as they come, until it ends."""
    async with open_subscription(home, TOPIC_JOB_LOGS) as events:
        return await follow_logs(home, job_id, LogPrinter.stdio(), events)
