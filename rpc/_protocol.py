"""JSON-RPC 2.0 framing: error codes, parsing, request validation, response encoding.

Pure functions, no I/O. Responses are built as JSON text so a result serialised once (on the
trio side, while the handler's objects are still consistent) is embedded without re-encoding.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Final

# The codes JSON-RPC 2.0 defines.
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
# Ours, in the spec's "implementation-defined server error" range -32000..-32099.
SERVER_BUSY: Final = -32000
UNAUTHORIZED: Final = -32001
FORBIDDEN: Final = -32002
CALL_TIMEOUT: Final = -32003
SHUTTING_DOWN: Final = -32004
NOT_SUPPORTED: Final = -32005
SUBSCRIPTION_LIMIT: Final = -32006

CLOSE_SLOW_SUBSCRIBER: Final = 4008
"""WebSocket close code for a subscriber dropped because its queue overflowed (4000-4999 is
the range RFC 6455 leaves to applications)."""

method_name_echo_chars_max: Final = 64
"""Error messages quote at most this much of a caller's method name."""

JsonId = str | int | float | None


class ParseError(ValueError):
    """Raised when a body is not one JSON text in UTF-8."""


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not.
    raise ParseError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # 1e400 parses to inf, which no JSON response can carry (not even as the id echoed back).
    value = float(text)
    if not math.isfinite(value):
        raise ParseError(f"{text[:32]} is not a finite number")
    return value


def parse_json(body: bytes) -> Any:
    """Parse ``body`` as strict JSON (finite numbers only); raise ``ParseError`` otherwise."""
    try:
        text = body.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except ParseError:
        raise
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and over-long integer literals; RecursionError
        # covers deeply nested arrays, which fit easily inside the body cap.
        raise ParseError(type(exc).__name__) from None


def dumps(value: Any) -> str:
    """Compact, ASCII-only JSON (lone surrogates survive), NaN refused."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def is_valid_id(value: object) -> bool:
    return value is None or (isinstance(value, str | int | float) and not isinstance(value, bool))


@dataclasses.dataclass(frozen=True)
class Request:
    """One well-formed JSON-RPC request; ``is_notification`` when it carried no ``id``."""

    method: str
    params: list[Any] | dict[str, Any] | None
    id: JsonId
    is_notification: bool


def validate_request(obj: object) -> Request | str:
    """Return the request, or the JSON text of the -32600 error response it deserves."""
    if not isinstance(obj, dict):
        return error_response(None, INVALID_REQUEST, "a request must be a JSON object")
    has_id = "id" in obj
    request_id = obj.get("id")
    if has_id and not is_valid_id(request_id):
        return error_response(None, INVALID_REQUEST, "id must be a string, a number or null")
    if obj.get("jsonrpc") != "2.0":
        return error_response(request_id, INVALID_REQUEST, 'jsonrpc must be exactly "2.0"')
    method = obj.get("method")
    if not isinstance(method, str):
        return error_response(request_id, INVALID_REQUEST, "method must be a string")
    params = obj.get("params")
    if "params" in obj and not isinstance(params, list | dict):
        return error_response(request_id, INVALID_REQUEST, "params must be an array or an object")
    return Request(method, params, request_id, not has_id)


def result_response(request_id: JsonId, result_json: str) -> str:
    return f'{{"jsonrpc":"2.0","id":{dumps(request_id)},"result":{result_json}}}'


def error_response(
    request_id: JsonId, code: int, message: str, data_json: str | None = None
) -> str:
    error = f'{{"code":{code},"message":{dumps(message)}'
    if data_json is not None:
        error += f',"data":{data_json}'
    return f'{{"jsonrpc":"2.0","id":{dumps(request_id)},"error":{error}}}}}'


def notification(method: str, params_json: str) -> str:
    return f'{{"jsonrpc":"2.0","method":{dumps(method)},"params":{params_json}}}'


def quote_method(name: str) -> str:
    """The caller's method name, shortened, for an error message."""
    if len(name) > method_name_echo_chars_max:
        name = name[:method_name_echo_chars_max] + "..."
    return repr(name)


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """How one call ended: the result as JSON text, or an error. Crosses from trio to asyncio."""

    result_json: str | None = None
    code: int = 0
    message: str = ""
    data_json: str | None = None

    @classmethod
    def success(cls, result_json: str) -> Outcome:
        return cls(result_json=result_json)

    @classmethod
    def failure(cls, code: int, message: str, data_json: str | None = None) -> Outcome:
        return cls(code=code, message=message, data_json=data_json)

    def response(self, request_id: JsonId) -> str:
        if self.result_json is not None:
            return result_response(request_id, self.result_json)
        return error_response(request_id, self.code, self.message, self.data_json)
