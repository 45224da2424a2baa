"""Locations (``ssl4eo sample``): non-overlap, reproducibility, sigma in km, inputs, CLI.

Every property is checked independently of the sampler's own helpers: overlaps with shapely
boxes in each UTM CRS (and across UTM zones by re-projecting densified boxes with pyproj),
offsets in km with ``pyproj.Geod.inv`` from the seed city, UTM zones from the longitude.
"""

from __future__ import annotations

import argparse
import json
import math
import re

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely
from geopandas.testing import assert_geodataframe_equal
from pyproj import Geod, Transformer

from pipeline.cli import build_parser, main
from pipeline.config import load_config
from pipeline.errors import ConfigError, UserError
from pipeline.layout import LOCATION_COLUMNS
from pipeline.sampling import (
    load_cities,
    read_locations,
    sample,
    table_metadata,
    write_locations,
)

GEOD = Geod(ellps="WGS84")
PATCH_M = 2640.0


def _cfg(**sampling):
    """ssl4eo-s12 settings with sampling overrides (no truncation unless clip_km is given)."""
    return load_config("ssl4eo-s12", overrides={"sampling": sampling})


def _to(src: int, dst: int):
    tr = Transformer.from_crs(src, dst, always_xy=True)

    def f(xy: np.ndarray) -> np.ndarray:
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return f


def _utm_boxes(gdf) -> np.ndarray:
    return shapely.box(gdf["xmin"].to_numpy(), gdf["ymin"].to_numpy(),
                       gdf["xmax"].to_numpy(), gdf["ymax"].to_numpy())


def _lonlat_footprints(gdf) -> np.ndarray:
    """Each patch box, edges densified every 10 m, re-projected to EPSG:4326 (computed here)."""
    boxes = shapely.segmentize(_utm_boxes(gdf), 10.0)
    out = np.empty(len(gdf), dtype=object)
    epsg = gdf["epsg"].to_numpy()
    for code in np.unique(epsg):
        sel = epsg == code
        out[sel] = shapely.transform(boxes[sel], _to(int(code), 4326))
    return out


def assert_no_overlap(gdf) -> dict[str, int]:
    """No two patch boxes share interior area. Returns counts of close pairs checked.

    Same UTM zone: exact, shapely boxes in that CRS (boxes that only touch are allowed).
    Different zones: candidate pairs from footprints re-projected here; then box j, densified
    every 10 m, is re-projected into box i's CRS and the intersection area must be < 1 m^2
    (the two zones' grids are not aligned, so a real overlap is far larger than that).
    """
    n_same = n_cross = 0
    epsg = gdf["epsg"].to_numpy()
    boxes = _utm_boxes(gdf)
    for code in np.unique(epsg):
        idx = np.flatnonzero(epsg == code)
        b = boxes[idx]
        tree = shapely.STRtree(b)
        i, j = tree.query(b, predicate="intersects")
        keep = i < j
        areas = shapely.area(shapely.intersection(b[i[keep]], b[j[keep]]))
        bad = np.flatnonzero(areas > 0)
        assert bad.size == 0, (
            f"EPSG:{code}: patches {gdf['sample'].iloc[idx[i[keep][bad[0]]]]} and "
            f"{gdf['sample'].iloc[idx[j[keep][bad[0]]]]} overlap by {areas[bad[0]]} m^2")
        ci, cj = tree.query(b, predicate="dwithin", distance=300.0)
        n_same += int((ci < cj).sum())
    foot = _lonlat_footprints(gdf)
    tree = shapely.STRtree(foot)
    i, j = tree.query(foot, predicate="dwithin", distance=0.005)
    sel = (i < j) & (epsg[i] != epsg[j])
    for a, b in zip(i[sel], j[sel]):
        other = shapely.transform(shapely.segmentize(boxes[b], 10.0),
                                  _to(int(epsg[b]), int(epsg[a])))
        area = shapely.intersection(boxes[a], other).area
        assert area < 1.0, (
            f"patches {gdf['sample'].iloc[a]} (EPSG:{epsg[a]}) and {gdf['sample'].iloc[b]} "
            f"(EPSG:{epsg[b]}) overlap by {area:.1f} m^2")
        n_cross += 1
    return {"same_zone_close_pairs": n_same, "cross_zone_close_pairs": n_cross}


