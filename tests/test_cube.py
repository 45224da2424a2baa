"""The cube against an independent path: each band of each patch warped with rasterio's
WarpedVRT directly from the same COGs, on the same grid, with the same resampling."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray.testing as xr_testing
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from test_cube_data import REAL, SEASON_DATES, s1_scene, s2_scene

from pipeline import cube, layout, providers
from pipeline.errors import UserError

N = layout.PATCH_PIXELS
LOCAL = cube.get_provider("local")


def reference(href: str, grid: cube.Grid, resampling: str = "bilinear") -> np.ndarray:
    """The patch warped by GDAL directly (no stackstac, no dask)."""
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(href) as src:
        with WarpedVRT(src, crs=f"EPSG:{grid.epsg}", transform=grid.transform, width=N,
                       height=N, resampling=Resampling[resampling]) as vrt:
            return vrt.read(1)


# ------------------------------------------------------------------------------ real scenes
MAJORTOM = sorted((REAL / "majortom_s2l2a").glob("*/*/S2*")) if REAL.is_dir() else []
needs_real = pytest.mark.skipif(
    not MAJORTOM, reason="real Major-TOM cells not found under ../shared/data/real")


def majortom_item(d: Path) -> dict:
    baseline = d.name.split("_")[3][1:]
    return {"type": "Feature", "stac_version": "1.0.0", "id": d.name, "geometry": None,
            "links": [], "properties": {
                "datetime": f"{d.name[11:15]}-{d.name[15:17]}-{d.name[17:19]}T10:00:00Z",
                "s2:processing_baseline": f"{baseline[:2]}.{baseline[2:]}"},
            "assets": {b: {"href": str(d / f"{b}.tif")} for b in layout.BANDS["S2L2A"]}}


def _grid_inside(d: Path, epsg: int | None = None) -> cube.Grid:
    from pyproj import Transformer

    with rasterio.open(d / "B02.tif") as src:
        b = src.bounds
        own = src.crs.to_epsg()
    cx, cy = (b.left + b.right) / 2, (b.bottom + b.top) / 2
    if epsg and epsg != own:
        cx, cy = Transformer.from_crs(own, epsg, always_xy=True).transform(cx, cy)
    x0 = round(cx / 10) * 10 - 1320
    y0 = round(cy / 10) * 10 - 1320
    return cube.Grid(epsg or own, (x0, y0, x0 + 2640, y0 + 2640))


@needs_real
@pytest.mark.parametrize("cell", MAJORTOM, ids=lambda d: d.parent.name)
def test_real_scene_every_band_pixel_exact(cell: Path) -> None:
    grid = _grid_inside(cell)
    ds = cube.s2_cube([majortom_item(cell)], grid, provider=LOCAL).compute()
    assert ds.bands.shape == (1, 12, N, N) and ds.bands.dtype == np.uint16
    for i, band in enumerate(layout.BANDS["S2L2A"]):
        ref = reference(str(cell / f"{band}.tif"), grid)
        assert np.array_equal(ds.bands.values[0, i], ref), band  # offset >= 04.00: unchanged
    assert float(ds.valid_fraction[0]) == 1.0
    assert (ds.cloud_mask.values == cube.CLOUD_UNKNOWN).all()  # no SCL asset: unknown


@needs_real
def test_real_scene_on_utm_zone_boundary() -> None:
    """Cell 0U_199R lies at 17.9 E, at the 33/34 boundary: a location in zone 34 (EPSG:32634)
    reads the zone-33 scene through GDAL's reprojection, pixel-exact with the direct warp."""
    cell = next(d for d in MAJORTOM if "0U_199R" in str(d))
    grid = _grid_inside(cell, epsg=32634)
    ds = cube.s2_cube([majortom_item(cell)], grid, provider=LOCAL).compute()
    for i, band in enumerate(layout.BANDS["S2L2A"]):
        assert np.array_equal(ds.bands.values[0, i], reference(str(cell / f"{band}.tif"), grid))
    assert float(ds.valid_fraction[0]) > 0.99


