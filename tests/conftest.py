"""Session fixtures shared by the whole suite.

* ``shared_dir``: ``../shared`` next to the repository (real data, reference STAC JSON), or
  ``None`` when absent.
* ``real_data_dir``: ``../shared/data/real`` or ``None``.
* ``demo_catalog``: an embedded catalog built once per session (``profile="test"``).
* ``stac_api``: that catalog served (PostgreSQL + pgstac + stac-fastapi-pgstac + the Range
  asset server), a :class:`pipeline.demo.serve.Served` with ``.stac_url``/``.asset_url``.
"""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small embedded catalog (profile ``test``), built once for the session."""
    from pipeline.demo.catalog import build_catalog

    out = tmp_path_factory.mktemp("demo-catalog")
    build_catalog(out, profile="test", real_data=None, seed=0, progress=False)
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


# ------------------------------------------------------------------ tables and stores (real)
#: Locations the build tests use: few enough for 2 cores, around cities of the test catalog.
TEST_SAMPLING = {"num_locations": 10, "sigma_km": 1.2, "clip_km": 2.4, "seed": 3}


@pytest.fixture(scope="session")
def demo_tables(stac_api, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``ssl4eo sample`` + ``ssl4eo search`` on the served test catalog (the real code)."""
    from pipeline.demo.serve import sample_and_search

    out = tmp_path_factory.mktemp("demo-tables")
    return {**sample_and_search(stac_api.stac_url, out, TEST_SAMPLING), "dir": out}


@pytest.fixture(scope="session")
def clean_store(demo_tables, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test tables built into a store by an uninterrupted run on a LocalCluster."""
    from pipeline.runner import BuildOptions, run_build

    path = tmp_path_factory.mktemp("clean-store") / "cube.zarr"
    run_build(demo_tables["locations"], demo_tables["scenes"], path,
              options=BuildOptions(provider="local", shard_samples=2),
              client_options={"workers": 2, "threads": 1}, progress=False)
    return path


@pytest.fixture(scope="session")
def v1_store(demo_tables, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test tables built with ``--convention v1`` (``clean_store`` is the default v1.1)."""
    from pipeline.runner import BuildOptions, run_build

    path = tmp_path_factory.mktemp("v1-store") / "cube.zarr"
    run_build(demo_tables["locations"], demo_tables["scenes"], path,
              options=BuildOptions(provider="local", shard_samples=2, convention="v1"),
              client_options={"workers": 2, "threads": 1}, progress=False)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module (its tests compare runs, and 2 cores are shared with
    the Dask workers); the thread count is restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
