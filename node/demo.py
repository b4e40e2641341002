"""The README's main job: a local testnet of real node processes doing real work.

Starts N nodes (the first three sell simulated GPUs, all four validate), waits until every node
sees every other and every provider's offer, moves money through BFT consensus, and shows the
result from several nodes' point of view. Run with ``bash scripts/demo.sh``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import ledger
from compute import testing
from node import _testnet
from node._home import Home
from node._tables import render_table, short
from node.testing import free_port_block, wait_until
from rpc import RpcCallError, RpcClient

SIMULATED_GPUS = "A100-80GB:2,RTX4090:1"
FINAL_STATES = frozenset({"done", "failed", "cancelled", "refunded", "output_mismatch"})


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def rpc(home: Home) -> RpcClient:
    return RpcClient.from_home(home.root, timeout_s=10.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--nodes", type=int, default=5)
    args = parser.parse_args(argv)
    nodes = max(args.nodes, 4)
    providers = 3

    say(f"creating a {nodes}-node testnet in {args.dir}")
    started = time.monotonic()
    layout = _testnet.init_testnet(
        args.dir,
        nodes,
        chain_id="gpumesh-demo",
        validators=4,
        providers=providers,
        simulate_gpus=SIMULATED_GPUS,
        base_port=free_port_block(2 * nodes),
    )
    homes = [Home(n.home) for n in layout.nodes]
    _testnet.up(args.dir)
    print(f"{nodes} daemons running (logs: {args.dir}/node*/node.log)")

    say("discovery: every node must see every other")
    wait_until(
        lambda: all(rpc(h).call("net_peerCount") == nodes - 1 for h in homes),
        timeout_s=30,
        what="a full mesh",
    )
    rows = [(f"node{i}", rpc(h).call("net_peerCount")) for i, h in enumerate(homes)]
    print(render_table(["NODE", "PEERS"], rows))
    print(f"full mesh after {time.monotonic() - started:.1f} s")

    say("the market: every node's directory lists the three GPU providers")
    wait_until(
        lambda: all(
            sum(1 for o in rpc(h).call("market_offers") if o["gpus"]) == providers for h in homes
        ),
        timeout_s=30,
        what="every provider's offer at every node",
    )
    offers = rpc(homes[-1]).call("market_offers", {"gpu_count": 2, "model": "A100-80GB"})
    print(
        render_table(
            ["PROVIDER", "GPUS", "FREE", "PRICE/GPU-s"],
            [
                (
                    short(o["provider"], 8),
                    len(o["gpus"]),
                    o["free_gpus"],
                    o["match"]["price_per_gpu_second"],
                )
                for o in offers
            ],
        )
    )

    say("the ledger: transfers submitted at different nodes, ordered by 4 BFT validators")
    chain_id = layout.chain_id
    sent: list[str] = []
    for i in range(nodes):
        sender, receiver = homes[i], layout.nodes[(i + 1) % nodes]
        key = sender.load_key()
        nonce = rpc(sender).call("chain_account", {"address": key.address.hex()})["next_nonce"]
        tx = ledger.sign_object(
            ledger.Transfer(
                nonce=nonce,
                fee=1,
                recipient=ledger.Address(bytes.fromhex(receiver.address)),
                amount=1000 * (i + 1),
            ),
            key,
            chain_id,
        )
        sent.append(rpc(sender).call("chain_sendTx", {"tx": ledger.encode(tx).hex()})["tx_hash"])

    def all_committed() -> bool:
        try:
            return all(rpc(homes[0]).call("chain_tx", {"hash": t})["ok"] for t in sent)
        except RpcCallError:
            return False

    wait_until(all_committed, timeout_s=60, what="the transfers to commit")
    heads = [rpc(h).call("chain_head") for h in homes]
    print(
        render_table(
            ["NODE", "HEIGHT", "HEAD HASH"],
            [(f"node{i}", hd["height"], short(hd["hash"], 10)) for i, hd in enumerate(heads)],
        )
    )
    top = min(hd["height"] for hd in heads)
    agreed = {rpc(h).call("chain_block", {"height": top})["hash"] for h in homes}
    print(f"every node holds the same block at height {top}: {len(agreed) == 1}")
    if len(agreed) != 1:
        print("nodes disagree: this is a bug", file=sys.stderr)
        return 1

    say("a job: submitted at a node with no GPU, run by a provider, settled on the ledger")
    requester = homes[-1]
    script = (
        "import hashlib, os, platform\n"
        "data = open('numbers.txt').read().split()\n"
        "total = sum(int(x) for x in data)\n"
        "os.makedirs('out', exist_ok=True)\n"
        "open('out/sum.txt', 'w').write(str(total))\n"
        "print('summed', len(data), 'numbers =', total, 'on', platform.node(),\n"
        "      'GPUs', os.environ.get('CUDA_VISIBLE_DEVICES'))\n"
    )
    numbers = " ".join(str(i) for i in range(1, 10_001))
    job = rpc(requester).call(
        "job_submit",
        {
            "argv": ["python3", "job.py"],
            "inputs": {
                "job.py": base64.b64encode(script.encode()).decode(),
                "numbers.txt": base64.b64encode(numbers.encode()).decode(),
            },
            "gpus": 1,
            "model": "A100-80GB",
            "max_price_per_gpu_second": 500,
            "max_wall_ms": 30_000,
            "bid_window_ms": 300,
        },
    )
    job_id = job["id"]
    submitted = time.monotonic()
    last = ""
    while job["state"] not in ("done", "failed", "cancelled", "refunded", "output_mismatch"):
        if job["state"] != last:
            print(f"  {time.monotonic() - submitted:5.2f} s  {job['state']}", flush=True)
            last = job["state"]
        if time.monotonic() - submitted > 120:
            print("the job did not finish in 120 s", file=sys.stderr)
            return 1
        time.sleep(0.05)
        job = rpc(requester).call("job_status", {"job_id": job_id})
    print(f"  {time.monotonic() - submitted:5.2f} s  {job['state']}")
    if job["state"] != "done":
        print(f"job ended {job['state']}: {job.get('error')}", file=sys.stderr)
        return 1
    result = rpc(requester).call("job_result", {"job_id": job_id})
    print("stdout:   " + base64.b64decode(result["stdout"]).decode().strip())
    print("output:   sum.txt = " + base64.b64decode(result["outputs"]["sum.txt"]).decode())
    provider = next(n for n in layout.nodes if n.address == job["provider"])
    print(f"ran on:   node{provider.index} ({short(provider.address, 8)})")
    print(f"price:    {job['price_per_gpu_second']} per GPU-second, escrow {job['max_cost']}")
    print(f"cost:     {job['cost']} (wall {job['receipt']['wall_ms']} ms)")
    receipts = {
        json.dumps(rpc(h).call("chain_receipt", {"job_id": job["attempt_job_id"]}), sort_keys=True)
        for h in homes
    }
    print(f"receipt:  {json.loads(next(iter(receipts)))['tx_hash'] if len(receipts) == 1 else '?'}")
    print(f"every node holds the same receipt: {len(receipts) == 1}")
    if len(receipts) != 1:
        return 1
    if not big_data_job(args.dir, requester):
        return 1
    if not image_job(args.dir, requester, layout, homes):
        return 1
    print(f"\ndemo finished in {time.monotonic() - started:.1f} s")
    return 0


BIG_INPUT_MIB = 64
BIG_SCRIPT = (
    "import hashlib, os, sys, time\n"
    "h = hashlib.sha256()\n"
    "os.makedirs('out', exist_ok=True)\n"
    "with open('data.bin', 'rb') as src, open('out/copy.bin', 'wb') as dst:\n"
    "    for step in range(1, 1 + os.path.getsize('data.bin') // (8 << 20)):\n"
    "        block = src.read(8 << 20)\n"
    "        h.update(block)\n"
    "        dst.write(block)\n"
    "        print(f'hashed {step * 8} MiB', flush=True)\n"
    "        time.sleep(0.25)\n"
    "open('out/sha256.txt', 'w').write(h.hexdigest())\n"
    "print('sha256', h.hexdigest()[:16], file=sys.stderr)\n"
)


def follow(home: Home, job_id: str, timeout_s: float) -> dict[str, Any] | None:
    """Print the job's stdout and stderr as they arrive (``job_logs`` from offsets, as
    ``gpumesh job logs -f`` does), each line stamped with the job's state at that moment."""
    offsets = {"stdout": 0, "stderr": 0}
    begun = time.monotonic()
    last = ""
    while time.monotonic() - begun < timeout_s:
        job = rpc(home).call("job_status", {"job_id": job_id})
        if job["state"] != last:
            print(f"  {time.monotonic() - begun:5.2f} s  {job['state']}", flush=True)
            last = job["state"]
        logs = rpc(home).call(
            "job_logs",
            {
                "job_id": job_id,
                "stdout_offset": offsets["stdout"],
                "stderr_offset": offsets["stderr"],
            },
        )
        for stream in ("stdout", "stderr"):
            chunk = base64.b64decode(logs[stream])
            offsets[stream] += len(chunk)
            for line in chunk.decode(errors="replace").splitlines():
                print(f"  {time.monotonic() - begun:5.2f} s  [{job['state']:8}] {stream}: {line}")
        if job["state"] in FINAL_STATES and logs.get("ended", True):
            return dict(job)
        time.sleep(0.2)
    print(f"the job did not end in {timeout_s:.0f} s", file=sys.stderr)
    return None


