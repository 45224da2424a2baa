"""A build at network latency: the tasks measure it, read each cube's files at once
(``cube.ReadPool``) and read more cubes at once, with the same pixels and no more HTTP
requests than a build over loopback (``benchmarks/latency.py`` measures the speed)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from test_reliability import assert_complete_samples_equal, rewrite_scenes

from pipeline import cube
from pipeline.faults import FaultProxy
from pipeline.runner import BuildOptions, run_build


def test_auto_read_threads_grow_with_latency():
    assert cube.auto_read_threads(0.0) == cube.BASE_READ_THREADS == 8
    assert cube.auto_read_threads(0.001) == 8
    assert cube.auto_read_threads(0.1) == 24
    assert cube.auto_read_threads(0.02) < cube.auto_read_threads(0.1)
    assert cube.auto_read_threads(10.0) == cube.MAX_READ_THREADS


def _shards_with_scenes(tables: dict, shard_samples: int) -> int:
    from pipeline.runner import read_locations

    ids = list(read_locations(tables["locations"])["sample"])
    scenes = pd.read_parquet(tables["scenes"])
    with_scenes = set(scenes.loc[scenes["status"] == "ok", "sample"])
    return sum(any(s in with_scenes for s in ids[k:k + shard_samples])
               for k in range(0, len(ids), shard_samples))


def _requests(stac_api) -> int:
    return int(stac_api.asset_stats()["requests"])


def test_build_at_latency_is_identical_with_no_more_requests(stac_api, demo_tables: dict,
                                                             clean_store: Path, tmp_path: Path):
    # one worker, one shard at a time: both builds read the files in the same order, so the
    # requests differ only by how the tasks read
    opts = BuildOptions(provider="local", shard_samples=2)
    n0 = _requests(stac_api)
    base = run_build(demo_tables["locations"], demo_tables["scenes"], tmp_path / "base.zarr",
                     options=opts, client_options={"workers": 1, "threads": 1}, progress=False)
    loopback = _requests(stac_api) - n0
    # loopback: nothing to hide (a busy moment may still make one task's probe slow)
    assert base["reading"]["latency_s_median"] < cube.READ_POOL_LATENCY_S, base["reading"]
    assert cube.BASE_READ_THREADS in base["reading"]["read_threads"]

    with FaultProxy(stac_api.asset_url, latency_s=0.03) as proxy:
        scenes = rewrite_scenes(demo_tables["scenes"], stac_api.asset_url, proxy.url,
                                tmp_path / "scenes.parquet")
        n1 = _requests(stac_api)
        slow = run_build(demo_tables["locations"], scenes, tmp_path / "slow.zarr",
                         options=opts, client_options={"workers": 1, "threads": 1},
                         progress=False)
        proxied = _requests(stac_api) - n1
    reading = slow["reading"]
    assert reading["latency_s_median"] >= 0.03
    # every shard that reads anything reads its cubes' files at once (a shard whose searches
    # found no scene reads nothing)
    assert reading["read_at_once"] == _shards_with_scenes(demo_tables, 2) > 0, reading
    assert max(reading["read_threads"]) > cube.BASE_READ_THREADS
    # reading a cube's files at once costs no request more than reading them in turn (GDAL
    # keeps what the latency probe's opens fetched): no more requests than over loopback, give
    # or take the tile reads of cubes that read a shared file at the same moment
    assert proxied <= 1.05 * loopback, (proxied, loopback)
    assert slow["status"]["complete"] == base["status"]["complete"] > 0
    assert assert_complete_samples_equal(tmp_path / "slow.zarr", clean_store) > 0


def test_read_pool_reads_a_cubes_files_at_once_with_the_same_pixels(stac_api, demo_tables: dict,
                                                                     tmp_path: Path):
    import numpy as np

    from pipeline.runner import read_locations

    with FaultProxy(stac_api.asset_url, latency_s=0.05) as proxy:
        scenes = pd.read_parquet(rewrite_scenes(demo_tables["scenes"], stac_api.asset_url,
                                                proxy.url, tmp_path / "scenes.parquet"))
        ok = scenes[(scenes["status"] == "ok") & (scenes["modality"] == "S2L2A")]
        locs = read_locations(demo_tables["locations"])
        loc = locs[locs["sample"] == ok["sample"].value_counts().index[0]].iloc[0].to_dict()
        n_scenes = int((ok["sample"] == loc["sample"]).sum())
        assert n_scenes >= 2

        def read(pool):  # -> (the cube, the most requests it had waiting at once)
            cube.clear_http_cache(cube.cube_hrefs("S2L2A", list(ok["item_json"])))
            proxy.reset_max_waiting()
            ds = cube.location_cubes(loc, scenes, modalities=("S2L2A",), compute=True,
                                     read_pool=pool)["S2L2A"]
            return ds, proxy.stats["max_waiting"]

        # the cube's own thread reads its files one after another (GDAL may overlap an open's
        # two requests) ...
        one_by_one, waiting_alone = read(None)
        assert waiting_alone <= 2
        # ... a ReadPool reads them at once: the bands of every scene wait together
        with cube.ReadPool(64) as pool:
            at_once, waiting = read(pool)
        assert waiting >= 4 * n_scenes, (waiting, n_scenes)
    np.testing.assert_array_equal(at_once["bands"].values, one_by_one["bands"].values)
    np.testing.assert_array_equal(at_once["cloud_mask"].values, one_by_one["cloud_mask"].values)
    np.testing.assert_array_equal(at_once["valid_fraction"].values,
                                  one_by_one["valid_fraction"].values)


def test_async_cog_reader_beside_gdal_reads_the_same_pixels_at_once(stac_api, demo_tables: dict,
                                                                     tmp_path: Path):
    """benchmarks/latency.py's async reader (async-tiff + obstore, then GDAL's WarpedVRT from
    memory): through a 30 ms proxy, every patch asset of the demo tables at once, each equal to
    the rasterio loop's read of the same file."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import async_cog

    with FaultProxy(stac_api.asset_url, latency_s=0.03) as proxy:
        scenes = rewrite_scenes(demo_tables["scenes"], stac_api.asset_url, proxy.url,
                                tmp_path / "scenes.parquet")
        tasks = async_cog.patch_reads(scenes, demo_tables["locations"])
        result = async_cog.compare(tasks, in_flight=16)
        waiting = proxy.stats["max_waiting"]
    assert result["reads"] == len(tasks) > 20
    assert result["identical"] == result["reads"], result
    assert waiting >= 16, waiting  # 16 assets in flight, each its header or its tiles