def _offsets_km(gdf, cities: pd.DataFrame) -> pd.DataFrame:
    """East/north offset (km) of each location from its seed city, along the geodesic."""
    unique = cities.drop_duplicates("name", keep=False).set_index("name")
    loc = gdf[gdf["city"].isin(unique.index)]
    c = unique.loc[loc["city"]]
    az, _, dist = GEOD.inv(c["lon"].to_numpy(), c["lat"].to_numpy(),
                           loc["lon"].to_numpy(), loc["lat"].to_numpy())
    az = np.radians(np.asarray(az))
    dist = np.asarray(dist) / 1000.0
    return pd.DataFrame({"city_lat": c["lat"].to_numpy(), "east": dist * np.sin(az),
                         "north": dist * np.cos(az)})


# -------------------------------------------------------------------------- non-overlap
def test_dense_packing_no_overlap_across_utm_zones():
    """Heavy packing around the demo cities; Halle (11.97 E) puts patches in zones 32 and 33."""
    gdf = sample(_cfg(cities="demo", num_locations=900, sigma_km=10.0).sampling,
                 progress=False)
    assert len(gdf) == 900
    halle = gdf[gdf["city"] == "Halle"]
    assert set(halle["epsg"]) == {32632, 32633}
    counts = assert_no_overlap(gdf)
    # the check is not vacuous: many neighbours within 300 m, and neighbours across 12 E
    assert counts["same_zone_close_pairs"] > 300, counts
    assert counts["cross_zone_close_pairs"] > 5, counts


def test_no_overlap_world_cities():
    gdf = sample(_cfg(num_locations=3000, num_cities=300, sigma_km=20.0, seed=7).sampling,
                 progress=False)
    assert len(gdf) == 3000 and gdf["epsg"].nunique() > 30
    assert_no_overlap(gdf)


def test_patch_boxes_and_columns(tmp_path):
    cfg = _cfg(cities="demo", num_locations=200, sigma_km=30.0, seed=3)
    gdf = sample(cfg.sampling, progress=False)
    path = write_locations(gdf, tmp_path / "loc.parquet", cfg)

    back = gpd.read_parquet(path)
    assert list(back.columns) == list(LOCATION_COLUMNS)
    assert back.crs.to_epsg() == 4326
    assert back.geometry.name == "geometry"
    geo = json.loads(pq.read_schema(path).metadata[b"geo"])
    assert geo["primary_column"] == "geometry"
    assert geo["columns"]["geometry"]["encoding"] == "WKB"
    assert set(geo["columns"]["geometry"]["geometry_types"]) == {"Polygon"}
    meta = table_metadata(path)
    assert meta["table"] == "locations" and meta["complete"] is True
    assert meta["config"]["sampling"]["num_locations"] == 200
    assert_geodataframe_equal(read_locations(path), back)

    # 7-digit ids, in order, no gaps
    assert back["sample"].tolist() == [f"{i:07d}" for i in range(200)]
    assert all(re.fullmatch(r"\d{7}", s) for s in back["sample"])
    # UTM zone from the longitude (standard zones), hemisphere from the latitude
    zone = np.floor((back["lon"] + 180) / 6).astype(int) + 1
    want = np.where(back["lat"] >= 0, 32600, 32700) + zone
    np.testing.assert_array_equal(back["epsg"], want)
    # 264 x 264 px boxes on the 10 m grid
    np.testing.assert_array_equal(back["xmax"] - back["xmin"], PATCH_M)
    np.testing.assert_array_equal(back["ymax"] - back["ymin"], PATCH_M)
    for c in ("xmin", "ymin"):
        np.testing.assert_array_equal(np.mod(back[c], 10.0), 0.0)
    # lon/lat is the box centre; the footprint is the box in EPSG:4326
    for code, grp in back.groupby("epsg"):
        tr = Transformer.from_crs(int(code), 4326, always_xy=True)
        cx, cy = tr.transform((grp["xmin"] + grp["xmax"]) / 2, (grp["ymin"] + grp["ymax"]) / 2)
        np.testing.assert_allclose(grp["lon"], cx, atol=1e-9)
        np.testing.assert_allclose(grp["lat"], cy, atol=1e-9)
        # the footprint's vertices are the box corners; its straight lon/lat edges stay
        # within 1e-5 deg (~1 m) of the true (slightly curved) box edges
        corners = shapely.get_coordinates(grp.geometry.to_numpy()).reshape(len(grp), 5, 2)
        ux = np.stack([grp["xmin"], grp["xmax"], grp["xmax"], grp["xmin"]], axis=1)
        uy = np.stack([grp["ymin"], grp["ymin"], grp["ymax"], grp["ymax"]], axis=1)
        gx, gy = tr.transform(ux.ravel(), uy.ravel())
        got = {tuple(np.round(c, 9)) for c in corners[:, :4].reshape(-1, 2)}
        assert got == set(zip(np.round(gx, 9), np.round(gy, 9)))
        d = shapely.hausdorff_distance(grp.geometry.to_numpy(), _lonlat_footprints(grp))
        assert d.max() < 1e-5