# ------------------------------------------------------------------------- synthetic scenes
@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("synth")
    x0, y1 = 500003.0, 5000007.0
    s2 = [s2_scene(out, f"S2_{k}", 32633, x0, y1, SEASON_DATES[k], seed=k,
                   baseline="03.00" if k == 0 else "04.00", nodata_rows=30 if k == 1 else 0)
          for k in range(2)]
    s1 = [s1_scene(out, "S1_0", 32633, x0 - 7, y1 + 3, SEASON_DATES[0], nodata_cols=40)]
    # southern hemisphere, zone 55 S (Sydney-ish), and a location in zone 56 S reading it
    south = s2_scene(out, "S2_south", 32755, 700003.0, 6250007.0, SEASON_DATES[2], seed=5)
    grid = cube.Grid(32633, (500100.0, 4997200.0, 502740.0, 4999840.0))
    return {"dir": out, "s2": s2, "s1": s1, "south": south, "grid": grid}


@pytest.mark.parametrize("resampling", ["bilinear", "cubic"])
def test_synthetic_s2_every_band_and_harmonised(synth: dict, resampling: str) -> None:
    grid = synth["grid"]
    # listed newest first: the cube must be chronological
    ds = cube.s2_cube(synth["s2"][::-1], grid, provider=LOCAL, resampling=resampling).compute()
    assert list(ds.file_id.values) == ["S2_0", "S2_1"]
    assert (np.diff(ds.time.values) > np.timedelta64(0)).all()
    for k, item in enumerate(synth["s2"]):
        old = item["properties"]["s2:processing_baseline"] < "04.00"
        for i, band in enumerate(layout.BANDS["S2L2A"]):
            ref = reference(item["assets"][band]["href"], grid, resampling).astype(np.int64)
            if old:  # v1.1 convention: +1000 on valid pixels, 0 stays nodata
                ref = np.where(ref > 0, np.clip(ref + 1000, 1, 65535), 0)
            assert np.array_equal(ds.bands.values[k, i], ref), (item["id"], band)
        scl = reference(item["assets"]["SCL"]["href"], grid, "nearest")
        valid = (ds.bands.values[k] != 0).all(0) & ~np.isin(scl, layout.SCL_INVALID_CLASSES)
        want = np.where(valid, np.isin(scl, layout.SCL_CLOUD_CLASSES), 255)
        assert np.array_equal(ds.cloud_mask.values[k], want)
        assert float(ds.valid_fraction[k]) == pytest.approx(valid.mean(), abs=1e-6)
    # the 30 nodata rows of scene 1 are nodata in the cube, not data
    assert float(ds.valid_fraction[1]) < 1.0
    assert float(ds.valid_fraction[0]) == 1.0


@pytest.mark.parametrize("resampling", ["bilinear", "nearest"])
def test_files_on_the_grid_are_read_unwarped_with_the_same_pixels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resampling: str) -> None:
    """Scenes on the grid's 10 m lattice (same zone, whole-pixel offset): their 10 m files are
    read at the shifted window, not warped (:class:`pipeline.cube.OnGridDataset`), the 20 m /
    60 m ones are warped as before, and every band equals GDAL's warp, over the scene's edge
    (outside: the file's nodata) and its nodata rows and columns included."""
    s2 = s2_scene(tmp_path, "S2_on_grid", 32633, 500000.0, 5000000.0, SEASON_DATES[0],
                  seed=3, nodata_rows=30)
    s1 = s1_scene(tmp_path, "S1_on_grid", 32633, 500000.0, 5000000.0, SEASON_DATES[0],
                  nodata_cols=40)
    read = []
    orig = cube.OnGridDataset.read
    monkeypatch.setattr(cube.OnGridDataset, "read",
                        lambda self, window, **kw: read.append(1) or orig(self, window, **kw))
    ten_m = [b for b in layout.BANDS["S2L2A"] if layout.S2_BAND_GSD[b] == 10]
    for grid in (cube.Grid(32633, (500100.0, 4997200.0, 502740.0, 4999840.0)),  # inside
                 cube.Grid(32633, (499000.0, 4998700.0, 501640.0, 5001340.0))):  # over a corner
        read.clear()
        ds = cube.s2_cube([s2], grid, provider=LOCAL, resampling=resampling).compute()
        assert len(read) == len(ten_m)  # the 10 m bands only
        for i, band in enumerate(layout.BANDS["S2L2A"]):
            ref = reference(s2["assets"][band]["href"], grid, resampling)
            assert np.array_equal(ds.bands.values[0, i], ref), (grid, band)
        read.clear()
        lin = cube.s1_cube([s1], grid, provider=LOCAL, resampling=resampling,
                           compute=True).bands.values[0]
        assert len(read) == 2
        for i, pol in enumerate(("vv", "vh")):
            ref = reference(s1["assets"][pol]["href"], grid, resampling)
            want = cube.rtc_to_db(np.where(ref == layout.S1_RTC_FILE_NODATA, np.nan, ref))
            assert np.array_equal(lin[i], want, equal_nan=True), (grid, pol)
    # not on the lattice (3 m off): warped, as every file was before
    off = s2_scene(tmp_path, "S2_off_grid", 32633, 500003.0, 5000000.0, SEASON_DATES[0])
    read.clear()
    cube.s2_cube([off], cube.Grid(32633, (500100.0, 4997200.0, 502740.0, 4999840.0)),
                 provider=LOCAL).compute()
    assert read == []


