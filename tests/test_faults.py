"""The fault-injecting proxy really injects each fault, forwards faithfully otherwise, and
enforces token expiry like a storage account does with stale SAS tokens."""

from __future__ import annotations

import functools
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from pipeline.faults import FAULT_KINDS, FaultProxy


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream")
    (root / "blob.bin").write_bytes(bytes(range(256)) * 64)  # 16 KiB

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_forwards_unchanged_without_faults(upstream):
    with FaultProxy(upstream, rate=0.0) as proxy:
        r = requests.get(proxy.url + "/blob.bin", timeout=5)
        assert r.status_code == 200
        assert r.content == bytes(range(256)) * 64
        assert proxy.stats == {"requests": 1}


@pytest.mark.parametrize("kind", ["500", "503", "429"])
def test_status_faults(upstream, kind):
    with FaultProxy(upstream, rate=1.0, kinds=(kind,), retry_after_s=2) as proxy:
        r = requests.get(proxy.url + "/blob.bin", timeout=5)
        assert r.status_code == int(kind)
        if kind == "429":
            assert r.headers["Retry-After"] == "2"
        assert proxy.stats[f"fault:{kind}"] == 1


def test_timeout_fault(upstream):
    with FaultProxy(upstream, rate=1.0, kinds=("timeout",), timeout_s=1.5) as proxy:
        t0 = time.monotonic()
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.get(proxy.url + "/blob.bin", timeout=0.5)
        assert time.monotonic() - t0 < 1.5


def test_reset_fault(upstream):
    with FaultProxy(upstream, rate=1.0, kinds=("reset",)) as proxy:
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(proxy.url + "/blob.bin", timeout=5)


def test_truncated_body(upstream):
    with FaultProxy(upstream, rate=1.0, kinds=("truncate",)) as proxy:
        with pytest.raises(requests.exceptions.RequestException):
            r = requests.get(proxy.url + "/blob.bin", timeout=5)
            r.raise_for_status()
            assert len(r.content) == 16384  # not reached: the body is cut short


def test_rate_is_honoured_and_repeatable(upstream):
    def run() -> dict[str, int]:
        with FaultProxy(upstream, rate=0.3, kinds=("500", "503"), seed=7) as proxy:
            for _ in range(200):
                requests.get(proxy.url + "/blob.bin", timeout=5)
            return proxy.stats

    first, second = run(), run()
    assert first == second
    faults = first.get("fault:500", 0) + first.get("fault:503", 0)
    assert 35 <= faults <= 85  # 200 x 0.3 = 60 expected


def test_stats_endpoint_and_clear(upstream):
    with FaultProxy(upstream, rate=1.0, kinds=("503",)) as proxy:
        assert requests.get(proxy.url + "/blob.bin", timeout=5).status_code == 503
        proxy.clear()
        assert requests.get(proxy.url + "/blob.bin", timeout=5).status_code == 200
        stats = requests.get(proxy.url + "/__faults__", timeout=5).json()
        assert stats == {"requests": 2, "fault:503": 1}


def test_expiring_tokens(upstream):
    with FaultProxy(upstream, token_ttl_s=60) as proxy:
        url = proxy.url + "/blob.bin"
        assert requests.get(url, timeout=5).status_code == 403  # unsigned
        assert requests.get(proxy.sign(url), timeout=5).status_code == 200
        stale = proxy.sign(url, now=time.time() - 120)  # issued 2 min ago, 60 s lifetime
        r = requests.get(stale, timeout=5)
        assert r.status_code == 403 and "AuthenticationFailed" in r.text
        forged = proxy.sign(url).replace("sig=", "sig=0")
        assert requests.get(forged, timeout=5).status_code == 403


def test_bad_configuration():
    with pytest.raises(ValueError, match="unknown fault kinds"):
        FaultProxy("http://127.0.0.1:1", kinds=("explode",))
    with pytest.raises(ValueError, match="rate"):
        FaultProxy("http://127.0.0.1:1", rate=1.5)
    assert set(FAULT_KINDS) == {"500", "503", "429", "timeout", "reset", "truncate"}