# ---------------------------------------------------------------------- reproducibility
def test_same_seed_same_table_bytes_different_seed_differs(tmp_path):
    cfg = _cfg(cities="demo", num_locations=300, sigma_km=15.0, seed=11)
    a = sample(cfg.sampling, progress=False)
    b = sample(cfg.sampling, progress=False)
    assert_geodataframe_equal(a, b, check_less_precise=False)
    pa_ = write_locations(a, tmp_path / "a.parquet", cfg)
    pb_ = write_locations(b, tmp_path / "b.parquet", cfg)
    assert pa_.read_bytes() == pb_.read_bytes()

    other = sample(_cfg(cities="demo", num_locations=300, sigma_km=15.0, seed=12).sampling,
                   progress=False)
    assert other["sample"].tolist() == a["sample"].tolist()
    moved = (other["lon"].to_numpy() != a["lon"].to_numpy())
    assert moved.mean() > 0.99
    assert not np.array_equal(np.sort(other["lon"]), np.sort(a["lon"]))


# ------------------------------------------------------------------------------ sigma (km)
def test_sigma_holds_in_km_at_equator_and_60_degrees():
    """World cities, sigma 50 km: east and north spread is 50 km near 0 deg and near 60 deg.

    (The paper converted km to degrees with no cos(latitude) factor, which would make the
    east spread 25 km at 60 deg.) Seed cities are dense enough that the non-overlap rejection
    barely changes the spread at this sigma (3 locations per city).
    """
    sigma = 50.0
    cfg = _cfg(num_locations=30000, num_cities=10000, sigma_km=sigma, seed=5)
    gdf = sample(cfg.sampling, progress=False)
    off = _offsets_km(gdf, load_cities(cfg.sampling))
    assert len(off) > 0.9 * len(gdf)
    bands = {"equator": off["city_lat"].abs() <= 6, "60N": off["city_lat"].between(55, 65)}
    for name, sel in bands.items():
        o = off[sel]
        assert len(o) > 400, (name, len(o))
        for axis in ("east", "north"):
            v = o[axis].to_numpy()
            ratio = v.std() / sigma
            assert abs(ratio - 1) < 0.1, (name, axis, ratio, len(v))
            assert abs(v.mean()) < 0.15 * sigma, (name, axis, v.mean())
            within = np.mean(np.abs(v) <= sigma)
            assert abs(within - 0.6827) < 0.07, (name, axis, within)
        assert abs(np.corrcoef(o["east"], o["north"])[0, 1]) < 0.12


def test_sigma_with_clip_is_a_truncated_gaussian_in_km():
    """clip_km = sigma: each axis is a normal truncated at +-1 sigma (std 0.5396 sigma)."""
    sigma = clip = 300.0
    cfg = _cfg(cities="demo", num_locations=2000, sigma_km=sigma, clip_km=clip, seed=9)
    gdf = sample(cfg.sampling, progress=False)
    off = _offsets_km(gdf, load_cities(cfg.sampling))
    assert len(off) == 2000
    c = clip / sigma
    phi = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(c / math.sqrt(2))
    want = sigma * math.sqrt(1 - 2 * c * phi / mass)
    for axis in ("east", "north"):
        v = off[axis].to_numpy()
        assert np.abs(v).max() <= clip + 0.01  # + the 10 m grid snap
        assert abs(v.std() / want - 1) < 0.06, (axis, v.std(), want)
    # per city too: Nairobi (equator) and Halle (51.5 N) both hold in km
    for city in ("Nairobi", "Halle"):
        o = off[(gdf["city"] == city).to_numpy()]
        assert len(o) > 300
        for axis in ("east", "north"):
            assert abs(o[axis].std() / want - 1) < 0.12, (city, axis, o[axis].std())