def test_offset_conventions(synth: dict) -> None:
    grid = synth["grid"]
    v11 = cube.s2_cube(synth["s2"], grid, provider=LOCAL).bands.values
    v1 = cube.s2_cube(synth["s2"], grid, provider=LOCAL, convention="v1").bands.values
    raw_old = reference(synth["s2"][0]["assets"]["B04"]["href"], grid)
    raw_new = reference(synth["s2"][1]["assets"]["B04"]["href"], grid)
    assert np.array_equal(v1[0, 3], raw_old)  # old scene unchanged in v1
    assert np.array_equal(v11[1, 3], raw_new)  # new scene unchanged in v1.1
    sub = np.where(raw_new > 0, np.clip(raw_new.astype(int) - 1000, 1, None), 0)
    assert np.array_equal(v1[1, 3], sub)
    assert ((v11[1, 3] == 0) == (raw_new == 0)).all()


@pytest.mark.parametrize("shifts", [(1000, 0), (-1000, 1000), (0, -1000), (0, 0), (1, -1)])
def test_harmonise_s2_equals_clipped_int_arithmetic(shifts: tuple[int, int]) -> None:
    """The uint16 kernel equals clip(b + shift, 1, 65535) on valid pixels, 0 on nodata, at
    the uint16 edges too (no wrap-around, a valid pixel never becomes nodata)."""
    rng = np.random.default_rng(0)
    bands = rng.integers(0, 65536, size=(2, 3, 40, 40), dtype=np.uint16)
    edges = [0, 1, 2, 999, 1000, 1001, 64535, 64536, 65534, 65535]
    bands[0, 0, 0, :10] = edges
    bands[1, 2, 1, :10] = edges
    shift = np.array(shifts, dtype=np.int32).reshape(-1, 1, 1, 1)
    expected = np.where(bands > 0, np.clip(bands.astype(np.int64) + shift, 1, 65535), 0)
    got = cube.harmonise_s2(bands, shift)
    assert got.dtype == np.uint16
    assert np.array_equal(got, expected)
    assert np.array_equal(bands[0, 0, 0, :3], [0, 1, 2])  # the input is left as it was


def test_one_chunk_cube_equals_chunk_per_scene(synth: dict) -> None:
    """The build computes each cube as one dask chunk (``time_chunk=None``); notebooks get a
    chunk per scene. Both give the same cube, harmonisation of mixed baselines included."""
    grid = synth["grid"]
    for make, items in ((cube.s2_cube, synth["s2"]), (cube.s1_cube, synth["s1"])):
        per_scene = make(items, grid, provider=LOCAL)
        whole = make(items, grid, provider=LOCAL, time_chunk=None)
        assert per_scene.bands.data.numblocks[0] == len(items)
        assert whole.bands.data.numblocks[0] == 1
        xr_testing.assert_identical(per_scene.compute(), whole.compute())


def test_computed_cube_equals_lazy_cube(synth: dict, tmp_path: Path) -> None:
    """The build's cubes (``compute=True``: stackstac's arrays computed, then the kernels on
    whole arrays) equal the lazy cubes computed by dask: S2 with and without SCL (mixed
    baselines), S1, and location_cubes' season coordinate."""
    import pandas as pd
    from test_cube_data import synthetic_build_inputs

    grid = synth["grid"]
    no_scl = [{**it, "assets": {k: a for k, a in it["assets"].items() if k != "SCL"}}
              for it in synth["s2"]]
    for make, items in ((cube.s2_cube, synth["s2"]), (cube.s2_cube, no_scl),
                        (cube.s1_cube, synth["s1"])):
        computed = make(items, grid, provider=LOCAL, compute=True)
        assert all(v.chunks is None for v in computed.variables.values())  # numpy, not dask
        xr_testing.assert_identical(make(items, grid, provider=LOCAL).compute(), computed)
    assert (cube.s2_cube(no_scl, grid, provider=LOCAL, compute=True).cloud_mask == 255).all()

    loc, sc = synthetic_build_inputs(tmp_path, 1, missing={(0, 1, "S2L2A")})
    location = pd.read_parquet(loc).iloc[0].to_dict()
    scenes = pd.read_parquet(sc)
    lazy = cube.location_cubes(location, scenes, provider=LOCAL)
    computed = cube.location_cubes(location, scenes, provider=LOCAL, compute=True)
    assert sorted(lazy) == sorted(computed) == ["S1RTC", "S2L2A"]
    for m in lazy:
        xr_testing.assert_identical(lazy[m].compute(), computed[m])


