"""Synthetic scenes (COGs + Planetary-Computer-shaped STAC items) and tables for the cube, store
and runner tests; plus tests of the generator itself.

S2 L2A scenes have every band at its native GSD (10/20/60 m) on a grid offset from the 10 m
patch grid (so every band is really resampled), SCL at 20 m, per-asset ``proj:transform`` and
``proj:shape``, item ``proj:epsg`` and ``s2:processing_baseline``. S1 RTC scenes are linear
gamma0 float32 with nodata -32768 and an item-level 9-element ``proj:transform``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from pipeline import layout
from pipeline.demo.cog import write_cog
from pipeline.providers import s2_offset_rule

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / ".." / "shared" / "data" / "real"
SCENE_M = 3600.0  # scene side, metres (multiple of 60)
SCL_VALUES = np.array([4, 5, 6, 8, 9, 3, 10, 7], np.uint8)


def _field(shape: tuple[int, int], seed: int, lo: float, hi: float) -> np.ndarray:
    """A smooth-ish deterministic field (so bilinear resampling has something to do)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    f = np.sin(xx / 7.0 + rng.uniform(0, 6)) + np.cos(yy / 5.0 + rng.uniform(0, 6))
    f += rng.normal(0, 0.3, shape)
    f = (f - f.min()) / (f.max() - f.min())
    return lo + (hi - lo) * f


