"""Reliability under faults: nothing lost, nothing silently wrong (the build on the served test
catalog, compared with the uninterrupted fault-free build ``clean_store``).

* flaky assets: a fault-injecting proxy in front of the asset server (500/503, 429 +
  Retry-After, stalls past the read timeout, resets, truncated bodies, at rate 0.2) and one
  asset that always fails: the build completes through retries, the one sample that cannot be
  read is recorded as failed with its reason (and nothing of it as data), a re-run with
  ``retry_failed`` after the fault clears completes it, and the store equals the clean one;
* a dead worker: a Dask worker process SIGKILLed mid-run (after the first shard): the nanny
  restarts it, the task is retried, the store equals the clean one;
* a killed job: ``ssl4eo build`` SIGKILLed (with its cluster) at five points (0, 1, 2, 3 and 4
  of 5 shards complete): after each kill every chunk decodes and every complete sample equals
  the clean run; each re-run resumes; the final store equals the clean one;
* STAC API stalls: search requests that stall are cut by the read timeout and retried (the
  result equals the fault-free search); stalls that never end give a clear error naming the
  window, and no scenes table;
* expiring tokens: assets readable only with tokens that live 3-4 s, minted on the workers by
  ``--signer pipeline.faults:sign_from_env`` (cached, as planetary-computer caches SAS tokens,
  and here handed out even after they expired): reads refused with 403 drop the cached token
  and re-sign, the store equals the clean one;
* secrets: tokens and keys appear in no log, output, store attribute, stored failure reason or
  scenes table.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import xarray as xr
from test_build import _build_cmd, assert_same_store

from pipeline import layout
from pipeline.faults import FAULT_KINDS, FaultProxy, sign_from_env
from pipeline.runner import BuildOptions, run_build
from pipeline.store import read_status, summary

COMPLETE = layout.STATUS_CODES["complete"]
FAILED = layout.STATUS_CODES["failed"]
PENDING = layout.STATUS_CODES["pending"]
GROUPS = ("S2L2A", "S1RTC")
#: GDAL: cut a stalled request after 1 s (the proxy stalls for 3 s) and retry quickly
FAST_GDAL = {"GDAL_HTTP_TIMEOUT": "1", "GDAL_HTTP_RETRY_DELAY": "0.05",
             "GDAL_HTTP_MAX_RETRY": "3"}


# ------------------------------------------------------------------------------- helpers
def rewrite_scenes(scenes: Path, old_url: str, new_url: str, out: Path,
                   samples: list[str] | None = None) -> Path:
    """A copy of the scenes table whose item hrefs point at ``new_url`` (optionally only the
    rows of ``samples``), keeping the table's metadata (schema version)."""
    table = pq.read_table(scenes)
    df = table.to_pandas()
    df["item_json"] = df["item_json"].str.replace(old_url, new_url, regex=False)
    if samples is not None:
        df = df[df["sample"].astype(str).isin(samples)].reset_index(drop=True)
    copy = pa.Table.from_pandas(df, schema=table.schema, preserve_index=False)
    pq.write_table(copy.replace_schema_metadata(table.schema.metadata), out)
    return out


def subset_locations(locations: Path, samples: list[str], out: Path) -> Path:
    """The locations table reduced to ``samples`` (metadata kept)."""
    table = pq.read_table(locations)
    keep = np.isin(np.asarray(table.column("sample").to_pylist(), dtype=str), samples)
    pq.write_table(table.filter(pa.array(keep)), out)
    return out


def asset_path(scenes: Path, sample: str, modality: str, key: str,
               item_id: str | None = None) -> str:
    """The URL path of asset ``key`` of the first chosen ``modality`` scene of ``sample`` (or
    of scene ``item_id``)."""
    df = pq.read_table(scenes).to_pandas()
    rows = df[(df["sample"].astype(str) == sample) & (df["modality"] == modality)
              & (df["status"] == "ok")]
    if item_id is not None:
        rows = rows[rows["item_id"] == item_id]
    row = rows.iloc[0]
    return urllib.parse.urlsplit(json.loads(row["item_json"])["assets"][key]["href"]).path


