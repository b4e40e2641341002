"""Hostile bodies: whatever arrives, the answer is a well-formed JSON-RPC response, never a 500
or a traceback. Seeded; the seed is in the assertion message."""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.rpc.conftest import Harness

seed = 20261124
known_codes = {-32700, -32600, -32601, -32602, -32603, -32001, -32002, -32003, -32005, 4321}
methods = [
    "node_add",
    "node_echo",
    "node_fail",
    "node_appError",
    "job_record",
    "rpc_discover",
    "rpc_subscribe",
    "nope",
    "",
]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    match kind:
        case 0:
            return None
        case 1:
            return rng.choice([True, False])
        case 2:
            return rng.choice([0, -1, 2**63, -(2**70), rng.randrange(-1000, 1000)])
        case 3:
            return rng.choice([0.5, -1e308, 1e-300])
        case 4:
            return "".join(chr(rng.randrange(0, 0x2FFF)) for _ in range(rng.randrange(8)))
        case 5 | 6:
            return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
        case _:
            keys = ["jsonrpc", "method", "params", "id", "x"]
            return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def random_request(rng: random.Random) -> Any:
    request: dict[str, Any] = {"jsonrpc": rng.choice(["2.0", "2.0", "1.0", 2])}
    request["method"] = rng.choice([*methods, random_json(rng)])
    if rng.random() < 0.7:
        request["params"] = rng.choice([[], [1], [1, 2], {"a": 1}, {"value": 1}, random_json(rng)])
    if rng.random() < 0.8:
        request["id"] = rng.choice([1, "x", None, 1.5, random_json(rng)])
    return request


def check_response(item: Any, context: str) -> None:
    assert isinstance(item, dict), f"{context}: not an object: {item!r}"
    assert item.get("jsonrpc") == "2.0", f"{context}: {item!r}"
    assert "id" in item, f"{context}: no id: {item!r}"
    assert ("result" in item) != ("error" in item), f"{context}: result xor error: {item!r}"
    if "error" in item:
        assert item["error"]["code"] in known_codes, f"{context}: unexpected code: {item!r}"


async def test_random_bodies_never_break_the_server(rpc: Harness) -> None:
    rng = random.Random(seed)
    valid = json.dumps({"jsonrpc": "2.0", "method": "node_add", "params": [1, 2], "id": 7})
    bodies: list[bytes] = []
    for _ in range(60):
        bodies.append(rng.randbytes(rng.randrange(0, 600)))
    for _ in range(60):
        raw = bytearray(valid.encode())
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        bodies.append(bytes(raw))
    for _ in range(80):
        bodies.append(json.dumps(random_request(rng)).encode())
    for _ in range(30):
        batch = [random_request(rng) for _ in range(rng.randrange(0, 12))]
        bodies.append(json.dumps(batch).encode())
    for _ in range(30):
        bodies.append(json.dumps(random_json(rng)).encode())

    for index, body in enumerate(bodies):
        context = f"seed {seed} body {index} {body[:80]!r}"
        status, raw = await rpc.post(body)
        assert status in (200, 204), f"{context}: HTTP {status} {raw[:200]!r}"
        assert b"Traceback" not in raw, f"{context}: traceback in {raw[:200]!r}"
        if status == 204:
            assert raw == b"", f"{context}: 204 with a body"
            continue
        reply = json.loads(raw)
        for item in reply if isinstance(reply, list) else [reply]:
            check_response(item, context)
    assert await rpc.call("node_add", [1, 2]) == 3, "the server still serves after the fuzzing"
