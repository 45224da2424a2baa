"""Build the embedded catalog: COGs and STAC items shaped like Planetary Computer's.

:func:`build_catalog` writes the directory that :mod:`pipeline.demo.serve` serves::

    OUT/catalog.json                                STAC Catalog ("ssl4eo:catalog_version")
    OUT/collections/sentinel-2-l2a.json             STAC Collections, generated here: extents
    OUT/collections/sentinel-1-rtc.json             from the items, item_assets, summaries
    OUT/items/<collection>/<item-id>.json           STAC Items, hrefs relative to the file
    OUT/assets/<collection>/<item-id>/<key>.tif     Cloud-Optimized GeoTIFFs
    OUT/labels/<tile>.tif                           land cover of each synthetic tile

Two parts go into the same two collections, ``sentinel-2-l2a`` and ``sentinel-1-rtc``:

**Synthetic scenes** (always): every tile of :func:`synthetic.city_tiles` around every city of
the profile, rendered by :func:`synthetic.render_tile` (one tile per city and UTM zone, so Halle
appears in EPSG:32632 and EPSG:32633). The profiles (:data:`PROFILES`):

* ``demo``: 15.36 km squares, 3 S2 L2A and 2 S1 RTC acquisitions per season (both orbit
  directions), all demo cities;
* ``test``: 7.68 km squares, 2 S2 and 1 S1 per season, over Halle (two UTM zones), Nairobi
  and Sydney (southern hemisphere): 4 tiles, 48 items, small enough for the test suite.

**Real scenes** (when ``real_data`` names a folder, e.g. ``../shared/data/real``), turned into
items of the same collections. Each real item names its origin in ``ssl4eo:source`` and
``ssl4eo:license`` and has ``via`` and ``license`` links; properties that the source does not
record and that were estimated (absolute orbits, generation centre, ...) are listed in
``ssl4eo:estimated``.

* ``majortom_s2l2a/<row>/<cell>/S2*_MSIL2A_*/B??.tif`` (Major-TOM Core-S2L2A cells, native
  10/20/60 m, UTM): one ``sentinel-2-l2a`` item per cell; id, sensing and generation time,
  relative orbit and MGRS tile from the product name, processing baseline from its ``_Nxxxx_``
  part (``N0400`` -> ``04.00``, ``N9999`` -> ``99.99``). Every band is re-written as a COG at
  its own native grid (no resampling). ``SCL`` (20 m) is derived from ``cloud_mask.tif``:
  cloud -> 9, else 4 (vegetation, NDVI >= 0.4) or 5 (not vegetated), 0 where the bands are 0;
  ``eo:cloud_cover`` and the ``s2:*_percentage`` properties are computed from it; the
  footprint is the cell. ``visual`` is made from B04/B03/B02; there is no AOT or WVP in the
  source, so those assets are absent.
  Baseline >= 04.00 means "DN carry the +1000 BOA offset" to every consumer (PC's
  ``harmonize_to_old`` recipe, :func:`pipeline.providers.s2_offset`). The reprocessed ``N9999``
  cell's DNs do *not* carry it (B02 median 483). So that the one rule stays true, a cell whose
  baseline says "offset" but whose darkest visible-band DNs lie below 1000 gets the 1000 added
  when its bands are re-written, and records ``ssl4eo:dn_offset_added: 1000``.
* ``ssl4eo_s12/s2a/<location>/<date>/`` (SSL4EO-S12 S2 L2A, EPSG:4326, 264 x 264 at ~10 m,
  20 m bands 132, 60 m bands 44): reprojected to the local UTM zone with GDAL warp at the
  10/20/60 m grids (bilinear; they share one origin, a multiple of 60 m), one item per date.
  The product metadata in ``metadata.json`` gives id, baseline, cloud cover and the
  ``s2:*_percentage`` values (granule-level, as PC reports them), solar angles, orbit and
  datastrip/datatake ids. ``SCL`` is derived as above, with clouds from a brightness test
  (B02 and B04 reflectance >= 0.2; >= 0.3 is "high probability") since the patches carry no
  cloud mask. ``ssl4eo_s12/s2c`` (L1C) is **skipped**: Planetary Computer has no L1C
  collection to shape it like.
* ``ssl4eo_s12/s1/<location>/<GRD id>/`` (SSL4EO-S12 S1 GRD, VV/VH dB, EPSG:4326): one
  ``sentinel-1-rtc`` item per date, warped to a UTM 10 m grid (bilinear) and converted from dB
  to *linear* float32 (nodata -32768), because PC's RTC assets are linear gamma0. (The GEE
  values are terrain-corrected sigma0, not flattened gamma0; the description says so.)
* ``s1_pyrosar/*.tif`` (pyroSAR test image, VV only, dB, 20 m, nodata -99): one
  ``sentinel-1-rtc`` item, resampled to 10 m (bilinear, in linear power). It has **only a vv
  asset** and ``sar:polarizations: ["VV"]``: nothing is invented for VH. Scene search, which
  wants VV+VH for S1 (:func:`pipeline.search.s1_ok`), never chooses it (it reports it as lacking
  the vh band when a search meets it).

A missing or unreadable real folder does not stop the build: it is skipped with a
:class:`RealDataWarning` that names the folder (and listed under ``"skipped"`` in the result).
A ``real_data`` path that is not a directory at all is a :class:`~pipeline.errors.CatalogError`.

Tiles and real scenes are independent tasks, run in parallel processes (at most
``os.cpu_count()``). The output is deterministic for a seed: a re-run writes the same item JSON
and the same COG bytes, whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

from ..errors import CatalogError
from . import stacmeta
from .cities import DEMO_CITIES
from .stacmeta import (
    S1_COLLECTION,
    S2_ASSET_GSD,
    S2_BAND_INFO,
    S2_COLLECTION,
    S2_REFLECTANCE_BANDS,
    STAC_VERSION,
)

CATALOG_ID = "ssl4eo-embedded"
#: Licence of the synthetic scenes (they are made by this package).
SYNTHETIC_LICENSE = ("Apache-2.0", "https://www.apache.org/licenses/LICENSE-2.0")
_S2_DATA_KEYS = ("AOT", "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B11",
                 "B12", "B8A", "SCL", "WVP", "visual")
_REAL_S2_KEYS = tuple(k for k in _S2_DATA_KEYS if k not in ("AOT", "WVP"))
#: SCL classes of the derived maps.
_SCL_VEGETATION, _SCL_NOT_VEGETATED, _SCL_CLOUD_MEDIUM, _SCL_CLOUD_HIGH = 4, 5, 8, 9
_NDVI_VEGETATION = 0.4
_S1_NODATA = -32768.0


class RealDataWarning(UserWarning):
    """A real-data folder was missing or unreadable and was left out of the catalog."""


# ---------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Profile:
    """Size of the synthetic part of a catalog."""

    name: str
    half_width_m: int
    s2_per_season: int
    s1_per_season: int
    cities: tuple[str, ...]

    def tiles(self) -> list:
        from .synthetic import city_tiles

        return [t for c in DEMO_CITIES if c.name in self.cities
                for t in city_tiles(c, self.half_width_m)]


def _profiles() -> dict[str, Profile]:
    from .synthetic import SCENE_HALF_WIDTH_M, TEST_SCENE_HALF_WIDTH_M

    every = tuple(c.name for c in DEMO_CITIES)
    return {
        "demo": Profile("demo", SCENE_HALF_WIDTH_M, 3, 2, every),
        # Halle (UTM 32/33 boundary: 2 tiles), Nairobi (just south of the equator), Sydney
        # (southern hemisphere, coast): both hemispheres and both zone cases in 4 tiles.
        "test": Profile("test", TEST_SCENE_HALF_WIDTH_M, 2, 1, ("Halle", "Nairobi", "Sydney")),
    }


#: The named sizes of the synthetic part (``demo``, ``test``).
PROFILES: dict[str, Profile] = _profiles()


# ------------------------------------------------------------------------------ real sources
@dataclass(frozen=True)
class RealSource:
    """Where one folder of real scenes comes from (for attribution in items/collections)."""

    folder: str
    title: str
    origin: str  # what and where from, with repository, commit and path
    url: str
    license: str  # SPDX id
    license_url: str
    provider: str


REAL_SOURCES: dict[str, RealSource] = {
    "majortom_s2l2a": RealSource(
        "majortom_s2l2a", "Major-TOM Core-S2L2A",
        "Major-TOM Core-S2L2A (ESA Phi-lab) cells, as copied in kai-tub/rico-hdl@dc41c07 "
        "integration_tests/tiffs/Major-TOM-Core/S2L2A; contains modified Copernicus Sentinel "
        "data",
        "https://github.com/kai-tub/rico-hdl", "CC-BY-SA-4.0",
        "https://creativecommons.org/licenses/by-sa/4.0/", "Major-TOM (ESA Phi-lab)",
    ),
    "ssl4eo_s12": RealSource(
        "ssl4eo_s12", "SSL4EO-S12",
        "SSL4EO-S12 (Wang et al. 2022, zhu-xlab/SSL4EO-S12) location 0000200, as copied in "
        "kai-tub/rico-hdl@dc41c07 integration_tests/tiffs/SSL4EO-S12; contains modified "
        "Copernicus Sentinel data",
        "https://github.com/zhu-xlab/SSL4EO-S12", "CC-BY-4.0",
        "https://creativecommons.org/licenses/by/4.0/", "SSL4EO-S12 (TU Munich, zhu-xlab)",
    ),
    "s1_pyrosar": RealSource(
        "s1_pyrosar", "pyroSAR test data",
        "pyroSAR test image tests/data/S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif "
        "(johntruckenbrodt/pyroSAR@e16d63b); contains modified Copernicus Sentinel data",
        "https://github.com/johntruckenbrodt/pyroSAR", "MIT",
        "https://github.com/johntruckenbrodt/pyroSAR/blob/main/LICENSE.txt", "pyroSAR developers",
    ),
}


# ------------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class _Task:
    kind: str  # "tile", "majortom", "ssl4eo_s2", "ssl4eo_s1", "pyrosar"
    label: str  # tile name or the real folder, for messages
    args: tuple


@dataclass
class _Result:
    items: list[dict[str, Any]]
    problems: list[str]


def _run_task(task: _Task, out: Path, seed: int) -> _Result:
    """Run one task (in a worker process). Real scenes that fail become problems."""
    if task.kind == "tile":
        from .synthetic import render_tile

        tile, s2, s1 = task.args
        items = render_tile(tile, out, seed, s2, s1)
        for item in items:
            item["properties"]["ssl4eo:source"] = (
                f"synthetic (pipeline.demo.synthetic, seed {seed})")
        return _Result(items, [])
    fn = _REAL_BUILDERS[task.kind]
    try:
        return _Result([fn(out, *task.args)], [])
    except Exception as exc:  # noqa: BLE001 - a bad real folder must not stop the build
        return _Result([], [f"skipped real scene folder {task.label}: {type(exc).__name__}: {exc}"])


@contextlib.contextmanager
def _removed_on_error(out: Path, collection: str, item_id: str) -> Iterator[None]:
    """Remove the assets written for ``item_id`` when the block fails (no orphan COGs)."""
    try:
        yield
    except BaseException:
        shutil.rmtree(stacmeta.asset_path(out, collection, item_id, "x").parent,
                      ignore_errors=True)
        raise


# ------------------------------------------------------------------------------- the builder
def build_catalog(
    out: Path,
    *,
    profile: str = "demo",
    real_data: Path | None = None,
    seed: int = 0,
    progress: bool = True,
    synthetic: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write the embedded catalog to ``out`` (see the module docstring) and return counts.

    ``profile`` sizes the synthetic part (:data:`PROFILES`); ``real_data`` is a folder with
    the real scenes (``None``: synthetic scenes only); ``synthetic=False`` leaves the
    synthetic scenes out (real scenes only); ``workers`` caps the worker processes (default
    ``os.cpu_count()``; 1 runs everything in this process).

    Returns ``{"items": total, "per_collection": {...}, "synthetic_items": n,
    "real_items": n, "tiles": [...], "real_sources": [...], "skipped": [...]}``.
    An existing catalog in ``out`` is replaced; ``catalog.json`` is written last, so an
    interrupted build never looks complete.
    """
    out = Path(out).expanduser()
    if profile not in PROFILES:
        raise CatalogError(
            f"unknown catalog profile {profile!r}; choose one of {', '.join(PROFILES)}."
        )
    prof = PROFILES[profile]
    if real_data is not None:
        real_data = Path(real_data).expanduser()
        if not real_data.is_dir():
            raise CatalogError(
                f"real data folder {real_data} "
                f"{'is not a directory' if real_data.exists() else 'does not exist'}; name the "
                "folder holding the real scenes (e.g. ../shared/data/real), or build without "
                "real data (--no-real-data)."
            )
    _prepare_out(out)

    tasks: list[_Task] = []
    tiles = prof.tiles() if synthetic else []
    for tile in tiles:
        tasks.append(_Task("tile", tile.name, (tile, prof.s2_per_season, prof.s1_per_season)))
    skipped: list[str] = []
    sources: list[str] = []
    if real_data is not None:
        real_tasks, skipped, sources = _real_tasks(real_data)
        tasks.extend(real_tasks)

    results = _run_all(tasks, out, seed, progress, workers)

    items: dict[str, list[dict]] = {c: [] for c in stacmeta.COLLECTIONS}
    seen: dict[tuple[str, str], str] = {}
    n_real = 0
    for task, res in zip(tasks, results, strict=True):
        skipped.extend(res.problems)
        for item in res.items:
            key = (item["collection"], item["id"])
            if key in seen:
                raise CatalogError(
                    f"two scenes got the same item id {item['id']!r} in {item['collection']} "
                    f"({seen[key]} and {task.label}); their assets would overwrite each other. "
                    "This is a bug in the catalog builder."
                )
            seen[key] = task.label
            items[item["collection"]].append(item)
            n_real += task.kind != "tile"
    for msg in skipped:
        warnings.warn(msg, RealDataWarning, stacklevel=2)

    for coll, coll_items in items.items():
        coll_items.sort(key=lambda i: i["id"])
        for item in coll_items:
            _write_json(stacmeta.item_path(out, coll, item["id"]), item)
    used_sources = sorted({s for coll_items in items.values() for s in _item_sources(coll_items)})
    for coll, coll_items in items.items():
        _write_json(out / "collections" / f"{coll}.json",
                    _collection(coll, coll_items, used_sources))
    _write_json(out / "catalog.json", _catalog(prof, seed, synthetic, used_sources))

    per_collection = {c: len(v) for c, v in items.items()}
    total = sum(per_collection.values())
    return {
        "items": total,
        "per_collection": per_collection,
        "synthetic_items": total - n_real,
        "real_items": n_real,
        "profile": prof.name,
        "seed": seed,
        "tiles": [
            {"name": t.name, "city": t.city.name, "epsg": t.epsg, "bounds": list(t.bounds),
             "label": f"labels/{t.name}.tif"}
            for t in tiles
        ],
        "real_sources": sources,
        "skipped": skipped,
    }