def big_data_job(root: Path, requester: Home) -> bool:
    say(
        f"data: a {BIG_INPUT_MIB} MiB input handed over by path, moved peer to peer in checked "
        "1 MiB chunks; live logs while it runs; the sealed output comes back as files"
    )
    work = root / "demo-data"
    (work / "in").mkdir(parents=True, exist_ok=True)
    data = work / "in" / "data.bin"
    with data.open("wb") as handle:
        for _ in range(BIG_INPUT_MIB):
            handle.write(os.urandom(1 << 20))
    script = work / "in" / "job.py"
    script.write_text(BIG_SCRIPT)
    want = hashlib.sha256(data.read_bytes()).hexdigest()
    job = rpc(requester).call(
        "job_submit",
        {
            "argv": ["python3", "job.py"],
            "input_paths": {"data.bin": str(data), "job.py": str(script)},
            "outputs_bytes_max": (BIG_INPUT_MIB + 1) << 20,  # the job's declared outputs cap
            "gpus": 1,
            "max_price_per_gpu_second": 500,
            "max_wall_ms": 60_000,
            "bid_window_ms": 300,
        },
    )
    ended = follow(requester, job["id"], 180)
    if ended is None or ended["state"] != "done":
        print(
            f"job ended {ended and ended['state']}: {ended and ended.get('error')}", file=sys.stderr
        )
        return False
    if ended.get("error"):
        print(f"job ended with an error: {ended['error']}", file=sys.stderr)
        return False
    out = work / "out"
    exported = rpc(requester).call("job_outputs", {"job_id": job["id"], "dir": str(out)})
    got = hashlib.sha256((out / "copy.bin").read_bytes()).hexdigest()
    print(f"outputs:  {exported['bytes'] >> 20} MiB written to {out}")
    print(f"copy.bin: sha256 {got[:16]}, the input's {want[:16]}: identical {got == want}")
    print(f"reported: sha256.txt = {(out / 'sha256.txt').read_text()[:16]}")
    return got == want == (out / "sha256.txt").read_text()


