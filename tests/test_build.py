"""The build end to end on the served test catalog: sample -> search -> build on Dask.

* an uninterrupted run on a LocalCluster (``clean_store``) is complete and opens with xarray;
* ``ssl4eo build`` killed with SIGKILL midway, then run again: complete, identical to it;
* a cluster of separate ``dask scheduler`` + two ``dask worker`` processes through
  ``--scheduler``: identical to it;
* bad input: missing or foreign tables, a store path holding something else, a path that cannot
  be written; never a bare traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pipeline import layout
from pipeline.cli import main
from pipeline.dask_plugins import profiler_can_deadlock
from pipeline.store import read_status

SSL4EO = [sys.executable, "-m", "pipeline.cli"]
COMPLETE = layout.STATUS_CODES["complete"]
PENDING = layout.STATUS_CODES["pending"]


def assert_same_store(a: Path, b: Path) -> None:
    """Same samples, status and every variable of every group (values, dtypes, NaN/NaT)."""
    ra, rb = xr.open_zarr(a, consolidated=False), xr.open_zarr(b, consolidated=False)
    np.testing.assert_array_equal(ra["sample"].values, rb["sample"].values)
    np.testing.assert_array_equal(ra["status"].values, rb["status"].values)
    np.testing.assert_array_equal(ra["failure"].values, rb["failure"].values)
    for group in ("S2L2A", "S1RTC"):
        ga = xr.open_zarr(a, group=group, consolidated=False)
        gb = xr.open_zarr(b, group=group, consolidated=False)
        assert sorted(ga.data_vars) == sorted(gb.data_vars)
        for name in ga.data_vars:
            va, vb = ga[name].values, gb[name].values
            assert va.dtype == vb.dtype, name
            np.testing.assert_array_equal(va, vb, err_msg=f"{group}/{name} differs")


def _build_cmd(tables: dict, store: Path, *extra: str) -> list[str]:
    return [*SSL4EO, "build", "--locations", str(tables["locations"]), "--scenes",
            str(tables["scenes"]), "--store", str(store), "--provider", "local",
            "--shard-samples", "2", "--no-progress", *extra]


def test_clean_build_is_complete(clean_store: Path, demo_tables: dict) -> None:
    import pandas as pd

    status = read_status(clean_store)
    assert (status == COMPLETE).all(), status
    s2 = xr.open_zarr(clean_store, group="S2L2A")
    assert s2["bands"].dims == ("sample", "time", "band", "y", "x")
    assert s2["bands"].shape[1:] == (4, 12, 264, 264)
    assert s2["bands"].dtype == np.uint16
    scenes = pd.read_parquet(demo_tables["scenes"])
    ok = scenes[(scenes["status"] == "ok") & (scenes["modality"] == "S2L2A")]
    fid = s2["file_id"].values
    # every chosen scene is in the store at its season (the scene-level rule's, or, where the
    # patch rule took a runner-up, that candidate), and no season is filled without one
    rank = s2["candidate_rank"].values
    for r in ok.itertuples():
        i = list(s2["sample"].values).index(r.sample)
        if rank[i, r.season] == 0:
            assert fid[i, r.season] == r.item_id
        else:
            others = [c["id"] for c in json.loads(r.candidates)]
            assert fid[i, r.season] == others[rank[i, r.season] - 1]
    assert (fid != "").sum() == len(ok)
    t = s2["time_"].values
    assert np.all(np.isnat(t[fid == ""]))
    s1 = xr.open_zarr(clean_store, group="S1RTC")
    vv = s1["bands"].sel(band="vv").values
    assert np.nanmax(vv) < 30 and np.nanmin(vv) > -60  # dB, not linear
    root = xr.open_zarr(clean_store)
    stats = root.attrs[layout.ATTR_STATS]
    assert len(stats["S2L2A"]["mean"]) == 12 and all(s > 0 for s in stats["S2L2A"]["std"])


def test_band_statistics_equal_a_direct_computation(clean_store: Path) -> None:
    """The stored mean / std per band are those of every valid pixel of the store (S2: non-zero
    DNs; S1: finite dB), computed here directly, not from the shards' partial moments."""
    stats = xr.open_zarr(clean_store).attrs[layout.ATTR_STATS]
    for modality in ("S2L2A", "S1RTC"):
        bands = xr.open_zarr(clean_store, group=modality)["bands"].values
        for b, name in enumerate(layout.BANDS[modality]):
            v = bands[:, :, b].astype(np.float64)
            v = v[v != 0] if modality == "S2L2A" else v[np.isfinite(v)]
            assert stats[modality]["count"][b] == v.size, name
            np.testing.assert_allclose(stats[modality]["mean"][b], v.mean(), rtol=1e-12)
            np.testing.assert_allclose(stats[modality]["std"][b], v.std(), rtol=1e-9)


