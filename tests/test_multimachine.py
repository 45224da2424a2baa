"""Builds on workers that cannot see the submitter's files, as on Kubernetes or other hosts.

A ``dask scheduler`` and two ``dask worker`` processes run each in its own mount namespace in
which the whole pytest temporary folder (the tables, the catalog's files, the reference store)
is covered by an empty tmpfs (:class:`pipeline.demo.isolated.IsolatedCluster`); the store and
the published tables live in a loopback S3 server (moto); the STAC and asset servers are the
session's embedded catalog. The submitter is ``ssl4eo build --scheduler ...`` with local
tables, exactly as a user on a laptop would run it.

* the workers really do not see the tables (asked on every worker);
* the build completes and its store equals the LocalCluster build bit for bit (every chunk and
  shard object of every array, besides values through xarray);
* the tasks read tables published beside the store; no credential is in a task's arguments,
  the workers' logs or the store;
* a worker killed with SIGKILL mid-run (with its nanny: nothing restarts it): the build
  completes on the other one, nothing is lost;
* bad input: a table URL that does not exist, or no credentials, fails before any task with
  the URL and the variables to set.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pipeline import layout, storage
from pipeline.demo.isolated import (
    TEST_SECRET_KEY,
    IsolatedCluster,
    differing_objects,
    namespaces_unavailable,
    store_objects,
)

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

SSL4EO = [sys.executable, "-m", "pipeline.cli"]
COMPLETE = layout.STATUS_CODES["complete"]
BUCKET = "ssl4eo-multi"

_why = namespaces_unavailable()
needs_namespaces = pytest.mark.skipif(_why is not None, reason=f"no mount namespaces: {_why}")


def test_which_clusters_get_published_tables() -> None:
    """Only a LocalCluster of this process is sure to share the submitter's disk."""
    from distributed import Client, LocalCluster

    from pipeline.runner import _needs_published_inputs, published_url

    assert _needs_published_inputs(None, {"scheduler": "tcp://10.0.0.5:8786"})
    assert _needs_published_inputs(None, {"cluster": "kubernetes"})
    assert not _needs_published_inputs(None, {"workers": 2})
    assert not _needs_published_inputs(None, None)
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as lc, \
            Client(lc) as client:
        assert not _needs_published_inputs(client, None)
        with Client(lc.scheduler_address) as by_address:  # a scheduler seen only by address
            assert _needs_published_inputs(by_address, None)
    assert (published_url("s3://b/eo/cube.zarr/", "scenes", "ab" * 32)
            == "s3://b/eo/cube.zarr.inputs/scenes-abababababababab.parquet")


@pytest.fixture(scope="module")
def s3():
    from pipeline.demo.isolated import s3_server

    with s3_server(BUCKET) as info:
        yield info


@pytest.fixture
def cluster(s3, tmp_path_factory: pytest.TempPathFactory):
    """Scheduler + 2 workers that cannot see anything under pytest's temporary folder."""
    hidden = tmp_path_factory.getbasetemp()
    with IsolatedCluster(2, hidden=[hidden]) as c:
        yield c


def _build(tables: dict, store: str, address: str, *extra: str, **kw) -> subprocess.Popen:
    cmd = [*SSL4EO, "build", "--locations", str(tables["locations"]), "--scenes",
           str(tables["scenes"]), "--store", store, "--provider", "local", "--shard-samples",
           "2", "--scheduler", address, "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kw)


def _same_values(remote: str, local: Path, skip: tuple[str, ...] = ()) -> None:
    for group in (None, "S2L2A", "S1RTC"):
        a = xr.open_zarr(storage.open_store(remote), group=group, consolidated=False)
        b = xr.open_zarr(local, group=group, consolidated=False)
        assert sorted(a.data_vars) == sorted(b.data_vars)
        for name in set(a.data_vars) - set(skip):
            assert a[name].dtype == b[name].dtype, name
            if name in ("band_mean", "band_std"):
                # combined from per-shard moments: shards of other sizes round differently
                np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-12,
                                           err_msg=f"{group}/{name} differs")
                continue
            np.testing.assert_array_equal(a[name].values, b[name].values,
                                          err_msg=f"{group}/{name} differs")


def _same_bytes(remote: str, local: Path) -> None:
    """Bit for bit: every array's chunk/shard objects and metadata identical; only the root
    group's attributes (provenance: date, table paths) may differ."""
    assert differing_objects(remote, local) in ([], ["zarr.json"])


@needs_namespaces
def test_build_on_workers_without_the_submitters_files(demo_tables: dict, clean_store: Path,
                                                       cluster: IsolatedCluster, s3) -> None:
    # the isolation is real: the submitter has the tables, no worker does
    assert Path(demo_tables["locations"]).is_file()
    seen = cluster.workers_see(demo_tables["locations"])
    assert len(seen) == 2 and not any(seen.values()), seen
    assert not any(cluster.workers_see(clean_store).values())

    store = f"s3://{BUCKET}/run-a/cube.zarr"
    proc = _build(demo_tables, store, cluster.address)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + cluster.logs()
    st = xr.open_zarr(storage.open_store(store), consolidated=False)["status"].values
    assert (st == COMPLETE).all()
    _same_values(store, clean_store)
    _same_bytes(store, clean_store)

    # the tasks read the tables published beside the store, by content
    import zarr

    prov = zarr.open_group(storage.open_store(store), mode="r").attrs["ssl4eo:provenance"]
    for kind in ("locations", "scenes"):
        rec = prov[f"{kind}_table"]
        assert rec["tasks_read"].startswith(f"s3://{BUCKET}/run-a/cube.zarr.inputs/{kind}-")
        assert storage.exists(rec["tasks_read"])
        assert rec["sha256"].startswith(rec["tasks_read"].rsplit("-", 1)[1][:16])
    # no credential anywhere: task arguments, worker and scheduler logs, the store's objects
    from pipeline.runner import BuildOptions, shard_task_args

    args = shard_task_args(store, {k: prov[f"{k}_table"]["tasks_read"]
                                   for k in ("locations", "scenes")}, 0, BuildOptions())
    assert all(not isinstance(a, str) or storage.is_remote(a) for a in args)
    assert TEST_SECRET_KEY.encode() not in pickle.dumps(args)
    assert TEST_SECRET_KEY not in cluster.logs() + out
    assert not any(TEST_SECRET_KEY.encode() in v for v in store_objects(store).values())


