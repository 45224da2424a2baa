"""The contracts between stages: file schemas, store layout and naming.

Every stage reads and writes files; this module is the one place that says what is in them,
so that sampling, search, cube, store, loader and training agree without importing each other.

Tables
------
* locations table (GeoParquet, written by ``ssl4eo sample``): one row per location, columns
  :data:`LOCATION_COLUMNS`.
* scenes table (Parquet, written by ``ssl4eo search``): one row per (location, season,
  modality), columns :data:`SCENE_COLUMNS`; the chosen item's full STAC JSON is kept in
  ``item_json`` (unsigned hrefs), so the build never searches again. Sorted by sample, in row
  groups of :data:`SCENES_ROW_GROUP` rows, so that a build task reads only its own rows.

Store
-----
One Zarr v3 store, one group per modality (names as SSL4EO-S12 v1.1 uses them). In each group:

=================  =============================  ====================================
variable           dims                           dtype
=================  =============================  ====================================
bands              (sample, time, band, y, x)     uint16 (S2), float32 dB (S1)
cloud_mask         (sample, time, y, x)           uint8  (S2 only; 1 = cloud/shadow/cirrus)
center_lat/lon     (sample,)                      float64
crs                (sample,)                      int32  (EPSG)
x_, y_             (sample, x) / (sample, y)      float64 (UTM pixel centres)
time_              (sample, time)                 datetime64[ns] (NaT where missing)
file_id            (sample, time)                 <U80 (STAC item id; "" where missing)
cloud_cover        (sample, time)                 float32 (scene eo:cloud_cover, NaN for S1)
valid_fraction     (sample, time)                 float32 (valid-pixel fraction of the patch)
zero_bands         (sample, time)                 uint8  (bands empty on the whole patch)
patch_cloud_fr...  (sample, time)                 float32 (S2: SCL cloud fraction of the patch)
candidates_tried   (sample, time)                 int8   (S2: scenes judged on the patch)
candidate_rank     (sample, time)                 int8   (S2: 0 = the scene-level rule's scene)
dn_offset          (sample, time)                 int16  (S2: the scene's own DN offset)
offset_rule        (sample, time)                 <U40   (S2: what decided dn_offset)
band_mean/std      (band,)                        float64 (valid-pixel statistics, by finalize)
band_count         (band,)                        int64  (valid pixels counted per band)
=================  =============================  ====================================

Each group describes itself (``xr.open_zarr(store, group="S2L2A")`` needs no root group): its
attributes give ``title``, ``description``, ``units``, ``nodata``, ``bands``, the S2 offset
convention (``s2_offset_convention``, ``s2_offset``, ``reflectance``) and per-band wavelength
and native GSD; every variable has CF-style ``long_name`` / ``units`` / ``standard_name``.

Coordinates: ``sample`` (7-digit id strings), ``time`` (0..3), ``band`` (names), ``y``/``x``
(0..263 pixel index). Chunks: one (sample, time) per inner chunk of ``bands``; shards hold
:data:`SHARD_SAMPLES` samples. Completion is recorded per sample in the root group's
``status`` array (see :data:`STATUS_CODES`).
"""

from __future__ import annotations

#: Version of the tables and store written by this package. Bump on incompatible change.
SCHEMA_VERSION = "1"

#: Patch geometry (the paper: 2640 m x 2640 m at 10 m).
PATCH_PIXELS = 264
PIXEL_SIZE_M = 10.0
PATCH_SIZE_M = PATCH_PIXELS * PIXEL_SIZE_M
NUM_SEASONS = 4

#: Samples per Zarr shard (SSL4EO-S12 v1.1 stores 64 locations per file).
SHARD_SAMPLES = 64

# ----------------------------------------------------------------------------------- modalities
S2L2A = "S2L2A"
S2L1C = "S2L1C"
S1RTC = "S1RTC"
S1GRD = "S1GRD"
MODALITIES = (S2L2A, S2L1C, S1RTC)

#: Band names per modality, in the stored order (SSL4EO-S12 v1.1 names).
BANDS: dict[str, tuple[str, ...]] = {
    S2L2A: ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"),
    S2L1C: (
        "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
    ),
    S1RTC: ("vv", "vh"),
}

#: Native ground sampling distance of each Sentinel-2 band, metres.
S2_BAND_GSD: dict[str, int] = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20, "B08": 10,
    "B8A": 20, "B09": 60, "B10": 60, "B11": 20, "B12": 20, "SCL": 20, "AOT": 10, "WVP": 10,
}

#: S2 reflectance convention stored: DN = 10000 * reflectance + 1000 (processing baseline
#: >= 04.00, and SSL4EO-S12 v1.1). Scenes before 04.00 get +1000 on valid pixels; 0 = nodata.
S2_OFFSET_CONVENTIONS = {"v1.1": 1000, "v1": 0}
S2_DEFAULT_CONVENTION = "v1.1"
S2_BASELINE_OFFSET = 1000