def read_every_chunk(store: Path) -> int:
    """Read every array of every group in full with zarr (every chunk must decode)."""
    import zarr

    root = zarr.open_group(str(store), mode="r")
    n = 0
    for _, arr in root.members(max_depth=None):
        if isinstance(arr, zarr.Array):
            arr[...]
            n += 1
    return n


def assert_complete_samples_equal(store: Path, clean: Path) -> int:
    """Every sample marked complete in ``store`` equals the clean run's, in every variable."""
    status = read_status(store)
    done = np.flatnonzero(status == COMPLETE)
    for group in GROUPS:
        a = xr.open_zarr(store, group=group, consolidated=False)
        b = xr.open_zarr(clean, group=group, consolidated=False)
        for name in a.data_vars:
            if "sample" not in a[name].dims:
                continue
            np.testing.assert_array_equal(a[name].values[done], b[name].values[done],
                                          err_msg=f"{group}/{name}")
    return len(done)


@pytest.fixture
def fresh_root_logging():
    """``main()`` gets to install its log handler on this test's captured stderr (not keep one
    an earlier test left bound to a stream that is closed by now)."""
    root = logging.getLogger()
    saved, root.handlers = root.handlers[:], []
    yield
    root.handlers = saved


def _options(**kw) -> BuildOptions:
    return BuildOptions(provider="local", shard_samples=2, **kw)


# ------------------------------------------------------------------- the proxy itself
def test_proxy_head_keeps_size_and_env_tokens(stac_api, demo_tables) -> None:
    """GDAL opens a COG with HEAD: the proxy must answer with the file's size; tokens minted by
    sign_from_env from the proxy's env() are accepted, cached until they expire, and dropped by
    cache_clear()."""
    path = asset_path(demo_tables["scenes"], _samples(demo_tables)[0], "S2L2A", "B04")
    size = int(requests.head(stac_api.asset_url + path, timeout=10).headers["Content-Length"])
    with FaultProxy(stac_api.asset_url, token_ttl_s=2, secret=b"k" * 16) as proxy:
        env = proxy.env()
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            sign_from_env.cache_clear()
            url = sign_from_env(proxy.url + path)
            assert sign_from_env(proxy.url + path) == url  # cached
            r = requests.head(url, timeout=10)
            assert r.status_code == 200 and int(r.headers["Content-Length"]) == size
            time.sleep(2.1)
            assert requests.head(url, timeout=10).status_code == 403  # expired
            fresh = sign_from_env(proxy.url + path)  # the cached token expired: a new one
            assert fresh != url and requests.head(fresh, timeout=10).status_code == 200
            sign_from_env.cache_clear()
            assert requests.get(sign_from_env(proxy.url + path), timeout=10,
                                headers={"Range": "bytes=0-99"}).status_code == 206
        finally:
            sign_from_env.cache_clear()
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        assert proxy.stats["403"] == 1


def _samples(tables: dict) -> list[str]:
    return [str(s) for s in pq.read_table(tables["locations"]).column("sample").to_pylist()]


def _sole_scene(tables: dict, modality: str, skip: int = 0) -> tuple[str, str]:
    """(sample, item id) of a chosen ``modality`` scene no other sample uses, from the
    ``skip``-th sample on."""
    df = pq.read_table(tables["scenes"]).to_pandas()
    ok = df[(df["status"] == "ok") & (df["modality"] == modality)]
    users = ok.groupby("item_id")["sample"].nunique()
    order = _samples(tables)
    for r in sorted(ok.itertuples(), key=lambda r: order.index(str(r.sample))):
        if order.index(str(r.sample)) >= skip and users[r.item_id] == 1:
            return str(r.sample), r.item_id
    raise AssertionError(f"no {modality} scene is used by one sample only")


def _with_scenes(tables: dict, modality: str) -> list[str]:
    """Samples (in table order) with at least one chosen scene of ``modality``."""
    df = pq.read_table(tables["scenes"]).to_pandas()
    have = set(df.loc[(df["status"] == "ok") & (df["modality"] == modality), "sample"].astype(str))
    return [s for s in _samples(tables) if s in have]


