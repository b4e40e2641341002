"""The method registry: trio handlers with their parameter schemas, and the OpenRPC document."""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, Literal, get_args

from rpc._protocol import INVALID_PARAMS
from rpc.exceptions import RegistryError, RpcError

JsonType = Literal["string", "integer", "number", "boolean", "object", "array", "null", "any"]
Handler = Callable[..., Awaitable[Any]]

NAMESPACES: Final = (
    "node", "net", "compute", "market", "job", "chain", "consensus", "admin", "image"
)  # fmt: skip
"""Namespaces open to registration; ``rpc_`` is reserved for the server's own methods."""
builtin_namespace: Final = "rpc"

TOPIC_NEW_HEADS: Final = "newHeads"
TOPIC_JOBS: Final = "jobs"
TOPIC_PEERS: Final = "peers"
STANDARD_TOPICS: Final[Mapping[str, str]] = {
    TOPIC_NEW_HEADS: "Each block header the node commits, as it commits it.",
    TOPIC_JOBS: "State changes of jobs this node requested or runs.",
    TOPIC_PEERS: "Peers connecting to and disconnecting from this node.",
}

openrpc_version: Final = "1.2.6"
method_name_chars_max: Final = 64
call_timeout_s_max: Final = 24 * 3600.0
param_name_echo_chars_max: Final = 40
_name_re: Final = re.compile(r"^([a-z]+)_[A-Za-z][A-Za-z0-9_]*$")
_topic_re: Final = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_json_types: Final = frozenset(get_args(JsonType))


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter: its name (also the handler's keyword), JSON type, and whether required."""

    name: str
    type: JsonType
    required: bool = True
    description: str = ""


@dataclasses.dataclass(frozen=True)
class Result:
    """What a method returns, for the OpenRPC document."""

    type: JsonType = "any"
    description: str = ""
    name: str = "result"


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method. ``handler`` is None for methods the server itself answers on a
    WebSocket connection (subscriptions), which need the connection, not the daemon."""

    name: str
    handler: Handler | None
    description: str
    params: tuple[Param, ...]
    result: Result
    call_timeout_s: float | None = None
    """This method's own limit on one call (the server's ``call_timeout_s`` when None): for a
    method whose work grows with what it is given, such as copying a job's input files."""

    @property
    def namespace(self) -> str:
        return self.name.split("_", 1)[0]

    def bind(self, params: list[Any] | dict[str, Any] | None) -> dict[str, Any]:
        """Map by-position or by-name params onto keyword arguments, checking every type.

        Raises ``RpcError(-32602)`` naming the offending param. An explicit null for an optional
        param counts as leaving it out (many JSON-RPC clients send it that way), except for types
        ``null`` and ``any``, where null is a value.
        """
        names = [p.name for p in self.params]
        given: dict[str, Any]
        if params is None:
            given = {}
        elif isinstance(params, list):
            if len(params) > len(names):
                raise RpcError(
                    INVALID_PARAMS,
                    f"too many params: {self.name} takes at most {len(names)}, got {len(params)}",
                )
            given = dict(zip(names, params, strict=False))
        else:
            unknown = sorted(k for k in params if k not in names)
            if unknown:
                raise RpcError(INVALID_PARAMS, f"unknown param {_quote(unknown[0])}")
            given = dict(params)
        kwargs: dict[str, Any] = {}
        for p in self.params:
            value = given.get(p.name)
            absent = value is None and not p.required and p.type not in ("null", "any")
            if p.name not in given or absent:
                if p.required:
                    raise RpcError(INVALID_PARAMS, f"missing required param {p.name!r}")
                continue
            if not _matches(p.type, value):
                raise RpcError(INVALID_PARAMS, f"param {p.name!r} must be of type {p.type}")
            kwargs[p.name] = value
        return kwargs


def _quote(name: str) -> str:
    if len(name) > param_name_echo_chars_max:
        name = name[:param_name_echo_chars_max] + "..."
    return repr(name)


def _matches(json_type: JsonType, value: Any) -> bool:
    match json_type:
        case "string":
            return isinstance(value, str)
        case "integer":
            return isinstance(value, int) and not isinstance(value, bool)
        case "number":
            return isinstance(value, int | float) and not isinstance(value, bool)
        case "boolean":
            return isinstance(value, bool)
        case "object":
            return isinstance(value, dict)
        case "array":
            return isinstance(value, list)
        case "null":
            return value is None
        case "any":
            return True


def _schema(json_type: JsonType) -> dict[str, Any]:
    return {} if json_type == "any" else {"type": json_type}


