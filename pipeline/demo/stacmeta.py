"""STAC JSON for the embedded catalog, shaped like Planetary Computer's real items.

The structure (keys, value types, asset keys, where ``proj:*`` lives, ``stac_extensions``)
copies the saved PC JSON in ``../shared/data/stac`` (see ``docs/reference/pc_stac_notes.md``):

* ``sentinel-2-l2a``: ``proj:epsg`` (and ``proj:code``) in ``properties`` only; every raster
  asset has ``proj:bbox``, ``proj:shape`` and a 6-element ``proj:transform`` at the band's own
  10/20/60 m grid, a float ``gsd``, and ``eo:bands`` on B01..B12 and ``visual`` (not on
  AOT/WVP/SCL); extensions eo, sat, projection v1.1.0; no ``raster:bands``.
* ``sentinel-1-rtc``: ``proj:*`` at item level only, with a 9-element ``proj:transform`` and
  ``proj:shape`` = [rows, cols] (``s1:shape`` = [cols, rows]); assets ``vv``/``vh`` with
  ``raster:bands`` (nodata -32768, float32, 10 m), ``file:size``/``file:checksum``; extensions
  sar, sat, projection v1.1.0, file v2.0.0, raster v1.1.0.

Asset ``href`` values are relative to the item file (``../../assets/<collection>/<id>/<key>.tif``).
PC's tiler assets (``tilejson``, ``rendered_preview``) and SAFE metadata assets are left out:
there is no tiler and no SAFE product behind a local scene.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from pyproj import Transformer
from shapely.geometry import Polygon, box, mapping
from shapely.ops import transform as shp_transform

S2_COLLECTION = "sentinel-2-l2a"
S1_COLLECTION = "sentinel-1-rtc"
COLLECTIONS = (S2_COLLECTION, S1_COLLECTION)

STAC_VERSION = "1.0.0"
COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"

S2_EXTENSIONS = [
    "https://stac-extensions.github.io/eo/v1.0.0/schema.json",
    "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
    "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
]
S1_EXTENSIONS = [
    "https://stac-extensions.github.io/sar/v1.0.0/schema.json",
    "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
    "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
    "https://stac-extensions.github.io/file/v2.0.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
]

#: Sentinel-2 bands as PC describes them: (name, common_name or None, description,
#: centre wavelength um, FWHM um, gsd m).
S2_BAND_INFO: dict[str, tuple[str | None, str, float, float, int]] = {
    "B01": ("coastal", "Band 1 - Coastal aerosol", 0.443, 0.027, 60),
    "B02": ("blue", "Band 2 - Blue", 0.49, 0.098, 10),
    "B03": ("green", "Band 3 - Green", 0.56, 0.045, 10),
    "B04": ("red", "Band 4 - Red", 0.665, 0.038, 10),
    "B05": ("rededge", "Band 5 - Vegetation red edge 1", 0.704, 0.019, 20),
    "B06": ("rededge", "Band 6 - Vegetation red edge 2", 0.74, 0.018, 20),
    "B07": ("rededge", "Band 7 - Vegetation red edge 3", 0.783, 0.028, 20),
    "B08": ("nir", "Band 8 - NIR", 0.842, 0.145, 10),
    "B8A": ("rededge", "Band 8A - Vegetation red edge 4", 0.865, 0.033, 20),
    "B09": (None, "Band 9 - Water vapor", 0.945, 0.026, 60),
    "B11": ("swir16", "Band 11 - SWIR (1.6)", 1.61, 0.143, 20),
    "B12": ("swir22", "Band 12 - SWIR (2.2)", 2.19, 0.242, 20),
}
#: Reflectance bands of an L2A item, in the order of ``layout.BANDS["S2L2A"]``.
S2_REFLECTANCE_BANDS = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12",
)
#: Every raster asset of a PC L2A item and its gsd.
S2_ASSET_GSD: dict[str, int] = {
    **{b: info[4] for b, info in S2_BAND_INFO.items()},
    "AOT": 10, "WVP": 10, "SCL": 20, "visual": 10,
}
S2_ASSET_TITLES = {
    "AOT": "Aerosol optical thickness (AOT)",
    "WVP": "Water vapour (WVP)",
    "SCL": "Scene classfication map (SCL)",  # sic, as PC spells it
    "visual": "True color image",
}
S1_ASSET_INFO = {
    "vv": (
        "VV: vertical transmit, vertical receive",
        "Terrain-corrected gamma naught values of signal transmitted with vertical "
        "polarization and received with vertical polarization with radiometric terrain "
        "correction applied.",
    ),
    "vh": (
        "VH: vertical transmit, horizontal receive",
        "Terrain-corrected gamma naught values of signal transmitted with vertical "
        "polarization and received with horizontal polarization with radiometric terrain "
        "correction applied.",
    ),
}


def eo_band(name: str) -> dict[str, Any]:
    """The ``eo:bands`` entry PC gives band ``name`` (B01..B12, B8A)."""
    common, desc, cw, fwhm, _ = S2_BAND_INFO[name]
    out: dict[str, Any] = {"name": name}
    if common:
        out["common_name"] = common
    out.update(description=desc, center_wavelength=cw, full_width_half_max=fwhm)
    return out


def s2_asset_title(key: str) -> str:
    if key in S2_BAND_INFO:
        return f"{S2_BAND_INFO[key][1]} - {S2_BAND_INFO[key][4]}m"
    return S2_ASSET_TITLES[key]


def asset_href(collection: str, item_id: str, key: str) -> str:
    """Asset href relative to the item file ``items/<collection>/<item_id>.json``."""
    return f"../../assets/{collection}/{item_id}/{key}.tif"


def asset_path(out: Path, collection: str, item_id: str, key: str) -> Path:
    """Where the COG of ``key`` lives inside the catalog directory ``out``."""
    return out / "assets" / collection / item_id / f"{key}.tif"


def item_path(out: Path, collection: str, item_id: str) -> Path:
    return out / "items" / collection / f"{item_id}.json"


def fmt_dt(dt: datetime) -> str:
    """PC's datetime format: ``2024-04-19T09:55:49.024000Z``."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def footprint_lonlat(geom_utm: Polygon, epsg: int) -> tuple[dict[str, Any], list[float]]:
    """GeoJSON geometry and bbox (lon/lat) of a footprint given in UTM metres."""
    tr = Transformer.from_crs(epsg, 4326, always_xy=True)
    dense = geom_utm.segmentize(max(geom_utm.length / 40.0, 1.0))
    ll = shp_transform(lambda x, y: tr.transform(x, y), dense)
    ll = ll.simplify(1e-7)
    geo = mapping(ll)
    coords = [[[round(float(x), 7), round(float(y), 7)] for x, y in ring]
              for ring in geo["coordinates"]]
    minx, miny, maxx, maxy = ll.bounds
    return (
        {"type": "Polygon", "coordinates": coords},
        [round(minx, 8), round(miny, 8), round(maxx, 8), round(maxy, 8)],
    )


