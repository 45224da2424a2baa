"""Batched scene search against the local STAC API: requests per location-window, locations/s.

Builds an item-only catalog (STAC JSON shaped like Planetary Computer's, no COGs: the search never
reads pixels) that covers the surroundings of the most populous cities with Sentinel-2 L2A tiles
(a 5-day revisit, random cloud cover, overlapping tiles) and Sentinel-1 RTC scenes (a 6-day
revisit, both orbit states), serves it with the real stack (PostgreSQL + pgstac +
stac-fastapi-pgstac on loopback), draws locations around those cities with ``ssl4eo sample``'s
code, and runs ``ssl4eo search``'s code on them, counting every HTTP request.

``geoparquet``: the same locations searched in the catalog's STAC GeoParquet snapshot
(``ssl4eo search --items``) served over HTTP: requests, throughput and whether it chose exactly
what the API chose.

Prints one JSON object::

    python benchmarks/search.py --locations 1000 --cities 40

``requests_per_location_window`` is HTTP requests (searches and their pages) over
(locations x 4 windows x modalities): the batched search groups locations in lon/lat cells and
merges their windows into a few datetime spans, so it grows with cells x spans, not locations.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

S2 = "sentinel-2-l2a"
S1 = "sentinel-1-rtc"
S2_KEYS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12",
           "SCL")


def write_catalog(out: Path, cities, year: int, seed: int) -> dict[str, int]:  # noqa: ANN001
    """Item JSON around each city for the calendar seasons of ``year``."""
    from shapely.geometry import mapping

    from pipeline.demo.stacmeta import search_only_item, write_search_only_catalog

    rng = np.random.default_rng(seed)
    t0 = dt.datetime(year - 1, 12, 1, 10, 0, 0)
    counts = {"s2": 0, "s1": 0}
    items: list[dict] = []
    for ci, (lon, lat) in enumerate(zip(cities["lon"], cities["lat"], strict=True)):
        # two overlapping tiles per city, about 2.4 x 2.4 degrees (the locations' spread)
        tiles = [shapely.box(lon - 1.3, lat - 1.2, lon + 1.1, lat + 1.2),
                 shapely.box(lon - 1.1, lat - 1.2, lon + 1.3, lat + 1.2)]
        for day in range(0, 366, 5):
            for ti, geom in enumerate(tiles):
                when = t0 + dt.timedelta(days=day, seconds=int(rng.integers(0, 600)))
                props = {"eo:cloud_cover": float(np.round(rng.uniform(0, 60), 3)),
                         "platform": "Sentinel-2A", "s2:processing_baseline": "04.00"}
                iid = f"S2_{ci}_{ti}_{when:%Y%m%dT%H%M%S}"
                items.append(search_only_item(S2, iid, when, mapping(geom), props, S2_KEYS))
                counts["s2"] += 1
        for day in range(0, 366, 6):
            when = t0 + dt.timedelta(days=day, hours=int(rng.integers(0, 12)))
            geom = shapely.box(lon - 1.4, lat - 1.3, lon + 1.4, lat + 1.3)
            props = {"sar:instrument_mode": "IW", "sar:polarizations": ["VV", "VH"],
                     "sat:orbit_state": "ascending" if day % 12 else "descending",
                     "platform": "SENTINEL-1A"}
            iid = f"S1_{ci}_{when:%Y%m%dT%H%M%S}"
            items.append(search_only_item(S1, iid, when, mapping(geom), props, ("vv", "vh")))
            counts["s1"] += 1
    write_search_only_catalog(out, "bench", items)
    return counts


def geoparquet_mode(cat: Path, asset_url: str, tmp: Path, cfg, locs, api_df) -> dict:  # noqa: ANN001
    """The same locations searched in the catalog's STAC GeoParquet snapshot (written by
    stac-geoparquet, served over HTTP with Range by the asset server, so that its requests
    are counted), and whether it chose what the API chose."""
    import threading

    from pipeline.demo.httpserver import make_server
    from pipeline.demo.serve import export_geoparquet
    from pipeline.search import SnapshotSearch

    www = tmp / "www"
    www.mkdir()
    export_geoparquet(cat, www / "items.parquet", asset_url)
    server = make_server(www)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        t = time.perf_counter()
        df, _ = SnapshotSearch(cfg, [f"http://{host}:{port}/items.parquet"]).run(
            locs, progress=False)
        secs = time.perf_counter() - t
        served = server.stats.as_dict()
    finally:
        server.shutdown()
        server.server_close()
    t = time.perf_counter()
    local_df, _ = SnapshotSearch(cfg, [str(www / "items.parquet")]).run(locs, progress=False)
    local_s = time.perf_counter() - t
    cols = ["sample", "season", "modality", "status", "item_id"]
    return {
        "http_requests": int(served["requests"]),
        "http_bytes": int(served["bytes"]),
        "snapshot_bytes": (www / "items.parquet").stat().st_size,
        "same_choice_as_api": bool(api_df[cols].equals(df[cols])
                                   and api_df[cols].equals(local_df[cols])),
        "locations_per_second": round(len(locs) / secs, 2),
        "search_seconds": round(secs, 3),
        "local_file_locations_per_second": round(len(locs) / local_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--locations", type=int, default=1000, help="locations to search (>= 1000)")
    ap.add_argument("--cities", type=int, default=40, help="most populous cities to sample around")
    ap.add_argument("--sigma-km", type=float, default=30.0, help="Gaussian sigma of the offsets")
    ap.add_argument("--workers", type=int, default=4, help="concurrent searches")
    ap.add_argument("--year", type=int, default=2022, help="calendar year of the windows")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from pipeline.config import load_config
    from pipeline.demo.serve import start_catalog_server
    from pipeline.sampling import load_cities, sample
    from pipeline.search import SceneSearch

    cfg = load_config("calendar", overrides={
        "sampling": {"num_locations": args.locations, "num_cities": args.cities,
                     "sigma_km": args.sigma_km, "clip_km": 100.0, "seed": args.seed},
        "seasons": {"year": args.year, "choice": "least_cloudy"},
        "search": {"provider": "local", "stac_url": "http://127.0.0.1:1",
                   "workers": args.workers},
    })
    t = time.perf_counter()
    locs = sample(cfg.sampling, progress=False)
    sample_s = time.perf_counter() - t
    cities = load_cities(cfg.sampling)
    with tempfile.TemporaryDirectory(prefix="ssl4eo-bench-search-") as tmp:
        cat = Path(tmp) / "catalog"
        cat.mkdir()
        counts = write_catalog(cat, cities, args.year, args.seed)
        served = start_catalog_server(cat, workdir=Path(tmp) / "serve", progress=False)
        try:
            cfg = load_config("calendar", overrides={**{k: v for k, v in cfg.to_dict().items()
                                                         if k in ("sampling", "seasons")},
                                                      "search": {**cfg.search.model_dump(),
                                                                 "stac_url": served.stac_url}})
            searcher = SceneSearch(cfg)
            t = time.perf_counter()
            df, info = searcher.run(locs, progress=False)
            search_s = time.perf_counter() - t
            snapshot = geoparquet_mode(cat, served.asset_url, Path(tmp), cfg, locs, df)
        finally:
            served.stop()
    ok = int((df["status"] == "ok").sum())
    out = {
        "benchmark": "search",
        "locations": int(len(locs)),
        "cities": int(args.cities),
        "modalities": list(cfg.search.modalities),
        "catalog_items": counts,
        "location_windows": int(info["location_windows"]),
        "groups": int(info["groups"]),
        "searches": int(info["searches"]),
        "http_requests": int(info["requests"]),
        "requests_per_location_window": round(float(info["requests_per_location_window"]), 5),
        "items_seen": int(info["items_seen"]),
        "scenes_chosen": ok,
        "scenes_missing": int(len(df) - ok),
        "search_seconds": round(search_s, 3),
        "locations_per_second": round(len(locs) / search_s, 2),
        "sampling_seconds": round(sample_s, 3),
        "workers": args.workers,
        "geoparquet": snapshot,
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