@needs_namespaces
def test_remote_build_survives_a_dead_worker(demo_tables: dict, clean_store: Path,
                                             cluster: IsolatedCluster) -> None:
    from distributed import Client

    store = f"s3://{BUCKET}/run-b/cube.zarr"
    proc = _build(demo_tables, store, cluster.address)
    # mid-run: a shard written, one running on worker-1
    killed = cluster.kill_worker_mid_run(1, until=lambda: proc.poll() is not None)
    out, _ = proc.communicate(timeout=600)
    assert killed is not None, "the build ended before a worker could be killed"
    assert proc.returncode == 0, out + cluster.logs()
    with Client(cluster.address, timeout="30s") as client:
        assert killed["worker"] not in client.scheduler_info()["workers"]
    st = xr.open_zarr(storage.open_store(store), consolidated=False)["status"].values
    assert (st == COMPLETE).all(), st  # nothing lost
    _same_values(store, clean_store)


def test_missing_table_url_fails_before_any_task(demo_tables: dict, s3, tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/nowhere/scenes.parquet"
    store = f"s3://{BUCKET}/run-c/cube.zarr"
    rc = subprocess.run([*SSL4EO, "build", "--locations", str(demo_tables["locations"]),
                         "--scenes", url, "--store", store, "--scheduler", "tcp://127.0.0.1:9",
                         "--no-progress"], capture_output=True, text=True, timeout=120)
    assert rc.returncode == 2, rc.stdout + rc.stderr
    assert f"scenes table {url} does not exist" in rc.stderr
    assert "Traceback" not in rc.stderr
    assert not storage.exists(f"{store}/zarr.json")  # nothing written


def test_table_url_without_credentials(demo_tables: dict, s3, tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/inputs/scenes.parquet"
    storage.upload_file(demo_tables["scenes"], url)
    env = {k: v for k, v in os.environ.items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "none")  # no ~/.aws fallback
    env["AWS_CONFIG_FILE"] = str(tmp_path / "none")
    rc = subprocess.run([*SSL4EO, "build", "--locations", str(demo_tables["locations"]),
                         "--scenes", url, "--store", str(tmp_path / "cube.zarr"),
                         "--no-progress"], capture_output=True, text=True, timeout=120, env=env)
    assert rc.returncode == 2, rc.stdout + rc.stderr
    assert url in rc.stderr and "AWS_ACCESS_KEY_ID" in rc.stderr, rc.stderr
    assert "Traceback" not in rc.stderr
    assert not (tmp_path / "cube.zarr").exists()


@needs_namespaces
def test_the_build_jobs_own_command_on_isolated_workers(stac_api, clean_store: Path,
                                                        cluster: IsolatedCluster,
                                                        tmp_path: Path) -> None:
    """What `kubectl apply -f daskjob.yaml` runs in the job pod (the rendered manifest's
    command, only the config file, the scheduler and the bucket's endpoint are this machine's):
    sample + search into object storage, build on workers that see none of the job's files;
    applied again, it reuses the tables and resumes."""
    import yaml

    from pipeline import k8s
    from tests.conftest import TEST_SAMPLING

    store = f"s3://{BUCKET}/k8s/cube.zarr"
    job = next(d for d in k8s.render_manifests(store=store)["daskjob.yaml"]
               if d["kind"] == "DaskJob")
    args = list(job["spec"]["job"]["spec"]["containers"][0]["args"])
    config = tmp_path / "config.yaml"  # the ConfigMap's file, for the embedded catalog
    config.write_text(yaml.safe_dump({"preset": "demo", "sampling": TEST_SAMPLING,
                                      "search": {"stac_url": stac_api.stac_url}}))
    args[args.index("--config") + 1] = str(config)
    args = [a.replace("$(DASK_SCHEDULER_ADDRESS)", cluster.address) for a in args]
    run_url = args[args.index("--out") + 1]
    assert run_url == f"s3://{BUCKET}/k8s/run"
    assert not any(cluster.workers_see(config).values())
    for attempt in ("first", "re-applied"):
        rc = subprocess.run([*SSL4EO, *args, "--no-progress"], capture_output=True, text=True,
                            timeout=600)
        assert rc.returncode == 0, rc.stdout + rc.stderr + cluster.logs()
        if attempt == "re-applied":
            assert "[sample] reusing" in rc.stdout and "[search] reusing" in rc.stdout
    for name in ("locations.parquet", "scenes.parquet", "stats.json", "band_stats.png"):
        assert storage.exists(storage.join(run_url, name)), name
    st = xr.open_zarr(storage.open_store(store), consolidated=False)["status"].values
    assert (st == COMPLETE).all()
    # the same sampling as the tests' tables; its shards are larger (the job's default size),
    # so only the per-shard partial statistics are cut differently
    _same_values(store, clean_store, skip=("stats_partial",))
    assert TEST_SECRET_KEY not in cluster.logs()