def grid_bbox(transform: Affine, shape: tuple[int, int]) -> list[float]:
    """``proj:bbox`` [xmin, ymin, xmax, ymax] of a north-up grid."""
    x0, y0 = transform.c, transform.f
    x1 = x0 + transform.a * shape[1]
    y1 = y0 + transform.e * shape[0]
    return [float(min(x0, x1)), float(min(y0, y1)), float(max(x0, x1)), float(max(y0, y1))]


def transform6(transform: Affine) -> list[float]:
    return [float(v) for v in (transform.a, transform.b, transform.c,
                               transform.d, transform.e, transform.f)]


def s2_raster_asset(
    collection: str, item_id: str, key: str, transform: Affine, shape: tuple[int, int]
) -> dict[str, Any]:
    """One PC-shaped S2 raster asset with per-asset projection at its own resolution."""
    asset: dict[str, Any] = {
        "href": asset_href(collection, item_id, key),
        "proj:bbox": grid_bbox(transform, shape),
        "proj:shape": [int(shape[0]), int(shape[1])],
        "proj:transform": transform6(transform),
        "gsd": float(S2_ASSET_GSD[key]),
        "type": COG_MEDIA_TYPE,
        "roles": ["data"],
        "title": s2_asset_title(key),
    }
    if key in S2_BAND_INFO:
        asset["eo:bands"] = [eo_band(key)]
    elif key == "visual":
        asset["eo:bands"] = [eo_band("B04"), eo_band("B03"), eo_band("B02")]
    return asset


