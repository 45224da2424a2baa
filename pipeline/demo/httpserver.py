"""A small threaded static-file HTTP server that honours Range requests.

Python's :mod:`http.server` ignores ``Range``, so GDAL's ``/vsicurl/`` would download whole
files through it. This server answers ``Range: bytes=...`` with ``206 Partial Content``
(single ranges, and ``multipart/byteranges`` for several), ``416`` for unsatisfiable ranges,
``HEAD`` with ``Accept-Ranges: bytes``, ``ETag``/``Last-Modified``, and keeps connections
alive (HTTP/1.1), which is what COG readers expect of a blob store.

It counts what it serves: ``GET /_stats`` returns JSON ``{"requests": n, "bytes": n,
"paths": {path: {"requests": n, "bytes": n, "ranges": n, "whole": n}}}`` (``ranges``:
requests with a Range header; ``whole``: GETs answered with the whole file; paths without
their query string), so tests and benchmarks can prove that a windowed read fetched a few ranges rather
than the file.

Run it alone with ``python -m pipeline.demo.httpserver --root DIR --port 0``; it prints
``READY <port>`` on stdout once it listens. With ``--fd N`` it serves on a listening socket
that the parent bound and passed down (so there is no race for the port).
"""

from __future__ import annotations

import argparse
import email.utils
import json
import os
import signal
import socket
import sys
import threading
import uuid
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STATS_PATH = "/_stats"
_CHUNK = 1 << 16


class RangeError(ValueError):
    """A Range header that cannot be satisfied."""


