"""The Range-capable asset server on its own (no database): what HTTP clients and GDAL rely on."""

from __future__ import annotations

import http.client
import json
import threading

import pytest

from pipeline.demo.httpserver import RangeError, make_server, parse_range


@pytest.fixture()
def server(tmp_path):
    data = bytes(range(256)) * 40  # 10240 bytes
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.tif").write_bytes(data)
    srv = make_server(tmp_path)
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    try:
        yield srv.server_address[1], data
    finally:
        srv.shutdown()
        srv.server_close()


def _req(port, method, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp, body


def test_parse_range():
    assert parse_range("bytes=0-9", 100) == [(0, 9)]
    assert parse_range("bytes=90-", 100) == [(90, 99)]
    assert parse_range("bytes=-10", 100) == [(90, 99)]
    assert parse_range("bytes=95-200", 100) == [(95, 99)]
    assert parse_range("bytes=0-1, 5-6", 100) == [(0, 1), (5, 6)]
    assert parse_range("items=0-1", 100) is None
    assert parse_range("bytes=5-1", 100) is None
    with pytest.raises(RangeError):
        parse_range("bytes=100-", 100)


def test_full_get_and_head(server):
    port, data = server
    resp, body = _req(port, "GET", "/sub/f.tif")
    assert resp.status == 200 and body == data
    assert resp.getheader("Accept-Ranges") == "bytes"
    resp, body = _req(port, "HEAD", "/sub/f.tif")
    assert resp.status == 200 and body == b""
    assert int(resp.getheader("Content-Length")) == len(data)
    assert resp.getheader("Accept-Ranges") == "bytes"
    assert resp.getheader("ETag")


def test_single_range(server):
    port, data = server
    resp, body = _req(port, "GET", "/sub/f.tif", {"Range": "bytes=100-199"})
    assert resp.status == 206
    assert resp.getheader("Content-Range") == f"bytes 100-199/{len(data)}"
    assert body == data[100:200]
    resp, body = _req(port, "GET", "/sub/f.tif", {"Range": "bytes=-16"})
    assert resp.status == 206 and body == data[-16:]
    # HEAD with Range: headers of the 206, no body
    resp, body = _req(port, "HEAD", "/sub/f.tif", {"Range": "bytes=0-15"})
    assert resp.status == 206 and body == b"" and resp.getheader("Content-Length") == "16"


def test_unsatisfiable_range(server):
    port, data = server
    resp, body = _req(port, "GET", "/sub/f.tif", {"Range": f"bytes={len(data)}-"})
    assert resp.status == 416
    assert resp.getheader("Content-Range") == f"bytes */{len(data)}"


def test_multipart_ranges(server):
    port, data = server
    resp, body = _req(port, "GET", "/sub/f.tif", {"Range": "bytes=0-3,1000-1003"})
    assert resp.status == 206
    ctype = resp.getheader("Content-Type")
    assert ctype.startswith("multipart/byteranges; boundary=")
    assert int(resp.getheader("Content-Length")) == len(body)
    boundary = ctype.split("boundary=")[1].encode()
    parts = [p for p in body.split(b"--" + boundary) if p.strip(b"\r\n-")]
    assert len(parts) == 2
    assert parts[0].split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n") == data[0:4]
    assert b"Content-Range: bytes 1000-1003/" in parts[1]


def test_if_range_mismatch_sends_whole_file(server):
    port, data = server
    resp, body = _req(port, "GET", "/sub/f.tif", {"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert resp.status == 200 and body == data


def test_not_found_and_no_listing(server):
    port, _ = server
    assert _req(port, "GET", "/nope.tif")[0].status == 404
    assert _req(port, "GET", "/sub/")[0].status == 404
    assert _req(port, "GET", "/../../etc/passwd")[0].status == 404


def test_stats_count_bytes_per_path(server):
    port, data = server
    _req(port, "GET", "/sub/f.tif?x=1", {"Range": "bytes=0-99"})
    _req(port, "GET", "/sub/f.tif", {"Range": "bytes=200-299"})
    stats = json.loads(_req(port, "GET", "/_stats")[1])
    entry = stats["paths"]["/sub/f.tif"]
    assert entry == {"requests": 2, "bytes": 200, "ranges": 2, "whole": 0}
    _req(port, "GET", "/sub/f.tif")
    stats = json.loads(_req(port, "GET", "/_stats")[1])
    assert stats["paths"]["/sub/f.tif"]["whole"] == 1