def s2_links(collection: str = S2_COLLECTION) -> list[dict[str, Any]]:
    return [
        {"rel": "collection", "type": "application/json",
         "href": f"../../collections/{collection}.json"},
        {"rel": "parent", "type": "application/json",
         "href": f"../../collections/{collection}.json"},
        {"rel": "root", "type": "application/json", "href": "../../catalog.json"},
        {"rel": "license",
         "href": "https://sentinel.esa.int/documents/247904/690755/Sentinel_Data_Legal_Notice"},
    ]


def file_info(path: Path) -> tuple[int, str]:
    """``file:size`` and ``file:checksum`` (md5 hex, as PC writes it) of a file."""
    data = path.read_bytes()
    return len(data), hashlib.md5(data).hexdigest()  # noqa: S324 - PC's checksum is md5


def s1_item(
    *,
    item_id: str,
    grd_id: str,
    start: datetime,
    end: datetime,
    epsg: int,
    transform: Affine,
    shape: tuple[int, int],
    footprint_utm: Polygon,
    orbit_state: str,
    relative_orbit: int,
    absolute_orbit: int,
    datatake_id: int,
    slice_number: int,
    total_slices: int,
    timeliness: str,
    asset_files: dict[str, Path],
    description: str | None = None,
) -> dict[str, Any]:
    """A PC-shaped sentinel-1-rtc item (``asset_files``: key -> written COG, for file:*)."""
    geometry, bbox = footprint_lonlat(footprint_utm, epsg)
    mid = start + (end - start) / 2
    assets: dict[str, Any] = {}
    for key in ("vh", "vv"):
        if key not in asset_files:
            continue
        size, checksum = file_info(asset_files[key])
        title, desc = S1_ASSET_INFO[key]
        assets[key] = {
            "href": asset_href(S1_COLLECTION, item_id, key),
            "file:size": size,
            "file:checksum": checksum,
            "type": COG_MEDIA_TYPE,
            "roles": ["data"],
            "title": title,
            "description": desc,
            "raster:bands": [
                {"nodata": -32768, "data_type": "float32", "spatial_resolution": 10.0}
            ],
        }
    props: dict[str, Any] = {
        "datetime": fmt_dt(mid),
        "platform": "SENTINEL-1A",
        "s1:shape": [int(shape[1]), int(shape[0])],
        "proj:bbox": grid_bbox(transform, shape),
        "proj:epsg": int(epsg),
        "proj:code": f"EPSG:{epsg}",
        "proj:shape": [int(shape[0]), int(shape[1])],
        "end_datetime": str(end.astimezone(UTC)),
        "constellation": "Sentinel-1",
        "s1:resolution": "high",
        "proj:transform": transform6(transform) + [0.0, 0.0, 1.0],
        "s1:datatake_id": str(datatake_id),
        "start_datetime": str(start.astimezone(UTC)),
        "s1:orbit_source": "RESORB",
        "s1:slice_number": str(slice_number),
        "s1:total_slices": str(total_slices),
        "sar:looks_range": 5,
        "sat:orbit_state": orbit_state,
        "sar:product_type": "GRD",
        "sar:looks_azimuth": 1,
        "sar:polarizations": ["VV", "VH"],
        "sar:frequency_band": "C",
        "sat:absolute_orbit": int(absolute_orbit),
        "sat:relative_orbit": int(relative_orbit),
        "s1:processing_level": "1",
        "sar:instrument_mode": "IW",
        "sar:center_frequency": 5.405,
        "sar:resolution_range": 20,
        "s1:product_timeliness": timeliness,
        "sar:resolution_azimuth": 22,
        "sar:pixel_spacing_range": 10,
        "sar:observation_direction": "right",
        "sar:pixel_spacing_azimuth": 10,
        "sar:looks_equivalent_number": 4.4,
        "s1:instrument_configuration_ID": "7",
        "sat:platform_international_designator": "2014-016A",
    }
    if description:
        props["description"] = description
    links = s2_links(S1_COLLECTION)
    links.append({
        "rel": "derived_from",
        "href": f"sentinel-1-grd/{grd_id}",
        "type": "application/json",
        "title": "Sentinel 1 GRD Item",
    })
    return {
        "id": item_id,
        "bbox": bbox,
        "type": "Feature",
        "links": links,
        "assets": assets,
        "geometry": geometry,
        "collection": S1_COLLECTION,
        "properties": props,
        "stac_extensions": list(S1_EXTENSIONS),
        "stac_version": STAC_VERSION,
    }