def parse_range(header: str, size: int) -> list[tuple[int, int]] | None:
    """Parse a ``Range`` header into inclusive ``(start, end)`` byte pairs.

    Returns ``None`` when the header is not a ``bytes`` range the server understands (the
    whole file is then sent, as RFC 9110 allows), and raises :class:`RangeError` when no range
    overlaps the file (answer 416).
    """
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec.strip():
        return None
    ranges: list[tuple[int, int]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        first, dash, last = part.partition("-")
        if not dash:
            return None
        try:
            if first == "":  # suffix range: the last N bytes
                n = int(last)
                if n <= 0:
                    continue
                start, end = max(0, size - n), size - 1
            else:
                start = int(first)
                end = int(last) if last else size - 1
                if start >= size:
                    continue  # unsatisfiable part
                if end < start:
                    return None
                end = min(end, size - 1)
        except ValueError:
            return None
        if start < 0:
            return None
        ranges.append((start, end))
    if not ranges:
        raise RangeError(header)
    return ranges


class Stats:
    """Thread-safe counters of what the server sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        self.paths: dict[str, dict[str, int]] = {}

    def add(self, path: str, nbytes: int, ranged: bool, whole: bool = False) -> None:
        path = path.split("?", 1)[0]
        with self._lock:
            self.requests += 1
            self.bytes += nbytes
            entry = self.paths.setdefault(
                path, {"requests": 0, "bytes": 0, "ranges": 0, "whole": 0}
            )
            entry["requests"] += 1
            entry["bytes"] += nbytes
            entry["ranges"] += int(ranged)
            entry["whole"] += int(whole)

    def add_bytes(self, path: str, nbytes: int) -> None:
        path = path.split("?", 1)[0]
        with self._lock:
            self.bytes += nbytes
            self.paths[path]["bytes"] += nbytes

    def as_dict(self) -> dict:
        with self._lock:
            return {
                "requests": self.requests,
                "bytes": self.bytes,
                "paths": {k: dict(v) for k, v in self.paths.items()},
            }


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """Static files with Range support; no directory listings."""

    protocol_version = "HTTP/1.1"
    server_version = "ssl4eo-assets/1"
    # TCP_NODELAY: headers and body leave as separate writes; with Nagle's algorithm on, the
    # body waited for the client's delayed ACK of the headers, 40 ms on every request of a
    # kept-alive connection (a file open, two requests, took 44 ms over loopback)
    disable_nagle_algorithm = True
    #: set by :func:`make_server`
    stats: Stats
    quiet: bool = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's name)
        if not self.quiet:
            super().log_message(format, *args)

    # -- routing ----------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?", 1)[0] == STATS_PATH:
            body = json.dumps(self.stats.as_dict()).encode()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
            return
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def list_directory(self, path):  # type: ignore[override]
        self.send_error(HTTPStatus.NOT_FOUND, "No directory listings")
        return None

    # -- files ------------------------------------------------------------------------------
    def _serve(self, head: bool) -> None:
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed below)
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return
        with f:
            st = os.fstat(f.fileno())
            size = st.st_size
            etag = f'"{st.st_mtime_ns:x}-{size:x}"'
            ctype = self.guess_type(path)
            if path.endswith((".tif", ".tiff")):
                ctype = "image/tiff; application=geotiff; profile=cloud-optimized"
            header = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if header and if_range and if_range.strip() != etag:
                header = None  # the file changed: send it whole
            ranges = None
            if header:
                try:
                    ranges = parse_range(header, size)
                except RangeError:
                    self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.stats.add(self.path, 0, True)
                    self.end_headers()
                    return
            common = [
                ("Accept-Ranges", "bytes"),
                ("ETag", etag),
                ("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True)),
            ]
            if ranges is None:
                self.send_response(HTTPStatus.OK)
                for k, v in common:
                    self.send_header(k, v)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(size))
                planned = 0 if head else size
                self.stats.add(self.path, planned, False, whole=not head)
                self.end_headers()
                if not head:
                    self._correct(planned, self._copy(f, 0, size - 1))
                return
            if len(ranges) == 1:
                start, end = ranges[0]
                self.send_response(HTTPStatus.PARTIAL_CONTENT)
                for k, v in common:
                    self.send_header(k, v)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.send_header("Content-Length", str(end - start + 1))
                planned = 0 if head else end - start + 1
                self.stats.add(self.path, planned, True)
                self.end_headers()
                if not head:
                    self._correct(planned, self._copy(f, start, end))
                return
            boundary = uuid.uuid4().hex
            heads = [
                (
                    f"--{boundary}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Range: bytes {s}-{e}/{size}\r\n\r\n"
                ).encode()
                for s, e in ranges
            ]
            tail = f"\r\n--{boundary}--\r\n".encode()
            length = sum(len(h) for h in heads) + sum(e - s + 1 for s, e in ranges)
            length += 2 * (len(ranges) - 1) + len(tail)
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            for k, v in common:
                self.send_header(k, v)
            self.send_header("Content-Type", f"multipart/byteranges; boundary={boundary}")
            self.send_header("Content-Length", str(length))
            planned = 0 if head else sum(e - s + 1 for s, e in ranges)
            self.stats.add(self.path, planned, True)
            self.end_headers()
            if not head:
                sent = 0
                for i, ((s, e), h) in enumerate(zip(ranges, heads)):
                    if i:
                        self.wfile.write(b"\r\n")
                    self.wfile.write(h)
                    sent += self._copy(f, s, e)
                self.wfile.write(tail)
                self._correct(planned, sent)

    def _correct(self, planned: int, sent: int) -> None:
        """Counters are written before the response leaves (a client that reads ``/_stats``
        right after its last response must see it counted); a client that hung up mid-body
        got fewer bytes than planned."""
        if sent != planned:
            self.stats.add_bytes(self.path, sent - planned)

    def _copy(self, f, start: int, end: int) -> int:
        """Send bytes ``start..end`` (inclusive) of ``f``; returns the count sent."""
        f.seek(start)
        left = end - start + 1
        sent = 0
        while left > 0:
            buf = f.read(min(_CHUNK, left))
            if not buf:
                break
            self.wfile.write(buf)
            left -= len(buf)
            sent += len(buf)
        return sent


class AssetServer(ThreadingHTTPServer):
    """Threaded HTTP server whose connection errors from clients that hang up stay quiet.

    Its listen backlog holds a build's burst of new connections (socketserver's default of 5
    does not: the kernel then drops the handshakes beyond it, and each waits a retransmission
    of a second or more, where object storage answers at once)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


def make_server(
    root: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    sock: socket.socket | None = None,
    quiet: bool = True,
) -> AssetServer:
    """A ready (bound, listening) server for ``root``; call ``serve_forever()`` on it.

    Pass ``sock`` to serve on a socket that is already bound and listening.
    """
    root = str(Path(root).resolve())
    stats = Stats()

    class Handler(RangeRequestHandler):
        pass

    Handler.stats = stats
    Handler.quiet = quiet

    def factory(*args, **kwargs):
        return Handler(*args, directory=root, **kwargs)

    if sock is None:
        server = AssetServer((host, port), factory)
    else:
        server = AssetServer(sock.getsockname()[:2], factory, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.server_address = sock.getsockname()[:2]
    server.stats = stats  # type: ignore[attr-defined]
    return server


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.demo.httpserver",
        description="Serve a directory over HTTP with Range requests.",
    )
    parser.add_argument("--root", required=True, help="directory to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0 = pick a free one)")
    parser.add_argument("--fd", type=int, default=None, help="serve on this listening socket")
    parser.add_argument("--log", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    sock = None
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    try:
        server = make_server(args.root, args.host, args.port, sock=sock, quiet=not args.log)
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2

    def _stop(signum, frame):  # noqa: ARG001
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"READY {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
