"""The method registry: registration checks, param binding, and the OpenRPC document."""

from __future__ import annotations

from typing import Any

import pytest

from rpc import INVALID_PARAMS, NAMESPACES, MethodRegistry, Param, RegistryError, Result, RpcError
from tests.rpc.conftest import Harness


async def _noop() -> None:
    return None


async def _takes_x(x: int) -> int:
    return x


def test_names_must_carry_a_known_namespace() -> None:
    registry = MethodRegistry()
    for namespace in NAMESPACES:
        registry.register(f"{namespace}_thing", _noop, description="ok")
    for bad in ("thing", "foo_thing", "rpc_mine", "node_", "node-thing", "Node_thing", "node_1x"):
        with pytest.raises(RegistryError):
            registry.register(bad, _noop, description="bad name")
    with pytest.raises(RegistryError, match="already registered"):
        registry.register("node_thing", _noop, description="twice")


def test_handler_must_match_its_params() -> None:
    registry = MethodRegistry()
    with pytest.raises(RegistryError, match="no keyword argument 'y'"):
        registry.register("node_a", _takes_x, description="", params=[Param("y", "integer")])
    with pytest.raises(RegistryError, match="'x' has no default"):
        registry.register("node_b", _takes_x, description="")
    with pytest.raises(RegistryError, match="'x' has no default"):
        registry.register(
            "node_c", _takes_x, description="", params=[Param("x", "integer", required=False)]
        )
    with pytest.raises(RegistryError, match="async"):
        registry.register("node_d", lambda: None, description="")  # type: ignore[arg-type,return-value]

    async def two(a: int = 0, b: int = 0) -> None:
        return None

    with pytest.raises(RegistryError, match="follows an optional"):
        registry.register(
            "node_e",
            two,
            description="",
            params=[Param("a", "integer", required=False), Param("b", "integer")],
        )
    with pytest.raises(RegistryError, match="unknown type"):
        registry.register(
            "node_f",
            two,
            description="",
            params=[Param("a", "float")],  # type: ignore[arg-type]
        )


def test_bind() -> None:
    async def handler(a: str, b: Any = None, c: bool = False) -> None:
        return None

    registry = MethodRegistry()
    method = registry.register(
        "node_m",
        handler,
        description="",
        params=[Param("a", "string"), Param("b", "any", False), Param("c", "boolean", False)],
    )
    assert method.bind(["x"]) == {"a": "x"}, "optional params left out are not passed"
    assert method.bind(["x", None, True]) == {"a": "x", "b": None, "c": True}, "any takes null"
    assert method.bind({"a": "x", "c": None}) == {"a": "x"}, "null for an optional is absent"
    cases: list[tuple[Any, str]] = [
        (None, "missing required param 'a'"),
        ({"a": 1}, "'a' must be of type string"),
        ({"a": "x", "c": 1}, "'c' must be of type boolean"),
        ({"a": "x", "zz": 1}, "unknown param 'zz'"),
        (["x", 1, True, 4], "at most 3"),
    ]
    for params, needle in cases:
        with pytest.raises(RpcError) as info:
            method.bind(params)
        assert info.value.code == INVALID_PARAMS, info.value
        assert needle in info.value.message, f"{params!r}: {info.value.message!r}"


def check_openrpc(doc: dict[str, Any]) -> None:
    """The parts of OpenRPC 1.2 a consumer relies on."""
    assert doc["openrpc"].startswith("1.2."), doc["openrpc"]
    assert doc["info"]["title"], "info.title is required"
    assert doc["info"]["version"], "info.version is required"
    names = [m["name"] for m in doc["methods"]]
    assert names == sorted(names), "methods are listed in name order"
    assert len(names) == len(set(names)), "method names are unique"
    for m in doc["methods"]:
        assert isinstance(m["description"], str), m
        assert m["paramStructure"] == "either", m
        assert m["tags"] == [{"name": m["name"].split("_", 1)[0]}], f"namespace tag: {m}"
        for p in m["params"]:
            assert set(p) == {"name", "description", "required", "schema"}, p
            assert isinstance(p["schema"], dict), p
        assert set(m["result"]) == {"name", "description", "schema"}, m["result"]


async def test_openrpc_document_over_http(rpc: Harness) -> None:
    doc = await rpc.call("rpc_discover")
    check_openrpc(doc)
    assert doc == rpc.server.registry.openrpc_document(), "served document = registry's"
    assert await rpc.call("rpc.discover") == doc, "rpc.discover is an alias"
    by_name = {m["name"]: m for m in doc["methods"]}
    assert by_name["node_add"]["params"] == [
        {"name": "a", "description": "", "required": True, "schema": {"type": "integer"}},
        {"name": "b", "description": "", "required": False, "schema": {"type": "integer"}},
    ], by_name["node_add"]
    assert by_name["node_add"]["result"]["schema"] == {"type": "integer"}, by_name["node_add"]
    assert by_name["node_echo"]["params"][0]["schema"] == {}, "type any has an empty schema"
    for builtin in ("rpc_discover", "rpc_subscribe", "rpc_unsubscribe"):
        assert builtin in by_name, f"{builtin} missing from the document"
    topics = {t["name"] for t in doc["x-topics"]}
    assert topics == {"newHeads", "jobs", "peers"}, topics


def test_topics() -> None:
    registry = MethodRegistry(topics={})
    assert not registry.has_topic("newHeads"), "topics={} registers none"
    registry.add_topic("blocks", "Blocks.")
    assert registry.has_topic("blocks"), "added topic"
    with pytest.raises(RegistryError):
        registry.add_topic("blocks", "again")
    with pytest.raises(RegistryError):
        registry.add_topic("bad topic", "space")


def test_result_default() -> None:
    method = MethodRegistry().register("chain_x", _noop, description="d")
    assert method.result == Result(), "no result description means type any"
    assert method.namespace == "chain", method.namespace