class MethodRegistry:
    """Methods by name, grouped by namespace, plus the subscription topics.

    Register everything before the server starts; the server reads the registry from its own
    thread and the registry is not locked.
    """

    def __init__(
        self,
        *,
        title: str = "gpumesh node",
        version: str = "0.1.0",
        topics: Mapping[str, str] = STANDARD_TOPICS,
    ) -> None:
        self.title = title
        self.version = version
        self._methods: dict[str, Method] = {}
        self._topics: dict[str, str] = {}
        for name, description in topics.items():
            self.add_topic(name, description)
        self._add(
            "rpc_discover",
            self._discover,
            description="This server's OpenRPC 1.2 document (also served as rpc.discover).",
            params=(),
            result=Result("object", "An OpenRPC document.", "openrpc"),
        )
        self._add(
            "rpc_subscribe",
            None,
            description="WebSocket only: subscribe to a topic (see x-topics). Events arrive as "
            '"subscription" notifications carrying the returned id.',
            params=(Param("topic", "string", True, "The topic name."),),
            result=Result("string", "The subscription id.", "subscription"),
        )
        self._add(
            "rpc_unsubscribe",
            None,
            description="WebSocket only: cancel a subscription made on this connection.",
            params=(Param("subscription", "string", True, "The id rpc_subscribe returned."),),
            result=Result("boolean", "Whether the subscription existed.", "removed"),
        )

    def register(
        self,
        name: str,
        handler: Handler,
        *,
        description: str,
        params: Sequence[Param] = (),
        result: Result | None = None,
        call_timeout_s: float | None = None,
    ) -> Method:
        """Register trio coroutine function ``handler`` as ``name`` (``<namespace>_<name>``).

        The handler is called with keyword arguments named after ``params``; its signature must
        accept them all and must not need any param that is not declared required.
        """
        match = _name_re.match(name)
        if match is None or match.group(1) not in NAMESPACES:
            raise RegistryError(
                f"method name {name!r} must be <namespace>_<name> with namespace one of "
                f"{', '.join(NAMESPACES)}"
            )
        if call_timeout_s is not None and not 0 < call_timeout_s <= call_timeout_s_max:
            raise RegistryError(f"{name}: call_timeout_s must be in (0, {call_timeout_s_max}]")
        return self._add(
            name,
            handler,
            description=description,
            params=params,
            result=result,
            call_timeout_s=call_timeout_s,
        )

    def method(
        self,
        name: str,
        *,
        description: str,
        params: Sequence[Param] = (),
        result: Result | None = None,
    ) -> Callable[[Handler], Handler]:
        """Decorator form of ``register``; returns the handler unchanged."""

        def decorate(handler: Handler) -> Handler:
            self.register(name, handler, description=description, params=params, result=result)
            return handler

        return decorate

    def add_topic(self, name: str, description: str) -> None:
        """Declare a topic subscribers may ask for and the daemon may publish to."""
        if not _topic_re.match(name):
            raise RegistryError(f"topic name {name!r} must match {_topic_re.pattern}")
        if name in self._topics:
            raise RegistryError(f"topic {name!r} is already registered")
        self._topics[name] = description

    def _add(
        self,
        name: str,
        handler: Handler | None,
        *,
        description: str,
        params: Sequence[Param],
        result: Result | None,
        call_timeout_s: float | None = None,
    ) -> Method:
        if len(name) > method_name_chars_max:
            raise RegistryError(f"method name {name!r} is longer than {method_name_chars_max}")
        if name in self._methods:
            raise RegistryError(f"method {name!r} is already registered")
        params = tuple(params)
        _check_params(name, params)
        if handler is not None:
            _check_handler(name, handler, params)
        method = Method(name, handler, description, params, result or Result(), call_timeout_s)
        self._methods[name] = method
        return method

    def get(self, name: str) -> Method | None:
        if name == "rpc.discover":
            # OpenRPC tooling asks for the service-discovery method by this reserved name.
            name = "rpc_discover"
        return self._methods.get(name)

    def methods(self) -> tuple[Method, ...]:
        return tuple(self._methods.values())

    def topics(self) -> Mapping[str, str]:
        return dict(self._topics)

    def has_topic(self, name: str) -> bool:
        return name in self._topics

    def openrpc_document(self) -> dict[str, Any]:
        """An OpenRPC 1.2 document describing every method, sorted by name."""
        methods = []
        for m in sorted(self._methods.values(), key=lambda m: m.name):
            methods.append(
                {
                    "name": m.name,
                    "description": m.description,
                    "tags": [{"name": m.namespace}],
                    "paramStructure": "either",
                    "params": [
                        {
                            "name": p.name,
                            "description": p.description,
                            "required": p.required,
                            "schema": _schema(p.type),
                        }
                        for p in m.params
                    ],
                    "result": {
                        "name": m.result.name,
                        "description": m.result.description,
                        "schema": _schema(m.result.type),
                    },
                }
            )
        return {
            "openrpc": openrpc_version,
            "info": {"title": self.title, "version": self.version},
            "methods": methods,
            "x-topics": [
                {"name": name, "description": text} for name, text in sorted(self._topics.items())
            ],
        }

    async def _discover(self) -> dict[str, Any]:
        return self.openrpc_document()


def _check_params(name: str, params: tuple[Param, ...]) -> None:
    seen: set[str] = set()
    optional_seen = False
    for p in params:
        if not p.name.isidentifier():
            raise RegistryError(f"{name}: param name {p.name!r} is not an identifier")
        if p.name in seen:
            raise RegistryError(f"{name}: param {p.name!r} declared twice")
        if p.type not in _json_types:
            raise RegistryError(f"{name}: param {p.name!r} has unknown type {p.type!r}")
        if p.required and optional_seen:
            # By-position calls fill params in order, so a required one may not follow an
            # optional one.
            raise RegistryError(f"{name}: required param {p.name!r} follows an optional one")
        optional_seen = optional_seen or not p.required
        seen.add(p.name)


def _check_handler(name: str, handler: Handler, params: tuple[Param, ...]) -> None:
    if not inspect.iscoroutinefunction(handler):
        raise RegistryError(f"{name}: handler must be an async function")
    signature = inspect.signature(handler)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    declared = {p.name: p for p in params}
    for p in params:
        accepted = signature.parameters.get(p.name)
        if not accepts_any and (accepted is None or accepted.kind not in keyword_kinds):
            raise RegistryError(f"{name}: handler takes no keyword argument {p.name!r}")
    for arg in signature.parameters.values():
        if arg.kind in (arg.VAR_KEYWORD, arg.VAR_POSITIONAL) or arg.default is not arg.empty:
            continue
        if arg.name not in declared or not declared[arg.name].required:
            raise RegistryError(
                f"{name}: handler argument {arg.name!r} has no default but is not a required param"
            )