def test_s1_db_and_nodata(synth: dict) -> None:
    grid = cube.Grid(32633, (499990.0, 4996600.0, 502630.0, 4999240.0))  # over the nodata edge
    ds = cube.s1_cube(synth["s1"], grid, provider=LOCAL).compute()
    assert ds.bands.dtype == np.float32
    for i, pol in enumerate(("vv", "vh")):
        lin = reference(synth["s1"][0]["assets"][pol]["href"], grid)
        lin = np.where((lin == layout.S1_RTC_FILE_NODATA) | (lin <= 0), np.nan, lin)
        want = (10.0 * np.log10(lin.astype(np.float32))).astype(np.float32)
        got = ds.bands.values[0, i]
        assert np.array_equal(np.isnan(got), np.isnan(want)), pol
        assert np.array_equal(got, want, equal_nan=True), pol
        assert np.isnan(got[:, :5]).all() and np.isfinite(got[:, 50:]).all()
        assert np.nanmax(got) <= 0 and np.nanmin(got) > -30  # dB of 0.002..0.6
    assert 0 < float(ds.valid_fraction[0]) < 1


@pytest.mark.parametrize("epsg", [32755, 32756])
def test_southern_hemisphere(synth: dict, epsg: int) -> None:
    from pyproj import Transformer

    item = synth["south"]
    x, y = 700003.0 + 1800, 6250007.0 - 1800
    if epsg != 32755:
        x, y = Transformer.from_crs(32755, epsg, always_xy=True).transform(x, y)
    x0, y0 = round(x / 10) * 10 - 1320, round(y / 10) * 10 - 1320
    grid = cube.Grid(epsg, (x0, y0, x0 + 2640, y0 + 2640))
    ds = cube.s2_cube([item], grid, provider=LOCAL).compute()
    assert ds.y.values[0] > ds.y.values[-1] and ds.y.values[0] < 10_000_000  # northing, south
    for i, band in enumerate(layout.BANDS["S2L2A"]):
        assert np.array_equal(ds.bands.values[0, i], reference(item["assets"][band]["href"],
                                                               grid)), band


def test_grid_is_checked() -> None:
    with pytest.raises(UserError, match="not a 264 x 264 px patch"):
        cube.Grid.from_location({"sample": "0000001", "epsg": 32633, "xmin": 0, "ymin": 0,
                                 "xmax": 2650, "ymax": 2640})
    with pytest.raises(UserError, match="snapped"):
        cube.Grid.from_location({"sample": "0000001", "epsg": 32633, "xmin": 5, "ymin": 0,
                                 "xmax": 2645, "ymax": 2640})


def test_missing_asset_is_an_error_not_fill(synth: dict, tmp_path: Path) -> None:
    item = json.loads(json.dumps(synth["s2"][1]))
    del item["assets"]["B8A"]
    with pytest.raises(UserError, match="B8A"):
        cube.s2_cube([item], synth["grid"], provider=LOCAL)
    item = json.loads(json.dumps(synth["s2"][1]))
    item["assets"]["B03"]["href"] = str(tmp_path / "gone.tif")
    with pytest.raises(Exception, match="gone.tif"):
        cube.s2_cube([item], synth["grid"], provider=LOCAL).compute()


def test_metadata_disagreeing_with_file(synth: dict) -> None:
    """Item metadata claims another place and CRS: the file's georeferencing decides, so the
    patch is still exact (the footprint metadata is never trusted to place pixels)."""
    item = json.loads(json.dumps(synth["s2"][1]))
    item["properties"]["proj:epsg"] = 32632
    for a in item["assets"].values():
        a["proj:transform"] = [10, 0, 100000, 0, -10, 200000]
    ds = cube.s2_cube([item], synth["grid"], provider=LOCAL).compute()
    ref = reference(item["assets"]["B02"]["href"], synth["grid"])
    assert np.array_equal(ds.bands.values[0, 1], ref)


