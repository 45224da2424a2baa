"""A fault-injecting HTTP proxy for loopback reliability tests.

It sits in front of a real server (the COG asset server or the STAC API) and forwards requests
(GET, HEAD, POST; Range headers included), except that a configurable fraction of them meets a
fault instead:

========== ==================================================================================
kind       what the client sees
========== ==================================================================================
``500``    ``500 Internal Server Error``
``503``    ``503 Service Unavailable``
``429``    ``429 Too Many Requests`` with ``Retry-After`` (seconds, configurable)
``timeout`` nothing for ``timeout_s`` seconds, then the connection closes
``reset``  the connection is reset (RST) before any byte of a response
``truncate`` a normal status line and headers, then only part of the body, then close
========== ==================================================================================

Faults are drawn from a seeded generator, so a run is repeatable for a given request order.
``latency_s`` delays every request (a slow storage account, to make a run outlive its tokens;
object storage's round trip); ``stats["max_waiting"]`` is the most requests that waited at once.
Optionally the proxy also plays a signing service's storage account: with ``token_ttl_s`` set,
every request must carry ``?se=<unix expiry>&sig=...`` issued by :meth:`FaultProxy.sign`, and an
expired or missing token gets ``403 AuthenticationFailed``, as Azure Blob Storage answers a stale
Planetary Computer SAS token.

Counters (faults by kind, requests, 403s) are served as JSON at ``/__faults__`` and available as
:attr:`FaultProxy.stats`. Use it as a context manager::

    with FaultProxy(upstream="http://127.0.0.1:8001", rate=0.2, seed=1) as proxy:
        url = proxy.url + "/assets/..."

Tokens in other processes (e.g. the Dask workers of a build): :meth:`FaultProxy.env` gives the
environment variables (:data:`SECRET_ENV`, :data:`TTL_ENV`) with which :func:`sign_from_env`
mints tokens this proxy accepts; set them before the workers start and build with
``signer="pipeline.faults:sign_from_env"``. Like planetary-computer's SAS token cache,
:func:`sign_from_env` reuses a token until it is about to expire (:data:`MARGIN_ENV`, default 0 s:
until it has expired), so a long run meets expired tokens; ``sign_from_env.cache_clear()`` drops
it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import os
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULT_KINDS = ("500", "503", "429", "timeout", "reset", "truncate")

#: environment variables read by :func:`sign_from_env` (see :meth:`FaultProxy.env`)
SECRET_ENV = "SSL4EO_FAULTS_SECRET"
TTL_ENV = "SSL4EO_FAULTS_TOKEN_TTL_S"
MARGIN_ENV = "SSL4EO_FAULTS_TOKEN_MARGIN_S"


def _token_sig(secret: bytes, expiry: int) -> str:
    return hmac.new(secret, str(expiry).encode(), hashlib.sha256).hexdigest()[:16]


def _with_token(href: str, expiry: int, sig: str) -> str:
    parts = urllib.parse.urlsplit(href)
    query = [
        (k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if k not in ("se", "sig")
    ]
    query += [("se", str(expiry)), ("sig", sig)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


_token_cache: dict[tuple[bytes, float], int] = {}
_token_lock = threading.Lock()


def sign_from_env(href: str) -> str:
    """Sign ``href`` as :meth:`FaultProxy.sign` does, with the secret and token lifetime taken
    from the environment (:data:`SECRET_ENV` hex, :data:`TTL_ENV` seconds), for processes that
    have no proxy object (the Dask workers of a build: ``--signer
    pipeline.faults:sign_from_env``). The token is cached and reused until less than
    :data:`MARGIN_ENV` seconds (default 0) of it remain, as planetary-computer does with SAS
    tokens (a negative margin keeps handing it out after it expired: a cache that believes a
    refused token valid); :func:`clear_token_cache` (also ``sign_from_env.cache_clear``) drops
    it."""
    try:
        secret = bytes.fromhex(os.environ[SECRET_ENV])
        ttl = float(os.environ[TTL_ENV])
    except (KeyError, ValueError) as exc:
        raise RuntimeError(
            f"sign_from_env needs {SECRET_ENV} (hex) and {TTL_ENV} (seconds) in the environment; "
            "set them from FaultProxy.env() before the workers start"
        ) from exc
    margin = float(os.environ.get(MARGIN_ENV, "0"))
    now = time.time()
    with _token_lock:
        expiry = _token_cache.get((secret, ttl))
        if expiry is None or expiry - now <= margin:
            expiry = int(now + ttl)
            _token_cache[(secret, ttl)] = expiry
    return _with_token(href, expiry, _token_sig(secret, expiry))


def clear_token_cache() -> None:
    """Forget the tokens :func:`sign_from_env` cached (the next call mints a fresh one)."""
    with _token_lock:
        _token_cache.clear()


sign_from_env.cache_clear = clear_token_cache  # type: ignore[attr-defined]

_HOP_HEADERS = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade",
}


@dataclass
class FaultPlan:
    """Which faults to inject and how often."""

    rate: float = 0.0  # probability that one request meets a fault
    kinds: tuple[str, ...] = FAULT_KINDS
    weights: tuple[float, ...] | None = None  # relative weight per kind (default equal)
    retry_after_s: int = 1
    timeout_s: float = 5.0
    seed: int = 0
    #: only requests whose path starts with one of these prefixes can meet a fault
    path_prefixes: tuple[str, ...] = ("/",)
    #: fail every request for these paths, always (a fault that does not clear)
    always_fail: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {FAULT_KINDS}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"fault rate must be within [0, 1], got {self.rate}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # no 40 ms delayed-ACK stall between headers and body
    server: _ProxyServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet by default
        pass

    # ---------------------------------------------------------------------------------- verbs
    def do_GET(self) -> None:  # noqa: N802
        self._handle()

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle()

    def do_POST(self) -> None:  # noqa: N802
        self._handle()

    # --------------------------------------------------------------------------------- faults
    def _handle(self) -> None:
        proxy = self.server.proxy
        parsed = urllib.parse.urlsplit(self.path)
        if parsed.path == "/__faults__":
            self._send_json(200, proxy.stats)
            return
        body = b""
        if self.command == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
        proxy._count("requests")
        if proxy.latency_s:
            with proxy._waiting():
                time.sleep(proxy.latency_s)
        if proxy.token_ttl_s is not None and not proxy._token_ok(parsed):
            proxy._count("403")
            self._send_text(403, "AuthenticationFailed: Signature not valid in the specified time frame")
            return
        kind = proxy._draw(parsed.path)
        if kind is not None:
            proxy._count(f"fault:{kind}")
            if self._inject(kind):
                return
        self._forward(parsed, body, truncate=(kind == "truncate"))

    def _inject(self, kind: str) -> bool:
        """Apply a fault; True if the request is finished, False if it continues (truncate)."""
        plan = self.server.proxy.plan
        if kind in ("500", "503"):
            self._send_text(int(kind), f"injected {kind}")
            return True
        if kind == "429":
            self._send_text(429, "injected 429", {"Retry-After": str(plan.retry_after_s)})
            return True
        if kind == "timeout":
            time.sleep(plan.timeout_s)
            self.close_connection = True
            return True
        if kind == "reset":
            # SO_LINGER (on, 0) turns close() into an RST
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return True
        return False  # truncate: forwarded, body cut short

    # ------------------------------------------------------------------------------- forward
    def _forward(self, parsed: urllib.parse.SplitResult, body: bytes, truncate: bool) -> None:
        proxy = self.server.proxy
        query = urllib.parse.parse_qsl(parsed.query, keep_blank_values=True)
        if proxy.token_ttl_s is not None:  # the upstream knows nothing about our tokens
            query = [(k, v) for k, v in query if k not in ("se", "sig")]
        target = parsed.path + ("?" + urllib.parse.urlencode(query) if query else "")
        # Host is kept as the client sent it (like a reverse proxy), so that the links a STAC
        # API builds from it point back at the proxy, not around it
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            conn.request(self.command, target, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            self._send_text(502, f"upstream error: {exc}")
            return
        finally:
            conn.close()
        self.send_response(resp.status, resp.reason)
        for key, value in resp.getheaders():
            if key.lower() in _HOP_HEADERS or key.lower() in ("content-length", "server", "date"):
                continue
            self.send_header(key, value)
        # a HEAD answer has no body: its Content-Length is the upstream's (the file's size)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length if length is not None else str(len(data)))
        if truncate:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if truncate and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data)

    # -------------------------------------------------------------------------------- helpers
    def _send_text(self, status: int, text: str, extra: dict[str, str] | None = None) -> None:
        payload = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _send_json(self, status: int, obj: object) -> None:
        payload = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # a build's burst of new connections (see AssetServer): socketserver's backlog of 5 drops
    # the handshakes beyond it, a second or more each, which is not what latency means
    request_queue_size = 1024
    proxy: FaultProxy


class FaultProxy:
    """A loopback HTTP proxy that injects faults into a configurable share of requests."""

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.0,
        kinds: tuple[str, ...] = FAULT_KINDS,
        seed: int = 0,
        retry_after_s: int = 1,
        timeout_s: float = 5.0,
        path_prefixes: tuple[str, ...] = ("/",),
        token_ttl_s: float | None = None,
        secret: bytes | str | None = None,
        latency_s: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        up = urllib.parse.urlsplit(upstream)
        if up.scheme != "http" or not up.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream_host = up.hostname
        self.upstream_port = up.port or 80
        self.plan = FaultPlan(
            rate=rate, kinds=kinds, seed=seed, retry_after_s=retry_after_s,
            timeout_s=timeout_s, path_prefixes=path_prefixes,
        )
        self.token_ttl_s = token_ttl_s
        self.latency_s = float(latency_s)
        if isinstance(secret, str):
            secret = bytes.fromhex(secret)
        self._secret = secret if secret is not None else random.Random(seed).randbytes(16)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._waiting_now = 0
        self._server = _ProxyServer((host, port), _Handler)
        self._server.proxy = self
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------------------------- control
    def set_rate(self, rate: float) -> None:
        """Change the fault rate while running (e.g. 0 once 'the fault clears')."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate must be within [0, 1], got {rate}")
        with self._lock:
            self.plan.rate = rate

    def fail_always(self, *paths: str) -> None:
        """Make every request for these paths fail with a 503 until :meth:`clear`."""
        with self._lock:
            self.plan.always_fail.update(paths)

    def clear(self) -> None:
        """Stop all faults (rate 0, no permanent failures)."""
        with self._lock:
            self.plan.rate = 0.0
            self.plan.always_fail.clear()

    def reset_max_waiting(self) -> None:
        """Start ``stats["max_waiting"]`` again from the requests waiting now."""
        with self._lock:
            self._counts["max_waiting"] = self._waiting_now

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    # ------------------------------------------------------------------------------- signing
    def sign(self, href: str, now: float | None = None) -> str:
        """Append a token valid for ``token_ttl_s`` seconds (like a SAS token) to ``href``."""
        if self.token_ttl_s is None:
            return href
        expiry = int((time.time() if now is None else now) + self.token_ttl_s)
        return _with_token(href, expiry, _token_sig(self._secret, expiry))

    def env(self) -> dict[str, str]:
        """Environment variables with which :func:`sign_from_env` (in another process) mints
        tokens this proxy accepts. They hold the signing secret: give them only to processes
        of the test or benchmark."""
        if self.token_ttl_s is None:
            raise ValueError("this proxy checks no tokens (token_ttl_s is None)")
        return {SECRET_ENV: self._secret.hex(), TTL_ENV: str(self.token_ttl_s)}

    def _token_ok(self, parsed: urllib.parse.SplitResult) -> bool:
        query = dict(urllib.parse.parse_qsl(parsed.query))
        try:
            expiry = int(query["se"])
        except (KeyError, ValueError):
            return False
        good = _token_sig(self._secret, expiry)
        return hmac.compare_digest(good, query.get("sig", "")) and expiry > time.time()

    # -------------------------------------------------------------------------------- drawing
    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    @contextlib.contextmanager
    def _waiting(self):  # -> Iterator[None]
        """A request's latency wait: counts the requests waiting at once, and the most so far
        (``stats["max_waiting"]``: how many requests the client had in flight at once)."""
        with self._lock:
            self._waiting_now += 1
            self._counts["max_waiting"] = max(self._counts["max_waiting"], self._waiting_now)
        try:
            yield
        finally:
            with self._lock:
                self._waiting_now -= 1

    def _draw(self, path: str) -> str | None:
        with self._lock:
            if path in self.plan.always_fail:
                return "503"
            if not any(path.startswith(p) for p in self.plan.path_prefixes):
                return None
            if self._rng.random() >= self.plan.rate:
                return None
            return self._rng.choices(self.plan.kinds, weights=self.plan.weights)[0]