def scl_percentages(scl: np.ndarray) -> dict[str, float]:
    """PC's ``s2:*_percentage`` properties and ``eo:cloud_cover`` computed from an SCL array.

    ``s2:nodata_pixel_percentage`` is over all pixels; the others (and ``eo:cloud_cover`` =
    medium + high probability clouds + thin cirrus, classes 8, 9, 10) are over valid pixels
    (SCL != 0), as Sen2Cor reports them.
    """
    total = scl.size
    counts = np.bincount(scl.ravel(), minlength=12).astype(np.float64)
    valid = total - counts[0]

    def pct(*classes: int) -> float:
        if valid == 0:
            return 0.0
        return round(float(sum(counts[c] for c in classes) * 100.0 / valid), 6)

    return {
        "eo:cloud_cover": pct(8, 9, 10),
        "s2:water_percentage": pct(6),
        "s2:snow_ice_percentage": pct(11),
        "s2:vegetation_percentage": pct(4),
        "s2:thin_cirrus_percentage": pct(10),
        "s2:cloud_shadow_percentage": pct(3),
        "s2:nodata_pixel_percentage": round(float(counts[0] * 100.0 / total), 6),
        "s2:unclassified_percentage": pct(7),
        "s2:dark_features_percentage": pct(2),
        "s2:not_vegetated_percentage": pct(5),
        "s2:degraded_msi_data_percentage": 0.0,
        "s2:high_proba_clouds_percentage": pct(9),
        "s2:medium_proba_clouds_percentage": pct(8),
        "s2:saturated_defective_pixel_percentage": pct(1),
    }


def s2_item(
    *,
    item_id: str,
    platform: str,
    sensing: datetime,
    generation: datetime,
    epsg: int,
    mgrs_tile: str,
    baseline: str,
    relative_orbit: int,
    absolute_orbit: int,
    centre: str,
    grids: dict[int, tuple[Affine, tuple[int, int]]],
    footprint_utm: Polygon,
    scl: np.ndarray,
    solar_zenith: float,
    solar_azimuth: float,
    reflectance_conversion_factor: float,
    asset_keys: tuple[str, ...],
    description: str | None = None,
) -> dict[str, Any]:
    """A PC-shaped sentinel-2-l2a item. ``grids``: gsd -> (transform, shape)."""
    geometry, bbox = footprint_lonlat(footprint_utm, epsg)
    sat = platform[-1]
    sens = sensing.strftime("%Y%m%dT%H%M%S")
    gen = generation.strftime("%Y%m%dT%H%M%S")
    n = "N" + baseline.replace(".", "")
    assets = {
        key: s2_raster_asset(S2_COLLECTION, item_id, key, *grids[S2_ASSET_GSD[key]])
        for key in asset_keys
    }
    props: dict[str, Any] = {
        "datetime": fmt_dt(sensing),
        "platform": platform,
        "proj:epsg": int(epsg),
        "proj:code": f"EPSG:{epsg}",
        "instruments": ["msi"],
        "s2:mgrs_tile": mgrs_tile,
        "constellation": "Sentinel 2",
        "s2:granule_id": (
            f"S2{sat}_OPER_MSI_L2A_TL_{centre}_{gen}_A{absolute_orbit:06d}_T{mgrs_tile}"
            f"_N{baseline}"
        ),
        "s2:datatake_id": f"GS2{sat}_{sens}_{absolute_orbit:06d}_N{baseline}",
        "s2:product_uri": f"S2{sat}_MSIL2A_{sens}_{n}_R{relative_orbit:03d}_T{mgrs_tile}_{gen}.SAFE",
        "s2:datastrip_id": f"S2{sat}_OPER_MSI_L2A_DS_{centre}_{gen}_S{sens}_N{baseline}",
        "s2:product_type": "S2MSI2A",
        "sat:orbit_state": "descending",
        "s2:datatake_type": "INS-NOBS",
        "s2:generation_time": fmt_dt(generation),
        "sat:relative_orbit": int(relative_orbit),
        "s2:mean_solar_zenith": float(solar_zenith),
        "s2:mean_solar_azimuth": float(solar_azimuth),
        "s2:processing_baseline": baseline,
        "s2:reflectance_conversion_factor": float(reflectance_conversion_factor),
    }
    props.update(scl_percentages(scl))
    if description:
        props["description"] = description
    return {
        "id": item_id,
        "bbox": bbox,
        "type": "Feature",
        "links": s2_links(),
        "assets": assets,
        "geometry": geometry,
        "collection": S2_COLLECTION,
        "properties": props,
        "stac_extensions": list(S2_EXTENSIONS),
        "stac_version": STAC_VERSION,
    }