# ----------------------------------------------------------------------------- user points
def _assert_centred_on(gdf, lon, lat, tol_m: float = 7.5) -> None:
    _, _, d = GEOD.inv(np.asarray(lon), np.asarray(lat), gdf["lon"].to_numpy(),
                       gdf["lat"].to_numpy())
    assert np.max(d) <= tol_m, d  # the centre moves at most half a 10 m pixel diagonal


def test_points_from_csv(tmp_path):
    p = tmp_path / "pts.csv"
    pd.DataFrame({
        "name": ["a", "b", "c", "d"],
        "Longitude": [11.95, 12.05, 11.96, 36.8],
        "Latitude": [51.48, 51.48, 51.485, -1.3],
    }).to_csv(p, index=False)
    gdf = sample(_cfg(points=str(p)).sampling, progress=False)
    # c is 800 m from a: its patch would overlap a's, so it is dropped (the later point)
    assert gdf["sample"].tolist() == ["0000000", "0000001", "0000002"]
    _assert_centred_on(gdf, [11.95, 12.05, 36.8], [51.48, 51.48, -1.3])
    assert gdf["epsg"].tolist() == [32632, 32633, 32737]
    assert set(gdf["city"]) == {"points:pts.csv"}
    assert_no_overlap(gdf)


def test_points_from_geojson_and_geoparquet(tmp_path):
    gj = tmp_path / "pts.geojson"
    poly = shapely.box(2.30, 48.80, 2.40, 48.90)
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"n": 1},
         "geometry": {"type": "Point", "coordinates": [-74.0, 40.7]}},
        {"type": "Feature", "properties": {"n": 2}, "geometry": shapely.geometry.mapping(poly)},
    ]}))
    gdf = sample(_cfg(points=str(gj)).sampling, progress=False)
    assert len(gdf) == 2
    _assert_centred_on(gdf.iloc[:1], [-74.0], [40.7])
    assert poly.contains(shapely.Point(gdf["lon"].iloc[1], gdf["lat"].iloc[1]))

    # GeoParquet in another CRS (web mercator): re-projected to lon/lat
    pts = gpd.GeoDataFrame(geometry=gpd.points_from_xy([139.69, 151.21], [35.69, -33.87]),
                           crs=4326).to_crs(3857)
    gp = tmp_path / "pts.parquet"
    pts.to_parquet(gp)
    gdf = sample(_cfg(points=str(gp)).sampling, progress=False)
    _assert_centred_on(gdf, [139.69, 151.21], [35.69, -33.87])
    assert gdf["epsg"].tolist() == [32654, 32756]


def test_points_bad_input(tmp_path):
    p = tmp_path / "nocols.csv"
    pd.DataFrame({"a": [1.0], "b": [2.0]}).to_csv(p, index=False)
    with pytest.raises(UserError, match=r"needs lon and lat columns.*\['a', 'b'\]"):
        sample(_cfg(points=str(p)).sampling, progress=False)
    p2 = tmp_path / "far.csv"
    pd.DataFrame({"lon": [10.0, 10.0], "lat": [50.0, 95.0]}).to_csv(p2, index=False)
    with pytest.raises(UserError, match="1 of 2 points are not valid lon/lat"):
        sample(_cfg(points=str(p2)).sampling, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        sample(_cfg(points=str(tmp_path / "nope.csv")).sampling, progress=False)


# ----------------------------------------------------------------------------------- AOI
def _write_aoi(path, geom) -> None:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(geom)}]}))


def test_aoi_points_inside_polygon_and_reproducible(tmp_path):
    # an L-shaped (concave) AOI across the UTM 32/33 boundary at 12 E
    aoi = shapely.Polygon([(11.7, 51.3), (12.3, 51.3), (12.3, 51.45), (11.9, 51.45),
                           (11.9, 51.7), (11.7, 51.7)])
    p = tmp_path / "aoi.geojson"
    _write_aoi(p, aoi)
    cfg = _cfg(aoi=str(p), num_locations=70, seed=4)
    gdf = sample(cfg.sampling, progress=False)
    assert len(gdf) == 70
    centres = shapely.points(gdf["lon"].to_numpy(), gdf["lat"].to_numpy())
    # inside the polygon, up to the 10 m grid snap (1e-4 deg ~ 7 m)
    assert shapely.contains(aoi.buffer(1e-4), centres).all()
    notch = shapely.box(11.9 + 1e-3, 51.45 + 1e-3, 12.3, 51.7)
    assert not shapely.intersects(notch, centres).any()
    assert set(gdf["epsg"]) == {32632, 32633}
    # both arms of the L are used
    assert (gdf["lat"] > 51.5).sum() > 10 and (gdf["lon"] > 12.0).sum() > 10
    counts = assert_no_overlap(gdf)
    assert counts["cross_zone_close_pairs"] > 0
    assert_geodataframe_equal(gdf, sample(cfg.sampling, progress=False))