def s2_scene(out: Path, item_id: str, epsg: int, x0: float, y1: float, when: str, *,
             baseline: str = "04.00", seed: int = 0, nodata_rows: int = 0,
             cloud_cover: float = 10.0, href_base: str | None = None) -> dict:
    """Write one S2 L2A scene (12 bands + SCL) with its upper-left corner at (x0, y1)."""
    d = out / item_id
    assets = {}
    for i, band in enumerate((*layout.BANDS[layout.S2L2A], "SCL")):
        gsd = layout.S2_BAND_GSD[band]
        n = int(SCENE_M // gsd)
        tr = Affine(gsd, 0, x0, 0, -gsd, y1)
        if band == "SCL":
            rng = np.random.default_rng(seed + 99)
            data = SCL_VALUES[rng.integers(0, len(SCL_VALUES), (n, n))]
            # blocks so nearest-resampled classes are spatially coherent
            data = np.repeat(np.repeat(data[: n // 4, : n // 4], 4, 0), 4, 1)[:n, :n]
            nod = None
        else:
            base = 1000 if baseline >= "04.00" else 0
            data = np.round(_field((n, n), seed * 31 + i, 50, 6000) + base).astype(np.uint16)
            nod = 0
        k = int(nodata_rows * 10 // gsd)
        if k:
            data[:k] = 0
        path = d / f"{band}.tif"
        write_cog(path, data, tr, epsg, nodata=nod,
                  resampling="nearest" if band == "SCL" else "average")
        href = f"{href_base}/{item_id}/{band}.tif" if href_base else str(path)
        assets[band] = {"href": href, "type": "image/tiff; application=geotiff; profile=cloud-"
                        "optimized", "roles": ["data"], "proj:shape": [n, n],
                        "proj:transform": list(tr)[:6], "gsd": gsd}
    return _item(item_id, epsg, x0, y1, when, assets, {
        "s2:processing_baseline": baseline, "eo:cloud_cover": cloud_cover,
        "platform": "sentinel-2a"})


def s1_scene(out: Path, item_id: str, epsg: int, x0: float, y1: float, when: str, *,
             seed: int = 0, nodata_cols: int = 0, href_base: str | None = None) -> dict:
    d = out / item_id
    n = int(SCENE_M // 10)
    tr = Affine(10, 0, x0, 0, -10, y1)
    assets = {}
    for j, pol in enumerate(("vv", "vh")):
        data = _field((n, n), seed * 17 + j, 0.002, 0.6).astype(np.float32)
        data[:, :nodata_cols] = layout.S1_RTC_FILE_NODATA
        path = d / f"{pol}.tif"
        write_cog(path, data, tr, epsg, nodata=layout.S1_RTC_FILE_NODATA)
        href = f"{href_base}/{item_id}/{pol}.tif" if href_base else str(path)
        assets[pol] = {"href": href, "type": "image/tiff; application=geotiff; profile=cloud-"
                       "optimized", "roles": ["data"]}
    return _item(item_id, epsg, x0, y1, when, assets, {
        "proj:shape": [n, n], "proj:transform": [*list(tr)[:6], 0, 0, 1],
        "sar:polarizations": ["VV", "VH"], "platform": "SENTINEL-1A"})


def _item(item_id, epsg, x0, y1, when, assets, props) -> dict:
    from pyproj import Transformer

    t = Transformer.from_crs(epsg, 4326, always_xy=True)
    xs, ys = t.transform([x0, x0 + SCENE_M, x0 + SCENE_M, x0], [y1, y1, y1 - SCENE_M,
                                                                 y1 - SCENE_M])
    ring = [[float(a), float(b)] for a, b in zip(xs, ys, strict=True)]
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": item_id,
        "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
        "bbox": [min(xs), min(ys), max(xs), max(ys)],
        "properties": {"datetime": when, "proj:epsg": epsg, **props},
        "assets": assets, "links": [],
        "stac_extensions": ["https://stac-extensions.github.io/projection/v1.1.0/schema.json"],
    }


def location_row(sample: str, epsg: int, xmin: float, ymin: float) -> dict:
    from pyproj import Transformer

    cx, cy = xmin + layout.PATCH_SIZE_M / 2, ymin + layout.PATCH_SIZE_M / 2
    lon, lat = Transformer.from_crs(epsg, 4326, always_xy=True).transform(cx, cy)
    return {"sample": sample, "lon": lon, "lat": lat, "epsg": epsg, "xmin": xmin, "ymin": ymin,
            "xmax": xmin + layout.PATCH_SIZE_M, "ymax": ymin + layout.PATCH_SIZE_M,
            "city": "synthetic"}


def write_locations(path: Path, rows: list[dict]) -> Path:
    import geopandas as gpd
    from shapely.geometry import box

    geoms = []
    for r in rows:
        from pyproj import Transformer

        t = Transformer.from_crs(r["epsg"], 4326, always_xy=True)
        x0, y0 = t.transform(r["xmin"], r["ymin"])
        x1, y1 = t.transform(r["xmax"], r["ymax"])
        geoms.append(box(x0, y0, x1, y1))
    gpd.GeoDataFrame(rows, geometry=geoms, crs=4326).to_parquet(path)
    return path


def scene_row(sample: str, season: int, modality: str, item: dict | None,
              reason: str = "") -> dict:
    import pandas as pd

    ok = item is not None
    return {
        "sample": sample, "season": season, "modality": modality,
        "window_start": pd.Timestamp("2021-01-01", tz="UTC"),
        "window_end": pd.Timestamp("2022-01-01", tz="UTC"),
        "status": "ok" if ok else "missing", "reason": reason,
        "collection": "sentinel-2-l2a" if modality.startswith("S2") else "sentinel-1-rtc",
        "item_id": item["id"] if ok else "",
        "datetime": pd.Timestamp(item["properties"]["datetime"]) if ok else pd.NaT,
        "cloud_cover": float(item["properties"].get("eo:cloud_cover", np.nan)) if ok else np.nan,
        "item_json": json.dumps(item) if ok else "",
        **dict(zip(("dn_offset", "offset_rule"),
                   s2_offset_rule(item) if ok and modality.startswith("S2") else (0, ""),
                   strict=True)),
        "candidates": "",
    }


def write_scenes(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path)
    return path


SEASON_DATES = ("2021-03-20T10:00:00Z", "2021-06-21T10:00:00Z", "2021-09-22T10:00:00Z",
                "2021-12-21T10:00:00Z")


def synthetic_build_inputs(tmp: Path, n_samples: int, *, missing: tuple = (),
                           href_base: str | None = None, epsg: int = 32633) -> tuple[Path, Path]:
    """Locations + scenes tables for ``n_samples`` patches inside shared synthetic scenes.

    Scenes: 4 seasons of S2 (seasons 0 and 1 with baseline 03.00, without offset) and S1, all
    covering a 3.6 km square; patches tile it with a small shift. ``missing`` lists
    (sample index, season, modality) to mark missing.
    """
    data = tmp / "scenes"
    x0, y1 = 500003.0, 5000007.0  # off the 10 m grid: every band is resampled
    s2 = [s2_scene(data, f"S2_{k}", epsg, x0, y1, SEASON_DATES[k], seed=k,
                   baseline="03.00" if k < 2 else "04.00", nodata_rows=3 if k == 3 else 0,
                   href_base=href_base) for k in range(4)]
    s1 = [s1_scene(data, f"S1_{k}", epsg, x0 - 7, y1 + 3, SEASON_DATES[k].replace("10:", "05:"),
                   seed=k, nodata_cols=5, href_base=href_base) for k in range(4)]
    locs, rows = [], []
    for i in range(n_samples):
        sid = layout.sample_id(i)
        xmin = 500100.0 + 10 * (i % 40)
        ymin = 4996500.0 + 10 * (i // 40)
        locs.append(location_row(sid, epsg, xmin, ymin))
        for k in range(4):
            for m, items in (("S2L2A", s2), ("S1RTC", s1)):
                it = None if (i, k, m) in missing else items[k]
                rows.append(scene_row(sid, k, m, it, "no scene" if it is None else ""))
    # a scene listed out of chronological order in the table: the cube must sort
    rows.reverse()
    return (write_locations(tmp / "locations.parquet", locs),
            write_scenes(tmp / "scenes.parquet", rows))


# ------------------------------------------------------------------------- generator checks
def test_synthetic_scene_has_native_resolutions(tmp_path: Path) -> None:
    import rasterio

    item = s2_scene(tmp_path, "x", 32633, 500003.0, 5000007.0, SEASON_DATES[0])
    for band in ("B02", "B05", "B01", "SCL"):
        with rasterio.open(item["assets"][band]["href"]) as src:
            assert src.res == (layout.S2_BAND_GSD[band],) * 2
            assert list(src.transform)[:6] == item["assets"][band]["proj:transform"]


def test_tables_follow_the_contract(tmp_path: Path) -> None:
    import pandas as pd

    loc, sc = synthetic_build_inputs(tmp_path, 2, missing={(1, 2, "S1RTC")})
    df = pd.read_parquet(sc)
    assert set(layout.SCENE_COLUMNS) <= set(df.columns)
    assert (df["status"] == "missing").sum() == 1
    assert set(layout.LOCATION_COLUMNS) <= set(pd.read_parquet(loc).columns)


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