@pytest.mark.parametrize("modality", ["S2L2A", "S1RTC"])
def test_partial_moments_combine_to_the_whole(modality: str) -> None:
    """Partial moments of shards (blocks with nodata, an empty shard) combine to the mean and
    std of all valid values."""
    from pipeline.store import combine_moments, partial_moments

    rng = np.random.default_rng(1)
    if modality == "S2L2A":
        data = rng.integers(1, 12000, size=(12, 4, 3, 30, 30)).astype(np.uint16)
        data[rng.random(data.shape) < 0.2] = 0
        data[4:8] = 0  # a shard without a valid pixel
        valid = data != 0
    else:
        data = rng.normal(-12, 5, size=(12, 4, 3, 30, 30)).astype(np.float32)
        data[rng.random(data.shape) < 0.2] = np.nan
        data[4:8] = np.nan
        valid = np.isfinite(data)
    parts = np.stack([partial_moments(data[k:k + 4], modality) for k in range(0, 12, 4)])
    count, mean, std = combine_moments(parts)
    for b in range(3):
        v = data[:, :, b][valid[:, :, b]].astype(np.float64)
        assert count[b] == v.size
        np.testing.assert_allclose(mean[b], v.mean(), rtol=1e-12)
        np.testing.assert_allclose(std[b], v.std(), rtol=1e-9)


def test_sigkill_midway_then_resume_equals_clean_run(demo_tables: dict, clean_store: Path,
                                                     tmp_path: Path) -> None:
    store = tmp_path / "cube.zarr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_build_cmd(demo_tables, store, "--workers", "1"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    killed_at = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (store / "status").exists():
                st = read_status(store)
                if (st == COMPLETE).sum() >= 2:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed_at = st
                    break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert killed_at is not None, "the build finished or never wrote a shard before the kill"
    after_kill = read_status(store)
    assert (after_kill == PENDING).any(), "the kill came too late to test a resume"
    # a killed run never marks a sample complete whose data is not written: resume fixes all
    rc = subprocess.run(_build_cmd(demo_tables, store, "--workers", "1"), env=env,
                        capture_output=True, text=True, timeout=600)
    assert rc.returncode == 0, rc.stdout + rc.stderr
    # the local cluster starts and stops quietly (Dask's INFO lines are not printed)
    assert "INFO distributed" not in rc.stdout + rc.stderr
    assert (read_status(store) == COMPLETE).all()
    assert_same_store(store, clean_store)


