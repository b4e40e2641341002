"""The asyncio side: aiohttp on its own thread and event loop. Nothing outside rpc/ sees it.

Everything here runs on the HTTP thread, except the few methods marked thread-safe. Method
handlers run on the trio side: ``call_into_trio`` posts them there with
``TrioToken.run_sync_soon`` and the trio task resolves an asyncio future with
``loop.call_soon_threadsafe``; neither side ever blocks waiting for the other.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import json
import logging
import re
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import trio
from aiohttp import WSCloseCode, WSMsgType, hdrs, web

from rpc._metrics import METRICS_METHOD, METRICS_PATH, metrics_content_type
from rpc._protocol import (
    CLOSE_SLOW_SUBSCRIBER,
    FORBIDDEN,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NOT_SUPPORTED,
    PARSE_ERROR,
    SERVER_BUSY,
    SHUTTING_DOWN,
    SUBSCRIPTION_LIMIT,
    UNAUTHORIZED,
    Outcome,
    ParseError,
    Request,
    dumps,
    error_response,
    notification,
    parse_json,
    quote_method,
    validate_request,
)
from rpc._static import static_file, static_headers
from rpc.exceptions import RpcError

if TYPE_CHECKING:
    from rpc._config import RpcConfig
    from rpc._registry import Method, MethodRegistry

log = logging.getLogger("rpc")

subscription_method: Final = "subscription"
_loopback_names: Final = frozenset({"127.0.0.1", "localhost", "[::1]"})
_port_re: Final = re.compile(r"^(:[0-9]{1,5})?$")

Deliver = Callable[[Outcome], None]
Spawn = Callable[[Deliver, "Method", dict[str, Any]], None]


def host_allowed(header: str | None, extra_names: frozenset[str]) -> bool:
    """Whether a Host header names a loopback address (or a configured extra name).

    The DNS-rebinding defence: a browser page on evil.example that rebinds its name to
    127.0.0.1 still sends ``Host: evil.example``.
    """
    if not header:
        return False
    host = header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return False
        name, rest = host[: end + 1], host[end + 1 :]
    else:
        name, sep, port = host.partition(":")
        rest = sep + port
    return (name in _loopback_names or name in extra_names) and _port_re.match(rest) is not None


def origin_allowed(origin: str, extra_names: frozenset[str], port: int) -> bool:
    """Whether a browser's Origin header is the node's own origin: ``http://`` + a loopback
    name (or a configured extra name) + our port. A page served elsewhere, or ``null``, is
    refused: the bearer token alone would let any page the user has open script the node if
    it ever learned the token."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    if scheme != "http" or not sep or "/" in rest:
        return False
    return host_allowed(rest, extra_names) and rest.rsplit(":", 1)[-1] == str(port)


class Counters:
    """Running counts. Each is written by one thread only, so no lock is needed."""

    def __init__(self) -> None:
        # HTTP thread.
        self.http_requests = 0
        self.rejected_busy = 0
        self.websocket_connections = 0
        self.subscriptions = 0
        self.notifications_queued = 0
        self.subscribers_dropped = 0
        self.body_timeouts = 0
        # trio thread.
        self.calls = 0
        self.call_failures = 0
        self.events_published = 0
        self.events_dropped = 0
        # Bounded: registered methods times the error codes they end with.
        self.calls_by_method: collections.Counter[tuple[str, str]] = collections.Counter()


class _Connection:
    """One WebSocket connection: its outgoing queue (responses and notifications share it, so
    order is kept) and its subscriptions."""

    def __init__(self, ws: web.WebSocketResponse, queue_max: int) -> None:
        self.ws = ws
        self.outgoing: asyncio.Queue[str] = asyncio.Queue(queue_max)
        self.subscriptions: dict[str, str] = {}
        self.dropped = False
        self.writer: asyncio.Task[None] | None = None


