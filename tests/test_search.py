"""Batched scene search against real STAC APIs on loopback (stac-fastapi-pgstac).

Two served catalogs:

* ``synthetic_api`` (this module): item JSON only, built here with known pathologies (tiles that
  cover only part of a city's surroundings, S1 scenes in EW mode or VV only, both orbit states,
  cloudy scenes, items lacking a band asset, scenes outside the year);
* ``stac_api`` (tests/conftest.py): the embedded demo catalog.

On both, for every location the batched choice must equal a brute-force oracle that queries each
(location, window, modality) on its own and picks with an independent implementation of the rule.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely

from pipeline.config import load_config
from pipeline.demo.cities import DEMO_CITIES
from pipeline.demo.stacmeta import search_only_item, write_search_only_catalog
from pipeline.errors import ConfigError, SearchError, UserError
from pipeline.providers import get_provider
from pipeline.sampling import locations_from_points, read_locations, sample, write_locations
from pipeline.search import SceneSearch, read_scenes, search_locations
from pipeline.seasons import season_windows

S2 = "sentinel-2-l2a"
S1 = "sentinel-1-rtc"
S2_KEYS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12",
           "SCL")


# ------------------------------------------------------------------------ synthetic catalog
def _box(lon0: float, lat0: float, lon1: float, lat1: float) -> dict:
    return shapely.geometry.mapping(shapely.box(lon0, lat0, lon1, lat1))


def build_synthetic_catalog(out: Path, seed: int = 0) -> dict:
    """Write a catalog in the embedded-catalog format; returns counts of what it holds."""
    rng = np.random.default_rng(seed)
    t0 = dt.datetime(2021, 11, 20, 10, 0, 0)
    counts = {"s2": 0, "s1": 0, "malformed": 0}
    items: list[dict] = []
    put = items.append

    for ci, city in enumerate(DEMO_CITIES):
        lon, lat = city.lon, city.lat
        tiles = {
            "A": _box(lon - 0.09, lat - 0.07, lon + 0.09, lat + 0.07),  # covers everything
            "B": _box(lon + 0.005, lat - 0.07, lon + 0.12, lat + 0.07),  # the east side only
            "C": _box(lon - 0.12, lat - 0.07, lon - 0.01, lat + 0.01),  # south-west corner
        }
        for day in range(0, 385, 5):
            for tile, geom in tiles.items():
                if tile == "A" and rng.random() < 0.3:
                    continue  # tile A not always there: then B/C or nothing
                when = t0 + dt.timedelta(days=day, seconds=int(rng.integers(0, 600)))
                if ci == 4 and when.month in (6, 7, 8) and tile != "B":
                    continue  # a winter with only a partial tile: missing seasons
                iid = f"S2X_{ci}_{tile}_{when:%Y%m%dT%H%M%S}"
                cloud = float(np.round(rng.uniform(0, 45), 3))
                props = {"eo:cloud_cover": cloud, "platform": "sentinel-2a",
                         "s2:processing_baseline": "04.00"}
                keys = S2_KEYS
                if rng.random() < 0.03 and cloud < 20:
                    keys = tuple(k for k in S2_KEYS if k != "B04")  # malformed: lacks a band
                    counts["malformed"] += 1
                put(search_only_item(S2, iid, when, geom, props, keys))
                counts["s2"] += 1
        for day in range(0, 385, 3):
            when = t0 + dt.timedelta(days=day, hours=int(rng.integers(0, 12)))
            dx, dy = rng.uniform(-0.06, 0.06, 2)
            geom = _box(lon - 0.1 + dx, lat - 0.08 + dy, lon + 0.1 + dx, lat + 0.08 + dy)
            r = rng.random()
            if ci == 3 and when.month in (12, 1, 2):
                r = 0.0  # a summer with EW-mode scenes only
            props = {
                "sar:instrument_mode": "EW" if r < 0.05 else "IW",
                "sar:polarizations": ["VV"] if 0.05 <= r < 0.12 else ["VV", "VH"],
                "sat:orbit_state": "ascending" if rng.random() < 0.5 else "descending",
                "platform": "SENTINEL-1A",
            }
            put(search_only_item(S1, f"S1X_{ci}_{when:%Y%m%dT%H%M%S}", when, geom, props, ("vv", "vh")))
            counts["s1"] += 1
    write_search_only_catalog(out, "synthetic", items)
    return counts


def _have_postgres() -> bool:
    try:
        from pipeline.demo.serve import find_postgres

        find_postgres()
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def synthetic_api(tmp_path_factory):
    """The synthetic catalog served by stac-fastapi-pgstac on loopback."""
    if not _have_postgres():
        pytest.skip("PostgreSQL/PostGIS not installed")
    from pipeline.demo.serve import start_catalog_server

    cat = tmp_path_factory.mktemp("synthetic-catalog")
    counts = build_synthetic_catalog(cat)
    served = start_catalog_server(cat, workdir=tmp_path_factory.mktemp("synthetic-serve"),
                                  progress=False)
    served.counts = counts  # type: ignore[attr-defined]
    try:
        yield served
    finally:
        served.stop()


# ------------------------------------------------------------------------------ the oracle
def oracle(url: str, loc, window, modality: str, cfg) -> str:
    """Item id (or '') for one (location, window, modality), queried alone, chosen here."""
    from pystac_client import Client

    prov = get_provider("local", url)
    col = prov.collection(modality)
    client = Client.open(url)
    w0, w1 = (pd.Timestamp(t) for t in window)
    search = client.search(
        collections=[col], intersects=shapely.geometry.mapping(loc.geometry),
        datetime=f"{w0.isoformat()}Z/{(w1 - pd.Timedelta('1ms')).isoformat()}Z", limit=1000,
    )
    need = set(prov.band_assets(modality).values())
    best = None
    for page in search.pages_as_dicts():
        for it in page["features"]:
            p = it["properties"]
            t = pd.Timestamp(p["datetime"]).tz_convert(None)
            if not (w0 <= t < w1) or not need <= set(it["assets"]):
                continue
            if not shapely.geometry.shape(it["geometry"]).contains(loc.geometry):
                continue
            if modality == "S1RTC":
                if p.get("sar:instrument_mode") != "IW" or not {"VV", "VH"} <= set(
                        p.get("sar:polarizations", [])):
                    continue
                if p.get("sat:orbit_state") not in cfg.search.s1_orbit_states:
                    continue
                cloud = 0.0
            else:
                cloud = p.get("eo:cloud_cover")
                if cloud is None or not cloud < cfg.seasons.max_cloud_cover:
                    continue
            if cfg.seasons.choice == "most_recent":
                key = (t, it["id"])
                better = best is None or key > best[0]
            else:
                key = (cloud, -t.value, it["id"])
                better = best is None or key < best[0]
            if better:
                best = (key, it["id"])
    return "" if best is None else best[1]


def _compare_with_oracle(url: str, locs, cfg, scenes: pd.DataFrame) -> int:
    windows = season_windows(locs["sample"].to_numpy(), cfg.seasons)
    got = {(r.sample, r.season, r.modality): r.item_id for r in scenes.itertuples()}
    checked = 0
    for j, loc in enumerate(locs.itertuples()):
        for season in range(4):
            for m in cfg.search.modalities:
                want = oracle(url, loc, windows[j, season], m, cfg)
                assert got[(loc.sample, season, m)] == want, (loc.sample, season, m)
                checked += 1
    return checked


def _demo_locations(n: int = 20, seed: int = 3):
    cfg = load_config("demo", overrides={"sampling": {"num_locations": n, "seed": seed}})
    return sample(cfg.sampling, progress=False)


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("rule", ["calendar-least-cloudy", "shifted-most-recent"])
def test_batched_choice_equals_oracle_synthetic(synthetic_api, rule):
    over = {"search": {"stac_url": synthetic_api.stac_url, "workers": 2}}
    if rule == "shifted-most-recent":
        over["seasons"] = {"rule": "shifted", "choice": "most_recent", "max_shift_days": 120,
                           "reference_dates": ["2022-03-01", "2022-05-20", "2022-08-21",
                                               "2022-11-22"]}
    cfg = load_config("demo", overrides=over)
    locs = _demo_locations()
    df, info = SceneSearch(cfg).run(locs, progress=False)
    assert len(df) == len(locs) * 4 * 2
    assert set(df["status"]) == {"ok", "missing"}  # the catalog makes both happen
    n = _compare_with_oracle(synthetic_api.stac_url, locs, cfg, df)
    assert n == len(df)
    # requests per (location, window, modality): far below the oracle's 1
    assert info["requests_per_location_window"] < 0.2, info
    # items lacking a band were met and recorded
    assert info["skipped_count"] > 0
    assert all("no asset for bands ['B04']" in s["reason"] for s in info["skipped_items"])
    ok = df[df["status"] == "ok"]
    for r in ok.head(5).itertuples():
        item = json.loads(r.item_json)
        assert item["id"] == r.item_id
        assert "?" not in item["assets"]["vv" if r.modality == "S1RTC" else "B04"]["href"]
    missing = df[df["status"] == "missing"]
    assert (missing["reason"].str.len() > 0).all() and (missing["item_json"] == "").all()


def test_partial_cover_and_s1_filters_reasons(synthetic_api):
    cfg = load_config("demo", overrides={"search": {"stac_url": synthetic_api.stac_url,
                                                    "s1_orbit_states": ["ascending"]}})
    locs = _demo_locations(10)
    df, _ = SceneSearch(cfg).run(locs, progress=False)
    s1 = df[(df["modality"] == "S1RTC") & (df["status"] == "ok")]
    for r in s1.itertuples():
        assert json.loads(r.item_json)["properties"]["sat:orbit_state"] == "ascending"
    assert _compare_with_oracle(synthetic_api.stac_url, locs.head(4), cfg,
                                df[df["sample"].isin(locs["sample"].head(4))]) > 0


def test_drop_incomplete_and_table_file(synthetic_api, tmp_path):
    cfg = load_config("demo", overrides={"search": {"stac_url": synthetic_api.stac_url,
                                                    "drop_incomplete": True},
                                         "seasons": {"max_cloud_cover": 5}})
    locs = _demo_locations(10)
    lp = tmp_path / "locations.parquet"
    write_locations(locs, lp, cfg)
    out = tmp_path / "scenes.parquet"
    info = search_locations(lp, out, cfg, progress=False)
    df = read_scenes(out)
    assert (df["status"] == "ok").all()
    assert info["dropped_samples"], "a 5 % cloud limit should leave some location incomplete"
    assert not set(info["dropped_samples"]) & set(df["sample"])
    assert set(df["sample"]) | set(info["dropped_samples"]) == set(locs["sample"])
    assert not (tmp_path / "scenes.parquet.partial").exists()


def test_retries_through_faulty_proxy(synthetic_api):
    from pipeline.faults import FaultProxy

    locs = _demo_locations(6)
    base = load_config("demo", overrides={"search": {"stac_url": synthetic_api.stac_url}})
    want, _ = SceneSearch(base).run(locs, progress=False)
    with FaultProxy(synthetic_api.stac_url, rate=0.3, kinds=("429", "503", "500"),
                    seed=2, retry_after_s=0) as proxy:
        cfg = load_config("demo", overrides={"search": {
            "stac_url": proxy.url, "backoff_s": 0.01, "max_retries": 8, "workers": 1}})
        got, _ = SceneSearch(cfg).run(locs, progress=False)
        faults = {k: v for k, v in proxy.stats.items() if k.startswith("fault:")}
        assert sum(faults.values()) > 0, proxy.stats
    pd.testing.assert_series_equal(got["item_id"], want["item_id"])


def test_api_failing_midway_names_the_window(synthetic_api, tmp_path):
    from pipeline.faults import FaultProxy

    locs = _demo_locations(4)
    lp = tmp_path / "loc.parquet"
    write_locations(locs, lp, None)
    with FaultProxy(synthetic_api.stac_url) as proxy:
        proxy.fail_always("/search")
        cfg = load_config("demo", overrides={"search": {
            "stac_url": proxy.url, "backoff_s": 0.0, "max_retries": 2, "workers": 1}})
        with pytest.raises(SearchError, match=r"window 20\d\d-.* failed after 2 retries"):
            search_locations(lp, tmp_path / "scenes.parquet", cfg, progress=False)
    assert not (tmp_path / "scenes.parquet").exists()
    assert not (tmp_path / "scenes.parquet.partial").exists()


def test_unknown_collection_and_modality(synthetic_api):
    from dataclasses import replace

    cfg = load_config("demo", overrides={"search": {"stac_url": synthetic_api.stac_url}})
    prov = get_provider("local", synthetic_api.stac_url)
    bad = replace(prov, collections={**prov.collections, "S2L2A": "sentinel-2-l9z"})
    with pytest.raises(ConfigError, match="sentinel-2-l9z.*does not exist"):
        SceneSearch(cfg, bad).run(_demo_locations(2), progress=False)
    cfg2 = load_config("demo", overrides={"search": {"stac_url": synthetic_api.stac_url,
                                                     "modalities": ["S2L1C"]}})
    with pytest.raises(ConfigError, match="no collection for modality 'S2L1C'"):
        SceneSearch(cfg2)


def test_unreachable_url_fails_fast():
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config("demo", overrides={"search": {"stac_url": f"http://127.0.0.1:{port}"}})
    t = time.perf_counter()
    with pytest.raises(SearchError, match="unreachable"):
        SceneSearch(cfg).run(_demo_locations(2), progress=False)
    assert time.perf_counter() - t < 5


def test_incomplete_tables_are_refused(tmp_path):
    import pyarrow as pa

    from pipeline.sampling import write_table

    p = tmp_path / "s.parquet"
    write_table(pa.table({"sample": ["0000000"]}), p, "scenes", None, complete=False)
    with pytest.raises(UserError, match="flagged incomplete"):
        read_scenes(p)
    with pytest.raises(UserError, match="not a locations table"):
        read_locations(p)


def test_empty_locations_rejected():
    cfg = load_config("demo", overrides={"search": {"stac_url": "http://127.0.0.1:9"}})
    locs = locations_from_points(np.array([12.0]), np.array([51.5]))
    with pytest.raises(UserError, match="empty"):
        SceneSearch(cfg).run(locs.iloc[:0], progress=False)


# --------------------------------------------------------------------- the demo catalog
def test_batched_choice_equals_oracle_demo_catalog(stac_api):
    cfg = load_config("demo", overrides={"search": {"stac_url": stac_api.stac_url}})
    locs = _demo_locations(15, seed=5)
    df, info = SceneSearch(cfg).run(locs, progress=False)
    _compare_with_oracle(stac_api.stac_url, locs, cfg, df)
    assert info["requests_per_location_window"] < 0.5, info