def s2_item_id(platform: str, sensing: datetime, relative_orbit: int, mgrs_tile: str,
               generation: datetime) -> str:
    """PC's L2A item id: ``S2B_MSIL2A_<sensing>_R<orbit>_T<tile>_<processing time>``."""
    return (
        f"S2{platform[-1]}_MSIL2A_{sensing:%Y%m%dT%H%M%S}_R{relative_orbit:03d}_T{mgrs_tile}"
        f"_{generation:%Y%m%dT%H%M%S}"
    )


def mgrs_tile(epsg: int, x: float, y: float, lat: float) -> str:
    """The MGRS 100 km square (``32UPB``) holding UTM point (x, y) of zone ``epsg``."""
    zone = epsg % 100
    band = "CDEFGHJKLMNPQRSTUVWX"[min(max(int((lat + 80) // 8), 0), 19)]
    col_sets = ("ABCDEFGH", "JKLMNPQR", "STUVWXYZ")
    col = col_sets[(zone - 1) % 3][min(max(int(x // 100000) - 1, 0), 7)]
    rows = "ABCDEFGHJKLMNPQRSTUV"
    row_idx = int(y // 100000) % 20
    if zone % 2 == 0:
        row_idx = (row_idx + 5) % 20
    return f"{zone:02d}{band}{col}{rows[row_idx]}"


def square_footprint(bounds: tuple[float, float, float, float]) -> Polygon:
    return box(*bounds)


# --------------------------------------------------------------------- item-only catalogs
def search_only_collection(cid: str) -> dict[str, Any]:
    """A minimal collection for an item-only catalog (searches never read pixels)."""
    return {
        "type": "Collection", "id": cid, "stac_version": STAC_VERSION, "description": cid,
        "license": "proprietary", "links": [],
        "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                   "temporal": {"interval": [["2021-01-01T00:00:00Z", None]]}},
    }


def search_only_item(cid: str, iid: str, when: datetime, geom: dict[str, Any],
                     props: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A minimal item with the properties and asset keys a search looks at, for catalogs of
    STAC JSON without COGs (search tests and benchmarks). ``geom`` is GeoJSON in lon/lat."""
    from shapely.geometry import shape

    return {
        "type": "Feature", "stac_version": STAC_VERSION, "id": iid, "collection": cid,
        "geometry": geom, "bbox": list(shape(geom).bounds), "links": [],
        "properties": {"datetime": when.strftime("%Y-%m-%dT%H:%M:%SZ"), **props},
        "assets": {k: {"href": asset_href(cid, iid, k), "type": "image/tiff",
                       "roles": ["data"]} for k in keys},
    }


def write_search_only_catalog(out: Path, catalog_id: str, items: list[dict[str, Any]]) -> None:
    """Write ``items`` as an item-only catalog in the embedded-catalog layout (``catalog.json``,
    ``collections/*.json``, ``items/<collection>/<id>.json``) that ``ssl4eo catalog serve``
    serves; no COGs, so no search result can be read, only chosen."""
    import json

    from .serve import CATALOG_VERSION, CATALOG_VERSION_KEY

    for cid in sorted({it["collection"] for it in items}):
        (out / "collections").mkdir(parents=True, exist_ok=True)
        (out / "collections" / f"{cid}.json").write_text(json.dumps(search_only_collection(cid)))
        (out / "items" / cid).mkdir(parents=True, exist_ok=True)
    for it in items:
        (out / "items" / it["collection"] / f"{it['id']}.json").write_text(json.dumps(it))
    (out / "catalog.json").write_text(json.dumps({
        "type": "Catalog", "id": catalog_id, "stac_version": STAC_VERSION,
        "description": f"item-only catalog {catalog_id}", "links": [],
        CATALOG_VERSION_KEY: CATALOG_VERSION}))