class HttpSide:
    """The aiohttp application, its runner, and the WebSocket subscriptions."""

    def __init__(
        self,
        registry: MethodRegistry,
        config: RpcConfig,
        *,
        host: str,
        port: int,
        token: str,
        allowed_hosts: frozenset[str],
        trio_token: trio.lowlevel.TrioToken,
        spawn: Spawn,
        counters: Counters,
    ) -> None:
        self._registry = registry
        self._config = config
        self._host = host
        self._port = port
        self._token = token.encode()
        self._allowed_hosts = allowed_hosts
        self._trio_token = trio_token
        self._spawn = spawn
        self._counters = counters
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._stop_early = False
        self._http_in_flight = 0
        self._bound_port = 0
        self._connections: set[_Connection] = set()
        self._subscribers: dict[str, dict[str, _Connection]] = {}
        self._closers: set[asyncio.Task[None]] = set()
        # Calls on their way to trio and outcomes on their way back; see _call_into_trio.
        # Bounded by the calls in flight (requests_in_flight_max x batch_calls_max, plus the
        # WebSocket equivalents); deque append/popleft are atomic across threads.
        self._to_trio: collections.deque[tuple[Deliver, Method, dict[str, Any]]] = (
            collections.deque()
        )
        self._to_trio_scheduled = False
        self._from_trio: collections.deque[tuple[asyncio.Future[Outcome], Outcome]] = (
            collections.deque()
        )
        self._from_trio_scheduled = False
        self._events: collections.deque[tuple[str, str]] = collections.deque()
        self._events_scheduled = False

    # -- thread-safe entry points -------------------------------------------------------------

    def thread_main(self, report: Callable[[int | BaseException], None]) -> None:
        """The HTTP thread's body: serve until ``request_stop``, then close the loop."""
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve(report))
        except BaseException as exc:
            log.exception("rpc HTTP thread failed")
            report(exc)
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def close_unstarted(self) -> None:
        """Release the event loop of a thread that never started."""
        self._loop.close()

    def request_stop(self) -> None:
        """Ask the HTTP thread to shut down (thread-safe, returns at once)."""
        try:
            self._loop.call_soon_threadsafe(self._set_stop)
        except RuntimeError:
            # The loop is already closed: the thread has finished.
            return

    def has_subscribers(self, topic: str) -> bool:
        """Thread-safe enough for a hint: a racing subscribe only misses this one event."""
        return bool(self._subscribers.get(topic))

    def publish_threadsafe(self, topic: str, payload_json: str) -> bool:
        """Queue an event for fan-out; False when the backlog is full or the loop is gone."""
        if len(self._events) >= self._config.publish_backlog_max:
            return False
        self._events.append((topic, payload_json))
        if not self._events_scheduled:
            self._events_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain_events)
            except RuntimeError:
                return False
        return True

    # -- lifecycle ----------------------------------------------------------------------------

    def _set_stop(self) -> None:
        if self._stop is None:
            self._stop_early = True
        else:
            self._stop.set()

    async def _serve(self, report: Callable[[int | BaseException], None]) -> None:
        self._stop = asyncio.Event()
        if self._stop_early:
            report(RuntimeError("stopped before start"))
            return
        app = web.Application(client_max_size=self._config.request_body_bytes_max)
        app.router.add_post("/", self._http)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get(METRICS_PATH, self._metrics)
        app.router.add_get("/", self._static)
        app.router.add_get("/static/{name}", self._static)
        app.on_shutdown.append(self._close_websockets)
        # access_log=None: no per-request log line, and never a ?token= query in a log.
        # aiohttp arms keepalive_timeout when a connection opens and after each response, and
        # closes the connection if no whole request head arrived by then: our header timeout.
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self._config.shutdown_timeout_s,
            keepalive_timeout=self._config.header_read_timeout_s,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                report(exc)
                return
            self._bound_port = int(runner.addresses[0][1])
            report(self._bound_port)
            await self._stop.wait()
        finally:
            await runner.cleanup()
            # Slow-subscriber closes still waiting on a full socket: the loop is about to close.
            for closer in list(self._closers):
                closer.cancel()
            await asyncio.gather(*self._closers, return_exceptions=True)

    async def _close_websockets(self, _app: web.Application) -> None:
        async def close(conn: _Connection) -> None:
            if not conn.ws.prepared:
                return
            try:
                async with asyncio.timeout(self._config.shutdown_timeout_s):
                    await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
            except TimeoutError:
                return

        await asyncio.gather(*(close(c) for c in list(self._connections)))

    # -- access control -----------------------------------------------------------------------

    def _check_access(
        self, request: web.Request, *, allow_query_token: bool
    ) -> web.Response | None:
        if not host_allowed(request.headers.get(hdrs.HOST), self._allowed_hosts):
            return _http_error(403, FORBIDDEN, "forbidden: the Host header must be a loopback name")
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and not origin_allowed(origin, self._allowed_hosts, self._bound_port):
            return _http_error(403, FORBIDDEN, "forbidden: only the node's own origin may call")
        scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        given: str | None = None
        if scheme.lower() == "bearer":
            given = value.strip()
        elif allow_query_token:
            given = request.query.get("token")
        if given is None or not hmac.compare_digest(given.encode("utf-8", "replace"), self._token):
            response = _http_error(
                401, UNAUTHORIZED, "unauthorized: a valid bearer token is needed"
            )
            response.headers[hdrs.WWW_AUTHENTICATE] = "Bearer"
            return response
        return None

    # -- HTTP ---------------------------------------------------------------------------------

    async def _http(self, request: web.Request) -> web.StreamResponse:
        self._counters.http_requests += 1
        denied = self._check_access(request, allow_query_token=False)
        if denied is not None:
            return denied
        body_max = self._config.request_body_bytes_max
        if request.content_length is not None and request.content_length > body_max:
            return _too_large(body_max)
        if self._http_in_flight >= self._config.requests_in_flight_max:
            self._counters.rejected_busy += 1
            return _http_error(503, SERVER_BUSY, "server busy: too many requests in flight")
        self._http_in_flight += 1
        try:
            try:
                async with asyncio.timeout(self._config.body_read_timeout_s):
                    body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return _too_large(body_max)
            except TimeoutError:
                self._counters.body_timeouts += 1
                response = _http_error(408, INVALID_REQUEST, "request body not received in time")
                response.force_close()
                return response
            text = await self._handle_body(body, None)
        finally:
            self._http_in_flight -= 1
        if text is None:
            return web.Response(status=204)
        return web.Response(text=text, content_type="application/json")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        """The dashboard's files. No token needed (they hold no data; the page reads its token
        from the URL fragment), but the Host check still applies."""
        self._counters.http_requests += 1
        if not host_allowed(request.headers.get(hdrs.HOST), self._allowed_hosts):
            return _http_error(403, FORBIDDEN, "forbidden: the Host header must be a loopback name")
        found = static_file(request.match_info.get("name", "index.html"))
        if found is None:
            return web.Response(status=404, text="not found")
        body, content_type = found
        return web.Response(body=body, headers=static_headers(content_type))

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self._counters.http_requests += 1
        denied = self._check_access(request, allow_query_token=False)
        if denied is not None:
            return denied
        method = self._registry.get(METRICS_METHOD)
        if method is None or method.handler is None:
            return _http_error(404, METHOD_NOT_FOUND, "this node exports no metrics")
        outcome = await self._call_into_trio(method, {})
        if outcome.result_json is None:
            return _http_error(503, outcome.code, outcome.message)
        text = json.loads(outcome.result_json)
        return web.Response(
            body=str(text).encode(), headers={hdrs.CONTENT_TYPE: metrics_content_type}
        )

    # -- JSON-RPC -----------------------------------------------------------------------------

    async def _handle_body(self, body: bytes, conn: _Connection | None) -> str | None:
        """The JSON text to answer ``body`` with, or None when nothing is owed (notifications)."""
        try:
            parsed = parse_json(body)
        except ParseError:
            return error_response(None, PARSE_ERROR, "parse error: the body is not valid JSON")
        if not isinstance(parsed, list):
            return await self._handle_one(parsed, conn)
        if not parsed:
            return error_response(None, INVALID_REQUEST, "invalid request: empty batch")
        if len(parsed) > self._config.batch_calls_max:
            return error_response(
                None,
                INVALID_REQUEST,
                f"invalid request: a batch of {len(parsed)} exceeds the cap of "
                f"{self._config.batch_calls_max}",
            )
        answers = await asyncio.gather(*(self._handle_one(item, conn) for item in parsed))
        kept = [a for a in answers if a is not None]
        return f"[{','.join(kept)}]" if kept else None

    async def _handle_one(self, obj: object, conn: _Connection | None) -> str | None:
        request = validate_request(obj)
        if isinstance(request, str):
            return request
        outcome = await self._dispatch(request, conn)
        return None if request.is_notification else outcome.response(request.id)

    async def _dispatch(self, request: Request, conn: _Connection | None) -> Outcome:
        method = self._registry.get(request.method)
        if method is None:
            return Outcome.failure(
                METHOD_NOT_FOUND, f"method not found: {quote_method(request.method)}"
            )
        try:
            kwargs = method.bind(request.params)
        except RpcError as exc:
            return Outcome.failure(exc.code, exc.message)
        if method.handler is None:
            return self._connection_method(method.name, kwargs, conn)
        return await self._call_into_trio(method, kwargs)

    async def _call_into_trio(self, method: Method, kwargs: dict[str, Any]) -> Outcome:
        future: asyncio.Future[Outcome] = self._loop.create_future()
        self._to_trio.append((functools.partial(self._deliver, future), method, kwargs))
        # Each wake-up of the other loop is a socket write and a GIL hand-over, the dominant
        # cost under load: calls queued while a drain is already scheduled ride along with it.
        if not self._to_trio_scheduled:
            self._to_trio_scheduled = True
            try:
                self._trio_token.run_sync_soon(self._drain_to_trio)
            except trio.RunFinishedError:
                self._to_trio_scheduled = False
                while self._to_trio:
                    deliver, _, _ = self._to_trio.popleft()
                    deliver(Outcome.failure(SHUTTING_DOWN, "server is shutting down"))
        return await future

    def _drain_to_trio(self) -> None:
        """On the trio thread: start every queued call (``spawn`` never raises)."""
        # Cleared before draining: a call queued from now on schedules a fresh drain.
        self._to_trio_scheduled = False
        while self._to_trio:
            deliver, method, kwargs = self._to_trio.popleft()
            self._spawn(deliver, method, kwargs)

    def _deliver(self, future: asyncio.Future[Outcome], outcome: Outcome) -> None:
        """On the trio thread: hand a call's outcome back, batching wake-ups like above."""
        self._from_trio.append((future, outcome))
        if not self._from_trio_scheduled:
            self._from_trio_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain_from_trio)
            except RuntimeError:
                # The loop is closed: nobody is waiting for these answers any more.
                return

    def _drain_from_trio(self) -> None:
        self._from_trio_scheduled = False
        while self._from_trio:
            future, outcome = self._from_trio.popleft()
            if not future.done():
                future.set_result(outcome)

    # -- WebSocket ----------------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        denied = self._check_access(request, allow_query_token=True)
        if denied is not None:
            return denied
        if len(self._connections) >= self._config.websocket_connections_max:
            self._counters.rejected_busy += 1
            return _http_error(503, SERVER_BUSY, "server busy: too many WebSocket connections")
        ws = web.WebSocketResponse(
            max_msg_size=self._config.request_body_bytes_max,
            timeout=self._config.shutdown_timeout_s,
            heartbeat=self._config.websocket_heartbeat_s,
        )
        conn = _Connection(ws, self._config.subscriber_queue_messages_max)
        # Counted before the first await, so concurrent upgrades cannot overshoot the cap.
        self._connections.add(conn)
        self._counters.websocket_connections += 1
        in_flight = asyncio.Semaphore(self._config.websocket_calls_in_flight_max)
        tasks: set[asyncio.Task[None]] = set()
        try:
            await ws.prepare(request)
            conn.writer = asyncio.create_task(self._write_loop(conn))
            async for message in ws:
                if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break
                data = message.data.encode() if message.type is WSMsgType.TEXT else message.data
                # Waiting here stops reading the socket: a client that floods calls is slowed,
                # never buffered without bound.
                await in_flight.acquire()
                task = asyncio.create_task(self._ws_call(conn, data, in_flight))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            self._connections.discard(conn)
            self._counters.websocket_connections -= 1
            self._unsubscribe_all(conn)
            pending = [*tasks, *([conn.writer] if conn.writer is not None else [])]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return ws

    async def _ws_call(self, conn: _Connection, data: bytes, in_flight: asyncio.Semaphore) -> None:
        try:
            text = await self._handle_body(data, conn)
            if text is not None and not conn.dropped:
                await conn.outgoing.put(text)
        finally:
            in_flight.release()

    async def _write_loop(self, conn: _Connection) -> None:
        try:
            while True:
                text = await conn.outgoing.get()
                await conn.ws.send_str(text)
        except (ConnectionError, RuntimeError):
            # The peer went away or the socket is closing; the handler cleans up.
            return

    def _connection_method(
        self, name: str, kwargs: dict[str, Any], conn: _Connection | None
    ) -> Outcome:
        if conn is None:
            return Outcome.failure(NOT_SUPPORTED, f"{name} needs a WebSocket connection (/ws)")
        if name == "rpc_subscribe":
            topic = kwargs["topic"]
            if conn.dropped:
                return Outcome.failure(SUBSCRIPTION_LIMIT, "this connection is being closed")
            if not self._registry.has_topic(topic):
                return Outcome.failure(
                    INVALID_PARAMS, f"invalid params: unknown topic {quote_method(topic)}"
                )
            if len(conn.subscriptions) >= self._config.subscriptions_per_connection_max:
                return Outcome.failure(
                    SUBSCRIPTION_LIMIT,
                    f"subscription limit: at most "
                    f"{self._config.subscriptions_per_connection_max} per connection",
                )
            subscription = "0x" + secrets.token_hex(8)
            conn.subscriptions[subscription] = topic
            self._subscribers.setdefault(topic, {})[subscription] = conn
            self._counters.subscriptions += 1
            return Outcome.success(dumps(subscription))
        assert name == "rpc_unsubscribe", name
        subscription = kwargs["subscription"]
        topic = conn.subscriptions.pop(subscription, None)
        if topic is not None:
            self._subscribers[topic].pop(subscription, None)
            self._counters.subscriptions -= 1
        return Outcome.success(dumps(topic is not None))

    def _unsubscribe_all(self, conn: _Connection) -> None:
        for subscription, topic in conn.subscriptions.items():
            self._subscribers[topic].pop(subscription, None)
            self._counters.subscriptions -= 1
        conn.subscriptions.clear()

    def _drain_events(self) -> None:
        self._events_scheduled = False
        while self._events:
            self._fan_out(*self._events.popleft())

    def _fan_out(self, topic: str, payload_json: str) -> None:
        for subscription, conn in list(self._subscribers.get(topic, {}).items()):
            params = f'{{"subscription":{dumps(subscription)},"result":{payload_json}}}'
            try:
                conn.outgoing.put_nowait(notification(subscription_method, params))
            except asyncio.QueueFull:
                self._drop_slow(conn)
                continue
            self._counters.notifications_queued += 1

    def _drop_slow(self, conn: _Connection) -> None:
        """Drop a subscriber that cannot keep up: the daemon never waits for a reader."""
        if conn.dropped:
            return
        conn.dropped = True
        self._counters.subscribers_dropped += 1
        self._unsubscribe_all(conn)
        if conn.writer is not None:
            conn.writer.cancel()
        log.warning("dropped a slow WebSocket subscriber")
        closer = asyncio.create_task(self._close_slow(conn))
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)

    async def _close_slow(self, conn: _Connection) -> None:
        try:
            async with asyncio.timeout(self._config.slow_close_timeout_s):
                await conn.ws.close(code=CLOSE_SLOW_SUBSCRIBER, message=b"subscriber too slow")
        except TimeoutError:
            # Its socket is full too: aiohttp has cut the transport, which is all we need.
            return


def _http_error(status: int, code: int, message: str) -> web.Response:
    return web.Response(
        status=status, text=error_response(None, code, message), content_type="application/json"
    )


def _too_large(body_max: int) -> web.Response:
    return _http_error(413, INVALID_REQUEST, f"invalid request: the body exceeds {body_max} bytes")
