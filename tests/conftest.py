"""Session fixtures shared by the whole suite.

* ``shared_dir``: ``../shared`` next to the repository (real data, reference STAC JSON), or
  ``None`` when absent.
* ``real_data_dir``: ``../shared/data/real`` or ``None``.
* ``demo_catalog``: an embedded catalog built once per session (``profile="test"``).
* ``stac_api``: that catalog served (PostgreSQL + pgstac + stac-fastapi-pgstac + the Range
  asset server), a :class:`pipeline.demo.serve.Served` with ``.stac_url``/``.asset_url``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path | None:
    """``../shared`` (real scenes and reference STAC JSON), or None when it is absent."""
    return SHARED if SHARED.is_dir() else None


@pytest.fixture(scope="session")
def real_data_dir(shared_dir: Path | None) -> Path | None:
    """``../shared/data/real`` or None."""
    if shared_dir is None:
        return None
    d = shared_dir / "data" / "real"
    return d if d.is_dir() else None


def _have_builder() -> bool:
    try:
        from pipeline.demo.catalog import build_catalog  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small embedded catalog (profile ``test``), built once for the session."""
    out = tmp_path_factory.mktemp("demo-catalog")
    if _have_builder():
        from pipeline.demo.catalog import build_catalog

        build_catalog(out, profile="test", real_data=None, seed=0, progress=False)
    else:  # until the catalog builder exists: a hand-made catalog in the same format
        _tiny_catalog(out)
    return out


@pytest.fixture(scope="session")
def stac_api(demo_catalog: Path, tmp_path_factory: pytest.TempPathFactory):
    """The demo catalog served on loopback for the whole session."""
    from pipeline.demo.serve import find_postgres, start_catalog_server
    from pipeline.errors import CatalogError

    try:
        find_postgres()
    except CatalogError as exc:
        pytest.skip(f"PostgreSQL/PostGIS not installed: {exc}")
    served = start_catalog_server(
        demo_catalog, workdir=tmp_path_factory.mktemp("stac-api"), progress=False
    )
    try:
        yield served
    finally:
        served.stop()


# ----------------------------------------------------------- stand-in catalog (builder absent)
def _tiny_catalog(out: Path) -> None:
    """A hand-made catalog in the contract's format: PC-shaped items with small real COGs."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    ref = SHARED / "data" / "stac"
    s2_ref = json.loads(
        (ref / "sentinel-2-l2a_S2B_MSIL2A_20240419T095549_R122_T47XMJ_20240419T122756.json")
        .read_text()
    )
    rng = np.random.default_rng(0)
    (out / "collections").mkdir(parents=True)
    shutil.copy(ref / "collection_sentinel-2-l2a.json", out / "collections" / "sentinel-2-l2a.json")
    shutil.copy(ref / "collection_sentinel-1-rtc.json", out / "collections" / "sentinel-1-rtc.json")
    (out / "catalog.json").write_text(json.dumps({
        "type": "Catalog", "id": "ssl4eo-embedded", "stac_version": "1.0.0",
        "description": "stand-in", "links": [], "ssl4eo:catalog_version": "1",
    }))
    x0, y0, n10 = 500000.0, 5710000.0, 1536  # near Halle, UTM 32N
    gsd = {"B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B8A": 20, "B09": 60, "SCL": 20}
    for k in range(12):
        month = 1 + k
        iid = f"S2A_MSIL2A_2022{month:02d}15T101000_R022_T32UPB_stand-in{k:02d}"
        item = json.loads(json.dumps(s2_ref))
        item["id"] = iid
        item["properties"].update({
            "datetime": f"2022-{month:02d}-15T10:10:00Z", "eo:cloud_cover": float(k * 8),
            "proj:epsg": 32632, "s2:mgrs_tile": "32UPB",
        })
        item["geometry"] = {"type": "Polygon", "coordinates": [[
            [12.0 - 0.1, 51.45], [12.0 + 0.15, 51.45], [12.0 + 0.15, 51.6],
            [12.0 - 0.1, 51.6], [12.0 - 0.1, 51.45]]]}
        item["bbox"] = [11.9, 51.45, 12.15, 51.6]
        item["links"] = []
        assets = {}
        for key, res in gsd.items():
            n = n10 * 10 // res
            path = out / "assets" / "sentinel-2-l2a" / iid / f"{key}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            if k == 0 or not (out / "assets" / "sentinel-2-l2a" / "_proto" / f"{key}.tif").exists():
                data = (rng.random((n, n)) * 3000 + 1000).astype("uint16")
                tr = from_origin(x0, y0, res, res)
                with rasterio.open(
                    path, "w", driver="COG", width=n, height=n, count=1, dtype="uint16",
                    crs="EPSG:32632", transform=tr, nodata=0, compress="deflate", blocksize=256,
                ) as dst:
                    dst.write(data, 1)
            else:
                shutil.copy(out / "assets" / "sentinel-2-l2a" / "_proto" / f"{key}.tif", path)
            if k == 0:
                proto = out / "assets" / "sentinel-2-l2a" / "_proto"
                proto.mkdir(exist_ok=True)
                shutil.copy(path, proto / f"{key}.tif")
            a = dict(s2_ref["assets"].get(key, s2_ref["assets"]["B02"]))
            a["href"] = f"../../assets/sentinel-2-l2a/{iid}/{key}.tif"
            a["proj:shape"] = [n, n]
            a["proj:transform"] = [res, 0.0, x0, 0.0, -res, y0]
            a["gsd"] = float(res)
            assets[key] = a
        item["assets"] = assets
        p = out / "items" / "sentinel-2-l2a" / f"{iid}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(item))
    shutil.rmtree(out / "assets" / "sentinel-2-l2a" / "_proto")


# ------------------------------------------------------------------ tables and stores (real)
#: Locations the build tests use: few enough for 2 cores, around cities of the test catalog.
TEST_SAMPLING = {"num_locations": 10, "sigma_km": 1.2, "clip_km": 2.4, "seed": 3}


@pytest.fixture(scope="session")
def demo_tables(stac_api, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``ssl4eo sample`` + ``ssl4eo search`` on the served test catalog (the real code)."""
    from pipeline.config import load_config
    from pipeline.sampling import sample, write_locations
    from pipeline.search import search_locations

    out = tmp_path_factory.mktemp("demo-tables")
    cfg = load_config("demo", overrides={"sampling": TEST_SAMPLING,
                                         "search": {"stac_url": stac_api.stac_url}})
    locations = write_locations(sample(cfg.sampling, progress=False),
                                out / "locations.parquet", cfg)
    scenes = out / "scenes.parquet"
    search_locations(locations, scenes, cfg, progress=False)
    return {"locations": locations, "scenes": scenes, "dir": out}


@pytest.fixture(scope="session")
def clean_store(demo_tables, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test tables built into a store by an uninterrupted run on a LocalCluster."""
    from pipeline.runner import BuildOptions, run_build

    path = tmp_path_factory.mktemp("clean-store") / "cube.zarr"
    run_build(demo_tables["locations"], demo_tables["scenes"], path,
              options=BuildOptions(provider="local", shard_samples=2),
              client_options={"workers": 2, "threads": 1}, progress=False)
    return path
