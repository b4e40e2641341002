"""``RpcClient``: a small synchronous JSON-RPC client on the standard library (for the CLI)."""

from __future__ import annotations

import itertools
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from rpc._files import COOKIE_FILE_NAME, PORT_FILE_NAME
from rpc.exceptions import RpcCallError, RpcTransportError

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

Params = list[Any] | dict[str, Any] | None
response_bytes_max: Final = 64 * 1024 * 1024
"""A response larger than this is refused rather than read into memory."""


class RpcClient:
    """Calls a gpumesh node over HTTP. Thread-safe; one short-lived connection per call."""

    def __init__(self, url: str, token: str, timeout_s: float = 10.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._token = token
        self._ids = itertools.count(1)
        self._ids_lock = threading.Lock()
        # No proxies: an http_proxy in the environment must never see a loopback call or token.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @classmethod
    def from_home(
        cls, home_dir: str | os.PathLike[str], *, timeout_s: float = 10.0, host: str = "127.0.0.1"
    ) -> RpcClient:
        """A client for the node whose home is ``home_dir``, from its cookie and port files.

        Raises ``FileNotFoundError`` when the node is not running (it removes both on exit).
        """
        home = Path(home_dir)
        token = (home / COOKIE_FILE_NAME).read_text().strip()
        port_text = (home / PORT_FILE_NAME).read_text().strip()
        try:
            port = int(port_text)
        except ValueError:
            raise RpcTransportError(
                f"{home / PORT_FILE_NAME} holds no port: {port_text!r}"
            ) from None
        return cls(f"http://{host}:{port}/", token, timeout_s)

    def call(self, method: str, params: Params = None) -> Any:
        """Call ``method`` and return its result; raises ``RpcCallError`` for an error answer."""
        reply = self._post(self._request(method, params, self._next_id()))
        if not isinstance(reply, dict):
            raise RpcTransportError(
                f"expected a JSON-RPC response object, got {type(reply).__name__}"
            )
        return _result_of(reply)

    def notify(self, method: str, params: Params = None) -> None:
        """Send a notification: the server runs it and answers nothing."""
        self._post(self._request(method, params, None))

    def batch(self, calls: Sequence[tuple[str, Params]]) -> list[Any]:
        """Call several methods in one request; returns, in order, each result or the
        ``RpcCallError`` it failed with (instead of raising it)."""
        ids = [self._next_id() for _ in calls]
        body = [self._request(m, p, i) for (m, p), i in zip(calls, ids, strict=True)]
        reply = self._post(body)
        if isinstance(reply, dict):
            # A batch refused as a whole (too large, for instance) gets one error object.
            _result_of(reply)
            raise RpcTransportError("expected an array answering the batch")
        if not isinstance(reply, list):
            raise RpcTransportError("expected an array answering the batch")
        by_id = {r.get("id"): r for r in reply if isinstance(r, dict)}
        out: list[Any] = []
        for i in ids:
            if i not in by_id:
                raise RpcTransportError(f"the batch answer lacks id {i}")
            try:
                out.append(_result_of(by_id[i]))
            except RpcCallError as exc:
                out.append(exc)
        return out

    def _next_id(self) -> int:
        with self._ids_lock:
            return next(self._ids)

    @staticmethod
    def _request(method: str, params: Params, request_id: int | None) -> dict[str, Any]:
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            request["params"] = params
        if request_id is not None:
            request["id"] = request_id
        return request

    def _post(self, body: Any) -> Any:
        data = json.dumps(body, separators=(",", ":")).encode()
        http_request = urllib.request.Request(
            self.url,
            data=data,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self._token}",
            },
        )
        try:
            with self._opener.open(http_request, timeout=self.timeout_s) as response:
                status = response.status
                raw = response.read(response_bytes_max + 1)
        except urllib.error.HTTPError as exc:
            # 401, 403, 413 and 503 carry a JSON-RPC error body: surface it as the call's error.
            status = exc.code
            raw = exc.read(response_bytes_max + 1)
            exc.close()
        except urllib.error.URLError as exc:
            raise RpcTransportError(f"cannot reach {self.url}: {exc.reason}") from exc
        except TimeoutError as exc:
            raise RpcTransportError(f"no answer from {self.url} in {self.timeout_s} s") from exc
        if len(raw) > response_bytes_max:
            raise RpcTransportError(f"response larger than {response_bytes_max} bytes")
        if status == 204:
            return None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise RpcTransportError(f"HTTP {status} with a body that is not JSON") from None
        if status != 200 and not (isinstance(reply, dict) and "error" in reply):
            raise RpcTransportError(f"HTTP {status}")
        return reply


def _result_of(reply: dict[str, Any]) -> Any:
    if "error" in reply:
        error = reply["error"]
        if not isinstance(error, dict):
            raise RpcTransportError("malformed error object")
        raise RpcCallError(
            int(error.get("code", 0)), str(error.get("message", "")), error.get("data")
        )
    if "result" not in reply:
        raise RpcTransportError("response has neither result nor error")
    return reply["result"]
