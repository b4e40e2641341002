"""The pure JSON-RPC framing, property-tested: any JSON value gets a well-formed answer."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from rpc import INVALID_REQUEST, PARSE_ERROR
from rpc._protocol import (
    Outcome,
    ParseError,
    Request,
    error_response,
    is_valid_id,
    parse_json,
    result_response,
    validate_request,
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
ids = st.none() | st.integers() | st.text() | st.floats(allow_nan=False, allow_infinity=False)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2.0]) | json_values,
        "method": st.text(max_size=20) | json_values,
        "params": json_values,
        "id": ids | json_values,
    },
)


@given(request_like | json_values)
def test_validate_request_never_raises_and_errors_are_well_formed(obj: Any) -> None:
    outcome = validate_request(obj)
    if isinstance(outcome, Request):
        assert isinstance(obj, dict), f"only objects are requests: {obj!r}"
        assert obj["jsonrpc"] == "2.0", obj
        assert isinstance(outcome.method, str), outcome
        assert outcome.is_notification == ("id" not in obj), outcome
        return
    reply = json.loads(outcome)
    assert reply["jsonrpc"] == "2.0", reply
    assert reply["error"]["code"] == INVALID_REQUEST, reply
    assert is_valid_id(reply["id"]), f"the echoed id must be a valid id: {reply!r}"


@given(ids, json_values)
def test_responses_round_trip(request_id: Any, result: Any) -> None:
    result_json = json.dumps(result)
    assert json.loads(result_response(request_id, result_json)) == {
        "jsonrpc": "2.0",
        "id": request_id,
        "result": result,
    }, "a result response must carry the id and result unchanged"
    error = json.loads(Outcome.failure(-1, "m", json.dumps(result)).response(request_id))
    assert error == {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {"code": -1, "message": "m", "data": result},
    }, error
    assert "data" not in json.loads(error_response(request_id, -1, "m"))["error"], "no data"


@given(st.binary(max_size=200))
def test_parse_json_accepts_only_json(body: bytes) -> None:
    try:
        value = parse_json(body)
    except ParseError:
        return
    assert json.loads(body.decode("utf-8")) == value, f"parsed differently from json: {body!r}"


def test_parse_json_refusals() -> None:
    for body in (b"NaN", b"[Infinity]", b"-Infinity", b"\xff", b"[" * 100_000, b"1" * 5000, b""):
        try:
            parse_json(body)
        except ParseError:
            continue
        raise AssertionError(f"{body[:20]!r} should be a parse error (-{-PARSE_ERROR})")
