"""``RpcServer``: the trio service that owns the HTTP thread, the cookie and the handlers."""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from rpc._app import Counters, Deliver, HttpSide
from rpc._config import RpcConfig
from rpc._files import (
    COOKIE_FILE_NAME,
    PORT_FILE_NAME,
    cookie_mode,
    port_file_mode,
    remove_if_holds,
    write_file_atomic,
)
from rpc._protocol import CALL_TIMEOUT, INTERNAL_ERROR, SHUTTING_DOWN, Outcome, dumps
from rpc.exceptions import RpcError, UnknownTopic

if TYPE_CHECKING:
    # The trio-stubs that trio-typing (a py-libp2p dependency) installs shadow trio's own
    # annotations for mypy and lack trio.TaskStatus; trio_typing's protocol fits both.
    import os

    from trio_typing import TaskStatus

    from rpc._registry import Method, MethodRegistry

log = logging.getLogger("rpc")

thread_join_grace_s: Final = 2.0
"""Added to the configured shutdown timeout before we give up joining the HTTP thread."""


@dataclasses.dataclass(frozen=True)
class RpcStatistics:
    """A snapshot of the server's counters."""

    http_requests: int
    calls: int
    call_failures: int
    rejected_busy: int
    websocket_connections: int
    subscriptions: int
    notifications_queued: int
    subscribers_dropped: int
    events_published: int
    events_dropped: int
    body_timeouts: int
    calls_by_method: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    """Finished calls by (method, result): ``ok`` or the JSON-RPC error code, e.g. ``-32602``."""