def image_job(
    root: Path, requester: Home, layout: _testnet.TestnetLayout, homes: list[Home]
) -> bool:
    say(
        "an image: built here from busybox, imported at the requester only, fetched by the provider"
    )
    offers = rpc(requester).call("market_offers")
    if not Path(testing.BUSYBOX).exists() or not any(
        "bwrap-image" in o.get("runtimes", []) for o in offers
    ):
        print("skipped: needs busybox-static, bubblewrap and umoci (scripts/setup.sh as root)")
        return True
    archive = root / "demo-data" / "busybox-oci.tar"
    testing.write_oci_archive(archive, testing.busybox_layers())
    slow = RpcClient.from_home(requester.root, timeout_s=120.0)
    image = slow.call("image_import", {"path": str(archive)})
    print(f"imported: {image.get('ref')} on the requester")
    job = rpc(requester).call(
        "job_submit",
        {
            "argv": [  # the image's entrypoint is sh -c
                "echo inside: $(cat /etc/gpumesh-image-marker); "
                "test -e /usr/bin && echo host /usr visible || echo no host /usr; "
                'echo "$GREETING" > /job/out/greeting.txt',
            ],
            "image": image["ref"],
            "gpus": 1,
            "max_price_per_gpu_second": 500,
            "max_wall_ms": 30_000,
            "bid_window_ms": 300,
        },
    )
    ended = follow(requester, job["id"], 120)
    if ended is None or ended["state"] != "done":
        print(
            f"job ended {ended and ended['state']}: {ended and ended.get('error')}", file=sys.stderr
        )
        return False
    result = rpc(requester).call("job_result", {"job_id": job["id"]})
    print(
        "output:   greeting.txt = "
        + base64.b64decode(result["outputs"]["greeting.txt"]).decode().strip()
    )
    index = next(n.index for n in layout.nodes if n.address == ended["provider"])
    held = [i["ref"] for i in rpc(homes[index]).call("image_list")]
    print(f"ran on:   node{index}, which now caches {held} (fetched over the mesh)")
    return True


if __name__ == "__main__":
    raise SystemExit(main())
