"""Real Planetary Computer STAC JSON (../shared/data/stac) through the provider and search code.

The files are verbatim PC responses saved by public projects (see SOURCES.md there): Sentinel-2
L2A items (2019 baseline 02.12, 2024 baseline 05.10), Sentinel-1 RTC items (2024), S1 GRD
items, the collections, the API landing page and a recorded POST /search page (33 S2 items).
Expected values are derived here from the JSON itself (MGRS tile, product URI, proj:bbox,
geometry), not from the code under test.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
import shapely.geometry

from pipeline.config import load_config
from pipeline.layout import SCENE_COLUMNS
from pipeline.providers import asset_grid, get_provider, processing_baseline, s2_offset
from pipeline.sampling import locations_from_points
from pipeline.search import MalformedItem, parse_item, s1_ok, scenes_from_page

STAC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stac"
if not STAC.is_dir():
    pytest.skip(f"{STAC} (saved Planetary Computer STAC JSON) is missing",
                allow_module_level=True)

PC = get_provider("planetary-computer")
S2_RES = {**dict.fromkeys(("B02", "B03", "B04", "B08"), 10),
          **dict.fromkeys(("B05", "B06", "B07", "B8A", "B11", "B12", "SCL"), 20),
          **dict.fromkeys(("B01", "B09"), 60)}
TILE_M = 109_800.0  # an MGRS tile is 109.8 km square


def _load(name: str):
    return json.loads((STAC / name).read_text())


def _s2_items() -> list[dict]:
    items = {}
    for p in sorted(STAC.glob("sentinel-2-l2a_*.json")):
        it = json.loads(p.read_text())
        items[it["id"]] = it
    for it in _load("itemlist_sentinel-2-l2a_pc_2024-04-19.json"):
        items[it["id"]] = it
    for it in _search_page()["features"]:
        items[it["id"]] = it
    return list(items.values())


def _rtc_items() -> list[dict]:
    items = {}
    for p in sorted(STAC.glob("sentinel-1-rtc_*.json")):
        it = json.loads(p.read_text())
        items[it["id"]] = it
    for it in _load("itemlist_sentinel-1-rtc_pc_2024-04-19.json"):
        items[it["id"]] = it
    return list(items.values())


def _search_page() -> dict:
    return _load("search_page_sentinel-2-l2a_2019-01-01_POST.json")["response"]


# ----------------------------------------------------------------------------- Sentinel-2
def test_s2_per_asset_grids_give_each_band_its_resolution():
    items = _s2_items()
    assert len(items) >= 38
    for item in items:
        props = item["properties"]
        zone = int(re.search(r"_T(\d\d)[C-X]", item["id"]).group(1))
        north = re.search(r"_T\d\d([C-X])", item["id"]).group(1) >= "N"
        grids = {}
        for band, key in PC.band_assets("S2L2A").items():
            g = asset_grid(item, key)
            asset = item["assets"][key]
            res = S2_RES[band]
            assert g.epsg == props["proj:epsg"] == (32600 if north else 32700) + zone
            assert g.resolution == res == float(asset["gsd"]), (item["id"], band)
            assert g.transform[4] == -res and g.transform[1] == g.transform[3] == 0
            assert g.shape == (int(TILE_M / res),) * 2
            # transform + shape reproduce the asset's own proj:bbox
            x0, y0 = g.transform[2], g.transform[5]
            bbox = (x0, y0 - g.shape[0] * res, x0 + g.shape[1] * res, y0)
            assert bbox == tuple(asset["proj:bbox"]), (item["id"], band)
            grids[band] = g
        # one origin (the MGRS tile's) for every resolution
        assert len({(g.transform[2], g.transform[5]) for g in grids.values()}) == 1
        assert "proj:transform" not in props and "proj:shape" not in props


def test_s2_items_parse_into_scenes():
    for item in _s2_items():
        sc = parse_item(item, "S2L2A", PC)
        assert sc.item_id == item["id"] and sc.collection == "sentinel-2-l2a"
        want = pd.Timestamp(item["properties"]["datetime"]).tz_convert(None)
        assert pd.Timestamp(sc.time) == want.floor("ms")
        assert sc.cloud == pytest.approx(item["properties"]["eo:cloud_cover"])
        assert sc.geometry.equals(shapely.geometry.shape(item["geometry"]))
        assert sc.item is item  # kept whole, hrefs untouched (never signed here)
        assert "?" not in sc.item["assets"]["B04"]["href"]


def test_processing_baseline_strings_decide_the_offset():
    seen = {}
    for item in _s2_items():
        b = processing_baseline(item)
        # the property agrees with the product URI's N-code (N0212, N0510)
        assert f"_N{b.replace('.', '')}_" in item["properties"]["s2:product_uri"]
        seen[b] = s2_offset(item)
    assert seen == {"02.12": 0, "05.10": 1000}

    old = next(it for it in _s2_items() if processing_baseline(it) == "02.12")
    cases = {"02.14": 0, "03.01": 0, "3.5": 0, "04.00": 1000, "4.0": 1000, "05.00": 1000,
             "05.11": 1000, "05.09": 1000, "10.00": 1000}
    for baseline, offset in cases.items():
        it = copy.deepcopy(old)
        it["properties"]["s2:processing_baseline"] = baseline
        assert s2_offset(it) == offset, baseline
    # an ESA-reprocessed old acquisition: decided by the baseline, not by the date
    it = copy.deepcopy(old)
    it["properties"]["datetime"] = "2017-12-19T09:54:09Z"
    it["properties"]["s2:processing_baseline"] = "05.00"
    assert s2_offset(it) == 1000
    it["properties"]["s2:processing_baseline"] = "N0500"
    with pytest.raises(ValueError, match=f"{old['id']}.*unreadable s2:processing_baseline"):
        s2_offset(it)
    # without the property: the product id's N-code decides, then the acquisition date
    del it["properties"]["s2:processing_baseline"]
    assert processing_baseline(it) is None
    it["properties"]["s2:product_uri"] = "S2B_MSIL2A_20171219T095409_N0510_R079_T33TUN.SAFE"
    assert s2_offset(it) == 1000
    it["properties"]["s2:product_uri"] = "S2B_MSIL2A_20171219T095409_N0206_R079_T33TUN.SAFE"
    assert s2_offset(it) == 0
    del it["properties"]["s2:product_uri"]
    it["id"] = "S2B_no-product-id"
    assert s2_offset(it) == 0  # 2017: before baseline 04.00
    it["properties"]["datetime"] = "2023-05-01T10:00:00Z"
    assert s2_offset(it) == 1000
    rtc = _rtc_items()[0]
    assert processing_baseline(rtc) is None and s2_offset(rtc) == 0


def test_collections_and_landing_page_match_the_provider_profile():
    s2 = _load("collection_sentinel-2-l2a.json")["item_assets"]
    for band, key in PC.band_assets("S2L2A").items():
        assert key in s2, band
        assert s2[key]["gsd"] == S2_RES[band]
    rtc = _load("collection_sentinel-1-rtc.json")["item_assets"]
    assert set(PC.band_assets("S1RTC").values()) <= set(rtc)
    for key in PC.band_assets("S1RTC").values():
        assert rtc[key]["raster:bands"][0]["nodata"] == -32768
    assert _load("collection_sentinel-2-l2a.json")["id"] == PC.collection("S2L2A")
    assert _load("collection_sentinel-1-rtc.json")["id"] == PC.collection("S1RTC")
    landing = _load("landing_page_api_stac_v1.json")
    assert any(c.endswith("item-search#query") for c in landing["conformsTo"])
    assert PC.supports_query
    root = next(link["href"] for link in landing["links"] if link["rel"] == "root")
    assert PC.url.rstrip("/") == root.rstrip("/")


# ----------------------------------------------------------------------------- Sentinel-1
def test_rtc_nine_element_transform_and_item_level_shape():
    items = _rtc_items()
    assert len(items) == 4
    for item in items:
        props = item["properties"]
        assert len(props["proj:transform"]) == 9 and props["proj:transform"][6:] == [0, 0, 1]
        for key in PC.band_assets("S1RTC").values():
            assert not any(k.startswith("proj:") for k in item["assets"][key])
            g = asset_grid(item, key)
            assert g.epsg == props["proj:epsg"]
            assert g.transform == tuple(float(v) for v in props["proj:transform"][:6])
            assert g.resolution == 10.0 and g.transform[4] == -10.0
            assert g.shape == tuple(props["proj:shape"])  # [rows, cols]
            # rows/cols order: the item's proj:bbox is exactly transform + shape
            x0, y0 = g.transform[2], g.transform[5]
            rows, cols = g.shape
            assert (x0, y0 - rows * 10, x0 + cols * 10, y0) == tuple(props["proj:bbox"])
            assert list(g.shape) == props["s1:shape"][::-1]  # s1:shape is [cols, rows]
        sc = parse_item(item, "S1RTC", PC)
        assert np.isnan(sc.cloud)
        assert s1_ok(props, ["ascending", "descending"])
        assert not s1_ok(props, ["ascending"])  # these are descending passes


def test_bad_rtc_grids_and_grd_items_are_refused():
    item = _rtc_items()[0]
    flipped = copy.deepcopy(item)  # PC issue #417: positive y pixel size
    flipped["properties"]["proj:transform"][4] = 10.0
    with pytest.raises(ValueError, match="non-negative y pixel size"):
        asset_grid(flipped, "vv")
    odd = copy.deepcopy(item)
    odd["properties"]["proj:transform"][8] = 2.0
    with pytest.raises(ValueError, match=r"last row is \[0.0, 0.0, 2.0\]|last row"):
        asset_grid(odd, "vv")
    # projection extension v2: proj:code instead of proj:epsg
    v2 = copy.deepcopy(item)
    v2["properties"]["proj:code"] = f"EPSG:{v2['properties'].pop('proj:epsg')}"
    assert asset_grid(v2, "vv") == asset_grid(item, "vv")
    # S1 GRD is in radar geometry: no proj:* anywhere, so no grid
    for p in sorted(STAC.glob("sentinel-1-grd_*.json")):
        grd = json.loads(p.read_text())
        key = next(k for k in ("vv", "hh") if k in grd["assets"])
        with pytest.raises(ValueError, match="lacks proj:epsg/proj:code, proj:transform"):
            asset_grid(grd, key)
    # EW HH-only GRD and the pre-release RTC format (vv-rtc keys) are not usable RTC items
    for name in ("sentinel-1-grd_S1A_EW_GRDM_1SSH_20220505T235314_20220505T235417_043082_05250D"
                 ".json", "legacy_sentinel-1-rtc_S1A_IW_GRDH_1SDV_20191215T004249_"
                 "20191215T004314_030352_0378DC_rtc.json"):
        with pytest.raises(MalformedItem, match=r"no asset for bands \['vv', 'vh'\]"):
            parse_item(_load(name), "S1RTC", PC)


# -------------------------------------------------------------- recorded search -> scenes
def _locations_in(items: list[dict]):
    """Points inside each footprint and inside each pairwise overlap of footprints."""
    geoms = [shapely.geometry.shape(it["geometry"]) for it in items]
    pts = [g.representative_point() for g in geoms]
    for i in range(len(geoms)):
        for j in range(i + 1, len(geoms)):
            inter = geoms[i].intersection(geoms[j])
            if inter.area > 1e-3:
                pts.append(inter.representative_point())
    return locations_from_points([p.x for p in pts], [p.y for p in pts])


def _independent_choice(items: list[dict], patch, start, end, max_cloud, rule) -> str:
    cands = []
    for it in items:
        p = it["properties"]
        t = pd.Timestamp(p["datetime"]).tz_convert(None)
        if not start <= t < end or not p["eo:cloud_cover"] < max_cloud:
            continue
        if shapely.geometry.shape(it["geometry"]).contains(patch):
            cands.append((t, p["eo:cloud_cover"], it["id"]))
    if not cands:
        return ""
    if rule == "most_recent":
        return max(cands, key=lambda c: (c[0], c[2]))[2]
    return min(cands, key=lambda c: (c[1], -c[0].value, c[2]))[2]


@pytest.mark.parametrize("rule", ["least_cloudy", "most_recent"])
def test_recorded_search_page_into_scenes_table(rule):
    page = _search_page()
    items = page["features"]
    assert len(items) == 33 and not any(link["rel"] == "next" for link in page["links"])
    locs = _locations_in(items)
    assert len(locs) > 40
    cfg = load_config("calendar", overrides={"seasons": {
        "year": 2019, "max_cloud_cover": 50, "choice": rule}})
    df, skipped = scenes_from_page(page, "S2L2A", locs, cfg, PC)
    assert skipped == []
    assert list(df.columns) == list(SCENE_COLUMNS)
    assert len(df) == 4 * len(locs)
    assert (df["modality"] == "S2L2A").all() and (df["collection"] == "sentinel-2-l2a").all()

    djf = (pd.Timestamp("2018-12-01"), pd.Timestamp("2019-03-01"))
    by_id = {it["id"]: it for it in items}
    n_ok = n_choice = 0
    for loc in locs.itertuples():
        rows = df[df["sample"] == loc.sample].set_index("season")
        want = _independent_choice(items, loc.geometry, *djf, 50, rule)
        got = rows.loc[0]
        assert got["item_id"] == want, (loc.sample, rule)
        assert rows.loc[0, "window_start"] == djf[0].tz_localize("UTC")
        assert rows.loc[0, "window_end"] == djf[1].tz_localize("UTC")
        if want:
            n_ok += 1
            item = by_id[want]
            assert got["status"] == "ok" and got["reason"] == ""
            assert json.loads(got["item_json"]) == item
            assert got["datetime"] == pd.Timestamp(item["properties"]["datetime"])
            assert got["cloud_cover"] == np.float32(item["properties"]["eo:cloud_cover"])
            covering = [it for it in items if shapely.geometry.shape(it["geometry"]).contains(
                loc.geometry) and it["properties"]["eo:cloud_cover"] < 50]
            n_choice += len(covering) > 1
        else:
            assert got["status"] == "missing" and got["item_json"] == ""
            assert re.search(r"none covers all of it|none has eo:cloud_cover < 50",
                             got["reason"]), got["reason"]
        for season in (1, 2, 3):  # the page holds 2019-01-01 scenes only
            assert rows.loc[season, "status"] == "missing"
            assert rows.loc[season, "reason"] == "no scene in the window intersects the patch"
    assert n_ok >= 10 and n_choice >= 3, (n_ok, n_choice)  # the rule mattered somewhere
    assert (df["status"] == "missing").sum() > 3 * len(locs)  # cloud limit and partial cover


def test_malformed_items_in_a_page_are_skipped_with_reasons():
    page = copy.deepcopy(_search_page())
    items = page["features"]
    locs = _locations_in(items[:6])
    broken = {
        items[0]["id"]: "no asset for bands ['B04']",
        items[1]["id"]: "eo:cloud_cover is 'n/a'",
        items[2]["id"]: "no datetime",
        items[3]["id"]: "unreadable geometry",
    }
    del items[0]["assets"]["B04"]
    items[1]["properties"]["eo:cloud_cover"] = "n/a"
    del items[2]["properties"]["datetime"]
    items[3]["geometry"] = None
    items.append({"type": "Feature", "properties": {}})  # no id
    cfg = load_config("calendar", overrides={"seasons": {"year": 2019, "max_cloud_cover": 100}})
    df, skipped = scenes_from_page(page, "S2L2A", locs, cfg, PC)
    reasons = {s["item_id"]: s["reason"] for s in skipped}
    assert len(skipped) == 5
    for iid, why in broken.items():
        assert iid in reasons[iid] and why in reasons[iid], reasons[iid]
    assert reasons["None"] == "item without an id"
    assert not set(df["item_id"]) & set(broken)
    good = [it for it in items[4:] if "id" in it]
    for loc in locs.itertuples():
        row = df[(df["sample"] == loc.sample) & (df["season"] == 0)].iloc[0]
        want = _independent_choice(good, loc.geometry, pd.Timestamp("2018-12-01"),
                                   pd.Timestamp("2019-03-01"), 100, "least_cloudy")
        assert row["item_id"] == want
        if not want:
            assert "(5 malformed item(s) skipped in this area)" in row["reason"]


def test_rtc_items_into_scenes_table():
    items = _rtc_items()
    geoms = [shapely.geometry.shape(it["geometry"]) for it in items]
    pts = [g.representative_point() for g in geoms]
    locs = locations_from_points([p.x for p in pts], [p.y for p in pts])
    page = {"type": "FeatureCollection", "features": items}
    cfg = load_config("calendar", overrides={"seasons": {"year": 2024}})
    df, skipped = scenes_from_page(page, "S1RTC", locs, cfg, PC)
    assert skipped == []
    mam = df[df["season"] == 1]  # 2024-04-19 is in March-May
    for loc, row in zip(locs.itertuples(), mam.itertuples()):
        want = [(pd.Timestamp(it["properties"]["datetime"]), it["id"]) for it in items
                if shapely.geometry.shape(it["geometry"]).contains(loc.geometry)]
        # no cloud cover for S1: least_cloudy falls back to the most recent
        assert row.item_id == (max(want)[1] if want else ""), loc.sample
        assert np.isnan(row.cloud_cover)
    assert (mam["status"] == "ok").sum() >= 3
    assert (df[df["season"] != 1]["status"] == "missing").all()
    # the patch grid is the RTC's 10 m grid: UTM origins are multiples of 10 m
    for loc in locs.itertuples():
        assert loc.xmin % 10 == 0 and loc.ymax % 10 == 0
    asc = load_config("calendar", overrides={"seasons": {"year": 2024},
                                             "search": {"s1_orbit_states": ["ascending"]}})
    df2, _ = scenes_from_page(page, "S1RTC", locs, asc, PC)
    m = df2[df2["season"] == 1]
    assert (m["status"] == "missing").all()
    assert m["reason"].str.contains(r"none is IW with VV\+VH in orbit states \['ascending'\]").any()


def test_patches_sit_on_the_s2_10m_grid():
    """A location in an S2 tile's UTM zone shares the tile's 10 m pixel grid exactly."""
    checked = 0
    for item in _s2_items():
        g = asset_grid(item, "B04")
        c = shapely.geometry.shape(item["geometry"]).representative_point()
        loc = locations_from_points([c.x], [c.y]).iloc[0]
        if loc["epsg"] != g.epsg:
            continue  # a tile reaching into the next zone
        checked += 1
        col = (loc["xmin"] - g.transform[2]) / 10
        row = (g.transform[5] - loc["ymax"]) / 10
        assert col == int(col) and row == int(row)
        assert 0 <= col <= g.shape[1] - 264 and 0 <= row <= g.shape[0] - 264
    assert checked >= 25