class RpcServer:
    """JSON-RPC 2.0 over HTTP POST ``/`` and WebSocket ``/ws``, as a trio service.

    ``run`` writes a fresh bearer token to ``cookie_path`` (mode 0600), starts aiohttp on its own
    thread, reports the bound port through ``task_status`` (and ``port_path``, mode 0644), and
    serves until cancelled; then it stops the thread, joins it and removes both files.
    """

    def __init__(
        self,
        registry: MethodRegistry,
        *,
        host: str = "127.0.0.1",
        port: int,
        cookie_path: str | os.PathLike[str],
        port_path: str | os.PathLike[str] | None = None,
        config: RpcConfig | None = None,
        allowed_hosts: frozenset[str] = frozenset(),
    ) -> None:
        self.registry = registry
        self.host = host
        self.config = config or RpcConfig.default()
        self._requested_port = port
        self._cookie_path = Path(cookie_path)
        self._port_path = Path(port_path) if port_path is not None else None
        self._allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self._counters = Counters()
        self._limiter = trio.CapacityLimiter(self.config.calls_in_flight_max)
        self._port = 0
        self._http: HttpSide | None = None
        self._calls: trio.Nursery | None = None
        self._started = False

    @classmethod
    def for_home(
        cls,
        registry: MethodRegistry,
        home_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        config: RpcConfig | None = None,
    ) -> RpcServer:
        """A server writing ``<home>/rpc.cookie`` and ``<home>/rpc.port`` (what
        ``RpcClient.from_home`` reads)."""
        home = Path(home_dir)
        return cls(
            registry,
            host=host,
            port=port,
            cookie_path=home / COOKIE_FILE_NAME,
            port_path=home / PORT_FILE_NAME,
            config=config,
        )

    @property
    def port(self) -> int:
        """The bound port once ``run`` reported ready, else 0."""
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}/"

    def statistics(self) -> RpcStatistics:
        c = self._counters
        return RpcStatistics(
            http_requests=c.http_requests,
            calls=c.calls,
            call_failures=c.call_failures,
            rejected_busy=c.rejected_busy,
            websocket_connections=c.websocket_connections,
            subscriptions=c.subscriptions,
            notifications_queued=c.notifications_queued,
            subscribers_dropped=c.subscribers_dropped,
            events_published=c.events_published,
            events_dropped=c.events_dropped,
            body_timeouts=c.body_timeouts,
            calls_by_method=dict(c.calls_by_method),
        )

    def publish(self, topic: str, payload: Any) -> bool:
        """Send ``payload`` (JSON-serialisable) to every subscriber of ``topic``. Never blocks.

        Call from the trio thread. The payload is serialised here, so later changes to it are
        not seen. Returns False when nobody was listening, the server is not running, or the
        hand-over to the HTTP thread is backlogged (then the event is counted as dropped).
        """
        if not self.registry.has_topic(topic):
            raise UnknownTopic(f"topic {topic!r} is not registered")
        http = self._http
        if http is None or not http.has_subscribers(topic):
            return False
        if not http.publish_threadsafe(topic, dumps(payload)):
            self._counters.events_dropped += 1
            return False
        self._counters.events_published += 1
        return True

    async def run(self, *, task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        if self._started:
            raise RuntimeError("an RpcServer runs once; make a new one to serve again")
        self._started = True
        token = secrets.token_urlsafe(32)
        ready = trio.Event()
        reported: list[int | BaseException] = []
        trio_token = trio.lowlevel.current_trio_token()

        def report(value: int | BaseException) -> None:
            def on_trio(value: int | BaseException = value) -> None:
                if not reported:
                    reported.append(value)
                ready.set()

            try:
                trio_token.run_sync_soon(on_trio)
            except trio.RunFinishedError:
                return

        http = HttpSide(
            self.registry,
            self.config,
            host=self.host,
            port=self._requested_port,
            token=token,
            allowed_hosts=self._allowed_hosts,
            trio_token=trio_token,
            spawn=self._spawn,
            counters=self._counters,
        )
        thread = threading.Thread(
            target=http.thread_main, args=(report,), name="rpc-http", daemon=True
        )
        port_text: str | None = None
        startup_error: BaseException | None = None
        try:
            write_file_atomic(self._cookie_path, token, cookie_mode)
            async with trio.open_nursery() as nursery:
                self._calls = nursery
                thread.start()
                await ready.wait()
                if isinstance(reported[0], BaseException):
                    # Raised below, outside the nursery, so the caller sees a bare OSError
                    # rather than an exception group.
                    startup_error = reported[0]
                    nursery.cancel_scope.cancel()
                else:
                    self._port = reported[0]
                    self._http = http
                    if self._port_path is not None:
                        port_text = f"{self._port}\n"
                        write_file_atomic(self._port_path, port_text, port_file_mode)
                    log.info("rpc listening on %s", self.url)
                    task_status.started(self._port)
                    await trio.sleep_forever()
            if startup_error is not None:
                raise startup_error
        finally:
            self._calls = None
            self._http = None
            with trio.CancelScope(shield=True):
                http.request_stop()
                if thread.ident is None:
                    http.close_unstarted()
                else:
                    timeout_s = self.config.shutdown_timeout_s * 2 + thread_join_grace_s
                    await trio.to_thread.run_sync(thread.join, timeout_s)
                    if thread.is_alive():
                        log.error("rpc HTTP thread did not stop within %.1f s", timeout_s)
            remove_if_holds(self._cookie_path, token)
            if self._port_path is not None and port_text is not None:
                remove_if_holds(self._port_path, port_text)

    # -- the trio side of a call ------------------------------------------------------------

    def _spawn(self, deliver: Deliver, method: Method, kwargs: dict[str, Any]) -> None:
        """Run by ``run_sync_soon`` on the trio thread: start the handler, or refuse at once.

        It must not raise: an exception here would be a TrioInternalError.
        """
        nursery = self._calls
        if nursery is not None:
            try:
                nursery.start_soon(self._run_call, deliver, method, kwargs)
                return
            except RuntimeError:
                # "Nursery is closed to new arrivals": we are shutting down.
                pass
        deliver(Outcome.failure(SHUTTING_DOWN, "server is shutting down"))

    async def _run_call(self, deliver: Deliver, method: Method, kwargs: dict[str, Any]) -> None:
        assert method.handler is not None, method.name
        outcome = Outcome.failure(SHUTTING_DOWN, "server is shutting down")
        try:
            async with self._limiter:
                self._counters.calls += 1
                timeout_s = method.call_timeout_s or self.config.call_timeout_s
                with trio.move_on_after(timeout_s) as scope:
                    outcome = await self._invoke(method, kwargs)
                if scope.cancelled_caught:
                    outcome = Outcome.failure(
                        CALL_TIMEOUT, f"{method.name} timed out after {_seconds(timeout_s)} s"
                    )
            if outcome.result_json is None:
                self._counters.call_failures += 1
            result = "ok" if outcome.result_json is not None else str(outcome.code)
            self._counters.calls_by_method[method.name, result] += 1
        finally:
            deliver(outcome)

    async def _invoke(self, method: Method, kwargs: dict[str, Any]) -> Outcome:
        assert method.handler is not None, method.name
        try:
            result = await method.handler(**kwargs)
        except RpcError as exc:
            return _error_outcome(method.name, exc)
        except Exception:
            log.exception("rpc method %s failed", method.name)
            return Outcome.failure(INTERNAL_ERROR, "internal error")
        try:
            # Serialised here, on the trio side, while the handler's objects are consistent.
            return Outcome.success(dumps(result))
        except (TypeError, ValueError):
            log.exception("rpc method %s returned a result JSON cannot carry", method.name)
            return Outcome.failure(INTERNAL_ERROR, "internal error: result is not JSON")


def _error_outcome(name: str, exc: RpcError) -> Outcome:
    if isinstance(exc.code, bool) or not isinstance(exc.code, int):
        log.error("rpc method %s raised RpcError with a non-integer code %r", name, exc.code)
        return Outcome.failure(INTERNAL_ERROR, "internal error")
    data_json = None
    if exc.data is not None:
        try:
            data_json = dumps(exc.data)
        except (TypeError, ValueError):
            log.exception("rpc method %s raised RpcError with data JSON cannot carry", name)
    return Outcome.failure(exc.code, str(exc.message), data_json)


def _seconds(value: float) -> str:
    return str(int(value)) if math.isclose(value, round(value)) else f"{value:.3g}"
