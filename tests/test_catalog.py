"""The embedded catalog builder (pipeline.demo.catalog): layout, PC-shaped items and
collections, COGs, scene content, determinism, real scenes and errors. CPU only, no network.

Structure is checked against the real Planetary Computer JSON in ../shared/data/stac when it
is there (those comparisons are skipped otherwise); ``pystac``'s schema validation would need
the network for the extension schemas, so the checks here are structural.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from shapely.geometry import Point, box, shape

from pipeline.demo import stacmeta, synthetic
from pipeline.demo.catalog import (
    PROFILES,
    RealDataWarning,
    build_catalog,
    s1_orbits,
    s2_absolute_orbit,
)
from pipeline.demo.serve import CATALOG_VERSION, CATALOG_VERSION_KEY, read_catalog
from pipeline.errors import CatalogError
from pipeline.providers import asset_grid, s2_offset
from pipeline.search import s1_ok

rasterio = pytest.importorskip("rasterio")

S2 = stacmeta.S2_COLLECTION
S1 = stacmeta.S1_COLLECTION
S2_KEYS = {"AOT", "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B11", "B12",
           "B8A", "SCL", "WVP", "visual"}
#: PC assets that point at SAFE metadata files or PC's tiler: no counterpart in a local catalog.
PC_NON_DATA = {"preview", "safe-manifest", "granule-metadata", "inspire-metadata",
               "product-metadata", "datastrip-metadata", "tilejson", "rendered_preview"}
HALLE = next(c for c in synthetic.DEMO_CITIES if c.name == "Halle")


# ------------------------------------------------------------------------------- helpers
def _items(cat: Path, coll: str | None = None) -> list[dict]:
    pattern = f"{coll}/*.json" if coll else "*/*.json"
    return [json.loads(p.read_text()) for p in sorted((cat / "items").glob(pattern))]


def _synthetic(items: list[dict]) -> list[dict]:
    return [i for i in items if "ssl4eo:source_folder" not in i["properties"]]


def _asset_file(cat: Path, item: dict, key: str) -> Path:
    return (cat / "items" / item["collection"] / item["assets"][key]["href"]).resolve()


def _json_type(v) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}[type(v)]


def _dt(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def _pc(shared_dir: Path | None, pattern: str) -> list[dict]:
    if shared_dir is None or not (shared_dir / "data" / "stac").is_dir():
        pytest.skip("../shared/data/stac (real Planetary Computer JSON) is absent")
    files = sorted((shared_dir / "data" / "stac").glob(pattern))
    assert files, pattern
    return [json.loads(f.read_text()) for f in files]


def _valid_min(path: Path) -> int:
    with rasterio.open(path) as src:
        a = src.read(1)
    return int(a[a > 0].min())


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------ layout, counts
def test_layout_counts_and_server_contract(demo_catalog):
    cat = json.loads((demo_catalog / "catalog.json").read_text())
    assert cat["type"] == "Catalog" and cat[CATALOG_VERSION_KEY] == CATALOG_VERSION
    children = [link["href"] for link in cat["links"] if link["rel"] == "child"]
    assert sorted(children) == [f"./collections/{c}.json" for c in sorted(stacmeta.COLLECTIONS)]
    for href in children:
        assert (demo_catalog / href).is_file()

    files = read_catalog(demo_catalog)  # what the server reads, with its own checks
    assert set(files.collections) == {S1, S2}
    prof = PROFILES["test"]
    tiles = prof.tiles()
    assert {t.city.name for t in tiles} >= {"Halle"} and len(tiles) >= 3
    n_s2 = sum(i["collection"] == S2 for _, i in files.items)
    n_s1 = sum(i["collection"] == S1 for _, i in files.items)
    assert n_s2 == len(tiles) * 4 * prof.s2_per_season
    assert n_s1 == len(tiles) * 4 * prof.s1_per_season
    for t in tiles:
        assert (demo_catalog / "labels" / f"{t.name}.tif").is_file()


def test_asset_hrefs_relative_and_no_orphans(demo_catalog):
    referenced = set()
    for item in _items(demo_catalog):
        for key, asset in item["assets"].items():
            assert asset["href"] == stacmeta.asset_href(item["collection"], item["id"], key)
            path = _asset_file(demo_catalog, item, key)
            assert path.is_file(), path
            referenced.add(path)
    on_disk = {p.resolve() for p in (demo_catalog / "assets").rglob("*") if p.is_file()}
    assert on_disk == referenced


def test_asset_metadata_matches_the_files(demo_catalog):
    """proj:* (per asset for S2, per item for S1), dtype and nodata agree with every COG."""
    for item in _items(demo_catalog):
        epsg = item["properties"]["proj:epsg"]
        for key in item["assets"]:
            grid = asset_grid(item, key)
            with rasterio.open(_asset_file(demo_catalog, item, key)) as src:
                assert src.crs.to_epsg() == epsg
                assert tuple(src.transform)[:6] == pytest.approx(grid.transform)
                assert (src.height, src.width) == grid.shape
                if item["collection"] == S1:
                    assert src.dtypes == ("float32",) and src.nodata == -32768
                elif key == "visual":
                    assert src.dtypes == ("uint8",) * 3 and src.nodata == 0
                elif key == "SCL":
                    assert src.dtypes == ("uint8",) and src.nodata == 0
                else:
                    assert src.dtypes == ("uint16",) and src.nodata == 0


def test_cogs_are_tiled_compressed_with_overviews(demo_catalog):
    paths = [p for p in (demo_catalog / "labels").glob("*.tif")]
    for coll in stacmeta.COLLECTIONS:
        for item in _items(demo_catalog, coll)[:3]:
            paths += [_asset_file(demo_catalog, item, k) for k in item["assets"]]
    with_overviews = 0
    for p in paths:
        with rasterio.open(p) as src:
            assert src.profile["tiled"] is True, p
            assert src.block_shapes[0] == (512, 512), p
            assert src.compression is not None and src.compression.value == "DEFLATE", p
            assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG", p
            if max(src.width, src.height) > 512:
                assert src.overviews(1), f"{p} is larger than one block but has no overviews"
                with_overviews += 1
    assert with_overviews > 0


# ------------------------------------------------------------------ PC-shaped S2 items
def test_s2_assets_and_native_grids(demo_catalog):
    for item in _items(demo_catalog, S2):
        assert set(item["assets"]) == S2_KEYS
        props = item["properties"]
        assert props["proj:epsg"] // 100 in (326, 327)
        origins = set()
        extents = set()
        for key, a in item["assets"].items():
            gsd = stacmeta.S2_ASSET_GSD[key]
            assert a["gsd"] == float(gsd) and "proj:epsg" not in a
            t = a["proj:transform"]
            assert len(t) == 6 and t[0] == gsd and t[4] == -gsd and t[1] == t[3] == 0
            origins.add((t[2], t[5]))
            extents.add((a["proj:shape"][0] * gsd, a["proj:shape"][1] * gsd))
            assert a["proj:bbox"] == stacmeta.grid_bbox(Affine(*t), a["proj:shape"])
        assert len(origins) == 1 and len(extents) == 1  # 10/20/60 m grids share one footprint


def test_s2_items_match_planetary_computer(demo_catalog, shared_dir):
    pc_items = _pc(shared_dir, "sentinel-2-l2a_S2B_MSIL2A_2024*.json")  # the current format
    ours = _synthetic(_items(demo_catalog, S2))
    for pc in pc_items:
        assert set(pc["assets"]) - PC_NON_DATA == S2_KEYS  # the same data assets as PC's
    pc = pc_items[0]
    for item in ours:
        assert item["stac_extensions"] == pc["stac_extensions"]
        assert item["stac_version"] == pc["stac_version"]
        assert set(pc) <= set(item)
        missing = set(pc["properties"]) - set(item["properties"])
        assert not missing, f"{item['id']} lacks PC properties {sorted(missing)}"
        for key, value in pc["properties"].items():
            assert _json_type(item["properties"][key]) == _json_type(value), key
        for key in S2_KEYS:
            mine, theirs = item["assets"][key], pc["assets"][key]
            assert set(theirs) <= set(mine), key
            for field in ("gsd", "type", "roles", "title", "eo:bands"):
                assert mine.get(field) == theirs.get(field), (key, field)
            assert len(mine["proj:transform"]) == len(theirs["proj:transform"]) == 6
            # PC's 10/20/60 m grids share one origin; so do ours
            res = theirs["proj:transform"][0]
            assert mine["proj:transform"][0] == res
        rels = {link["rel"] for link in item["links"]}
        assert {"collection", "parent", "root", "license"} <= rels
        assert item["id"].count("_") == pc["id"].count("_")  # PC's id: no _Nxxxx part
        assert "_N" not in item["id"]


def test_s1_items_match_planetary_computer(demo_catalog, shared_dir):
    ours = _synthetic(_items(demo_catalog, S1))
    for item in ours:  # checks that do not need PC's JSON
        props = item["properties"]
        t = props["proj:transform"]
        assert len(t) == 9 and t[6:] == [0.0, 0.0, 1.0] and t[4] < 0 < t[0] == 10.0
        rows, cols = props["proj:shape"]
        assert props["s1:shape"] == [cols, rows]
        assert props["proj:bbox"] == [t[2], t[5] + t[4] * rows, t[2] + t[0] * cols, t[5]]
        assert set(item["assets"]) == {"vv", "vh"}
        assert not any(k.startswith("proj:") for a in item["assets"].values() for k in a)
        assert s1_ok(props, ["ascending", "descending"])
        derived = [link for link in item["links"] if link["rel"] == "derived_from"]
        assert len(derived) == 1 and item["id"].endswith("_rtc")
        assert derived[0]["href"].endswith(item["id"][: -len("_rtc")])

    pc_items = _pc(shared_dir, "sentinel-1-rtc_*.json")
    for pc in pc_items:
        assert set(pc["assets"]) - PC_NON_DATA == {"vv", "vh"}
    pc = pc_items[0]
    for item in ours:
        assert item["stac_extensions"] == pc["stac_extensions"]
        missing = set(pc["properties"]) - set(item["properties"])
        assert not missing, f"{item['id']} lacks PC properties {sorted(missing)}"
        for key, value in pc["properties"].items():
            assert _json_type(item["properties"][key]) == _json_type(value), key
        for key in ("vv", "vh"):
            mine, theirs = item["assets"][key], pc["assets"][key]
            assert set(theirs) <= set(mine)
            for field in ("type", "roles", "title", "description", "raster:bands"):
                assert mine[field] == theirs[field], (key, field)
            assert _json_type(mine["file:size"]) == "number" and len(mine["file:checksum"]) == 32
            data = _asset_file(demo_catalog, item, key).read_bytes()
            assert mine["file:size"] == len(data)
            assert mine["file:checksum"] == hashlib.md5(data).hexdigest()  # noqa: S324
        assert {link["rel"] for link in pc["links"]} - {"self", "preview"} <= {
            link["rel"] for link in item["links"]}


# ----------------------------------------------------------------------- collections
def test_collections_computed_from_items(demo_catalog):
    for coll in stacmeta.COLLECTIONS:
        c = json.loads((demo_catalog / "collections" / f"{coll}.json").read_text())
        items = _items(demo_catalog, coll)
        assert c["id"] == coll and c["type"] == "Collection" and c["stac_version"] == "1.0.0"
        bbox = c["extent"]["spatial"]["bbox"][0]
        b = np.array([i["bbox"] for i in items])
        assert bbox == [b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]
        (t0, t1), = c["extent"]["temporal"]["interval"]
        starts = [_dt(i["properties"].get("start_datetime") or i["properties"]["datetime"])
                  for i in items]
        ends = [_dt(i["properties"].get("end_datetime") or i["properties"]["datetime"])
                for i in items]
        assert 0 <= (min(starts) - _dt(t0)).total_seconds() < 1
        assert 0 <= (_dt(t1) - max(ends)).total_seconds() < 1
        assert set(c["item_assets"]) == {k for i in items for k in i["assets"]}
        for a in c["item_assets"].values():
            assert "href" not in a and not any(k.startswith("proj:") for k in a)
        for key in ("platform", "sat:orbit_state") if coll == S1 else ("platform",):
            assert c["summaries"][key] == sorted({i["properties"][key] for i in items})
        assert any(link["rel"] == "license" for link in c["links"])
    s1 = json.loads((demo_catalog / "collections" / f"{S1}.json").read_text())
    assert s1["summaries"]["sat:orbit_state"] == ["ascending", "descending"]


def test_collections_match_planetary_computer(demo_catalog, shared_dir):
    for coll in stacmeta.COLLECTIONS:
        (pc,) = _pc(shared_dir, f"collection_{coll}.json")
        c = json.loads((demo_catalog / "collections" / f"{coll}.json").read_text())
        wanted = {k for k in pc if not k.startswith("msft:")} - {"assets"}
        assert wanted <= set(c), sorted(wanted - set(c))
        for key in wanted:
            assert _json_type(c[key]) == _json_type(pc[key]), key
        for key, entry in c["item_assets"].items():
            assert entry == pc["item_assets"][key], key  # PC's exact item_assets entries
        pc_summaries = set(pc["summaries"]) - {"view:off_nadir"}  # no view:* in PC's items
        assert pc_summaries <= set(c["summaries"]), sorted(pc_summaries - set(c["summaries"]))
        for p in c["providers"]:
            assert isinstance(p["name"], str) and isinstance(p["roles"], list)


# ------------------------------------------------------------------------------- content
def test_processing_baselines_and_offset(demo_catalog):
    items = _items(demo_catalog, S2)
    baselines = {i["properties"]["s2:processing_baseline"] for i in items}
    assert "04.00" in baselines and any(b < "04.00" for b in baselines)
    for item in items:
        b = item["properties"]["s2:processing_baseline"]
        assert (b == "04.00") == (_dt(item["properties"]["datetime"])
                                  >= synthetic.BASELINE_0400_START)
        assert item["properties"]["s2:product_uri"].split("_")[3] == "N" + b.replace(".", "")
        low = _valid_min(_asset_file(demo_catalog, item, "B02"))
        if s2_offset(item):  # the +1000 BOA offset: no valid DN below it
            assert low >= 1000, item["id"]
        else:  # no offset: dark surfaces give DN below 1000
            assert low < 1000, item["id"]


def _tile_of(item: dict) -> tuple:
    p = item["properties"]
    return (p["proj:epsg"], p.get("s2:mgrs_tile") or round(p["proj:bbox"][0], -3))


def test_seasons_cloud_cover_and_orbits(demo_catalog):
    prof = PROFILES["test"]
    windows = synthetic.season_windows()
    s2 = _items(demo_catalog, S2)
    per = {}
    for item in s2:
        when = _dt(item["properties"]["datetime"])
        season = next(k for k, (_, a, b) in enumerate(windows) if a <= when < b)
        per.setdefault((_tile_of(item), season), []).append(item["properties"]["eo:cloud_cover"])
    tiles = {t for t, _ in per}
    assert len(tiles) == len(prof.tiles())
    for t in tiles:
        for season in range(4):
            ccs = per[(t, season)]
            assert len(ccs) == prof.s2_per_season
            assert len(set(ccs)) == len(ccs), f"cloud cover does not vary in {t} season {season}"
    ccs = [i["properties"]["eo:cloud_cover"] for i in s2]
    assert min(ccs) < 10 and max(ccs) > 40
    s1 = _items(demo_catalog, S1)
    assert {i["properties"]["sat:orbit_state"] for i in s1} == {"ascending", "descending"}
    for item in s1:
        when = _dt(item["properties"]["datetime"])
        assert any(a <= when < b for _, a, b in windows)


def test_cloud_cover_is_computed_from_the_scl(demo_catalog):
    for item in _items(demo_catalog, S2)[::3]:
        with rasterio.open(_asset_file(demo_catalog, item, "SCL")) as src:
            scl = src.read(1)
        pct = stacmeta.scl_percentages(scl)
        for key, value in pct.items():
            assert item["properties"][key] == pytest.approx(value), (item["id"], key)


def test_both_hemispheres_and_halle_in_two_zones(demo_catalog):
    for coll in stacmeta.COLLECTIONS:
        items = _items(demo_catalog, coll)
        epsgs = {i["properties"]["proj:epsg"] for i in items}
        assert any(e // 100 == 326 for e in epsgs) and any(e // 100 == 327 for e in epsgs)
        assert min(i["bbox"][1] for i in items) < 0 < max(i["bbox"][3] for i in items)
        halle = Point(HALLE.lon, HALLE.lat)
        over = [i for i in items if shape(i["geometry"]).buffer(0.01).contains(halle)]
        assert {i["properties"]["proj:epsg"] for i in over} == {32632, 32633}, coll
    s1_ids = [i["id"] for i in _items(demo_catalog, S1)]
    assert len(s1_ids) == len(set(s1_ids))


def test_label_is_the_landcover_of_the_tile(demo_catalog):
    tile = next(t for t in PROFILES["test"].tiles() if t.epsg == 32633)
    with rasterio.open(demo_catalog / "labels" / f"{tile.name}.tif") as src:
        label = src.read(1)
        assert src.crs.to_epsg() == 32633
        assert src.transform == tile.grid(10)[0]
    expect = synthetic.landcover(tile.city, tile.epsg, tile.bounds, 10.0, seed=0)
    np.testing.assert_array_equal(label, expect)
    assert len(np.unique(label)) >= 5


# --------------------------------------------------------------------------- determinism
def test_rebuild_is_byte_identical(demo_catalog, tmp_path):
    again = tmp_path / "again"
    result = build_catalog(again, profile="test", seed=0, progress=False)
    assert result["items"] == len(_items(demo_catalog)) and result["real_items"] == 0
    assert result["synthetic_items"] == result["items"]
    first, second = _tree_digest(demo_catalog), _tree_digest(again)
    assert set(first) == set(second)
    json_files = [k for k in first if k.endswith(".json")]
    assert len(json_files) == result["items"] + 3
    assert [k for k in first if first[k] != second[k]] == []  # items, collections and COGs


def test_orbit_numbers_match_planetary_computer(shared_dir):
    pcs = _pc(shared_dir, "sentinel-2-l2a_*.json")
    for pc in pcs:
        p = pc["properties"]
        want = int(p["s2:granule_id"].split("_A")[1][:6])
        assert s2_absolute_orbit(p["platform"], _dt(p["datetime"]),
                                 p["sat:relative_orbit"]) == want, pc["id"]
    for pattern in ("sentinel-1-rtc_*.json", "sentinel-1-grd_*.json", "legacy_*.json"):
        for pc in _pc(shared_dir, pattern):
            p = pc["properties"]
            absolute, relative = s1_orbits(p["platform"], _dt(p.get("start_datetime") or
                                                               p["datetime"]))
            assert abs(absolute - p["sat:absolute_orbit"]) <= 1, pc["id"]
            assert (p["sat:absolute_orbit"] - 73) % 175 + 1 == p["sat:relative_orbit"]


# -------------------------------------------------------------------------------- errors
def test_missing_real_data_folder_is_a_catalog_error(tmp_path):
    out = tmp_path / "cat"
    with pytest.raises(CatalogError, match=r"real data folder .*nowhere.* does not exist"):
        build_catalog(out, profile="test", real_data=tmp_path / "nowhere", progress=False)
    assert not out.exists()  # nothing was written
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(CatalogError, match="is not a directory"):
        build_catalog(out, profile="test", real_data=f, progress=False)


def test_bad_profile_and_foreign_output_directory(tmp_path):
    with pytest.raises(CatalogError, match="unknown catalog profile 'huge'"):
        build_catalog(tmp_path / "x", profile="huge", progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CatalogError, match="not an embedded catalog"):
        build_catalog(foreign, profile="test", progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------- real scenes
@pytest.fixture(scope="module")
def real_catalog(real_data_dir, tmp_path_factory):
    if real_data_dir is None:
        pytest.skip("../shared/data/real is absent")
    out = tmp_path_factory.mktemp("real-catalog")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = build_catalog(out, profile="test", real_data=real_data_dir, synthetic=False,
                               progress=False)
    return out, result, [w for w in caught if issubclass(w.category, RealDataWarning)]


def _real(real_catalog, source: str) -> list[dict]:
    out, _, _ = real_catalog
    return [i for i in _items(out) if i["properties"].get("ssl4eo:source_folder") == source]


@pytest.mark.real
def test_real_items_all_present(real_catalog, real_data_dir):
    out, result, caught = real_catalog
    assert caught == [] and result["skipped"] == []
    n_mt = len([d for d in (real_data_dir / "majortom_s2l2a").glob("*/*/S2*_MSIL2A_*")])
    n_s2 = len(list((real_data_dir / "ssl4eo_s12" / "s2a").glob("*/*")))
    n_s1 = len(list((real_data_dir / "ssl4eo_s12" / "s1").glob("*/*")))
    n_py = len(list((real_data_dir / "s1_pyrosar").glob("*.tif")))
    assert result["real_items"] == result["items"] == n_mt + n_s2 + n_s1 + n_py
    assert result["per_collection"] == {S2: n_mt + n_s2, S1: n_s1 + n_py}
    assert len(read_catalog(out).items) == result["items"]
    ids = [i["id"] for i in _items(out)]
    assert not any("20200823" in i for i in ids), "the L1C-only date (s2c) must not appear"
    for item in _items(out):
        props = item["properties"]
        assert props["ssl4eo:source"] and props["ssl4eo:license"]
        assert {"via", "license"} <= {link["rel"] for link in item["links"]}
    for coll in stacmeta.COLLECTIONS:
        c = json.loads((out / "collections" / f"{coll}.json").read_text())
        assert any(link["rel"] == "via" for link in c["links"])
    s2c = json.loads((out / "collections" / f"{S2}.json").read_text())
    assert s2c["license"] == "various"  # Major-TOM CC-BY-SA-4.0 + SSL4EO-S12 CC-BY-4.0


@pytest.mark.real
def test_real_majortom_cells_at_native_resolution(real_catalog, real_data_dir):
    out, _, _ = real_catalog
    items = {i["properties"]["ssl4eo:majortom_cell"]: i for i in _real(real_catalog,
                                                                        "majortom_s2l2a")}
    dirs = sorted((real_data_dir / "majortom_s2l2a").glob("*/*/S2*_MSIL2A_*"))
    assert len(items) == len(dirs) >= 1
    for d in dirs:
        item = items[d.parent.name]
        n = d.name.split("_")[3]
        assert item["properties"]["s2:processing_baseline"] == f"{n[1:3]}.{n[3:]}"
        assert item["id"] == d.name.replace(f"_{n}", "")
        assert set(item["assets"]) == S2_KEYS - {"AOT", "WVP"}
        offset_added = item["properties"].get("ssl4eo:dn_offset_added", 0)
        for band in stacmeta.S2_REFLECTANCE_BANDS:
            with rasterio.open(d / f"{band}.tif") as src:
                raw, transform, crs = src.read(1), src.transform, src.crs
            with rasterio.open(_asset_file(out, item, band)) as dst:
                assert dst.crs == crs and dst.transform == transform  # no resampling
                written = dst.read(1)
            a = item["assets"][band]
            assert a["proj:shape"] == list(raw.shape)
            assert a["proj:transform"] == list(transform)[:6]
            expect = np.where(raw > 0, raw.astype(np.int64) + offset_added, 0)
            np.testing.assert_array_equal(written, expect)
        # the harmonised DN (written - offset by baseline) is the source reflectance
        with rasterio.open(d / "B02.tif") as src:
            raw = src.read(1).astype(np.int64)
        harmonised = np.where(raw > 0, raw + offset_added, 0) - s2_offset(item)
        if n == "N9999":
            assert offset_added == 1000
            np.testing.assert_array_equal(harmonised, raw)
        elif n == "N0400":
            assert offset_added == 0 and raw.min() >= 1000
        with rasterio.open(d / "cloud_mask.tif") as src:
            cloudy = src.read(1) > 0
        with rasterio.open(_asset_file(out, item, "SCL")) as src:
            scl = src.read(1)
            assert src.res == (20.0, 20.0)
        assert set(np.unique(scl)) <= {0, 4, 5, 9}
        assert item["properties"]["eo:cloud_cover"] == pytest.approx(
            stacmeta.scl_percentages(scl)["eo:cloud_cover"])
        if not cloudy.any():
            assert item["properties"]["eo:cloud_cover"] == 0
        # the footprint is the cell
        t = item["assets"]["B02"]["proj:transform"]
        cell = box(t[2], t[5] - 10 * 1068, t[2] + 10 * 1068, t[5])
        assert cell.area == pytest.approx(1068 * 1068 * 100)
        lon, lat = item["bbox"][0::2], item["bbox"][1::2]
        assert lon[0] < lon[1] and lat[0] < lat[1]
        assert (lon[1] - lon[0]) == pytest.approx(10680 / (111320 * math.cos(
            math.radians(sum(lat) / 2))), rel=0.05)


def _sample_back(real_path: Path, utm_path: Path, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Values of the source (EPSG:4326) at random pixel centres, and of the warped UTM COG at
    the same places."""
    from pyproj import Transformer

    with rasterio.open(real_path) as src:
        a = src.read(1).astype(np.float64)
        rng = np.random.default_rng(0)
        r = rng.integers(2, src.height - 2, n)
        c = rng.integers(2, src.width - 2, n)
        lon, lat = rasterio.transform.xy(src.transform, r, c)
        values = a[r, c]
    with rasterio.open(utm_path) as dst:
        tr = Transformer.from_crs(4326, dst.crs.to_epsg(), always_xy=True)
        x, y = tr.transform(np.asarray(lon), np.asarray(lat))
        warped = np.array([v[0] for v in dst.sample(zip(x, y, strict=True))], dtype=np.float64)
    return values, warped