# ----------------------------------------------------------------------- flaky assets
def test_flaky_assets_complete_through_retries_then_retry_failed(
        stac_api, demo_tables: dict, clean_store: Path, tmp_path: Path) -> None:
    samples = _samples(demo_tables)
    doomed, item = _sole_scene(demo_tables, "S2L2A", skip=2)  # not in the first shard
    with FaultProxy(stac_api.asset_url, rate=0.15, kinds=FAULT_KINDS, timeout_s=3,
                    retry_after_s=1, seed=11) as proxy:
        scenes = rewrite_scenes(demo_tables["scenes"], stac_api.asset_url, proxy.url,
                                tmp_path / "scenes.parquet")
        dead = asset_path(scenes, doomed, "S2L2A", "B04", item)
        proxy.fail_always(dead)  # a fault that does not clear during the first run
        store = tmp_path / "cube.zarr"
        out = run_build(demo_tables["locations"], scenes, store,
                        options=_options(env_overrides=FAST_GDAL),
                        client_options={"workers": 2, "threads": 1}, progress=False)
        stats = proxy.stats
        # every kind of fault was met, and the build went through them
        for kind in FAULT_KINDS:
            assert stats.get(f"fault:{kind}", 0) > 0, stats
        assert out["status"] == {"pending": 0, "complete": len(samples) - 1, "failed": 1}, out
        reason = out["failures"][doomed]
        assert "503" in reason and Path(dead).name in reason, reason
        # the failed sample holds no data: every season nodata / NaT / "" in every group
        i = samples.index(doomed)
        for group in GROUPS:
            g = xr.open_zarr(store, group=group, consolidated=False)
            assert (g["file_id"].values[i] == "").all()
            assert np.isnat(g["time_"].values[i]).all()
            bands = g["bands"].values[i]
            assert (np.isnan(bands) if group == "S1RTC" else bands == 0).all()
        # the other samples are exactly the clean run's
        assert assert_complete_samples_equal(store, clean_store) == len(samples) - 1

        proxy.clear()  # the fault clears; a plain re-run has nothing to do ...
        again = run_build(demo_tables["locations"], scenes, store, options=_options(),
                          client_options={"workers": 1, "threads": 1}, progress=False)
        assert again["shards_run"] == 0 and again["status"]["failed"] == 1
        before = proxy.stats["requests"]
        # ... and --retry-failed redoes the failed sample's shard only
        done = run_build(demo_tables["locations"], scenes, store, options=_options(),
                         client_options={"workers": 1, "threads": 1}, retry_failed=True,
                         progress=False)
        assert done["shards_run"] == 1 and proxy.stats["requests"] > before
    assert done["status"] == {"pending": 0, "complete": len(samples), "failed": 0}
    assert done["failures"] == {}
    assert_same_store(store, clean_store)