@pytest.mark.parametrize("kind", ["no-features", "zero-area", "points-only"])
def test_empty_aoi_is_a_user_error(tmp_path, kind):
    p = tmp_path / f"{kind}.geojson"
    if kind == "no-features":
        p.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    elif kind == "zero-area":
        _write_aoi(p, shapely.Polygon([(10, 50), (11, 50), (12, 50), (10, 50)]))
    else:
        _write_aoi(p, shapely.Point(10, 50))
    with pytest.raises(UserError, match=r"AOI file .* holds no polygon with area") as exc:
        sample(_cfg(aoi=str(p), num_locations=5).sampling, progress=False)
    assert str(p) in str(exc.value)


def test_aoi_too_small_and_points_plus_aoi(tmp_path):
    p = tmp_path / "tiny.geojson"
    _write_aoi(p, shapely.box(12.0, 51.0, 12.03, 51.02))  # about 2 x 2 km: room for 1 or 2
    with pytest.raises(UserError, match="could place only"):
        sample(_cfg(aoi=str(p), num_locations=10).sampling, progress=False)
    with pytest.raises(ConfigError, match="either sampling.points or sampling.aoi"):
        sample(_cfg(aoi=str(p), points=str(p)).sampling, progress=False)


# ----------------------------------------------------------------------------------- CLI
def test_cli_sample_writes_table(tmp_path, capsys):
    out = tmp_path / "loc.parquet"
    rc = main(["sample", "--preset", "demo", "--out", str(out), "-n", "8", "--seed", "1",
               "--no-progress"])
    assert rc == 0
    assert "wrote 8 locations" in capsys.readouterr().out
    gdf = read_locations(out)
    assert len(gdf) == 8
    meta = table_metadata(out)
    assert meta["config"]["preset"] == "demo"
    assert meta["config"]["sampling"]["seed"] == 1
    # the CLI gives the same table as the library with the same settings
    cfg = load_config("demo", overrides={"sampling": {"num_locations": 8, "seed": 1}})
    assert_geodataframe_equal(gdf, sample(cfg.sampling, progress=False))


@pytest.mark.parametrize("extra, message", [
    (["--points", "p.csv", "--aoi", "a.geojson"], "either sampling.points or sampling.aoi"),
    (["-n", "0"], "sampling.num_locations"),
    (["--sigma-km", "-5"], "sampling.sigma_km"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--points", "missing.csv"], "points file 'missing.csv' does not exist"),
])
def test_cli_sample_bad_flags(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "loc.parquet"
    rc = main(["sample", "--out", str(out), "--no-progress", *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("ssl4eo: error: ") and message in err
    assert "Traceback" not in err
    assert not out.exists() and not (tmp_path / "loc.parquet.partial").exists()


@pytest.mark.parametrize("argv, message", [
    (["sample", "-n", "5"], "the following arguments are required: --out"),
    (["sample", "--out", "x.parquet", "-n", "five"], "invalid int value: 'five'"),
    (["search", "--out", "x.parquet"], "required: --locations"),
])
def test_cli_argument_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["sample", "search"])
def test_help_lists_every_option_with_help(capsys, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = "".join(capsys.readouterr().out.split())
    options = [a for a in _subparser(command)._actions if a.option_strings]
    assert len(options) >= 8
    for action in options:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        for opt in action.option_strings:
            assert opt in text, opt
        assert "".join(action.help.split()) in text, action.help
    flags = {o for a in options for o in a.option_strings}
    want = {"sample": {"--out", "--num-locations", "--num-cities", "--sigma-km", "--clip-km",
                       "--seed", "--points", "--aoi", "--preset", "--config"},
            "search": {"--locations", "--out", "--provider", "--stac-url", "--modalities",
                       "--max-cloud", "--choice", "--preset", "--config"}}[command]
    assert want <= flags