def recorded_convention(attrs: dict) -> tuple[str, int]:
    """``(name, DN offset)`` of the S2 convention a store records in its root attributes
    (``ssl4eo:conventions``: ``s2_offset_convention`` is the name, ``s2_offset`` the offset);
    a store that records none is v1.1, the only convention written before it was recorded."""
    conv = dict(attrs.get(ATTR_CONVENTIONS) or {})
    name = conv.get("s2_offset_convention")
    if name is None and isinstance(conv.get("s2_offset"), str):
        name = conv["s2_offset"]  # an early layout put the name under the offset's key
    if name is None and conv.get("s2_offset") is not None:
        by_offset = {v: k for k, v in S2_OFFSET_CONVENTIONS.items()}
        name = by_offset.get(int(conv["s2_offset"]))
    name = str(name or S2_DEFAULT_CONVENTION)
    if name not in S2_OFFSET_CONVENTIONS:
        raise ValueError(f"unknown S2 offset convention {name!r} recorded in the store "
                         f"(known: {', '.join(S2_OFFSET_CONVENTIONS)})")
    return name, S2_OFFSET_CONVENTIONS[name]
S2_OFFSET_BASELINE = "04.00"
S2_NODATA = 0
#: Sentinel-1 stored in dB, float32, NaN as nodata.
S1_NODATA = float("nan")
#: Planetary Computer's RTC nodata in linear gamma0 files.
S1_RTC_FILE_NODATA = -32768.0

#: SCL classes counted as cloud in ``cloud_mask``: 3 shadow, 8/9 cloud, 10 cirrus.
SCL_CLOUD_CLASSES = (3, 8, 9, 10)
#: SCL classes that are not data at all (0 nodata, 1 saturated/defective).
SCL_INVALID_CLASSES = (0, 1)

# ------------------------------------------------------------------------------------- tables
LOCATION_COLUMNS = (
    "sample",  # 7-digit id, str
    "lon", "lat",  # centre, EPSG:4326
    "epsg",  # UTM EPSG of the patch grid
    "xmin", "ymin", "xmax", "ymax",  # patch bounds in that UTM CRS, snapped to the 10 m grid
    "city",  # seed city (or source of the point)
    "geometry",  # patch footprint in EPSG:4326 (GeoParquet)
)

SCENE_COLUMNS = (
    "sample",  # location id
    "season",  # 0..3 (chronological order of the windows)
    "modality",  # S2L2A / S2L1C / S1RTC
    "window_start", "window_end",  # UTC timestamps of the season window
    "status",  # "ok" or "missing"
    "reason",  # why missing / skipped ("" when ok)
    "collection",  # STAC collection id
    "item_id",
    "datetime",  # acquisition time (UTC)
    "cloud_cover",  # eo:cloud_cover (NaN for S1)
    "item_json",  # the chosen STAC item, JSON text, unsigned hrefs
    "dn_offset",  # S2: the scene's DN offset (1000: DN = 10000 x reflectance + 1000; else 0)
    "offset_rule",  # S2: what decided dn_offset (pipeline.providers.s2_offset_rule)
    "candidates",  # S2: JSON array of the next scenes in the choice's order (item JSON), or ""
)

#: Rows per Parquet row group of the scenes table, which is sorted by sample: a shard task reads
#: only the groups that hold its samples (:func:`pipeline.runner.read_shard_scenes`). 512 rows
#: are one default shard (64 samples x 4 seasons x 2 modalities), about 4 MB of item JSON. With
#: pyarrow's default (1 Mi rows a group), every task of a 250,000-location build would read
#: and decompress gigabytes of item JSON to use a few megabytes of it.
SCENES_ROW_GROUP = 512

# -------------------------------------------------------------------------------------- store
#: Root-group attribute names.
ATTR_SCHEMA = "ssl4eo:schema_version"
ATTR_PROVENANCE = "ssl4eo:provenance"
ATTR_STATS = "ssl4eo:band_stats"  # {modality: {"mean": [...], "std": [...], "bands": [...]}}
ATTR_CONVENTIONS = "ssl4eo:conventions"

#: Values of the root ``status`` array (sample,) uint8.
STATUS_CODES = {"pending": 0, "complete": 1, "failed": 2}

STORE_VARIABLES = (
    "bands", "cloud_mask", "center_lat", "center_lon", "crs", "x_", "y_", "time_",
    "file_id", "cloud_cover", "valid_fraction",
)


def sample_id(index: int) -> str:
    """The 7-digit id SSL4EO-S12 uses for location ``index`` (``0000042``)."""
    if not 0 <= index < 10_000_000:
        raise ValueError(f"sample index {index} does not fit a 7-digit id (0..9999999)")
    return f"{index:07d}"
