"""Provider profiles as data, offsets from item metadata, S2 L1C from JPEG 2000, and the bulk
search over STAC GeoParquet snapshots.

Real item shapes: Planetary Computer's recorded items (``../shared/data/stac``), Earth Search's
recorded item (``tests/data/earth_search``, see its SOURCES.md) and the embedded catalog's own.
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline import cube, layout
from pipeline.config import load_config
from pipeline.errors import ConfigError, UserError
from pipeline.providers import (
    PROVIDER_NAMES,
    builtin_profile,
    get_provider,
    provider_from_dict,
    s2_offset_rule,
)
from pipeline.search import MalformedItem, SnapshotSearch, parse_item

HERE = Path(__file__).parent
ES_ITEM = HERE / "data" / "earth_search" / "sentinel-2-l2a_S2A_39QTA_20230628_0_L2A.json"


def _es_item() -> dict:
    return json.loads(ES_ITEM.read_text())


def _pc_items(shared_dir: Path | None) -> list[dict]:
    if shared_dir is None:
        pytest.skip("../shared (real Planetary Computer items) is not there")
    return [json.loads(p.read_text())
            for p in sorted((shared_dir / "data" / "stac").glob("sentinel-2-l2a_S2*.json"))]


# ------------------------------------------------------------------------------ profiles
@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_builtin_profiles_are_data_and_round_trip(name):
    raw = builtin_profile(name)
    assert raw["name"] == name  # the YAML file is the profile
    prov = get_provider(name, "http://127.0.0.1:1" if name == "local" else None)
    again = provider_from_dict(prov.to_dict())
    assert again.to_dict() == prov.to_dict()
    for m in prov.collections:
        assert set(layout.BANDS[m]) <= set(prov.band_assets(m))
    assert again.sign("https://x/y.tif") == prov.sign("https://x/y.tif") or name == \
        "planetary-computer"  # PC's signer asks a token service (no network here)
    assert again.signing == prov.signing


def test_profile_from_config_with_base_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "providers:\n"
        "  my-mirror:\n"
        "    base: earth-search\n"
        "    url: http://127.0.0.1:9/stac\n"
        "    gdal: {GDAL_HTTP_MAX_RETRY: 9}\n"
        "    modalities:\n"
        "      S2L2A: {collection: s2-mirror}\n"
        "search: {provider: my-mirror, modalities: [S2L2A, S2L1C]}\n"
    )
    cfg = load_config(path=path)
    prov = SnapshotSearch(cfg, ["unused.parquet"]).provider
    assert prov.name == "my-mirror" and prov.url == "http://127.0.0.1:9/stac"
    assert prov.collection("S2L2A") == "s2-mirror"
    assert prov.asset_key("S2L2A", "B04") == "red"  # from the base profile
    assert prov.collection("S2L1C") == "sentinel-2-l1c"
    assert prov.gdal_options("S2L1C") == {"GDAL_HTTP_MAX_RETRY": "9",
                                          "AWS_REQUEST_PAYER": "requester",
                                          "AWS_REGION": "eu-central-1"}
    assert prov.gdal_options("S2L2A") == {"GDAL_HTTP_MAX_RETRY": "9"}


@pytest.mark.parametrize("entry, field", [
    ({"base": "earth-search", "modalities": {"S2L2A": {"assets": {"B99": "x"}}}},
     r"providers\.bad\.modalities\.S2L2A\.assets: unknown band name\(s\) \['B99'\]"),
    ({"modalities": {"S2L2A": {"collection": "c", "assets": {"B01": "b1"}}}},
     r"providers\.bad\.modalities\.S2L2A\.assets: band\(s\) \['B02'"),
    ({"modalities": {"S2L2A": {"assets": {}}}},
     r"providers\.bad\.modalities\.S2L2A\.collection: missing"),
    ({"base": "earth-search", "offset_rule": "guess"},
     r"providers\.bad\.offset_rule: 'guess' is not one of metadata, baseline, none"),
    ({"base": "earth-search", "gdal": {"AWS_SECRET_ACCESS_KEY": "x"}},
     r"providers\.bad\.gdal\.AWS_SECRET_ACCESS_KEY: credentials do not belong"),
    ({"base": "earth-search", "colections": {}},
     r"providers\.bad: unknown field\(s\) \['colections'\]"),
    ({"base": "earth-search", "signing": "nomodule"},
     r"providers\.bad\.signing: 'nomodule' is not"),
    ({"base": "earth-search", "modalities": {"S3OLCI": {}}},
     r"providers\.bad\.modalities\.S3OLCI: unknown modality"),
])
def test_bad_profile_fields_are_named(tmp_path, entry, field):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"providers": {"bad": entry}}))
    with pytest.raises(ConfigError, match=field):
        load_config(path=path)


def test_unknown_asset_key_in_the_items_names_the_profile_field():
    """A profile whose asset key the items do not have: every item is skipped as malformed,
    and the reason names the bands (the scenes' missing rows carry it)."""
    prov = get_provider("earth-search")
    item = _es_item()
    bad = provider_from_dict({**prov.to_dict(), "name": "typo", "modalities": {
        "S2L2A": {**prov.to_dict()["modalities"]["S2L2A"],
                  "assets": {**prov.band_assets("S2L2A"), "B04": "rouge"}}}})
    with pytest.raises(MalformedItem, match=r"no asset for bands \['B04'\]"):
        parse_item(item, "S2L2A", bad)


# ------------------------------------------------------------------ real items, each provider
def test_real_items_of_each_builtin_provider(shared_dir, demo_catalog):
    from pipeline.demo.serve import read_catalog

    es = parse_item(_es_item(), "S2L2A", get_provider("earth-search"))
    assert (es.dn_offset, es.offset_rule) == (0, "earthsearch:boa_offset_applied")
    pc = get_provider("planetary-computer")
    got = {}
    for item in _pc_items(shared_dir):
        sc = parse_item(item, "S2L2A", pc)
        got[sc.item_id[:26]] = (sc.dn_offset, sc.offset_rule)
    # 2019 scenes (baseline 02.xx) carry no offset, 2024 ones (05.10) do; PC has no raster:bands
    assert got["S2A_MSIL2A_20190101T000001"] == (0, "s2:processing_baseline")
    assert got["S2B_MSIL2A_20240419T095549"] == (1000, "s2:processing_baseline")
    local = get_provider("local", "http://127.0.0.1:1")
    s2 = [i for _, i in read_catalog(demo_catalog).items if i["collection"] == "sentinel-2-l2a"]
    rules = {parse_item(i, "S2L2A", local).offset_rule for i in s2}
    assert rules == {"s2:processing_baseline"}
    # a Planetary Computer item does not parse with Earth Search's asset keys, and vice versa
    with pytest.raises(MalformedItem, match="no asset for bands"):
        parse_item(_es_item(), "S2L2A", pc)


def test_offset_rule_order():
    item = _es_item()
    assert s2_offset_rule(item) == (0, "earthsearch:boa_offset_applied")
    raw = copy.deepcopy(item)
    raw["properties"]["earthsearch:boa_offset_applied"] = False
    assert s2_offset_rule(raw) == (1000, "raster:bands")
    zero = copy.deepcopy(raw)
    for a in zero["assets"].values():
        for rb in a.get("raster:bands", []):
            if "offset" in rb and rb.get("scale") == 0.0001:
                rb["offset"] = 0
    assert s2_offset_rule(zero) == (0, "raster:bands")
    assert s2_offset_rule(zero, "baseline") == (1000, "s2:processing_baseline")
    assert s2_offset_rule(zero, "none")[0] == 0
    bare = {"id": "x", "collection": "sentinel-2-l2a",
            "properties": {"s2:product_uri": "S2B_MSIL2A_20180101T000000_N0206_R001_T01AAA_X",
                           "datetime": "2023-01-01T00:00:00Z"}, "assets": {}}
    assert s2_offset_rule(bare) == (0, "product id")
    del bare["properties"]["s2:product_uri"]
    assert s2_offset_rule(bare) == (1000, "datetime")
    mixed = copy.deepcopy(raw)
    mixed["assets"]["red"]["raster:bands"][0]["offset"] = 0
    with pytest.raises(ValueError, match="different raster:bands offsets"):
        s2_offset_rule(mixed)


# ----------------------------------------------------------- files written and served here
EPSG = 32633
X0, Y0, SIDE = 500_000.0, 5_000_040.0, 6000.0
RES = {b: layout.S2_BAND_GSD[b] for b in layout.BANDS[layout.S2L1C]} | {"SCL": 20}


def _reflectance(band: str, res: int) -> np.ndarray:
    """Deterministic reflectance x 10000 of one band (no offset), nodata in one corner."""
    n = int(SIDE // res)
    yy, xx = np.mgrid[0:n, 0:n]
    k = layout.BANDS[layout.S2L1C].index(band) if band in layout.BANDS[layout.S2L1C] else 0
    v = (300 + 40 * k + 7 * xx + 5 * yy + (xx * yy) % 97).astype(np.uint16)
    v[: n // 8, : n // 8] = 0
    return v


def _write(path: Path, data: np.ndarray, res: int, driver: str) -> None:
    import rasterio
    from affine import Affine

    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": driver, "width": data.shape[1], "height": data.shape[0], "count": 1,
               "dtype": data.dtype.name, "crs": f"EPSG:{EPSG}", "nodata": 0,
               "transform": Affine(res, 0, X0, 0, -res, Y0)}
    if driver == "JP2OpenJPEG":
        profile.update(QUALITY="100", REVERSIBLE="YES", BLOCKXSIZE="256", BLOCKYSIZE="256")
    else:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)


def _footprint() -> dict:
    import shapely
    from pyproj import Transformer

    t = Transformer.from_crs(EPSG, 4326, always_xy=True)
    xs = [X0, X0 + SIDE, X0 + SIDE, X0, X0]
    ys = [Y0, Y0, Y0 - SIDE, Y0 - SIDE, Y0]
    lon, lat = t.transform(xs, ys)
    return shapely.geometry.mapping(shapely.Polygon(zip(lon, lat, strict=True)))


def _item(item_id: str, collection: str, when: str, hrefs: dict[str, str], props: dict) -> dict:
    import shapely

    geometry = _footprint()
    return {"type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": collection,
            "geometry": geometry, "links": [],
            "bbox": list(shapely.geometry.shape(geometry).bounds),
            "properties": {"datetime": when, "eo:cloud_cover": 1.5, "proj:epsg": EPSG, **props},
            "assets": {k: {"href": h, "type": "image/jp2" if h.endswith(".jp2") else
                           "image/tiff; application=geotiff", "roles": ["data"]}
                       for k, h in hrefs.items()}}


@pytest.fixture()
def served_dir(tmp_path):
    """``tmp_path/www`` served on loopback by the Range-capable asset server."""
    from pipeline.demo.httpserver import make_server

    root = tmp_path / "www"
    root.mkdir()
    server = make_server(root)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield root, f"http://{host}:{port}", server
    finally:
        server.shutdown()
        server.server_close()


def _location():
    from pyproj import Transformer

    from pipeline.sampling import locations_from_points

    lon, lat = Transformer.from_crs(EPSG, 4326, always_xy=True).transform(
        X0 + SIDE / 2, Y0 - SIDE / 2)
    return locations_from_points(np.array([lon]), np.array([lat]), "test")


def _direct(url: str, grid: cube.Grid, resampling: str) -> np.ndarray:
    """GDAL's own read of ``url`` warped onto the patch grid (the reference)."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    with rasterio.Env(**cube.GDAL_HTTP_ENV), rasterio.open(url) as src, WarpedVRT(
            src, crs=f"EPSG:{grid.epsg}", transform=grid.transform,
            width=layout.PATCH_PIXELS, height=layout.PATCH_PIXELS,
            resampling=Resampling[resampling], nodata=0) as vrt:
        return vrt.read(1)


def test_pre_harmonised_and_raw_items_give_identical_values(served_dir):
    """The same reflectances written twice: raw (DN + 1000, raster:bands offset -0.1) and
    pre-harmonised (DN, earthsearch:boa_offset_applied). Both land on the same values."""
    root, url, _ = served_dir
    prov = get_provider("earth-search")
    keys = prov.band_assets("S2L2A")
    items = []
    for name, add, props in (
            ("raw", 1000, {"s2:processing_baseline": "05.09",
                           "earthsearch:boa_offset_applied": False}),
            ("harmonised", 0, {"s2:processing_baseline": "05.09",
                               "earthsearch:boa_offset_applied": True})):
        hrefs = {}
        for band, key in keys.items():
            res = RES.get(band, 20)
            data = _reflectance(band, res)
            if band != "SCL":
                data = np.where(data > 0, data + add, 0).astype(np.uint16)
            else:
                data = np.where(data > 0, 4, 0).astype(np.uint8)
            _write(root / name / f"{band}.tif", data, res, "GTiff")
            hrefs[key] = f"{url}/{name}/{band}.tif"
        item = _item(f"S2A_{name}", "sentinel-2-l2a", "2023-06-28T07:24:41Z", hrefs, props)
        for band, key in keys.items():
            if band != "SCL":
                item["assets"][key]["raster:bands"] = [{"nodata": 0, "scale": 0.0001,
                                                        "offset": -0.1}]
        items.append(item)
    grid = cube.Grid.from_location(_location().iloc[0])
    # nearest: bilinear weights round x + 1000 and x differently at a .5 (one pixel in 10^6)
    raw, harm = (cube.s2_cube([it], grid, provider=prov, compute=True, resampling="nearest")
                 for it in items)
    assert list(raw["offset_rule"].values) == ["raster:bands"]
    assert list(harm["offset_rule"].values) == ["earthsearch:boa_offset_applied"]
    np.testing.assert_array_equal(raw["bands"].values, harm["bands"].values)
    # and the values are the v1.1 convention: reflectance x 10000 + 1000 on valid pixels
    b02 = raw["bands"].sel(band="B02").values[0]
    ref = _direct(f"{url}/harmonised/B02.tif", grid, "nearest")
    np.testing.assert_array_equal(b02, np.where(ref > 0, ref + 1000, 0))


def _l1c_scene(root: Path, url: str, name: str, add: int) -> dict[str, str]:
    keys = get_provider("earth-search").band_assets("S2L1C")
    hrefs = {}
    for band, key in keys.items():
        data = _reflectance(band, RES[band])
        data = np.where(data > 0, data + add, 0).astype(np.uint16)
        _write(root / "l1c" / name / f"{band}.jp2", data, RES[band], "JP2OpenJPEG")
        hrefs[key] = f"{url}/l1c/{name}/{band}.jp2"
    return hrefs


def test_l1c_13_bands_from_jp2_served_on_loopback(served_dir, tmp_path):
    """Earth-Search-shaped S2 L1C items with JPEG 2000 assets, served over HTTP (Range):
    searched from a GeoParquet snapshot, built into the opt-in S2L1C group, values equal to
    GDAL's direct read of each JP2 warped onto the patch grid."""
    import stac_geoparquet.arrow as sga
    import xarray as xr

    from pipeline.runner import BuildOptions, run_build
    from pipeline.sampling import write_locations
    from pipeline.search import search_locations

    root, url, server = served_dir
    new = _item("S2A_33TWL_20220705_0_L1C", "sentinel-2-l1c", "2022-07-05T10:00:00Z",
                _l1c_scene(root, url, "new", 1000), {"s2:processing_baseline": "04.00"})
    old = _item("S2A_33TWL_20220105_0_L1C", "sentinel-2-l1c", "2022-01-05T10:00:00Z",
                _l1c_scene(root, url, "old", 0), {"s2:processing_baseline": "03.01"})
    snap = tmp_path / "l1c.parquet"
    sga.to_parquet(sga.parse_stac_items_to_arrow([new, old]).read_all(), snap)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text("preset: demo\nsearch: {provider: earth-search, modalities: [S2L1C]}\n")
    cfg = load_config(path=cfg_path)
    locations = write_locations(_location(), tmp_path / "locations.parquet", cfg)
    scenes = tmp_path / "scenes.parquet"
    info = search_locations(locations, scenes, cfg, progress=False, items=[str(snap)])
    assert info["requests"] == 0 and info["profile"]["name"] == "earth-search"
    store = tmp_path / "cube.zarr"
    # nearest: with bilinear, GDAL's warp of a window (stackstac) and of the whole patch
    # (the reference) round a few .5 ties of the 60 m JP2 bands differently (3 px in 70,000)
    out = run_build(locations, scenes, store,
                    options=BuildOptions(resampling="nearest"),  # and the recorded profile
                    client_options={"workers": 1, "threads": 2}, progress=False)
    assert out["status"] == {"complete": 1, "failed": 0, "pending": 0}
    ds = xr.open_zarr(store, group="S2L1C")
    assert list(ds["band"].values) == list(layout.BANDS[layout.S2L1C])
    grid = cube.Grid.from_location(_location().iloc[0])
    # calendar seasons of 2022: DJF (Dec 2021 - Feb) holds the January scene, JJA the July one
    for season, name, shift in ((0, "old", 1000), (2, "new", 0)):
        for band in ("B02", "B05", "B10"):  # 10, 20 and 60 m
            want = _direct(f"{url}/l1c/{name}/{band}.jp2", grid, "nearest")
            want = np.where(want > 0, want.astype(np.int32) + shift, 0).astype(np.uint16)
            got = ds["bands"].sel(band=band).values[0, season]
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {band}")
    # no SCL for L1C: the cloud state is unknown (255), documented in the README
    assert set(np.unique(ds["cloud_mask"].values[0, 2])) <= {cube.CLOUD_UNKNOWN}
    assert server.stats.as_dict()["requests"] > 0


# --------------------------------------------------------------- the build reads the profile
ES_KEYS = get_provider("earth-search").band_assets("S2L2A")


def _as_earth_search(item: dict) -> dict:
    """An embedded-catalog S2 item re-keyed as Earth Search names its assets, with Earth
    Search's raster:bands (offset -0.1 from baseline 04.00: these files carry the offset)."""
    out = copy.deepcopy(item)
    has_offset = s2_offset_rule(item)[0] == layout.S2_BASELINE_OFFSET
    assets = {}
    for band, key in ES_KEYS.items():
        a = dict(item["assets"][band])
        if band != "SCL":
            a["raster:bands"] = [{"nodata": 0, "data_type": "uint16", "scale": 0.0001,
                                  "offset": -0.1 if has_offset else 0.0}]
        assets[key] = a
    out["assets"] = assets
    out["properties"]["earthsearch:boa_offset_applied"] = False
    return out


def test_search_with_earth_search_profile_then_plain_build(stac_api, demo_catalog, demo_tables,
                                                           clean_store, tmp_path):
    """The new user's path of the issue: Earth-Search-shaped items found with
    ``provider: earth-search``, then a plain build (no --provider) reads them with the
    recorded profile, and the values equal the local-profile build of the same scenes."""
    import stac_geoparquet.arrow as sga
    import xarray as xr

    from pipeline.demo.serve import read_catalog, rewrite_for_serving
    from pipeline.runner import BuildOptions, run_build
    from pipeline.search import read_scenes, search_locations

    files = read_catalog(demo_catalog)
    items = [_as_earth_search(rewrite_for_serving(i, p, files.root, stac_api.asset_url))
             for p, i in files.items if i["collection"] == "sentinel-2-l2a"]
    snap = tmp_path / "es.parquet"
    sga.to_parquet(sga.parse_stac_items_to_arrow(items).read_all(), snap)
    cfg = load_config("demo", overrides={"search": {"provider": "earth-search",
                                                    "modalities": ["S2L2A"]}})
    scenes = tmp_path / "scenes.parquet"
    search_locations(demo_tables["locations"], scenes, cfg, progress=False, items=[str(snap)])
    df = read_scenes(scenes)
    ok = df[df["status"] == "ok"]
    assert len(ok) and set(ok["offset_rule"]) == {"raster:bands"}
    store = tmp_path / "cube.zarr"
    out = run_build(demo_tables["locations"], scenes, store, options=BuildOptions(shard_samples=5),
                    client_options={"workers": 1, "threads": 2}, progress=False)
    assert out["status"].get("failed", 0) == 0 and out["status"].get("complete") == len(
        set(df["sample"]))
    got = xr.open_zarr(store, group="S2L2A")
    ref = xr.open_zarr(clean_store, group="S2L2A")
    np.testing.assert_array_equal(got["file_id"].values, ref["file_id"].values)
    np.testing.assert_array_equal(got["bands"].values, ref["bands"].values)
    # --provider overrides only when given: the local profile cannot read these keys
    bad = run_build(demo_tables["locations"], scenes, tmp_path / "bad.zarr",
                    options=BuildOptions(provider="local", shard_samples=5),
                    client_options={"workers": 1, "threads": 2}, progress=False)
    assert bad["status"].get("failed", 0) > 0


# ------------------------------------------------------------------ GeoParquet bulk search
def test_snapshot_search_makes_the_api_choice(stac_api, demo_catalog, demo_tables, tmp_path):
    """The embedded catalog exported by stac-geoparquet: ``--items`` chooses the very scenes
    the API search chose, with no request to the API."""
    from pipeline.demo.serve import export_geoparquet
    from pipeline.search import read_scenes, search_locations

    snap = tmp_path / "items.parquet"
    counts = export_geoparquet(demo_catalog, snap, stac_api.asset_url)
    assert set(counts) == {"sentinel-2-l2a", "sentinel-1-rtc"}
    cfg = load_config("demo", overrides={"search": {"stac_url": stac_api.stac_url}})
    scenes = tmp_path / "scenes.parquet"
    info = search_locations(demo_tables["locations"], scenes, cfg, progress=False,
                            items=[str(snap)])
    assert info["requests"] == 0 and info["items"] == [str(snap)]
    api, bulk = read_scenes(demo_tables["scenes"]), read_scenes(scenes)
    cols = ["sample", "season", "modality", "status", "item_id", "datetime", "cloud_cover",
            "dn_offset", "offset_rule", "reason"]
    assert (api["status"] == "ok").sum() > 0
    assert api[cols].equals(bulk[cols])
    for a, b in zip(api["item_json"], bulk["item_json"], strict=True):
        if a:
            ia, ib = json.loads(a), json.loads(b)
            assert ia["assets"] == ib["assets"] and ia["geometry"] == ib["geometry"]


def test_snapshot_errors_name_what_to_fix(tmp_path, demo_catalog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.demo.serve import export_geoparquet

    cfg = load_config("demo")
    locs = _location()
    thin = tmp_path / "thin.parquet"
    pq.write_table(pa.table({"id": ["a"], "datetime": ["2022-01-01"]}), thin)
    with pytest.raises(UserError, match=r"lacks column\(s\) \['collection', 'geometry', "
                                        r"'assets'\]"):
        SnapshotSearch(cfg, [str(thin)]).run(locs, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        SnapshotSearch(cfg, [str(tmp_path / "nope.parquet")]).run(locs, progress=False)
    snap = tmp_path / "items.parquet"
    export_geoparquet(demo_catalog, snap, "http://127.0.0.1:1/assets")
    other = load_config("demo", overrides={"search": {"provider": "earth-search",
                                                      "modalities": ["S2L1C"]}})
    with pytest.raises(ConfigError, match=r"no item of collection 'sentinel-2-l1c'.*"
                                          r"providers\.earth-search\.modalities\.S2L1C\."
                                          "collection"):
        SnapshotSearch(other, [str(snap)]).run(locs, progress=False)
    path = tmp_path / "cfg.yaml"
    path.write_text("preset: demo\nproviders:\n  c: {base: local, cloud_property: s2:cloudy}\n"
                    "search: {provider: c, modalities: [S2L2A]}\n")
    with pytest.raises(ConfigError, match=r"no 's2:cloudy' column.*providers\.c\."
                                          "cloud_property"):
        SnapshotSearch(load_config(path=path), [str(snap)]).run(locs, progress=False)


def test_l1c_from_requester_pays_s3(tmp_path, capfd):
    """s3:// JPEG 2000 hrefs as Earth Search gives them, in a bucket served by moto on
    loopback: every request carries the profile's ``x-amz-request-payer: requester`` and is
    signed with the credentials of the reader's environment (none travel with the profile);
    values equal GDAL's direct read."""
    import boto3

    from pipeline.demo.isolated import s3_server

    prov = get_provider("earth-search")
    keys = prov.band_assets("S2L1C")
    with s3_server("sentinel-s2-l1c-test") as s3:
        client = boto3.client("s3", endpoint_url=s3["endpoint"])
        hrefs = {}
        for band, key in keys.items():
            path = tmp_path / f"{band}.jp2"
            _write(path, _reflectance(band, RES[band]), RES[band], "JP2OpenJPEG")
            client.upload_file(str(path), s3["bucket"], f"tiles/33/T/WL/2022/7/5/0/{band}.jp2")
            hrefs[key] = f"s3://{s3['bucket']}/tiles/33/T/WL/2022/7/5/0/{band}.jp2"
        item = _item("S2A_33TWL_20220705_0_L1C", "sentinel-2-l1c", "2022-07-05T10:00:00Z",
                     hrefs, {"s2:processing_baseline": "03.01"})
        endpoint = {"AWS_S3_ENDPOINT": s3["endpoint"].split("://", 1)[1], "AWS_HTTPS": "NO",
                    "AWS_VIRTUAL_HOSTING": "FALSE"}
        grid = cube.Grid.from_location(_location().iloc[0])
        capfd.readouterr()
        ds = cube.s2_cube([item], grid, modality="S2L1C", provider=prov, compute=True,
                          resampling="nearest",
                          env_overrides={**endpoint, "CPL_CURL_VERBOSE": "YES"})
        trace = capfd.readouterr().err
        assert trace.count("x-amz-request-payer: requester") >= len(keys)
        assert "Credential=ssl4eo-test-access-key/" in trace
        import rasterio

        with rasterio.Env(**endpoint):
            for band in ("B02", "B10"):
                want = _direct(hrefs[keys[band]], grid, "nearest")
                np.testing.assert_array_equal(ds["bands"].sel(band=band).values[0],
                                              np.where(want > 0, want + 1000, 0))