@pytest.mark.real
def test_real_ssl4eo_s2_warped_to_utm(real_catalog, real_data_dir):
    out, _, _ = real_catalog
    items = {i["id"]: i for i in _real(real_catalog, "ssl4eo_s12") if i["collection"] == S2}
    dirs = sorted((real_data_dir / "ssl4eo_s12" / "s2a").glob("*/*"))
    assert len(items) == len(dirs) >= 1
    for d in dirs:
        meta = json.loads((d / "metadata.json").read_text())
        pid = meta["PRODUCT_ID"]
        item = items[pid.replace("_" + pid.split("_")[3], "")]
        p = item["properties"]
        assert p["eo:cloud_cover"] == meta["CLOUDY_PIXEL_PERCENTAGE"]
        assert p["s2:processing_baseline"] == meta["PROCESSING_BASELINE"] == "02.14"
        assert p["s2:datastrip_id"] == meta["DATASTRIP_ID"]
        assert p["proj:epsg"] == 32643 and s2_offset(item) == 0
        t10 = item["assets"]["B02"]["proj:transform"]
        assert t10[2] % 60 == 0 and t10[5] % 60 == 0
        s10 = item["assets"]["B02"]["proj:shape"]
        assert item["assets"]["B05"]["proj:shape"] == [s10[0] // 2, s10[1] // 2]
        assert item["assets"]["B01"]["proj:shape"] == [s10[0] // 6, s10[1] // 6]
        for band, name in (("B04", "B4"), ("B08", "B8"), ("B11", "B11")):
            src_v, utm_v = _sample_back(d / f"{name}.tif", _asset_file(out, item, band))
            rel = np.abs(utm_v - src_v) / src_v
            assert np.median(rel) < 0.05, (band, np.median(rel))
            assert np.corrcoef(src_v, utm_v)[0, 1] > 0.9


@pytest.mark.real
def test_real_ssl4eo_s1_is_linear_on_utm(real_catalog, real_data_dir):
    out, _, _ = real_catalog
    items = {i["id"]: i for i in _real(real_catalog, "ssl4eo_s12") if i["collection"] == S1}
    dirs = sorted((real_data_dir / "ssl4eo_s12" / "s1").glob("*/*"))
    assert len(items) == len(dirs) >= 1
    for d in dirs:
        meta = json.loads((d / "metadata.json").read_text())
        item = items[d.name[: d.name.rfind("_")] + "_rtc"]
        p = item["properties"]
        assert p["sat:orbit_state"] == meta["orbitProperties_pass"].lower()
        assert p["sat:relative_orbit"] == meta["relativeOrbitNumber_start"]
        assert p["sat:absolute_orbit"] == meta["orbitNumber_start"]
        assert s1_ok(p, ["ascending", "descending"])
        for pol in ("VV", "VH"):
            src_db, utm_lin = _sample_back(d / f"{pol}.tif",
                                           _asset_file(out, item, pol.lower()))
            assert (utm_lin > 0).all()  # linear power, inside the footprint
            diff = np.abs(10 * np.log10(utm_lin) - src_db)
            assert np.median(diff) < 1.0, (pol, np.median(diff))
        with rasterio.open(_asset_file(out, item, "vv")) as src:
            a = src.read(1)
        assert (a == -32768).any() and a[a != -32768].max() < 100  # nodata corners, linear


@pytest.mark.real
def test_real_pyrosar_vv_only_at_10m(real_catalog, real_data_dir):
    out, _, _ = real_catalog
    (item,) = _real(real_catalog, "s1_pyrosar")
    assert set(item["assets"]) == {"vv"}
    assert item["properties"]["sar:polarizations"] == ["VV"]
    assert not s1_ok(item["properties"], ["ascending", "descending"])  # search never picks it
    assert "sat:absolute_orbit" in item["properties"]["ssl4eo:estimated"]
    (src_path,) = sorted((real_data_dir / "s1_pyrosar").glob("*.tif"))
    with rasterio.open(src_path) as src:
        db = src.read(1)
        nodata = src.nodata
        centre = src.xy(src.height // 2, src.width // 2)
        shape20 = src.shape
    rows, cols = item["properties"]["proj:shape"]
    assert abs(rows - 2 * shape20[0]) <= 1 and abs(cols - 2 * shape20[1]) <= 1
    with rasterio.open(_asset_file(out, item, "vv")) as dst:
        assert dst.res == (10.0, 10.0)
        lin = np.array([v[0] for v in dst.sample([centre])])
    expect = db[shape20[0] // 2, shape20[1] // 2]
    assert expect != nodata
    assert abs(10 * np.log10(lin[0]) - expect) < 1.0


@pytest.mark.real
def test_missing_or_broken_real_folders_are_skipped(real_data_dir, tmp_path):
    if real_data_dir is None:
        pytest.skip("../shared/data/real is absent")
    real = tmp_path / "real"
    real.mkdir()
    (real / "s1_pyrosar").symlink_to(real_data_dir / "s1_pyrosar", target_is_directory=True)
    good = next((real_data_dir / "majortom_s2l2a").glob("*/*/S2*_MSIL2A_*"))
    broken = real / "majortom_s2l2a" / good.parent.parent.name / good.parent.name / good.name
    broken.mkdir(parents=True)
    for f in good.iterdir():
        shutil.copy(f, broken / f.name)
    (broken / "B05.tif").write_text("not a GeoTIFF")
    out = tmp_path / "cat"
    with pytest.warns(RealDataWarning) as caught:
        result = build_catalog(out, profile="test", real_data=real, synthetic=False,
                               progress=False)
    messages = [str(w.message) for w in caught]
    assert any(str(real / "ssl4eo_s12") in m and "not found" in m for m in messages)
    assert any(str(broken) in m for m in messages)
    assert len(result["skipped"]) == 2
    assert result["items"] == 1 and result["per_collection"][S1] == 1  # pyroSAR still built
    assert not (out / "assets" / S2).exists()  # nothing left of the broken cell
    assert len(read_catalog(out).items) == 1
    empty = json.loads((out / "collections" / f"{S2}.json").read_text())
    (start, end), = empty["extent"]["temporal"]["interval"]
    assert isinstance(start, str) and end is None  # open-ended, not [null, null]
