"""`gpumesh job ...`: submit, follow, inspect and cancel jobs."""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from node._tables import render_pairs, render_table, short
from node.exceptions import NodeError

if TYPE_CHECKING:
    import argparse

FINAL_STATES = {"done", "failed", "cancelled", "refunded", "output_mismatch"}
PROGRESS = ("bidding", "awarded", "locked", "running", "settling", "done")
wait_poll_s = 0.1
wait_max_s = 24 * 3600
input_bytes_max = 8 * 1024 * 1024


class Call(Protocol):
    def __call__(self, home: Path, method: str, params: Any = None) -> Any: ...


class Emit(Protocol):
    def __call__(self, args: argparse.Namespace, document: Any, text: str) -> int: ...


def parse_duration_ms(text: str) -> int:
    units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
    t = text.strip().lower()
    for unit in ("ms", "s", "m", "h"):
        if t.endswith(unit) and t[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * units[unit])
    if t.isdigit():
        return int(t) * 1000
    raise NodeError(f"cannot read duration {text!r} (try 90s, 10m, 500ms)")


def describe(job: dict[str, Any]) -> str:
    pairs: list[tuple[str, Any]] = [
        ("job", job.get("id")),
        ("state", job.get("state")),
    ]
    for key in ("provider", "price_per_gpu_second", "max_cost", "cost", "error"):
        if job.get(key) not in (None, ""):
            pairs.append((key.replace("_", " "), job[key]))
    receipt = job.get("receipt")
    if receipt:
        pairs.append(("receipt", json.dumps(receipt)))
    return render_pairs(pairs)


def cmd_job(args: argparse.Namespace, call: Call, emit: Emit) -> int:
    action: str = args.job_command
    if action == "submit":
        return _submit(args, call, emit)
    if action == "list":
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
    if action == "status":
        job = call(args.home, "job_status", {"job_id": args.job_id})
        return emit(args, job, describe(job))
    if action == "cancel":
        job = call(args.home, "job_cancel", {"job_id": args.job_id})
        return emit(args, job, describe(job))
    if action == "logs":
        logs = call(args.home, "job_logs", {"job_id": args.job_id})
        text = base64.b64decode(logs["stdout"]).decode(errors="replace")
        err = base64.b64decode(logs["stderr"]).decode(errors="replace")
        return emit(args, logs, text + (f"\n--- stderr ---\n{err}" if err else ""))
    if action == "result":
        result = call(args.home, "job_result", {"job_id": args.job_id})
        return emit(args, result, _show_result(result, args.output_dir))
    raise AssertionError(f"unhandled job action {action}")


def _show_result(result: dict[str, Any], output_dir: Path | None) -> str:
    lines = [f"state: {result['state']}"]
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        for name, data in result["outputs"].items():
            target = (output_dir / name).resolve()
            if output_dir.resolve() not in target.parents:
                raise NodeError(f"refusing to write output {name!r} outside {output_dir}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(data))
        lines.append(f"{len(result['outputs'])} output files written to {output_dir}")
    else:
        lines.append("outputs: " + (", ".join(result["outputs"]) or "(none)"))
    stdout = base64.b64decode(result["stdout"]).decode(errors="replace")
    if stdout:
        lines.append("--- stdout ---\n" + stdout.rstrip())
    if result.get("receipt"):
        lines.append("receipt: " + json.dumps(result["receipt"]))
    return "\n".join(lines)


def _submit(args: argparse.Namespace, call: Call, emit: Emit) -> int:
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise NodeError("give the command after --, e.g. gpumesh job submit -- echo hi")
    inputs: dict[str, str] = {}
    total = 0
    for name in args.input:
        path = Path(name)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise NodeError(f"cannot read input {name}: {exc}") from None
        total += len(data)
        if total > input_bytes_max:
            raise NodeError(f"inputs exceed {input_bytes_max} bytes")
        inputs[path.name] = base64.b64encode(data).decode()
    params: dict[str, Any] = {
        "argv": command,
        "inputs": inputs,
        "gpus": args.gpus,
        "model": args.model,
        "min_cuda_version": args.cuda,
        "max_price_per_gpu_second": args.max_price,
        "max_wall_ms": parse_duration_ms(args.max_time),
        "strategy": args.strategy,
    }
    if args.min_vram:
        from node.cli import parse_size

        params["min_vram_bytes"] = parse_size(args.min_vram)
    if args.deadline:
        params["deadline_ms"] = int(time.time() * 1000) + parse_duration_ms(args.deadline)
    if args.bid_window:
        params["bid_window_ms"] = parse_duration_ms(args.bid_window)
    job = call(args.home, "job_submit", params)
    if not args.wait:
        return emit(args, job, describe(job))
    job = _follow(args, call, job["id"], show=not args.json)
    if job["state"] == "done":
        result = call(args.home, "job_result", {"job_id": job["id"]})
        if args.json:
            job["result"] = result
        else:
            print(_show_result(result, args.output_dir))
    rc = emit(args, job, describe(job))
    return rc if job["state"] == "done" else 1


def _follow(args: argparse.Namespace, call: Call, job_id: str, *, show: bool) -> dict[str, Any]:
    started = time.monotonic()
    last = ""
    while True:
        job: dict[str, Any] = call(args.home, "job_status", {"job_id": job_id})
        state = str(job["state"])
        if show and state != last:
            elapsed = time.monotonic() - started
            marks = (
                " > ".join((f"[{p}]" if p == state else p) for p in PROGRESS)
                if state in PROGRESS
                else state
            )
            print(f"{elapsed:7.2f}s  {marks}", file=sys.stderr, flush=True)
            last = state
        if state in FINAL_STATES:
            return job
        if time.monotonic() - started > wait_max_s:
            raise NodeError("gave up waiting for the job")
        time.sleep(wait_poll_s)