# ------------------------------------------------------------------------- dead worker
def test_worker_killed_mid_run(demo_tables: dict, clean_store: Path, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    store = tmp_path / "cube.zarr"
    killed: dict = {}
    errors: list[BaseException] = []
    stop = threading.Event()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:

        def killer() -> None:
            try:
                while not stop.is_set():
                    st = read_status(store) if (store / "status").exists() else None
                    if st is not None and (st == COMPLETE).sum() >= 2:
                        busy = [w for w, keys in client.processing().items() if keys]
                        if busy:
                            pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                            killed.update(worker=busy[0], pid=pid, status=st.copy())
                            os.kill(pid, signal.SIGKILL)
                            return
                    time.sleep(0.1)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            out = run_build(demo_tables["locations"], demo_tables["scenes"], store,
                            options=_options(), client=client, retries=2, progress=False)
        finally:
            stop.set()
            thread.join(30)
        assert not errors, errors
        assert killed, "no worker was busy after the first shard: nothing was killed"
        assert (killed["status"] != COMPLETE).any()  # killed while work remained
        client.wait_for_workers(2, timeout=60)  # the nanny restarted the dead one
        assert killed["pid"] not in client.run(os.getpid).values()
    assert out["status"]["complete"] == len(_samples(demo_tables)), out
    assert_same_store(store, clean_store)


# -------------------------------------------------------------------------- killed job
def test_sigkill_at_five_points_each_resume_identical(stac_api, demo_tables: dict,
                                                      clean_store: Path, tmp_path: Path) -> None:
    """Five SIGKILLs of the whole `ssl4eo build` process group (client, scheduler, worker),
    each run resuming the last: while the store template is written / the cluster starts;
    while the first shard reads (seen through a fault-free proxy in front of the assets); and
    once 1, 2 and 3 of the 5 shards are complete (the next one reading)."""
    store = tmp_path / "cube.zarr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    n = len(_samples(demo_tables))
    seen = []
    with FaultProxy(stac_api.asset_url) as proxy:
        scenes = rewrite_scenes(demo_tables["scenes"], stac_api.asset_url, proxy.url,
                                tmp_path / "scenes.parquet")
        cmd = _build_cmd({"locations": demo_tables["locations"], "scenes": scenes}, store,
                         "--workers", "1")

        def reached(point: int, start: int) -> bool:
            if point == 0:
                return store.exists()
            if not (store / "status" / "zarr.json").exists():
                return False
            shards = int((read_status(store) == COMPLETE).sum()) // 2
            if point == 1:
                return shards == 0 and proxy.stats.get("requests", 0) >= 20
            return shards > start  # one more shard than when this run started

        for point in range(5):
            start = seen[-1] // 2 if seen else 0
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 180
            try:
                while time.monotonic() < deadline and proc.poll() is None:
                    if reached(point, start):
                        break
                    time.sleep(0.01 if point == 0 else 0.05)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                output = proc.communicate(timeout=30)[0]
            assert proc.returncode == -signal.SIGKILL, output.decode(errors="replace")[-3000:]
            if point == 0:
                seen.append(0)
                continue  # the template may be half written: the next run must cope
            status = read_status(store)
            seen.append(int((status == COMPLETE).sum()))
            assert (status == PENDING).any(), f"kill {point} came after the end"
            assert not (status == FAILED).any()
            assert read_every_chunk(store) > 20  # every chunk of every array decodes
            assert assert_complete_samples_equal(store, clean_store) == seen[-1]
        rc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    # kill points: 0 (template), 0 (first shard reading), then each run one shard further
    # (1, 2, 3 of the 5 shards of 2 samples, when the scheduler keeps submission order)
    assert seen[:2] == [0, 0] and all(b > a for a, b in zip(seen[1:], seen[2:])), seen
    assert rc.returncode == 0, rc.stdout + rc.stderr
    status = read_status(store)
    assert (status == COMPLETE).all() and len(status) == n
    read_every_chunk(store)
    assert_same_store(store, clean_store)


def test_kill_while_the_template_is_written(demo_tables: dict, clean_store: Path,
                                           tmp_path: Path) -> None:
    """The state a SIGKILL leaves between the template's S2 and S1 groups (create_store
    consolidates the metadata last): the next run writes the template again and builds."""
    from pipeline import store as zstore

    two = _samples(demo_tables)[:2]
    locs = subset_locations(demo_tables["locations"], two, tmp_path / "loc.parquet")
    scenes = rewrite_scenes(demo_tables["scenes"], "", "", tmp_path / "scenes.parquet",
                            samples=two)
    path = tmp_path / "cube.zarr"
    zstore.create_store(path, two, GROUPS, provenance={}, shard_samples=2)
    meta = json.loads((path / "zarr.json").read_text())
    del meta["consolidated_metadata"]
    (path / "zarr.json").write_text(json.dumps(meta))
    for p in sorted((path / "S1RTC").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (path / "S1RTC").rmdir()
    # create_store keeps this marker beside the store until the template is complete
    (tmp_path / "cube.zarr.ssl4eo-creating").write_text("x")
    out = run_build(locs, scenes, path, options=_options(),
                    client_options={"workers": 1, "threads": 1}, progress=False)
    assert out["status"]["complete"] == 2, out
    assert assert_complete_samples_equal(path, clean_store) == 2


# ------------------------------------------------------------------- STAC API timeouts
def test_search_stalls_are_cut_by_the_read_timeout_and_retried(stac_api, demo_tables: dict,
                                                               tmp_path: Path) -> None:
    import pandas as pd

    from pipeline.config import load_config
    from pipeline.search import search_locations

    want = pd.read_parquet(demo_tables["scenes"])
    stall = 30.0
    with FaultProxy(stac_api.stac_url, rate=0.3, kinds=("timeout",), timeout_s=stall,
                    path_prefixes=("/search",), seed=4) as proxy:
        cfg = load_config("demo", overrides={"search": {
            "stac_url": proxy.url, "timeout_s": 1.0, "max_retries": 8, "backoff_s": 0.01,
            "workers": 2}})
        t0 = time.monotonic()
        search_locations(demo_tables["locations"], tmp_path / "scenes.parquet", cfg,
                         progress=False)
        took = time.monotonic() - t0
        stalls = proxy.stats.get("fault:timeout", 0)
    assert stalls > 0, proxy.stats
    # each stall cost the 1 s read timeout, not the 30 s the server stalled
    assert took < stall, took
    got = pd.read_parquet(tmp_path / "scenes.parquet")
    cols = ["sample", "season", "modality", "status", "reason", "item_id"]
    pd.testing.assert_frame_equal(got[cols], want[cols])


def test_search_that_always_stalls_fails_clearly(stac_api, demo_tables: dict, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    with FaultProxy(stac_api.stac_url, rate=1.0, kinds=("timeout",), timeout_s=20,
                    path_prefixes=("/search",)) as proxy:
        cfg = tmp_path / "search.yaml"
        cfg.write_text(json.dumps({"preset": "demo", "search": {
            "stac_url": proxy.url, "timeout_s": 0.5, "max_retries": 2, "backoff_s": 0.0,
            "workers": 1}}))
        out = tmp_path / "scenes.parquet"
        t0 = time.monotonic()
        rc = main(["search", "--config", str(cfg), "--locations", str(demo_tables["locations"]),
                   "--out", str(out), "--no-progress"])
        took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 2, err
    assert re.search(r"window 20\d\d-.* failed after 2 retries", err), err
    assert "timed out" in err.lower() or "timeout" in err.lower(), err
    assert "Traceback" not in err
    assert took < 20, took  # 3 attempts x 0.5 s per search, not the 20 s stall
    assert not out.exists() and not Path(str(out) + ".partial").exists()


# ---------------------------------------------------------------------- expiring tokens
def test_expired_tokens_are_renewed_no_holes(stac_api, demo_tables: dict, clean_store: Path,
                                             tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens live 3-4 s; the storage answers slowly (50 ms a request), so one worker's run
    outlives several tokens while one location's reads take less than one. The workers'
    signer caches a token even past its expiry (a token the cache believes valid but the
    storage refuses: clock skew, revocation, a token issued pre-expired), so every expiry makes
    reads fail with 403 until the build drops the cached token and signs again."""
    from pipeline.faults import MARGIN_ENV

    ttl = 4
    with FaultProxy(stac_api.asset_url, token_ttl_s=ttl, secret=os.urandom(16),
                    latency_s=0.05) as proxy:
        for k, v in proxy.env().items():  # the worker processes inherit these
            monkeypatch.setenv(k, v)
        monkeypatch.setenv(MARGIN_ENV, "-3600")
        scenes = rewrite_scenes(demo_tables["scenes"], stac_api.asset_url, proxy.url,
                                tmp_path / "scenes.parquet")
        store = tmp_path / "cube.zarr"
        t0 = time.monotonic()
        out = run_build(demo_tables["locations"], scenes, store,
                        options=_options(signer="pipeline.faults:sign_from_env"),
                        client_options={"workers": 1, "threads": 1}, progress=False)
        took = time.monotonic() - t0
        stats = proxy.stats
    # tokens really expired mid-run (the run outlived them) and were renewed: no hole
    assert took > ttl
    assert stats.get("403", 0) > 0, stats
    assert out["status"] == {"pending": 0, "complete": len(_samples(demo_tables)),
                             "failed": 0}, out["failures"]
    assert_same_store(store, clean_store)


def test_without_a_signer_every_read_is_refused_and_recorded(
        stac_api, demo_tables: dict, tmp_path: Path) -> None:
    """The control for the test above: with no token at all, reads fail with 403 after the
    retries and the samples are recorded as failed, never filled."""
    one = _samples(demo_tables)[:1]
    with FaultProxy(stac_api.asset_url, token_ttl_s=60) as proxy:
        scenes = rewrite_scenes(demo_tables["scenes"], stac_api.asset_url, proxy.url,
                                tmp_path / "scenes.parquet", samples=one)
        locs = subset_locations(demo_tables["locations"], one, tmp_path / "loc.parquet")
        out = run_build(locs, scenes, tmp_path / "cube.zarr", options=_options(),
                        client_options={"workers": 1, "threads": 1}, progress=False)
        stats = proxy.stats
    assert out["status"]["failed"] == 1 and "403" in out["failures"][one[0]]
    # the first try and sign_retries (2) re-signed tries, each refused
    assert stats["403"] >= 3 and stats["403"] == stats["requests"], stats


# ------------------------------------------------------------------------------ secrets
def test_no_secret_in_logs_outputs_store_or_tables(stac_api, demo_tables: dict, tmp_path: Path,
                                                   capfd: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   fresh_root_logging) -> None:
    from pipeline.cli import main

    aws = "SSL4EO-TEST-SECRET-q8Zr2Lk0"  # in the environment and in a GDAL header option
    secret = b"SSL4EO-TEST-KEY!"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws)
    victim, item = _sole_scene(demo_tables, "S1RTC", 1)
    two = [_samples(demo_tables)[0], victim]
    with FaultProxy(stac_api.asset_url, token_ttl_s=30, secret=secret) as proxy:
        for k, v in proxy.env().items():
            monkeypatch.setenv(k, v)
        scenes = rewrite_scenes(demo_tables["scenes"], stac_api.asset_url, proxy.url,
                                tmp_path / "scenes.parquet", samples=two)
        locs = subset_locations(demo_tables["locations"], two, tmp_path / "loc.parquet")
        dead = asset_path(scenes, victim, "S1RTC", "vv", item)
        proxy.fail_always(dead)  # its failure message quotes the signed URL
        cfg = tmp_path / "build.yaml"
        cfg.write_text(json.dumps({"preset": "demo", "build": {
            "env_overrides": {**FAST_GDAL, "GDAL_HTTP_HEADERS": f"Authorization: Bearer {aws}"}}}))
        store = tmp_path / "cube.zarr"
        t0 = time.time()
        rc = main(["-v", "build", "--config", str(cfg), "--locations", str(locs), "--scenes",
                   str(scenes), "--store", str(store), "--provider", "local", "--signer",
                   "pipeline.faults:sign_from_env", "--shard-samples", "2", "--workers", "1",
                   "--no-progress"])
        rc_stats = main(["stats", "--store", str(store), "--json"])
        t1 = time.time()
        assert proxy.stats["requests"] > 50
    captured = capfd.readouterr()
    logs = captured.out + captured.err
    assert rc == 0 and rc_stats == 0, logs[-3000:]
    # a positive control: the failure was recorded, with the URL but without its token
    st = summary(store)
    reason = st["failures"][victim]
    assert Path(dead).name in reason and "<redacted>" in reason, reason
    assert Path(dead).name in logs  # it was logged and printed too
    # every token that could have been minted during the run
    sigs = {hmac.new(secret, str(e).encode(), hashlib.sha256).hexdigest()[:16]
            for e in range(int(t0) - 1, int(t1) + 32)}
    attrs = (store / "zarr.json").read_text()
    stored = " ".join(
        "\n".join(np.asarray(xr.open_zarr(store, group=g, consolidated=False)["file_id"].values,
                             dtype=str).ravel()) for g in GROUPS)
    stored += "\n".join(np.asarray(xr.open_zarr(store, consolidated=False)["failure"].values,
                                   dtype=str))
    table = Path(scenes).read_bytes() + Path(demo_tables["scenes"]).read_bytes()
    for where, text in (("logs/output", logs), ("store attributes", attrs),
                        ("stored strings", stored), ("scenes table", table.decode("latin-1"))):
        assert aws not in text, where
        assert secret.hex() not in text and secret.decode() not in text, where
        assert not any(s in text for s in sigs), where
        assert not re.search(r"[?&]sig=", text), where
    assert "GDAL_HTTP_HEADERS" in attrs  # recorded, masked