def test_separate_scheduler_and_two_workers(demo_tables: dict, clean_store: Path,
                                           tmp_path: Path) -> None:
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        import json

        address = json.loads(sched_file.read_text())["address"]
        for _ in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                 "--nworkers", "1", "--no-dashboard", "--host", "127.0.0.1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        from distributed import Client

        def profiling(dask_worker) -> bool:  # noqa: ANN001 - a distributed.Worker
            return "profile" in dask_worker.periodic_callbacks

        with Client(address, timeout="30s") as c:
            c.wait_for_workers(2, timeout=60)
            assert len(c.scheduler_info()["workers"]) == 2
            assert all(c.run(profiling).values())  # Dask's default: the task profiler on
        store = tmp_path / "cube.zarr"
        rc = subprocess.run(_build_cmd(demo_tables, store, "--scheduler", address),
                            capture_output=True, text=True, timeout=600)
        assert rc.returncode == 0, rc.stdout + rc.stderr
        assert_same_store(store, clean_store)
        # the build stopped the task profiler of workers it did not start, on Python 3.11
        # (pipeline.dask_plugins: it can deadlock a worker there)
        with Client(address, timeout="30s") as c:
            assert set(c.run(profiling).values()) == {not profiler_can_deadlock()}
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def test_stats_cli(clean_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    png = tmp_path / "stats.png"
    assert main(["stats", "--store", str(clean_store), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "B04" in out and "mean" in out and "complete" in out
    assert png.stat().st_size > 10_000


# ---------------------------------------------------------------------------- bad input
def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_missing_scenes_table(demo_tables: dict, tmp_path: Path, capsys) -> None:
    rc, err = _run(["build", "--locations", str(demo_tables["locations"]), "--scenes",
                    str(tmp_path / "nope.parquet"), "--store", str(tmp_path / "s.zarr")], capsys)
    assert rc == 2 and "does not exist" in err and "ssl4eo search" in err


def test_foreign_scenes_table(demo_tables: dict, tmp_path: Path, capsys) -> None:
    import pandas as pd

    bad = tmp_path / "other.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(bad)
    rc, err = _run(["build", "--locations", str(demo_tables["locations"]), "--scenes",
                    str(bad), "--store", str(tmp_path / "s.zarr")], capsys)
    assert rc == 2 and "lacks column" in err


def test_store_path_holding_something_else(demo_tables: dict, tmp_path: Path, capsys) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.txt").write_text("precious")
    rc, err = _run(["build", "--locations", str(demo_tables["locations"]), "--scenes",
                    str(demo_tables["scenes"]), "--store", str(target)], capsys)
    assert rc == 2 and "not an ssl4eo store" in err
    assert (target / "thesis.txt").read_text() == "precious"
    rc, err = _run(["build", "--locations", str(demo_tables["locations"]), "--scenes",
                    str(demo_tables["scenes"]), "--store", str(target), "--overwrite"], capsys)
    assert rc == 2 and (target / "thesis.txt").exists()


def test_store_path_not_writable(demo_tables: dict, tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, err = _run(["build", "--locations", str(demo_tables["locations"]), "--scenes",
                    str(demo_tables["scenes"]), "--store", str(afile / "cube.zarr")], capsys)
    assert rc == 2 and "cannot write the store" in err


def test_stats_of_a_missing_store(tmp_path: Path, capsys) -> None:
    rc, err = _run(["stats", "--store", str(tmp_path / "none.zarr")], capsys)
    assert rc == 2 and "does not exist" in err


def test_half_written_template_is_written_again(tmp_path: Path) -> None:
    """A kill while the template is written leaves a folder that is not yet recognisably ours;
    the marker beside it says whose it is, so the next run writes the template again."""
    from pipeline import store
    from pipeline.errors import StoreError

    path = tmp_path / "cube.zarr"
    (path / "S2L2A").mkdir(parents=True)
    (path / "S2L2A" / "zarr.json").write_text("{}")
    with pytest.raises(StoreError, match="not an ssl4eo store"):  # no marker: never touched
        store.create_store(path, ["0000000", "0000001"], ["S2L2A"], provenance={},
                           shard_samples=2)
    (tmp_path / "cube.zarr.ssl4eo-creating").write_text("x")
    assert store.create_store(path, ["0000000", "0000001"], ["S2L2A"], provenance={},
                              shard_samples=2)
    assert not (tmp_path / "cube.zarr.ssl4eo-creating").exists()
    assert read_status(path).tolist() == [PENDING, PENDING]


def test_shard_task_reads_only_its_row_groups(tmp_path: Path) -> None:
    """The scenes table is written sorted by sample in row groups of SCENES_ROW_GROUP rows; a
    shard task reads only the groups holding its samples (at 250,000 locations the table holds
    some 15 GB of item JSON), and gets exactly the rows a full read would give it, also from
    a table written by another tool (one group, unsorted)."""
    import random

    import pandas as pd
    import pyarrow.parquet as pq
    from test_cube_data import scene_row

    from pipeline import search
    from pipeline.runner import SHARD_SCENE_COLUMNS, read_shard_scenes, scene_row_groups

    item = {"id": "S2X", "properties": {"datetime": "2021-06-01T10:00:00Z"}, "assets": {}}
    rows = [scene_row(f"{i:07d}", season, m, None if (i + season) % 7 == 0 else item)
            for i in range(300) for season in range(4) for m in ("S1RTC", "S2L2A")]
    random.Random(0).shuffle(rows)
    for r in rows:  # the search's own row values: naive UTC times
        r.update(window_start="2021-01-01", window_end="2022-01-01",
                 datetime="2021-06-01T10:00:00" if r["status"] == "ok" else None)
    ours = search.write_scenes(search.scenes_frame(rows), tmp_path / "scenes.parquet", {},
                               {"provider": "test"})
    assert pq.ParquetFile(ours).metadata.num_row_groups == -(-2400 // layout.SCENES_ROW_GROUP)
    foreign = tmp_path / "foreign.parquet"
    pd.DataFrame(rows).to_parquet(foreign)  # one row group, rows in any order
    assert pq.ParquetFile(foreign).metadata.num_row_groups == 1

    everything = pd.read_parquet(foreign, columns=list(SHARD_SCENE_COLUMNS))
    for shard in (0, 1, 4):
        ids = [f"{i:07d}" for i in range(shard * 64, min(300, (shard + 1) * 64))]
        groups = scene_row_groups(ours, ids)
        assert 1 <= len(groups) <= 2, groups
        want = everything[everything["sample"].isin(ids)]
        want = want.sort_values(["sample", "season", "modality"]).reset_index(drop=True)
        for path in (ours, foreign):
            got = read_shard_scenes(path, ids)
            got = got.sort_values(["sample", "season", "modality"]).reset_index(drop=True)
            pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert scene_row_groups(ours, ["9999999"]) == []
    assert len(read_shard_scenes(ours, ["9999999"])) == 0
