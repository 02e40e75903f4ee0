"""Building and running the server: one process, or several sharing one port.

- :func:`create_server` builds a complete server (servicers, health, reflection, auth, TLS,
  limits) bound to ``settings.host:settings.port`` and returns it with the bound port, so tests
  run the real thing in-process on port 0.
- :func:`run_worker` runs one server process: it starts NOT_SERVING, loads the index, turns
  SERVING, reloads on SIGHUP and drains on SIGTERM/SIGINT.
- :func:`serve` runs ``settings.workers`` of those under a :class:`Supervisor`. Python threads
  cannot run the engine on two cores at once (the GIL), so scaling with cores means processes.
  As in grpc's ``examples/python/multiprocessing``, each worker binds the same port with
  ``SO_REUSEPORT`` and the kernel spreads incoming *connections* over them (so a single client
  connection is served by a single worker; clients that want both cores open several).
  The supervisor claims the port first, so that only its own workers can share it: a second
  service on a taken port fails at start-up (:class:`PortClaim`).
  Workers are spawned (not forked) because gRPC must not be forked once initialised.
- With ``health_port`` set, each server also listens there, in plaintext, for the health
  service's ``Check`` alone (:func:`_health_only_server`): probes that cannot speak TLS
  (Kubernetes' gRPC probes) then ask the same health status as the service port's, which
  may require TLS or mutual TLS. The supervisor claims that port too.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import SecretStr

from conceptsvc._proto.conceptsvc.v1 import conceptsvc_pb2_grpc as pb_grpc
from conceptsvc.cache import build_cache
from conceptsvc.errors import ConceptsvcError, ConfigError
from conceptsvc.metrics import (
    ServiceMetrics,
    mark_process_dead,
    multiprocess_registry,
    start_metrics_http_server,
)
from conceptsvc.server.admission import AdmissionInterceptor
from conceptsvc.server.auth import AuthInterceptor
from conceptsvc.server.pool import RpcThreadPool
from conceptsvc.server.servicer import (
    ADMIN_SERVICE_NAME,
    SERVICE_NAME,
    AdminServicer,
    ConceptServicer,
    ReloadOutcome,
    ServiceState,
    add_concept_service,
)

if TYPE_CHECKING:
    from conceptsvc.config import Settings
    from conceptsvc.extractor import Extractor

__all__ = ["ConceptServer", "PortClaim", "Supervisor", "create_server", "run_worker", "serve"]

log = logging.getLogger(__name__)

#: A draining server stops gRPC once no call has entered a handler for this long (see drain).
DRAIN_QUIET_SECONDS = 0.25

ReadyCallback = Callable[[int], None]

#: Threads of the health port's server, and the calls it takes at once (more are refused
#: with RESOURCE_EXHAUSTED): probes are a few unary calls a second, and a flood on that
#: plaintext port must not hold more than this.
HEALTH_PORT_THREADS = 2
HEALTH_PORT_MAX_CALLS = 16


def resolve_index_path(settings: Settings) -> Path:
    """The configured index, or the embedded demo dictionary (built on first use)."""
    if settings.index is not None:
        return settings.index
    from conceptsvc.embedded import demo_index_path

    return demo_index_path()


def _health_only_server(
    servicer: health.HealthServicer, reuse_port: bool
) -> tuple[grpc.Server, RpcThreadPool]:
    """A gRPC server that answers ``grpc.health.v1.Health/Check`` from ``servicer`` (the
    service port's, so both report the same status) and nothing else: every other method,
    ``Watch`` included (a stream would hold one of its few threads), is UNIMPLEMENTED, which
    the health protocol allows. No interceptor: like the service port's health service it
    needs no token."""
    pool = RpcThreadPool(HEALTH_PORT_THREADS, thread_name_prefix="health")
    server = grpc.server(
        pool,
        options=[("grpc.so_reuseport", 1 if reuse_port else 0)],
        maximum_concurrent_rpcs=HEALTH_PORT_MAX_CALLS,
    )
    check = grpc.unary_unary_rpc_method_handler(
        servicer.Check,
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(health.SERVICE_NAME, {"Check": check}),)
    )
    return server, pool


def _listen(add_port: Callable[[str], int], address: str, what: str = "") -> int:
    """Bind ``address`` with ``add_port`` (a server's add_*_port); the bound port, or
    ConfigError naming the address (and ``what`` it is for)."""
    try:
        port = add_port(address)
    except RuntimeError as exc:
        raise ConfigError(
            f"cannot listen on {address}{what} ({exc}); is the port in use or the host wrong?"
        ) from None
    if port == 0:
        raise ConfigError(f"cannot listen on {address}{what}; is the port in use?")
    return port


def _server_credentials(settings: Settings) -> grpc.ServerCredentials:
    if settings.tls_cert is None or settings.tls_key is None:
        raise ConfigError("TLS needs both tls_cert and tls_key")
    try:
        key = settings.tls_key.read_bytes()
        cert = settings.tls_cert.read_bytes()
        ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    except OSError as exc:
        raise ConfigError(f"cannot read TLS files: {exc}") from None
    _check_tls_files(settings)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def _check_tls_files(settings: Settings) -> None:
    """ConfigError naming the file when the certificate and key are not a PEM pair, or the
    client CA is not PEM certificates: gRPC would only fail to bind the port, and the message
    would blame the port."""
    assert settings.tls_cert is not None and settings.tls_key is not None  # (the caller's check)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # an encrypted key gets an empty password and fails here: gRPC cannot use one either
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls_cert {settings.tls_cert} and tls_key {settings.tls_key} are not a PEM "
            f"certificate (chain) and its unencrypted private key ({exc.reason or exc}); "
            "check that the key is the certificate's and that neither is swapped"
        ) from None
    if settings.tls_client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=settings.tls_client_ca)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"tls_client_ca {settings.tls_client_ca} is not a PEM CA certificate "
                f"({exc.reason or exc})"
            ) from None


class ConceptServer:
    """A built server: the gRPC server plus the state its RPCs share.

    Lifecycle: :meth:`start` (NOT_SERVING until an index is loaded) → :meth:`reload` (SERVING)
    → :meth:`drain` (NOT_SERVING, new RPCs refused, in-flight ones finish within the grace).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        extractor: Extractor | None = None,
        reuse_port: bool = False,
        metrics: ServiceMetrics | None = None,
        on_admin_reload: Callable[[ReloadOutcome], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else ServiceMetrics()
        self.cache = build_cache(settings, self.metrics)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        if extractor is not None:
            fixed = extractor.index.path
            index_path: Callable[[], Path] = lambda: fixed  # noqa: E731
        else:
            index_path = lambda: resolve_index_path(settings)  # noqa: E731
        self.state = ServiceState(settings, self.metrics, self.health, index_path)
        self._on_admin_reload = on_admin_reload
        self._stopped = threading.Event()

        interceptor = AuthInterceptor(
            token=settings.auth_token.get_secret_value() if settings.auth_token else None,
            admin_token=settings.admin_token.get_secret_value() if settings.admin_token else None,
            admin_prefix=f"/{ADMIN_SERVICE_NAME}/",
            on_reject=lambda method, code: self.metrics.observe_rpc(
                method.rsplit("/", 1)[-1], code.name, 0.0
            ),
        )
        # Outermost, so that calls the auth interceptor refuses are counted while they run too.
        self.admission = AdmissionInterceptor(
            settings.rpc_limit,
            on_refuse=lambda method, code: self.metrics.observe_rpc(
                method.rsplit("/", 1)[-1], code.name, 0.0
            ),
            is_draining=lambda: self.state.draining,
        )
        # Not futures.ThreadPoolExecutor: its idle threads wake each other on every call
        # (see conceptsvc.server.pool).
        self.pool = RpcThreadPool(settings.threads, thread_name_prefix="rpc")
        options: list[tuple[str, int]] = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
        if settings.max_connection_age_seconds > 0:
            # gRPC sends GOAWAY at the age (±10 %); the client's next call opens a connection
            # after resolving the name again, and calls in progress get the grace to finish
            options += [
                ("grpc.max_connection_age_ms",
                 max(1, round(settings.max_connection_age_seconds * 1000))),
                ("grpc.max_connection_age_grace_ms",
                 round(settings.max_connection_age_grace_seconds * 1000)),
            ]
        self.grpc_server = grpc.server(
            self.pool,
            interceptors=[self.admission, interceptor],
            options=options,
            # gRPC's own limit, checked before a call is queued for a thread: with no more calls
            # than threads nothing ever waits in the pool's queue. Admission refuses earlier;
            # this only sheds a flood of health checks and refusals beyond the reserve.
            maximum_concurrent_rpcs=settings.threads,
        )
        add_concept_service(
            ConceptServicer(self.state, self.cache if self.cache.enabled else None),
            self.grpc_server,
        )
        pb_grpc.add_AdminServiceServicer_to_server(  # type: ignore[no-untyped-call]
            AdminServicer(self.state, self._admin_reload), self.grpc_server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                self.grpc_server,
            )
        address = f"{settings.host}:{settings.port}"
        if settings.tls:
            credentials = _server_credentials(settings)
            self.port = _listen(
                lambda a: self.grpc_server.add_secure_port(a, credentials), address
            )
        else:
            self.port = _listen(self.grpc_server.add_insecure_port, address)
        self.health_port: int | None = None
        self._health_server: grpc.Server | None = None
        self._health_pool: RpcThreadPool | None = None
        if settings.health_port is not None:
            self._health_server, self._health_pool = _health_only_server(self.health, reuse_port)
            try:
                self.health_port = _listen(
                    self._health_server.add_insecure_port,
                    f"{settings.host}:{settings.health_port}",
                    " (health_port)",
                )
            except ConfigError:
                self._health_pool.shutdown(wait=False)
                self.grpc_server.start()  # (an unstarted server keeps its port bound)
                self.grpc_server.stop(None).wait()  # frees the service port it has bound
                self.pool.shutdown(wait=False)
                raise
        if extractor is not None:
            self.state.install(extractor)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, *, load: bool = True) -> None:
        """Start accepting RPCs; with ``load``, load the index now (blocking) if none is."""
        self.grpc_server.start()
        if self._health_server is not None:
            self._health_server.start()
        if load and self.state.current is None:
            self.reload()

    def reload(self) -> ReloadOutcome:
        """Load the configured index and swap it in (raises and keeps the old one on error)."""
        return self.state.reload()

    def _admin_reload(self) -> ReloadOutcome:
        outcome = self.state.reload()
        if outcome.changed and self._on_admin_reload is not None:
            self._on_admin_reload(outcome)
        return outcome

    def drain(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, then (after the drain delay, during which RPCs are
        still answered as usual while load balancers and clients notice the NOT_SERVING and
        the endpoint's removal) refuse new RPCs and let in-flight ones finish.

        The gRPC server keeps accepting calls until the in-flight ones have finished and no
        new one has come for :data:`DRAIN_QUIET_SECONDS` (or the grace is over): a new call
        meanwhile is answered by its handler, UNAVAILABLE "shutting down", which clients retry
        elsewhere. gRPC's own shutdown cancels a call that has arrived but has no handler
        yet (the client sees CANCELLED, which only a client that knows it did not cancel can
        resend: ``ConceptClient`` and ``conceptsvc annotate`` do, a generic gRPC client does
        not), so the server is stopped when calls have stopped coming, not at the signal
        (where clients and load balancers that have not seen NOT_SERVING yet still send)."""
        if self._stopped.is_set():
            return
        grace = self.settings.grace_seconds if grace is None else grace
        delay = self.settings.drain_delay_seconds
        if delay:
            log.info("draining: NOT_SERVING now; RPCs answered for %.1fs more (drain delay)",
                     delay)
            self.state.start_draining(refuse=False)
            time.sleep(delay)
        log.info("draining: new RPCs refused now, in-flight ones have %.1fs to finish", grace)
        self.state.start_draining()
        deadline = time.monotonic() + grace
        if not self.state.wait_idle(grace, quiet=DRAIN_QUIET_SECONDS):
            log.warning("draining: RPCs still running or arriving after the %.1fs grace", grace)
        self.stop(max(0.0, deadline - time.monotonic()))
        log.info("stopped")

    def stop(self, grace: float | None = 0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.state.draining = True
        self.grpc_server.stop(grace).wait()
        # Idle threads end now; a handler that outlived the grace ends with its call.
        self.pool.shutdown(wait=False)
        # The health port answered NOT_SERVING throughout the drain; it goes last.
        if self._health_server is not None and self._health_pool is not None:
            self._health_server.stop(0).wait()
            self._health_pool.shutdown(wait=False)
        self.cache.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self.grpc_server.wait_for_termination(timeout))


def create_server(
    settings: Settings,
    *,
    extractor: Extractor | None = None,
    reuse_port: bool = False,
    metrics: ServiceMetrics | None = None,
    on_admin_reload: Callable[[ReloadOutcome], None] | None = None,
) -> tuple[ConceptServer, int]:
    """Build the server and bind its port (``settings.port`` 0 picks a free one).

    With ``extractor`` the server serves it (and reloads re-read that extractor's index path);
    otherwise :meth:`ConceptServer.start` loads the configured index. Not started yet.
    """
    server = ConceptServer(
        settings,
        extractor=extractor,
        reuse_port=reuse_port,
        metrics=metrics,
        on_admin_reload=on_admin_reload,
    )
    return server, server.port


# -- one process ------------------------------------------------------------------------
def run_worker(
    settings: Settings,
    *,
    reuse_port: bool = False,
    on_ready: ReadyCallback | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
    serve_metrics: bool = True,
) -> int:
    """Run one server process until SIGTERM/SIGINT; returns the exit status.

    ``report`` sends lifecycle events to a supervisor (``ready``, ``failed``, ``reloaded``).
    """
    metrics = ServiceMetrics()
    if serve_metrics and settings.metrics_port is not None:
        _, _, mport = start_metrics_http_server(
            settings.metrics_port, settings.metrics_host, metrics.registry
        )
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, mport)

    def admin_reloaded(outcome: ReloadOutcome) -> None:
        if report is not None:
            report({"event": "reloaded", "content_hash": outcome.content_hash})

    server, port = create_server(
        settings, reuse_port=reuse_port, metrics=metrics, on_admin_reload=admin_reloaded
    )
    control: queue.SimpleQueue[str] = queue.SimpleQueue()
    previous = _install_signals(control)
    parent = os.getppid()
    try:
        server.start(load=False)
        try:
            outcome = server.reload()
        except ConceptsvcError as exc:
            log.error("cannot load the index: %s", exc)
            if report is not None:
                report({"event": "failed", "error": str(exc)})
            server.stop(0)
            return 2
        log.info(
            "serving %s on %s:%d: index %s, content hash %s, %d concepts",
            SERVICE_NAME, settings.host, port, server.state.index_path(),
            outcome.content_hash, outcome.concepts,
        )
        if server.health_port is not None:
            log.info("health checks (plaintext, Check only) on %s:%d",
                     settings.host, server.health_port)
        redis_ok = server.cache.redis.probe() if server.cache.redis is not None else None
        log.info("security and cache: %s", _posture(settings, redis_ok))
        plaintext = _plaintext_token_warning(settings)
        if plaintext is not None:
            log.warning("%s", plaintext)
        if report is not None:
            report({"event": "ready", "port": port, "content_hash": outcome.content_hash})
        if on_ready is not None:
            on_ready(port)
        while True:
            try:
                command = control.get(timeout=1.0)
            except queue.Empty:
                if report is not None and os.getppid() != parent:
                    log.error("supervisor is gone; draining")
                    command = "drain"
                else:
                    continue
            if command == "reload":
                try:
                    reloaded = server.reload()
                    if report is not None:  # what this worker serves now (not "reloaded":
                        # that one asks the supervisor to reload the others)
                        report({"event": "serving", "content_hash": reloaded.content_hash})
                except ConceptsvcError as exc:
                    log.error("reload failed, still serving the previous index: %s", exc)
                except Exception:  # a bug must not take a serving process down
                    log.exception("reload failed, still serving the previous index")
            elif command == "drain":
                server.drain()
                return 0
    finally:
        _restore_signals(previous)
        server.stop(0)


def _posture(settings: Settings, redis_ok: bool | None = None) -> str:
    """What an operator checks first, in one line and without secrets: token auth, the admin
    RPC, TLS and the cache tiers (the Redis URL's host and port only: it may hold a
    password; ``redis_ok``: whether it answered a PING at start-up)."""
    tls = "off"
    if settings.tls_cert is not None:
        tls = "mutual" if settings.tls_client_ca is not None else "on"
    redis = "off"
    if settings.redis_url:
        from redis.connection import parse_url

        where = parse_url(settings.redis_url)  # type: ignore[no-untyped-call]
        redis = where.get("path") or f"{where.get('host', '?')}:{where.get('port', 6379)}"
        if redis_ok is not None:
            redis += " (answering)" if redis_ok else (
                " (not answering: served without it, retried with backoff)")
    return (
        f"token auth {'on' if settings.auth_token else 'off'}, admin RPC "
        f"{'on' if settings.admin_token else 'off'}, TLS {tls}; in-process cache "
        f"{settings.cache_size:,} entries, Redis {redis}"
    )


def _plaintext_token_warning(settings: Settings) -> str | None:
    """What to say at start-up when tokens would cross a network in plaintext: token auth (or
    the admin token) on, no TLS, and an address other than loopback (a name counts as other:
    it may resolve anywhere). None when that is not so."""
    if settings.tls or not (settings.auth_token or settings.admin_token):
        return None
    host = settings.host.strip("[]")
    if host.lower() == "localhost":
        return None
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(host)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
        if address.is_loopback:
            return None
    return (
        f"token auth is on without TLS on {settings.host}:{settings.port}: bearer tokens and "
        "captions cross the network in plaintext, where anyone on the path can read the "
        "tokens and call the service with them. Set tls_cert and tls_key "
        "(CONCEPTSVC_TLS_CERT, CONCEPTSVC_TLS_KEY), or listen on 127.0.0.1 behind a proxy "
        "that speaks TLS"
    )


def _install_signals(control: queue.SimpleQueue[str]) -> dict[int, Any]:
    """SIGHUP → reload, SIGTERM/SIGINT → drain; handlers only enqueue (they run in the main
    thread between bytecodes, so the work happens in the control loop)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, _frame: FrameType | None) -> None:
        control.put("reload" if signum == signal.SIGHUP else "drain")

    previous: dict[int, Any] = {}
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)


# -- several processes ------------------------------------------------------------------
def _settings_payload(settings: Settings) -> str:
    """Settings as JSON for a worker (secrets included: the worker needs them; every secret
    field, so that a new one cannot reach the workers as the dump's '**********')."""
    data = settings.model_dump(mode="json")
    for name, value in settings:
        if isinstance(value, SecretStr):
            data[name] = value.get_secret_value()
    data["config_file"] = None  # already merged in
    return json.dumps(data)


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, worker (a supervisor's
    worker number; absent in a single process), message, and the traceback if any. gRPC's
    own C-core lines go to stderr beside them, as text: they do not pass through logging."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        if self.worker is not None:
            out["worker"] = self.worker
        out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def use_log_format(fmt: str, worker: int | None = None) -> None:
    """Switch the root logger's handlers to ``fmt`` ("json"; "text" leaves them)."""
    if fmt == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter(worker))


def _worker_main(payload: str, port: int, conn: Any, index: int, log_level: int) -> None:
    """Entry point of a spawned worker process."""
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s",
    )
    from conceptsvc.config import worker_settings

    settings = worker_settings({**json.loads(payload), "port": port})
    use_log_format(settings.log_format, index)

    def report(event: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            conn.send_bytes(json.dumps(event).encode("utf-8"))

    code = run_worker(settings, reuse_port=True, report=report, serve_metrics=False)
    raise SystemExit(code)


class PortClaim:
    """The port of one multi-worker service, held by its supervisor for the service's life.

    Workers share the port with ``SO_REUSEPORT``, and Linux lets any socket of the same user
    join such a group: a second ``serve --workers N`` on a taken port used to start its workers
    beside the first one's, and the kernel spread connections over both dictionaries (issue
    18). Only the workers of one supervisor may share the port, so claiming it takes, in order:

    * on Linux, an abstract Unix socket named after host:port, which one process at a time can
      bind, so that of two supervisors started in the same instant one goes on (without it,
      both could pass the probe before either bound its guard — or each fail on the other's).
      The kernel releases it when the supervisor dies, however it dies;
    * a probe bound *without* ``SO_REUSEPORT`` and closed at once. It fails with EADDRINUSE
      when anything holds the port: another service's listener, or another supervisor's guard.
      ``SO_REUSEADDR`` on it keeps connections of an earlier run, still in TIME_WAIT, from
      counting as a service;
    * the guard, bound with ``SO_REUSEPORT`` and never listening: the workers join it, and a
      later supervisor's probe fails on it even while every worker is being restarted. It must
      not set ``SO_REUSEADDR``: two sockets that both have it may share a port that neither
      listens on, and the probe would pass.

    Port 0 is resolved once, first (a free port, by the kernel), and the workers get the result.
    """

    def __init__(self, host: str, port: int, *, setting: str = "port") -> None:
        bare = host.strip("[]")
        family = socket.AF_INET6 if ":" in bare else socket.AF_INET
        self._held: list[socket.socket] = []
        if port == 0:
            port = self._probe(family, bare, host, 0, setting)
        self.port = port
        try:
            if sys.platform == "linux":
                lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._held.append(lock)
                _bind(lock, f"\0conceptsvc-port:{bare}:{port}", host, port, setting)
            self._probe(family, bare, host, port, setting)
            guard = socket.socket(family, socket.SOCK_STREAM)
            self._held.append(guard)
            guard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            _bind(guard, (bare, port), host, port, setting)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _probe(
        family: socket.AddressFamily, bare: str, host: str, port: int, setting: str
    ) -> int:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _bind(probe, (bare, port), host, port, setting)
            return int(probe.getsockname()[1])

    def close(self) -> None:
        for sock in self._held:
            sock.close()
        self._held.clear()


def _bind(sock: socket.socket, address: Any, host: str, port: int, setting: str) -> None:
    try:
        sock.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"cannot listen on {host}:{port}: port {port} is already in use by another "
                "service (workers share a port only with their own supervisor); stop that "
                f"service or choose another --{setting.replace('_', '-')}"
            ) from None
        raise ConfigError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None


class Supervisor:
    """Starts ``settings.workers`` worker processes on one port and looks after them.

    Forwards SIGHUP (reload) and SIGTERM/SIGINT (drain) to every worker; after one worker
    reloads through the admin RPC, tells the others to reload too; restarts a worker that dies
    (at most ``max_restarts`` per minute); serves the aggregated metrics.
    """

    def __init__(
        self, settings: Settings, *, on_ready: ReadyCallback | None = None, max_restarts: int = 5
    ) -> None:
        self.settings = settings
        self.on_ready = on_ready
        self.max_restarts = max_restarts
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: dict[int, Any] = {}
        self._conns: dict[int, Any] = {}
        self._restarts: list[float] = []
        self._hashes: dict[int, str] = {}  # the index each worker last said it serves
        self._log_level = logging.getLogger().getEffectiveLevel()

    def _spawn(self, i: int, payload: str, port: int) -> None:
        old = self._conns.pop(i, None)
        if old is not None:
            old.close()
        parent_conn, child_conn = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(payload, port, child_conn, i, self._log_level),
            name=f"conceptsvc-worker-{i}",
        )
        proc.start()
        child_conn.close()
        self._procs[i] = proc
        self._conns[i] = parent_conn

    def _signal_all(self, sig: int, *, except_worker: int | None = None) -> None:
        for i, proc in self._procs.items():
            if i != except_worker and proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def _read_events(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        by_conn = {c: i for i, c in self._conns.items()}
        if not by_conn:
            time.sleep(timeout)  # wait() on nothing would return at once: no busy loop
            return []
        events = []
        for ready in multiprocessing.connection.wait(list(by_conn), timeout=timeout):
            i = by_conn[ready]
            conn = self._conns[i]
            try:
                events.append((i, json.loads(conn.recv_bytes())))
            except (EOFError, OSError):
                self._conns.pop(i, None)
                conn.close()
        return events

    def run(self) -> int:
        s = self.settings
        if s.index is None:
            # Build the demo index once here, not concurrently in every worker.
            s = s.model_copy(update={"index": resolve_index_path(s)})
        # Everything run holds is released in reverse order however it ends, a start that
        # fails half-way included (the metrics port taken after the service port was claimed).
        with contextlib.ExitStack() as held:
            claim = PortClaim(s.host, s.port)
            held.callback(claim.close)
            port = claim.port
            if s.health_port is not None:
                health_claim = PortClaim(s.host, s.health_port, setting="health_port")
                held.callback(health_claim.close)
                s = s.model_copy(update={"health_port": health_claim.port})
            if s.metrics_port is not None:
                metrics_dir = held.enter_context(
                    tempfile.TemporaryDirectory(prefix="conceptsvc-metrics-")
                )
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
                held.callback(os.environ.pop, "PROMETHEUS_MULTIPROC_DIR", None)
                _, _, mport = start_metrics_http_server(
                    s.metrics_port, s.metrics_host, multiprocess_registry()
                )
                log.info("metrics of all workers on http://%s:%d/metrics", s.metrics_host,
                         mport)
            payload = _settings_payload(s)
            control: queue.SimpleQueue[str] = queue.SimpleQueue()
            held.callback(_restore_signals, _install_signals(control))
            for i in range(s.workers):
                self._spawn(i, payload, port)
            if not self._wait_ready(s.workers):
                self._shutdown(grace=0)
                return 2
            log.info("%d workers serving on %s:%d", s.workers, s.host, port)
            if self.on_ready is not None:
                self.on_ready(port)
            return self._loop(control, payload, port)

    def _wait_ready(self, n: int) -> bool:
        ready: set[int] = set()
        deadline = time.monotonic() + 600
        while len(ready) < n and time.monotonic() < deadline:
            for i, event in self._read_events(0.5):
                if event.get("event") == "ready":
                    ready.add(i)
                    self._hashes[i] = str(event.get("content_hash", ""))
                elif event.get("event") == "failed":
                    log.error("worker %d could not start: %s", i, event.get("error"))
                    return False
            for i, proc in self._procs.items():
                if i not in ready and proc.exitcode is not None:
                    log.error("worker %d exited with %s while starting", i, proc.exitcode)
                    return False
        return len(ready) == n

    def _loop(self, control: queue.SimpleQueue[str], payload: str, port: int) -> int:
        while True:
            with contextlib.suppress(queue.Empty):
                command = control.get_nowait()
                if command == "reload":
                    log.info("SIGHUP: telling every worker to reload the index")
                    self._signal_all(signal.SIGHUP)
                else:
                    self._shutdown(grace=self.settings.grace_seconds)
                    return 0
            for i, event in self._read_events(0.2):
                kind = event.get("event")
                if kind in ("reloaded", "serving", "ready"):
                    self._hashes[i] = str(event.get("content_hash", ""))
                if kind == "reloaded":
                    log.info("worker %d reloaded through the admin RPC; reloading the others", i)
                    self._signal_all(signal.SIGHUP, except_worker=i)
                elif kind == "ready":  # a restarted worker: it loaded the index on disk now
                    others = {h for j, h in self._hashes.items() if j != i}
                    if others and others != {self._hashes[i]}:
                        log.warning(
                            "worker %d restarted on index %s while the others serve %s (the "
                            "index changed on disk without a reload); reloading the others so "
                            "that every worker serves one index", i, self._hashes[i],
                            ", ".join(sorted(others)),
                        )
                        self._signal_all(signal.SIGHUP, except_worker=i)
            for i, proc in list(self._procs.items()):
                if proc.exitcode is None:
                    continue
                mark_process_dead(proc.pid)
                now = time.monotonic()
                self._restarts = [t for t in self._restarts if now - t < 60] + [now]
                if len(self._restarts) > self.max_restarts:
                    log.error("workers keep dying (%d restarts in a minute); stopping",
                              len(self._restarts))
                    self._shutdown(grace=self.settings.grace_seconds)
                    return 1
                log.error("worker %d exited with %s; restarting it", i, proc.exitcode)
                self._spawn(i, payload, port)

    def _shutdown(self, grace: float) -> None:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace + self.settings.drain_delay_seconds + 10
        for proc in self._procs.values():
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                log.error("worker pid %s did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join(timeout=5)
            if proc.pid is not None:
                mark_process_dead(proc.pid)


def serve(settings: Settings, *, on_ready: ReadyCallback | None = None) -> int:
    """Run the service as configured (``conceptsvc serve``); returns the exit status."""
    if settings.workers <= 1:
        return run_worker(settings, on_ready=on_ready)
    return Supervisor(settings, on_ready=on_ready).run()