def _prepare_out(out: Path) -> None:
    """Make ``out`` ready: create it, or clear a previous catalog; refuse anything else."""
    if out.exists() and not out.is_dir():
        raise CatalogError(f"{out} exists and is not a directory; choose another --out.")
    if out.is_dir() and any(out.iterdir()):
        cat = out / "catalog.json"
        ours = False
        if cat.is_file():
            try:
                from .serve import CATALOG_VERSION_KEY

                ours = CATALOG_VERSION_KEY in json.loads(cat.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                ours = False
        if not ours:
            raise CatalogError(
                f"{out} exists, is not empty and is not an embedded catalog (no catalog.json "
                "written by `ssl4eo catalog build`); remove it or choose another --out."
            )
        cat.unlink()
        for sub in ("collections", "items", "assets", "labels"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _run_all(tasks: list[_Task], out: Path, seed: int, progress: bool,
             workers: int | None) -> list[_Result]:
    from tqdm import tqdm

    n = max(1, min(workers or os.cpu_count() or 1, os.cpu_count() or 1, len(tasks) or 1))
    bar = tqdm(total=len(tasks), desc="catalog", unit="task", disable=not progress,
               dynamic_ncols=True)
    results: list[_Result | None] = [None] * len(tasks)
    try:
        if n == 1:
            for i, task in enumerate(tasks):
                bar.set_postfix_str(Path(task.label).name, refresh=False)
                results[i] = _run_task(task, out, seed)
                bar.update()
        else:
            ctx = multiprocessing.get_context("forkserver")
            with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
                futures: dict[Future, int] = {
                    pool.submit(_run_task, task, out, seed): i for i, task in enumerate(tasks)
                }
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        exc = fut.exception()
                        if exc is not None:
                            for p in pending:
                                p.cancel()
                            raise exc
                        results[futures[fut]] = fut.result()
                        bar.set_postfix_str(Path(tasks[futures[fut]].label).name,
                                            refresh=False)
                        bar.update()
    finally:
        bar.close()
    return [r for r in results if r is not None]


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                    encoding="utf-8")


# ----------------------------------------------------------------------- catalog/collections
def _item_sources(items: Iterable[dict]) -> set[str]:
    out = set()
    for item in items:
        src = item["properties"].get("ssl4eo:source_folder")
        out.add(src if src else "synthetic")
    return out


def _catalog(prof: Profile, seed: int, synthetic: bool, sources: list[str]) -> dict[str, Any]:
    from .serve import CATALOG_VERSION, CATALOG_VERSION_KEY

    parts = []
    if synthetic:
        parts.append(f"synthetic scenes (profile {prof.name!r}, seed {seed})")
    parts += [REAL_SOURCES[s].title for s in sources if s in REAL_SOURCES]
    links: list[dict[str, Any]] = [
        {"rel": "root", "href": "./catalog.json", "type": "application/json",
         "title": "ssl4eo-stac embedded catalog"},
    ]
    for coll in stacmeta.COLLECTIONS:
        links.append({"rel": "child", "href": f"./collections/{coll}.json",
                      "type": "application/json", "title": _COLLECTION_TEXT[coll][0]})
    return {
        "type": "Catalog",
        "id": CATALOG_ID,
        "stac_version": STAC_VERSION,
        "title": "ssl4eo-stac embedded catalog",
        "description": (
            "Local Sentinel-2 L2A and Sentinel-1 RTC scenes (Cloud-Optimized GeoTIFFs) with "
            "STAC items shaped like Microsoft Planetary Computer's: " + "; ".join(parts) + "."
        ),
        "links": links,
        CATALOG_VERSION_KEY: CATALOG_VERSION,
        "ssl4eo:profile": prof.name if synthetic else None,
        "ssl4eo:seed": seed,
        "ssl4eo:sources": (["synthetic"] if synthetic else []) + [
            s for s in sources if s != "synthetic"],
    }


_COLLECTION_TEXT = {
    S2_COLLECTION: (
        "Sentinel-2 Level-2A",
        "Sentinel-2 L2A (bottom-of-atmosphere reflectance) scenes of the ssl4eo-stac embedded "
        "catalog, as Cloud-Optimized GeoTIFFs at the native 10/20/60 m grids, with items "
        "shaped like Planetary Computer's `sentinel-2-l2a` collection. Scenes from processing "
        "baseline 04.00 on carry the +1000 DN offset (BOA_ADD_OFFSET), which is recorded "
        "only in `s2:processing_baseline`, as on Planetary Computer.",
        ["Sentinel", "Copernicus", "ESA", "Satellite", "Imagery", "Reflectance"],
    ),
    S1_COLLECTION: (
        "Sentinel 1 Radiometrically Terrain Corrected (RTC)",
        "Sentinel-1 IW backscatter of the ssl4eo-stac embedded catalog as linear-power "
        "float32 Cloud-Optimized GeoTIFFs (nodata -32768) on UTM 10 m grids, with items "
        "shaped like Planetary Computer's `sentinel-1-rtc` collection.",
        ["ESA", "Copernicus", "Sentinel", "C-Band", "SAR", "RTC"],
    ),
}

_S1_SUMMARY_KEYS = (
    "platform", "constellation", "s1:resolution", "s1:orbit_source", "sar:looks_range",
    "sat:orbit_state", "sar:product_type", "sar:looks_azimuth", "sar:polarizations",
    "sar:frequency_band", "s1:processing_level", "sar:instrument_mode", "sar:center_frequency",
    "sar:resolution_range", "s1:product_timeliness", "sar:resolution_azimuth",
    "sar:pixel_spacing_range", "sar:observation_direction", "sar:pixel_spacing_azimuth",
    "sar:looks_equivalent_number", "sat:platform_international_designator", "proj:epsg",
)
_S2_SUMMARY_KEYS = ("platform", "instruments", "constellation", "s2:processing_baseline",
                    "proj:epsg")


def _unique(values: Iterable[Any]) -> list[Any]:
    """Distinct values (lists count as one value), in a stable order."""
    seen: dict[str, Any] = {}
    for v in values:
        seen.setdefault(json.dumps(v, sort_keys=True), v)
    return [seen[k] for k in sorted(seen)]


def _summaries(coll: str, items: list[dict]) -> dict[str, Any]:
    props = [i["properties"] for i in items]
    out: dict[str, Any] = {}
    if coll == S2_COLLECTION:
        gsds = sorted({int(a["gsd"]) for i in items for a in i["assets"].values() if "gsd" in a})
        out["gsd"] = gsds
        names = {b["name"] for i in items for a in i["assets"].values()
                 for b in a.get("eo:bands", [])}
        out["eo:bands"] = [
            {"gsd": S2_BAND_INFO[b][4], **stacmeta.eo_band(b)}
            for b in S2_REFLECTANCE_BANDS if b in names
        ]
        for key in _S2_SUMMARY_KEYS:
            vals = [p[key] for p in props if key in p]
            if key == "instruments":
                vals = [x for v in vals for x in v]
            if vals:
                out[key] = _unique(vals)
    else:
        for key in _S1_SUMMARY_KEYS:
            vals = [p[key] for p in props if key in p]
            if vals:
                out[key] = _unique(vals)
    return out


def _item_assets(coll: str, items: list[dict]) -> dict[str, Any]:
    """PC-style ``item_assets``: each asset key's common fields, without href and proj:*."""
    keys = sorted({k for i in items for k in i["assets"]})
    if coll == S2_COLLECTION and not keys:
        keys = list(_S2_DATA_KEYS)
    if coll == S1_COLLECTION and not keys:
        keys = ["vh", "vv"]
    out: dict[str, Any] = {}
    for key in keys:
        if coll == S2_COLLECTION:
            dummy = stacmeta.s2_raster_asset(coll, "x", key, Affine.identity(), (1, 1))
        else:
            title, desc = stacmeta.S1_ASSET_INFO[key]
            dummy = {"type": stacmeta.COG_MEDIA_TYPE, "roles": ["data"], "title": title,
                     "description": desc, "raster:bands": [
                         {"nodata": -32768, "data_type": "float32", "spatial_resolution": 10.0}]}
        out[key] = {k: v for k, v in dummy.items()
                    if k != "href" and not k.startswith("proj:")}
    return out


def _rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_dt(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


#: First acquisitions of the missions: the open-ended temporal extent of an empty collection.
_MISSION_START = {S2_COLLECTION: "2015-06-27T10:25:31Z", S1_COLLECTION: "2014-10-10T00:28:21Z"}


def _extent(coll: str, items: list[dict]) -> dict[str, Any]:
    if not items:  # e.g. real scenes only, none of them of this collection
        return {"spatial": {"bbox": [[-180.0, -90.0, 180.0, 90.0]]},
                "temporal": {"interval": [[_MISSION_START[coll], None]]}}
    bboxes = np.array([i["bbox"] for i in items], dtype=np.float64)
    bbox = [float(bboxes[:, 0].min()), float(bboxes[:, 1].min()),
            float(bboxes[:, 2].max()), float(bboxes[:, 3].max())]
    starts, ends = [], []
    for i in items:
        p = i["properties"]
        starts.append(_parse_dt(p.get("start_datetime") or p["datetime"]))
        ends.append(_parse_dt(p.get("end_datetime") or p["datetime"]))
    t0 = min(starts).replace(microsecond=0)
    t1 = max(ends)
    if t1.microsecond:
        t1 = t1.replace(microsecond=0) + timedelta(seconds=1)
    return {"spatial": {"bbox": [bbox]},
            "temporal": {"interval": [[_rfc3339(t0), _rfc3339(t1)]]}}


def _collection(coll: str, items: list[dict], used_sources: list[str]) -> dict[str, Any]:
    title, description, keywords = _COLLECTION_TEXT[coll]
    here = sorted(_item_sources(items)) or ["synthetic"]
    licenses: list[tuple[str, str, str]] = []
    providers: list[dict[str, Any]] = [
        {"url": "https://sentinel.esa.int/web/sentinel/missions/"
                + ("sentinel-2" if coll == S2_COLLECTION else "sentinel-1"),
         "name": "ESA", "roles": ["producer", "licensor"]},
    ]
    links: list[dict[str, Any]] = [
        {"rel": "root", "href": "../catalog.json", "type": "application/json"},
        {"rel": "parent", "href": "../catalog.json", "type": "application/json"},
    ]
    for src in here:
        if src == "synthetic":
            licenses.append((*SYNTHETIC_LICENSE, "synthetic scenes (ssl4eo-stac)"))
            providers.append({"name": "ssl4eo-stac (synthetic scenes)",
                              "roles": ["producer", "processor", "host"]})
            description += (" Synthetic scenes are generated by pipeline.demo.synthetic: "
                            "not real data.")
        else:
            s = REAL_SOURCES[src]
            licenses.append((s.license, s.license_url, s.title))
            providers.append({"url": s.url, "name": s.provider, "roles": ["processor"]})
            links.append({"rel": "via", "href": s.url, "title": s.origin})
            description += f" Real scenes: {s.origin} ({s.license})."
    for spdx, url, what in licenses:
        links.append({"rel": "license", "href": url, "title": f"{spdx} ({what})"})
    if coll == S2_COLLECTION:
        links.append({"rel": "license", "title": "Copernicus Sentinel data terms",
                      "href": "https://sentinel.esa.int/documents/247904/690755/"
                              "Sentinel_Data_Legal_Notice"})
    distinct = sorted({spdx for spdx, _, _ in licenses})
    extensions = ["https://stac-extensions.github.io/item-assets/v1.0.0/schema.json"]
    if coll == S1_COLLECTION:
        extensions = ["https://stac-extensions.github.io/sar/v1.0.0/schema.json",
                      "https://stac-extensions.github.io/sat/v1.0.0/schema.json", *extensions]
    return {
        "id": coll,
        "type": "Collection",
        "links": links,
        "title": title,
        "extent": _extent(coll, items),
        "license": distinct[0] if len(distinct) == 1 else "various",
        "keywords": keywords,
        "providers": providers,
        "summaries": _summaries(coll, items),
        "description": description,
        "item_assets": _item_assets(coll, items),
        "stac_version": STAC_VERSION,
        "stac_extensions": extensions,
        "ssl4eo:sources": here,
    }


# ------------------------------------------------------------------------------- real scenes
_S2_PRODUCT = re.compile(
    r"^(?P<sat>S2[ABCD])_MSIL2A_(?P<sensing>\d{8}T\d{6})_N(?P<baseline>\d{4})_R(?P<orbit>\d{3})"
    r"_T(?P<tile>\d{2}[A-Z]{3})_(?P<gen>\d{8}T\d{6})$"
)
_S1_GRD = re.compile(
    r"^(?P<sat>S1[ABCD])_(?P<mode>IW|EW|SM)_GRD(?P<res>[HMF])_1S(?P<pol>DV|SV|DH|SH)_"
    r"(?P<start>\d{8}T\d{6})_(?P<end>\d{8}T\d{6})_(?P<abs>\d{6})_(?P<dt>[0-9A-F]{6})"
    r"(?:_(?P<crc>[0-9A-F]{4}))?$"
)
_PYROSAR = re.compile(
    r"^(?P<sat>S1[ABCD])__(?P<mode>IW|EW|SM)___(?P<pass>[AD])_(?P<start>\d{8}T\d{6})_"
    r"(?P<pol>VV|VH|HH|HV)_.*\.tif$"
)


def _real_tasks(root: Path) -> tuple[list[_Task], list[str], list[str]]:
    """Tasks for every real scene under ``root``; problems for missing folders; sources."""
    tasks: list[_Task] = []
    problems: list[str] = []

    def missing(folder: Path, what: str) -> None:
        problems.append(f"skipped real data folder {folder}: {what}")

    # Major-TOM
    mt = root / "majortom_s2l2a"
    if not mt.is_dir():
        missing(mt, "not found")
    else:
        dirs = sorted(d for d in mt.glob("*/*/S2*_MSIL2A_*") if d.is_dir())
        if not dirs:
            missing(mt, "no <row>/<cell>/S2*_MSIL2A_* product folders in it")
        used: set[str] = set()
        for d in dirs:
            m = _S2_PRODUCT.match(d.name)
            if not m:
                missing(d, "folder name is not an S2 L2A product id")
                continue
            item_id = _pc_s2_id(m)
            if item_id in used:  # two cells cut from one product: keep both, apart
                item_id = f"{item_id}_{d.parent.name}"
            used.add(item_id)
            tasks.append(_Task("majortom", str(d), (d, item_id)))
    # SSL4EO-S12
    ss = root / "ssl4eo_s12"
    if not ss.is_dir():
        missing(ss, "not found")
    else:
        s2 = sorted(d for d in ss.glob("s2a/*/*") if d.is_dir())
        s1 = sorted(d for d in ss.glob("s1/*/*") if d.is_dir())
        if not s2:
            missing(ss / "s2a", "no <location>/<date> folders in it")
        if not s1:
            missing(ss / "s1", "no <location>/<GRD id> folders in it")
        tasks += [_Task("ssl4eo_s2", str(d), (d,)) for d in s2]
        tasks += [_Task("ssl4eo_s1", str(d), (d,)) for d in s1]
        # s2c (L1C) is left out on purpose: Planetary Computer has no L1C collection.
    # pyroSAR
    py = root / "s1_pyrosar"
    if not py.is_dir():
        missing(py, "not found")
    else:
        files = sorted(py.glob("*.tif"))
        if not files:
            missing(py, "no *.tif in it")
        tasks += [_Task("pyrosar", str(f), (f,)) for f in files]
    sources = sorted({REAL_SOURCES[_source_of(t)].folder for t in tasks})
    return tasks, problems, sources


def _source_of(task: _Task) -> str:
    return {"majortom": "majortom_s2l2a", "ssl4eo_s2": "ssl4eo_s12", "ssl4eo_s1": "ssl4eo_s12",
            "pyrosar": "s1_pyrosar"}[task.kind]


def _pc_s2_id(m: re.Match) -> str:
    """PC's L2A id for a product name: the product id without its ``_Nxxxx`` part."""
    return f"{m['sat']}_MSIL2A_{m['sensing']}_R{m['orbit']}_T{m['tile']}_{m['gen']}"


def _ts(s: str) -> datetime:
    return datetime.strptime(s, "%Y%m%dT%H%M%S").replace(tzinfo=UTC)


def _ms(value: float | int) -> datetime:
    return datetime.fromtimestamp(float(value) / 1000.0, tz=UTC)


#: Reference orbits: platform letter -> (time, absolute orbit, relative orbit); from PC items
#: (S2A 2019-01-01 T58UFE A018417 R116) and SSL4EO-S12 metadata (S2B 2020-06-04 A016948 R048).
_S2_ORBIT_REF = {
    "A": (datetime(2019, 1, 1, 0, 0, 1, tzinfo=UTC), 18417, 116),
    "B": (datetime(2020, 6, 4, 5, 46, 39, tzinfo=UTC), 16948, 48),
}
_S2_ORBIT_S = 10 * 86400 / 143  # 143 orbits in the 10-day repeat cycle


def s2_absolute_orbit(platform: str, when: datetime, relative_orbit: int) -> int | None:
    """The absolute orbit of a Sentinel-2A/B acquisition, from its time and relative orbit.

    The estimate from the orbit period is snapped to the nearest orbit with the given relative
    orbit (absolute and relative orbit differ by a fixed amount modulo 143). ``None`` for
    other platforms.
    """
    ref = _S2_ORBIT_REF.get(platform[-1])
    if ref is None:
        return None
    t0, abs0, rel0 = ref
    est = abs0 + (when - t0).total_seconds() / _S2_ORBIT_S
    k = round((est - abs0 - (relative_orbit - rel0)) / 143)
    return abs0 + (relative_orbit - rel0) + 143 * k


def s1_orbits(platform: str, when: datetime) -> tuple[int, int]:
    """(absolute, relative) orbit of a Sentinel-1A acquisition estimated from its time
    (175 orbits in 12 days; reference: PC item of 2024-04-19, absolute orbit 53498)."""
    ref = datetime(2024, 4, 19, 4, 58, tzinfo=UTC)
    absolute = 53498 + math.floor((when - ref).total_seconds() / (12 * 86400 / 175))
    return absolute, (absolute - 73) % 175 + 1


def _read_band(path: Path) -> tuple[np.ndarray, Affine, int | None, Any, float | None]:
    import rasterio

    with rasterio.open(path) as src:
        if src.count != 1:
            raise ValueError(f"{path.name} has {src.count} bands, expected 1")
        epsg = src.crs.to_epsg() if src.crs else None
        return src.read(1), src.transform, epsg, src.crs, src.nodata


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    r, c = a.shape[0] // k, a.shape[1] // k
    return a[: r * k, : c * k].reshape(r, k, c, k).mean(axis=(1, 3))


def _block_any(a: np.ndarray, k: int) -> np.ndarray:
    r, c = a.shape[0] // k, a.shape[1] // k
    return a[: r * k, : c * k].reshape(r, k, c, k).any(axis=(1, 3))


def _derive_scl(red: np.ndarray, nir: np.ndarray, blue: np.ndarray, valid10: np.ndarray,
                cloud10: np.ndarray | None) -> np.ndarray:
    """A 20 m SCL-like map from 10 m reflectance x 10000 (offset removed).

    0 where any 10 m pixel of the block is nodata; clouds 9 (from ``cloud10``, a cloud mask;
    without one, a brightness test: B02 and B04 >= 0.2 is 8, >= 0.3 is 9); else 4 where
    NDVI >= 0.4 and 5 otherwise.
    """
    r = _block_mean(red.astype(np.float32), 2)
    n = _block_mean(nir.astype(np.float32), 2)
    b = _block_mean(blue.astype(np.float32), 2)
    ndvi = (n - r) / np.maximum(n + r, 1.0)
    scl = np.where(ndvi >= _NDVI_VEGETATION, _SCL_VEGETATION, _SCL_NOT_VEGETATED).astype(np.uint8)
    if cloud10 is not None:
        scl[_block_any(cloud10 > 0, 2)] = _SCL_CLOUD_HIGH
    else:
        scl[(b >= 2000) & (r >= 2000)] = _SCL_CLOUD_MEDIUM
        scl[(b >= 3000) & (r >= 3000)] = _SCL_CLOUD_HIGH
    scl[_block_mean(valid10.astype(np.float32), 2) < 1] = 0
    return scl


def _tci(red: np.ndarray, green: np.ndarray, blue: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """True-colour image as Sen2Cor makes it: reflectance 0..0.2 -> 1..255, nodata 0."""
    rgb = np.stack([red, green, blue]).astype(np.float32)
    tci = np.clip(np.rint(rgb * 255.0 / 2000.0), 1, 255).astype(np.uint8)
    tci[:, ~valid] = 0
    return tci


def _with_attribution(item: dict, source: str, estimated: list[str],
                      extra: dict[str, Any] | None = None) -> dict:
    s = REAL_SOURCES[source]
    props = item["properties"]
    props["ssl4eo:source"] = s.origin
    props["ssl4eo:source_folder"] = s.folder
    props["ssl4eo:license"] = s.license
    if estimated:
        props["ssl4eo:estimated"] = sorted(estimated)
    if extra:
        props.update(extra)
    item["links"].append({"rel": "via", "href": s.url, "title": s.origin})
    item["links"].append({"rel": "license", "href": s.license_url,
                          "title": f"{s.license} ({s.title})"})
    return item


def _solar_and_rcf(lat: float, lon: float, when: datetime) -> tuple[float, float, float]:
    from .synthetic import _solar

    zen, az = _solar(lat, when, lon)
    doy = when.timetuple().tm_yday
    rcf = 1.0 / (1 - 0.01672 * math.cos(math.radians(0.9856 * (doy - 4)))) ** 2
    return zen, az, rcf


def _majortom_item(out: Path, product_dir: Path, item_id: str) -> dict[str, Any]:
    """One Major-TOM cell -> a sentinel-2-l2a item (bands at native resolution)."""
    from pyproj import Transformer
    from shapely.geometry import box

    from .cog import write_cog
    from .synthetic import baseline_has_offset

    m = _S2_PRODUCT.match(product_dir.name)
    assert m is not None
    baseline = f"{m['baseline'][:2]}.{m['baseline'][2:]}"
    bands: dict[str, np.ndarray] = {}
    grids: dict[int, tuple[Affine, tuple[int, int]]] = {}
    epsg = None
    for b in S2_REFLECTANCE_BANDS:
        path = product_dir / f"{b}.tif"
        if not path.is_file():
            raise FileNotFoundError(f"band file {path.name} is missing")
        arr, transform, band_epsg, _, _ = _read_band(path)
        gsd = S2_ASSET_GSD[b]
        if band_epsg is None or (epsg is not None and band_epsg != epsg):
            raise ValueError(f"{path.name} has CRS EPSG:{band_epsg}, expected one UTM CRS")
        epsg = band_epsg
        if not math.isclose(transform.a, gsd) or not math.isclose(-transform.e, gsd):
            raise ValueError(f"{path.name} has {transform.a} m pixels, expected {gsd} m")
        grid = (transform, arr.shape)
        if grids.setdefault(gsd, grid) != grid:
            raise ValueError(f"{path.name} is not on the grid of the other {gsd} m bands")
        bands[b] = arr
    assert epsg is not None
    cloud10, _, _, _, _ = _read_band(product_dir / "cloud_mask.tif")
    if cloud10.shape != bands["B02"].shape:
        raise ValueError("cloud_mask.tif is not on the 10 m grid")

    valid10 = (bands["B02"] > 0) & (bands["B03"] > 0) & (bands["B04"] > 0) & (bands["B08"] > 0)
    offset = 1000 if baseline_has_offset(baseline) else 0
    added = 0
    if offset:
        vis = np.concatenate([bands[b][valid10] for b in ("B02", "B03", "B04")])
        if vis.size and float(np.percentile(vis, 1)) < offset:
            added = offset  # the baseline promises the offset, the DNs lack it: add it
    refl = {b: np.where(valid10, bands[b].astype(np.float32) + added - offset, 0)
            for b in ("B02", "B03", "B04", "B08")}
    scl = _derive_scl(refl["B04"], refl["B08"], refl["B02"], valid10, cloud10)
    tci = _tci(refl["B04"], refl["B03"], refl["B02"], valid10)

    with _removed_on_error(out, S2_COLLECTION, item_id):
        for b, arr in bands.items():
            data = arr
            if added:
                data = np.where(arr > 0, np.minimum(arr.astype(np.int32) + added, 65535),
                                0).astype(np.uint16)
            write_cog(stacmeta.asset_path(out, S2_COLLECTION, item_id, b), data,
                      grids[S2_ASSET_GSD[b]][0], epsg, nodata=0)
        write_cog(stacmeta.asset_path(out, S2_COLLECTION, item_id, "SCL"), scl, grids[20][0], epsg,
                  nodata=0, resampling="nearest")
        write_cog(stacmeta.asset_path(out, S2_COLLECTION, item_id, "visual"), tci, grids[10][0],
                  epsg, nodata=0)

        t10, shape10 = grids[10]
        bounds = stacmeta.grid_bbox(t10, shape10)
        sensing, generation = _ts(m["sensing"]), _ts(m["gen"])
        platform = f"Sentinel-2{m['sat'][-1]}"
        rel = int(m["orbit"])
        cx, cy = (bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2
        lon, lat = Transformer.from_crs(epsg, 4326, always_xy=True).transform(cx, cy)
        zen, az, rcf = _solar_and_rcf(lat, lon, sensing)
        absolute = s2_absolute_orbit(platform, sensing, rel) or 0
        item = stacmeta.s2_item(
            item_id=item_id, platform=platform, sensing=sensing, generation=generation,
            epsg=epsg, mgrs_tile=m["tile"], baseline=baseline, relative_orbit=rel,
            absolute_orbit=absolute, centre="MTOM", grids=grids, footprint_utm=box(*bounds),
            scl=scl, solar_zenith=zen, solar_azimuth=az, reflectance_conversion_factor=rcf,
            asset_keys=_REAL_S2_KEYS,
            description=(f"Real Sentinel-2 L2A: Major-TOM cell {product_dir.parent.name} of "
                         f"product {product_dir.name}. SCL derived from the cell's cloud mask and "
                         "NDVI (not Sen2Cor's); no AOT/WVP in the source."),
        )
        extra: dict[str, Any] = {"ssl4eo:majortom_cell": product_dir.parent.name}
        if added:
            extra["ssl4eo:dn_offset_added"] = added
        return _with_attribution(
            item, "majortom_s2l2a",
            ["s2:granule_id", "s2:datatake_id", "s2:datastrip_id", "s2:mean_solar_zenith",
             "s2:mean_solar_azimuth", "s2:reflectance_conversion_factor", "s2:*_percentage (SCL)"],
            extra,
        )


def _utm_grid(bounds_ll: tuple[float, float, float, float], epsg: int, res: int,
              snap: int) -> tuple[Affine, tuple[int, int], tuple[float, float, float, float]]:
    """The ``res`` grid covering lon/lat bounds in ``epsg``, outer edges on ``snap`` metres."""
    from rasterio.warp import transform_bounds

    xmin, ymin, xmax, ymax = transform_bounds("EPSG:4326", f"EPSG:{epsg}", *bounds_ll,
                                              densify_pts=21)
    xmin, ymin = math.floor(xmin / snap) * snap, math.floor(ymin / snap) * snap
    xmax, ymax = math.ceil(xmax / snap) * snap, math.ceil(ymax / snap) * snap
    shape = (int(round((ymax - ymin) / res)), int(round((xmax - xmin) / res)))
    return Affine(float(res), 0.0, float(xmin), 0.0, -float(res), float(ymax)), shape, (
        xmin, ymin, xmax, ymax)


def _warp(arr: np.ndarray, src_transform: Affine, src_crs: Any, dst_transform: Affine,
          shape: tuple[int, int], epsg: int, resampling: str, nodata: float) -> np.ndarray:
    from rasterio.crs import CRS
    from rasterio.warp import Resampling, reproject

    dst = np.full(shape, nodata, dtype=arr.dtype)
    reproject(arr, dst, src_transform=src_transform, src_crs=src_crs, src_nodata=nodata,
              dst_transform=dst_transform, dst_crs=CRS.from_epsg(epsg), dst_nodata=nodata,
              resampling=Resampling[resampling], num_threads=1)
    return dst


def _footprint_utm(bounds_ll: tuple[float, float, float, float], epsg: int):
    from pyproj import Transformer
    from shapely.geometry import box
    from shapely.ops import transform as shp_transform

    tr = Transformer.from_crs(4326, epsg, always_xy=True)
    poly = box(*bounds_ll).segmentize((bounds_ll[2] - bounds_ll[0]) / 10)
    return shp_transform(lambda x, y: tr.transform(x, y), poly)


_SSL4EO_S2_BANDS = {b: ("B" + b[1:].lstrip("0") if b != "B8A" else "B8A")
                    for b in S2_REFLECTANCE_BANDS}
_SSL4EO_PCT = {
    "s2:water_percentage": "WATER_PERCENTAGE",
    "s2:snow_ice_percentage": "SNOW_ICE_PERCENTAGE",
    "s2:vegetation_percentage": "VEGETATION_PERCENTAGE",
    "s2:thin_cirrus_percentage": "THIN_CIRRUS_PERCENTAGE",
    "s2:cloud_shadow_percentage": "CLOUD_SHADOW_PERCENTAGE",
    "s2:nodata_pixel_percentage": "NODATA_PIXEL_PERCENTAGE",
    "s2:unclassified_percentage": "UNCLASSIFIED_PERCENTAGE",
    "s2:dark_features_percentage": "DARK_FEATURES_PERCENTAGE",
    "s2:not_vegetated_percentage": "NOT_VEGETATED_PERCENTAGE",
    "s2:degraded_msi_data_percentage": "DEGRADED_MSI_DATA_PERCENTAGE",
    "s2:high_proba_clouds_percentage": "HIGH_PROBA_CLOUDS_PERCENTAGE",
    "s2:medium_proba_clouds_percentage": "MEDIUM_PROBA_CLOUDS_PERCENTAGE",
    "s2:saturated_defective_pixel_percentage": "SATURATED_DEFECTIVE_PIXEL_PERCENTAGE",
    "eo:cloud_cover": "CLOUDY_PIXEL_PERCENTAGE",
}


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / "metadata.json"
    if not path.is_file():
        return {}
    meta = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("metadata.json is not a JSON object")
    return meta


def _ssl4eo_s2_item(out: Path, date_dir: Path) -> dict[str, Any]:
    """One SSL4EO-S12 S2 L2A date -> a sentinel-2-l2a item on UTM 10/20/60 m grids."""
    from .cog import write_cog
    from .synthetic import baseline_has_offset, utm_epsg

    meta = _read_meta(date_dir)
    product = str(meta.get("PRODUCT_ID", ""))
    m = _S2_PRODUCT.match(product)
    if m is None:
        raise ValueError(f"metadata.json has no S2 L2A PRODUCT_ID (got {product!r})")
    item_id = _pc_s2_id(m)
    baseline = str(meta.get("PROCESSING_BASELINE") or f"{m['baseline'][:2]}.{m['baseline'][2:]}")
    src: dict[str, tuple[np.ndarray, Affine, Any]] = {}
    bounds_ll = None
    for b, name in _SSL4EO_S2_BANDS.items():
        path = date_dir / f"{name}.tif"
        if not path.is_file():
            raise FileNotFoundError(f"band file {path.name} is missing")
        arr, transform, e, crs, _ = _read_band(path)
        if e != 4326:
            raise ValueError(f"{path.name} has CRS EPSG:{e}, expected EPSG:4326")
        src[b] = (arr, transform, crs)
        if S2_ASSET_GSD[b] == 10:
            bb = stacmeta.grid_bbox(transform, arr.shape)
            bounds_ll = tuple(bb) if bounds_ll is None else bounds_ll
    assert bounds_ll is not None
    lon = (bounds_ll[0] + bounds_ll[2]) / 2
    lat = (bounds_ll[1] + bounds_ll[3]) / 2
    epsg = utm_epsg(lon, lat)
    grids: dict[int, tuple[Affine, tuple[int, int]]] = {}
    t60, shape60, _ = _utm_grid(bounds_ll, epsg, 60, 60)
    for gsd in (10, 20, 60):
        k = 60 // gsd
        grids[gsd] = (Affine(float(gsd), 0.0, t60.c, 0.0, -float(gsd), t60.f),
                      (shape60[0] * k, shape60[1] * k))
    warped = {b: _warp(a, t, crs, *grids[S2_ASSET_GSD[b]], epsg, "bilinear", 0)
              for b, (a, t, crs) in src.items()}
    offset = 1000 if baseline_has_offset(baseline) else 0
    valid10 = np.logical_and.reduce([warped[b] > 0 for b in ("B02", "B03", "B04", "B08")])
    refl = {b: np.where(valid10, warped[b].astype(np.float32) - offset, 0)
            for b in ("B02", "B03", "B04", "B08")}
    scl = _derive_scl(refl["B04"], refl["B08"], refl["B02"], valid10, None)
    tci = _tci(refl["B04"], refl["B03"], refl["B02"], valid10)
    with _removed_on_error(out, S2_COLLECTION, item_id):
        for b, arr in warped.items():
            write_cog(stacmeta.asset_path(out, S2_COLLECTION, item_id, b), arr,
                      grids[S2_ASSET_GSD[b]][0], epsg, nodata=0)
        write_cog(stacmeta.asset_path(out, S2_COLLECTION, item_id, "SCL"), scl, grids[20][0], epsg,
                  nodata=0, resampling="nearest")
        write_cog(stacmeta.asset_path(out, S2_COLLECTION, item_id, "visual"), tci, grids[10][0],
                  epsg, nodata=0)

        sensing = _ts(m["sensing"])
        generation = _ms(meta["GENERATION_TIME"]) if "GENERATION_TIME" in meta else _ts(m["gen"])
        platform = str(meta.get("SPACECRAFT_NAME") or f"Sentinel-2{m['sat'][-1]}")
        rel = int(meta.get("SENSING_ORBIT_NUMBER") or m["orbit"])
        estimated = []
        granule = re.search(r"_A(\d{6})_", str(meta.get("GRANULE_ID", "")))
        if granule:
            absolute = int(granule.group(1))
        else:
            absolute = s2_absolute_orbit(platform, sensing, rel) or 0
            estimated.append("s2:granule_id")
        centre = re.search(r"_DS_([A-Z0-9]{4})_", str(meta.get("DATASTRIP_ID", "")))
        if "MEAN_SOLAR_ZENITH_ANGLE" in meta:
            zen = float(meta["MEAN_SOLAR_ZENITH_ANGLE"])
            az = float(meta["MEAN_SOLAR_AZIMUTH_ANGLE"])
            rcf = float(meta.get("REFLECTANCE_CONVERSION_CORRECTION", 1.0))
        else:
            zen, az, rcf = _solar_and_rcf(lat, lon, sensing)
            estimated += ["s2:mean_solar_zenith", "s2:mean_solar_azimuth",
                          "s2:reflectance_conversion_factor"]
        item = stacmeta.s2_item(
            item_id=item_id, platform=platform, sensing=sensing, generation=generation,
            epsg=epsg, mgrs_tile=str(meta.get("MGRS_TILE") or m["tile"]), baseline=baseline,
            relative_orbit=rel, absolute_orbit=absolute,
            centre=centre.group(1) if centre else "UNKN", grids=grids,
            footprint_utm=_footprint_utm(bounds_ll, epsg), scl=scl, solar_zenith=zen,
            solar_azimuth=az, reflectance_conversion_factor=rcf, asset_keys=_REAL_S2_KEYS,
            description=(f"Real Sentinel-2 L2A: SSL4EO-S12 patch {date_dir.parent.name} of "
                         f"{product}, warped from EPSG:4326 to EPSG:{epsg} (bilinear). Cloud cover "
                         "and the s2:*_percentage values are the product's (granule-level); SCL is "
                         "derived from NDVI and a brightness test (not Sen2Cor's); no AOT/WVP."),
        )
        props = item["properties"]
        for key, mkey in _SSL4EO_PCT.items():
            if mkey in meta:
                props[key] = float(meta[mkey])
            else:
                estimated.append(key)
        if "DATASTRIP_ID" in meta:
            props["s2:datastrip_id"] = str(meta["DATASTRIP_ID"])
        if "DATATAKE_IDENTIFIER" in meta:
            props["s2:datatake_id"] = str(meta["DATATAKE_IDENTIFIER"])
        if "DATATAKE_TYPE" in meta:
            props["s2:datatake_type"] = str(meta["DATATAKE_TYPE"])
        if "SENSING_ORBIT_DIRECTION" in meta:
            props["sat:orbit_state"] = str(meta["SENSING_ORBIT_DIRECTION"]).lower()
        return _with_attribution(item, "ssl4eo_s12", estimated,
                                 {"ssl4eo:ssl4eo_location": date_dir.parent.name})


def _s1_props(item: dict, *, platform: str, pols: list[str], config_id: str | None,
              designator: str | None) -> None:
    props = item["properties"]
    props["platform"] = f"SENTINEL-1{platform[-1]}"
    props["sar:polarizations"] = pols
    if config_id is not None:
        props["s1:instrument_configuration_ID"] = config_id
    if designator is not None:
        props["sat:platform_international_designator"] = designator


def _valid_footprint(valid: np.ndarray, transform: Affine):
    """The valid-data area of a mask as one polygon (the convex hull of its regions)."""
    from rasterio.features import shapes
    from shapely.geometry import box, shape
    from shapely.ops import unary_union

    polys = [shape(g) for g, v in shapes(valid.astype(np.uint8), mask=valid,
                                         transform=transform) if v]
    if not polys:
        raise ValueError("no valid pixels")
    hull = unary_union(polys).convex_hull
    rows, cols = valid.shape
    return hull.intersection(box(*stacmeta.grid_bbox(transform, (rows, cols))))


def _db_to_linear(db: np.ndarray, nodata: float | None) -> np.ndarray:
    """dB backscatter -> linear power float32, nodata (and NaN) -> -32768."""
    db = db.astype(np.float32)
    ok = np.isfinite(db)
    if nodata is not None:
        ok &= db != np.float32(nodata)
    lin = np.power(np.float32(10.0), np.where(ok, db, 0) / np.float32(10.0), dtype=np.float32)
    return np.where(ok, lin, np.float32(_S1_NODATA)).astype(np.float32)


def _ssl4eo_s1_item(out: Path, scene_dir: Path) -> dict[str, Any]:
    """One SSL4EO-S12 S1 GRD date (dB) -> a sentinel-1-rtc item (linear, UTM 10 m)."""
    from .cog import write_cog
    from .synthetic import utm_epsg

    m = _S1_GRD.match(scene_dir.name)
    if m is None:
        raise ValueError("folder name is not a Sentinel-1 GRD product id")
    meta = _read_meta(scene_dir)
    grd_id = scene_dir.name if m["crc"] is None else scene_dir.name[: -len(m["crc"]) - 1]
    item_id = f"{grd_id}_rtc"
    sources = {}
    for pol in ("VV", "VH"):
        path = scene_dir / f"{pol}.tif"
        if not path.is_file():
            raise FileNotFoundError(f"{path.name} is missing")
        db, transform, e, crs, nodata = _read_band(path)
        if e != 4326:
            raise ValueError(f"{path.name} has CRS EPSG:{e}, expected EPSG:4326")
        sources[pol.lower()] = (_db_to_linear(db, nodata), transform, crs)
    vv_lin, vv_transform, _ = sources["vv"]
    bounds_ll = tuple(stacmeta.grid_bbox(vv_transform, vv_lin.shape))
    epsg = utm_epsg((bounds_ll[0] + bounds_ll[2]) / 2, (bounds_ll[1] + bounds_ll[3]) / 2)
    t10, shape10, _ = _utm_grid(bounds_ll, epsg, 10, 10)
    grid = (t10, shape10)
    layers = {key: _warp(lin, transform, crs, t10, shape10, epsg, "bilinear", _S1_NODATA)
              for key, (lin, transform, crs) in sources.items()}
    with _removed_on_error(out, S1_COLLECTION, item_id):
        files = {}
        for key, arr in layers.items():
            p = stacmeta.asset_path(out, S1_COLLECTION, item_id, key)
            write_cog(p, arr, grid[0], epsg, nodata=_S1_NODATA)
            files[key] = p
        start, end = _ts(m["start"]), _ts(m["end"])
        absolute = int(meta.get("orbitNumber_start") or m["abs"])
        estimated = []
        if "relativeOrbitNumber_start" in meta:
            relative = int(meta["relativeOrbitNumber_start"])
        else:
            relative = (absolute - 73) % 175 + 1
            estimated.append("sat:relative_orbit")
        orbit_state = str(meta.get("orbitProperties_pass", "")).lower()
        if orbit_state not in ("ascending", "descending"):
            orbit_state = "descending" if start.hour < 12 else "ascending"
            estimated.append("sat:orbit_state")
        if "sliceNumber" not in meta:
            estimated += ["s1:slice_number", "s1:total_slices"]
        estimated.append("s1:orbit_source")
        item = stacmeta.s1_item(
            item_id=item_id, grd_id=grd_id, start=start, end=end, epsg=epsg, transform=grid[0],
            shape=grid[1], footprint_utm=_footprint_utm(bounds_ll, epsg), orbit_state=orbit_state,
            relative_orbit=relative, absolute_orbit=absolute,
            datatake_id=int(meta.get("missionDataTakeID") or int(m["dt"], 16)),
            slice_number=int(meta.get("sliceNumber", 1)),
            total_slices=int(meta.get("totalSlices", 1)),
            timeliness=str(meta.get("productTimelinessCategory", "Fast-24h")), asset_files=files,
            description=(f"Real Sentinel-1 GRD (SSL4EO-S12 patch {scene_dir.parent.name}, Google "
                         "Earth Engine S1_GRD: terrain-corrected sigma0, not flattened gamma0), "
                         f"warped from EPSG:4326 to EPSG:{epsg} and converted from dB to linear."),
        )
        cfg = meta.get("instrumentConfigurationID")
        _s1_props(item, platform=m["sat"], pols=["VV", "VH"],
                  config_id=None if cfg is None else str(cfg),
                  designator=meta.get("nssdcIdentifier"))
        if cfg is None:
            estimated.append("s1:instrument_configuration_ID")
        return _with_attribution(item, "ssl4eo_s12", estimated,
                                 {"ssl4eo:ssl4eo_location": scene_dir.parent.name})


def _pyrosar_item(out: Path, path: Path) -> dict[str, Any]:
    """The pyroSAR VV image (dB, 20 m) -> a sentinel-1-rtc item with a vv asset only."""
    from .cog import write_cog

    m = _PYROSAR.match(path.name)
    if m is None:
        raise ValueError("file name is not a pyroSAR S1 product name")
    db, transform, epsg, crs, nodata = _read_band(path)
    if epsg is None or not (32601 <= epsg <= 32660 or 32701 <= epsg <= 32760):
        raise ValueError(f"CRS EPSG:{epsg} is not a UTM zone")
    lin = _db_to_linear(db, nodata)
    x0 = math.floor(transform.c / 10) * 10
    y1 = math.ceil(transform.f / 10) * 10
    xmax = transform.c + transform.a * db.shape[1]
    ymin = transform.f + transform.e * db.shape[0]
    shape = (int(math.ceil((y1 - ymin) / 10)), int(math.ceil((xmax - x0) / 10)))
    t10 = Affine(10.0, 0.0, float(x0), 0.0, -10.0, float(y1))
    vv = _warp(lin, transform, crs, t10, shape, epsg, "bilinear", _S1_NODATA)
    pol = m["pol"].lower()
    start = _ts(m["start"])
    absolute, relative = s1_orbits(m["sat"], start)
    grd_id = f"{m['sat']}_{m['mode']}_GRDH_1SSV_{m['start']}_{m['start']}_{absolute:06d}_000000"
    item_id = f"{grd_id}_rtc"
    with _removed_on_error(out, S1_COLLECTION, item_id):
        p = stacmeta.asset_path(out, S1_COLLECTION, item_id, pol)
        write_cog(p, vv, t10, epsg, nodata=_S1_NODATA)
        item = stacmeta.s1_item(
            item_id=item_id, grd_id=grd_id, start=start, end=start, epsg=epsg, transform=t10,
            shape=shape, footprint_utm=_valid_footprint(vv != _S1_NODATA, t10),
            orbit_state="ascending" if m["pass"] == "A" else "descending",
            relative_orbit=relative, absolute_orbit=absolute, datatake_id=0, slice_number=1,
            total_slices=1, timeliness="Off-line", asset_files={pol: p},
            description=("Real Sentinel-1 IW GRD, VV only: pyroSAR test image (GAMMA: multilooked, "
                         "geocoded, terrain-normalised, dB), resampled from 20 m to 10 m and "
                         "converted to linear. It has no VH, so scene search (VV+VH) skips it."),
        )
        _s1_props(item, platform=m["sat"], pols=[m["pol"]], config_id=None, designator=None)
        return _with_attribution(
            item, "s1_pyrosar",
            ["end_datetime", "sat:absolute_orbit", "sat:relative_orbit", "s1:datatake_id",
             "s1:slice_number", "s1:total_slices", "s1:product_timeliness", "s1:orbit_source",
             "s1:instrument_configuration_ID"],
        )


_REAL_BUILDERS = {
    "majortom": _majortom_item,
    "ssl4eo_s2": _ssl4eo_s2_item,
    "ssl4eo_s1": _ssl4eo_s1_item,
    "pyrosar": _pyrosar_item,
}