def test_signed_just_before_reading_over_http(synth: dict) -> None:
    """Hrefs in the table are unsigned and unreadable; the provider's signer makes them
    readable URLs on the loopback Range server when each file is opened, and the result
    equals the local read."""
    import cloudpickle

    from pipeline.demo.httpserver import make_server

    server = make_server(synth["dir"])
    th = threading.Thread(target=server.serve_forever, daemon=True)
    th.start()
    try:
        port = server.server_address[1]
        base = str(synth["dir"])
        item = json.loads(json.dumps(synth["s2"][1]).replace(base, "unsigned://cat"))
        calls: list[str] = []

        def sign(href: str) -> str:
            calls.append(href)
            return href.replace("unsigned://cat", f"http://127.0.0.1:{port}")

        prov = providers.Provider(
            name="test", url="", collections={"S2L2A": "sentinel-2-l2a"},
            assets={"S2L2A": LOCAL.band_assets("S2L2A")}, signer_func=sign)
        lazy = cube.s2_cube([item], synth["grid"], provider=prov)
        # nothing is signed while the graph is built, and no signed URL is in it
        assert calls == []
        assert f"127.0.0.1:{port}".encode() not in cloudpickle.dumps(lazy)
        assert "unsigned" in json.dumps(item)  # the caller's item is not modified
        http = lazy.compute()
        # each of the 13 assets (12 bands + SCL) signed once, when its file was opened
        keys = [LOCAL.band_assets("S2L2A")[b] for b in layout.BANDS["S2L2A"]] + ["SCL"]
        assert sorted(calls) == sorted(item["assets"][k]["href"] for k in keys)
        local = cube.s2_cube([synth["s2"][1]], synth["grid"], provider=LOCAL).compute()
        assert np.array_equal(http.bands.values, local.bands.values)
        assert np.array_equal(http.cloud_mask.values, local.cloud_mask.values)
        assert server.stats.requests > 0 if hasattr(server.stats, "requests") else True
    finally:
        server.shutdown()
        server.server_close()


def test_location_cubes_season_coordinate(tmp_path: Path) -> None:
    import pandas as pd
    from test_cube_data import synthetic_build_inputs

    loc, sc = synthetic_build_inputs(tmp_path, 1, missing={(0, 1, "S2L2A")})
    locs = pd.read_parquet(loc)
    scenes = pd.read_parquet(sc)
    cubes = cube.location_cubes(locs.iloc[0].to_dict(), scenes, provider=LOCAL)
    assert list(cubes["S2L2A"].season.values) == [0, 2, 3]
    assert list(cubes["S1RTC"].season.values) == [0, 1, 2, 3]
    assert cubes["S1RTC"].bands.dtype == np.float32


def _dot_sign(href: str) -> str:
    """A 'signer' for local files: another spelling of the same path (picklable by name)."""
    head, tail = href.rsplit("/", 1)
    return f"{head}/./{tail}"


def test_reader_pickles_unsigned(synth: dict) -> None:
    """A reader moved between Dask workers carries the unsigned href and the signer, never a
    signed URL: the receiving worker signs again when it opens the file."""
    import pickle

    from rasterio.enums import Resampling
    from rasterio.windows import Window
    from stackstac.raster_spec import RasterSpec

    href = synth["s2"][0]["assets"]["B04"]["href"]
    grid = synth["grid"]
    reader = cube.RetryingRioReader(
        url=href, sign=_dot_sign, sign_retries=1,
        spec=RasterSpec(epsg=grid.epsg, bounds=grid.bounds, resolutions_xy=(10.0, 10.0)),
        resampling=Resampling.bilinear, dtype=np.dtype("uint16"), fill_value=np.uint16(0),
        scale_offset=(1, 0), gdal_env=cube.gdal_env())
    ref = reference(href, grid)
    assert np.array_equal(reader.read(Window(0, 0, N, N)), ref)
    assert reader.url == _dot_sign(href) != reader.href  # opened through the signed URL
    blob = pickle.dumps(reader)
    assert reader.url.encode() not in blob
    copy = pickle.loads(blob)
    assert (copy.href, copy.sign_retries) == (href, 1)
    assert np.array_equal(copy.read(Window(0, 0, N, N)), ref)
