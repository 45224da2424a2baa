"""The Dask side of the build: which cluster, one task per shard, retries, progress, resumption.

``run_build`` validates the inputs, writes the store template once (or reopens a compatible
store), then submits **one task per shard of locations** (``SHARD_SAMPLES`` = 64 by default) to
a Dask distributed cluster. A task's arguments are three paths, a shard number and the options
(a few hundred bytes): it reads its own rows of the locations and scenes tables, builds the
stackstac cubes of its locations (signing hrefs there, just before reading), and writes its
whole shard. 250,000 locations are 3,907 tasks, so the graph stays small.

Clusters: a :class:`distributed.LocalCluster` sized to the machine by default (one worker
process per ``threads`` cores); ``scheduler="tcp://HOST:PORT"`` for an existing cluster;
``cluster="kubernetes"`` through :func:`pipeline.k8s.make_cluster` (dask-kubernetes).

Reliability: GDAL retries transient HTTP errors; a task that raises is retried by Dask
(``retries``); a location whose reads still fail is recorded as ``failed`` with its reason, its
data left as fill. ``status`` is written after the data, so an interrupted run (even SIGKILL)
leaves unfinished shards ``pending``, and a re-run does exactly those; the result is identical
to an uninterrupted run (the writes are deterministic).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import layout
from .errors import StoreError, UserError

log = logging.getLogger(__name__)

#: parquet key-value metadata key holding the table schema version (written by search/sample)
TABLE_VERSION_KEYS = (b"ssl4eo:schema_version", b"ssl4eo_schema_version", b"schema_version")


@dataclass(frozen=True)
class BuildOptions:
    """What a shard task needs besides its inputs (small; travels with each task)."""

    modalities: tuple[str, ...] = ()
    provider: str = "auto"
    resampling: str = "bilinear"
    convention: str = layout.S2_DEFAULT_CONVENTION
    read_threads: int = 8
    shard_samples: int = layout.SHARD_SAMPLES
    env_overrides: Mapping[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ inputs
def _table_version(path: Path) -> str | None:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    for key in TABLE_VERSION_KEYS:
        if key in meta:
            return meta[key].decode()
    return None


def _check_table(path: str | Path, what: str, columns: Sequence[str], made_by: str) -> Path:
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist; create it with `{made_by}`")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a parquet table"
        raise UserError(f"{what} {path} is not a readable Parquet file ({exc}); re-create it with"
                        f" `{made_by}`") from exc
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise UserError(
            f"{what} {path} lacks column(s) {missing} (has {schema.names}); it was written by "
            f"another version or another tool: re-create it with `{made_by}`"
        )
    version = _table_version(path)
    if version is not None and version != layout.SCHEMA_VERSION:
        raise UserError(
            f"{what} {path} has schema version {version}, this package reads "
            f"{layout.SCHEMA_VERSION}; re-create it with `{made_by}`"
        )
    return path


def read_locations(path: str | Path):  # -> pd.DataFrame
    """The locations table (only the columns the build needs), checked."""
    import pandas as pd

    cols = ["sample", "lon", "lat", "epsg", "xmin", "ymin", "xmax", "ymax"]
    path = _check_table(path, "locations table", cols, "ssl4eo sample")
    df = pd.read_parquet(path, columns=cols)
    df["sample"] = df["sample"].astype(str)
    if df["sample"].duplicated().any():
        dup = df["sample"][df["sample"].duplicated()].iloc[0]
        raise UserError(f"locations table {path} has sample {dup!r} more than once; "
                        "re-create it with `ssl4eo sample`")
    return df.reset_index(drop=True)


def check_scenes(path: str | Path) -> Path:
    cols = ["sample", "season", "modality", "status", "item_id", "item_json"]
    return _check_table(path, "scenes table", cols, "ssl4eo search")


def scene_modalities(path: str | Path) -> list[str]:
    import pyarrow.parquet as pq

    mods = pq.read_table(path, columns=["modality"]).column("modality").unique().to_pylist()
    return [m for m in layout.MODALITIES if m in mods]


# -------------------------------------------------------------------------------- shard task
def build_shard(
    store_path: str,
    locations_path: str,
    scenes_path: str,
    shard: int,
    options: BuildOptions,
) -> dict[str, Any]:
    """Build and write one whole shard; the unit of work of a Dask task."""
    import dask
    import pandas as pd

    from . import cube, store

    t0 = time.perf_counter()
    s = options.shard_samples
    locs = read_locations(locations_path)
    rows = locs.iloc[shard * s:(shard + 1) * s]
    ids = list(rows["sample"])
    scenes = pd.read_parquet(
        scenes_path, filters=[("sample", "in", ids)],
        columns=["sample", "season", "modality", "status", "item_id", "item_json"],
    )
    scenes["sample"] = scenes["sample"].astype(str)
    ok = scenes[scenes["status"] == "ok"]
    provider = cube.get_provider(options.provider, _first_hrefs(ok))
    arrays = {m: store.empty_shard(m, ids) for m in options.modalities}
    status = np.full(len(ids), layout.STATUS_CODES["complete"], np.uint8)
    failure = [""] * len(ids)
    n_scenes = 0
    for i, loc in enumerate(rows.to_dict("records")):
        grid = cube.Grid.from_location(loc)
        for m in options.modalities:
            a = arrays[m]
            a["center_lat"][i], a["center_lon"][i] = loc["lat"], loc["lon"]
            a["crs"][i] = grid.epsg
            a["x_"][i], a["y_"][i] = grid.x_centres(), grid.y_centres()
        try:
            cubes = cube.location_cubes(
                loc, ok, modalities=options.modalities, provider=provider,
                resampling=options.resampling, convention=options.convention,
                env_overrides=options.env_overrides,
            )
            names = list(cubes)
            with dask.config.set(scheduler="threads", num_workers=options.read_threads):
                computed = dask.compute(*[cubes[m] for m in names])
            for m, ds in zip(names, computed, strict=True):
                n_scenes += _place(arrays[m], i, ds, m)
        except Exception as exc:  # noqa: BLE001 - recorded per sample, never silent
            for m in options.modalities:  # nothing of a failed sample is written as data
                fresh = store.empty_shard(m, [ids[i]])
                for k, v in fresh.items():
                    if k not in ("center_lat", "center_lon", "crs", "x_", "y_"):
                        arrays[m][k][i] = v[0]
            status[i] = layout.STATUS_CODES["failed"]
            failure[i] = f"{type(exc).__name__}: {exc}"[: store.FAILURE_LEN]
            log.warning("sample %s failed: %s", ids[i], failure[i])
    store.write_shard_arrays(store_path, shard, ids, arrays, status, failure, shard_samples=s)
    return {"shard": shard, "samples": len(ids), "scenes": n_scenes,
            "failed": int((status == layout.STATUS_CODES["failed"]).sum()),
            "seconds": time.perf_counter() - t0, "pid": os.getpid()}


def _first_hrefs(scenes) -> list[str]:  # noqa: ANN001
    import json

    if len(scenes) == 0:
        return []
    item = json.loads(scenes["item_json"].iloc[0])
    return [a["href"] for a in item.get("assets", {}).values()][:1]


def _place(a: dict[str, np.ndarray], i: int, ds, modality: str) -> int:  # noqa: ANN001
    """Copy one computed cube into the shard arrays at season positions; returns scenes kept.

    A scene without a single valid pixel in the patch stays nodata and is marked missing.
    """
    seasons = ds["season"].values.astype(int)
    if len(set(seasons)) != len(seasons):
        raise UserError(
            f"scenes table has more than one {modality} scene for one season of sample "
            f"(seasons {list(seasons)}); re-create it with `ssl4eo search`"
        )
    if list(seasons) != sorted(seasons):
        raise UserError(f"{modality} scenes are not chronological by season ({list(seasons)})")
    kept = 0
    for k, season in enumerate(seasons):
        vf = float(ds["valid_fraction"].values[k])
        if not vf > 0:
            continue
        a["bands"][i, season] = ds["bands"].values[k]
        if "cloud_mask" in a and "cloud_mask" in ds:
            a["cloud_mask"][i, season] = ds["cloud_mask"].values[k]
        a["time_"][i, season] = ds["time"].values[k]
        a["file_id"][i, season] = str(ds["file_id"].values[k])
        a["cloud_cover"][i, season] = ds["cloud_cover"].values[k]
        a["valid_fraction"][i, season] = vf
        kept += 1
    return kept


# ---------------------------------------------------------------------------------- clusters
def make_client(
    scheduler: str | None = None,
    cluster: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    memory_limit: str | None = None,
    cluster_options: Mapping[str, Any] | None = None,
):  # -> distributed.Client
    """A Dask client: an existing scheduler, a Kubernetes cluster, or a LocalCluster sized to
    this machine (``workers`` processes x ``threads`` threads; default: one single-threaded
    worker per core, since each task already reads with its own thread pool)."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="20s")
        except OSError as exc:
            raise UserError(
                f"cannot reach the Dask scheduler at {scheduler} ({exc}); start one with "
                "`dask scheduler` or omit --scheduler to use a local cluster"
            ) from exc
    if cluster == "kubernetes":
        try:
            from . import k8s
        except ImportError as exc:
            raise UserError(
                f"--cluster kubernetes needs pipeline.k8s and dask-kubernetes ({exc}); install "
                "dask-kubernetes or use --scheduler / a local cluster"
            ) from exc
        try:
            kc = k8s.make_cluster(**dict(cluster_options or {}))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - no cluster / no kube config
            raise UserError(
                f"could not start a Dask cluster on Kubernetes ({type(exc).__name__}: {exc}); "
                "check your kube config and that the Dask operator is installed, or use "
                "--scheduler / a local cluster"
            ) from exc
        if workers:
            kc.scale(workers)
        return Client(kc)
    if cluster not in (None, "local"):
        raise UserError(f"unknown --cluster {cluster!r}: use 'local' or 'kubernetes'")
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = threads or 1
    workers = workers or max(1, (ncpu or 1) // threads)
    lc = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                      memory_limit=memory_limit or "auto", dashboard_address=":0")
    return Client(lc)


def plan(n_samples: int, status: np.ndarray | None = None, shard_samples: int = 64,
         retry_failed: bool = False) -> list[int]:
    """Shards still to do: any sample pending (or failed, with ``retry_failed``)."""
    from . import store

    todo = []
    for k in range(store.n_shards(n_samples, shard_samples)):
        if status is None:
            todo.append(k)
            continue
        st = status[store.shard_slice(k, n_samples, shard_samples)]
        if (st == layout.STATUS_CODES["pending"]).any() or (
            retry_failed and (st == layout.STATUS_CODES["failed"]).any()
        ):
            todo.append(k)
    return todo


def run_build(
    locations: str | Path,
    scenes: str | Path,
    store_path: str | Path,
    *,
    options: BuildOptions | None = None,
    client=None,  # noqa: ANN001 - a distributed.Client, or None to make one
    client_options: Mapping[str, Any] | None = None,
    retries: int = 2,
    retry_failed: bool = False,
    overwrite: bool = False,
    config: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or resume) the store; returns its summary."""
    from distributed import as_completed

    from . import store

    options = options or BuildOptions()
    locations, scenes, store_path = Path(locations), Path(scenes), Path(store_path)
    locs = read_locations(locations)
    check_scenes(scenes)
    mods = tuple(options.modalities) or tuple(scene_modalities(scenes))
    if not mods:
        raise UserError(f"scenes table {scenes} has no rows; run `ssl4eo search` first")
    options = BuildOptions(**{**asdict(options), "modalities": mods})
    for loc in locs.head(1000).to_dict("records"):  # fail fast on a broken grid
        from .cube import Grid

        Grid.from_location(loc)
    if overwrite:
        store.remove_store(store_path)
    prov = store.provenance(config, options.provider, scenes, locations, asdict(options))
    created = store.create_store(store_path, list(locs["sample"]), mods, provenance=prov,
                                 shard_samples=options.shard_samples)
    root = store.open_root(store_path)
    s = int(root.attrs.get("ssl4eo:shard_samples", options.shard_samples))
    if s != options.shard_samples:
        options = BuildOptions(**{**asdict(options), "shard_samples": s})
    todo = plan(len(locs), np.asarray(root["status"][...]), s, retry_failed)
    log.info("store %s (%s): %d of %d shards to do", store_path,
             "new" if created else "resumed", len(todo), store.n_shards(len(locs), s))
    results = []
    if todo:
        own = client is None
        if own:
            client = make_client(**dict(client_options or {}))
        try:
            if progress:
                print(f"ssl4eo build: {len(todo)} shard task(s); dashboard: "
                      f"{client.dashboard_link}", flush=True)
            futures = [
                client.submit(build_shard, str(store_path.resolve()), str(locations.resolve()),
                              str(scenes.resolve()), k, options, retries=retries, pure=False,
                              key=f"ssl4eo-shard-{k}-{os.getpid()}-{time.time_ns()}")
                for k in todo
            ]
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(futures), unit="shard", desc="build")
            for fut in as_completed(futures):
                results.append(fut.result())
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
        finally:
            if own:
                cl = getattr(client, "cluster", None)
                client.close()
                if cl is not None:
                    cl.close()
    store.finalize(store_path)
    out = store.summary(store_path)
    out["shards_run"] = len(results)
    out["task_seconds"] = float(sum(r["seconds"] for r in results))
    return out


def graph_size(n_locations: int, shard_samples: int = layout.SHARD_SAMPLES) -> dict[str, int]:
    """Tasks and pickled bytes per task a build of ``n_locations`` submits."""
    import pickle

    from . import store

    opts = BuildOptions(modalities=layout.MODALITIES)
    args = ("/data/store.zarr", "/data/locations.parquet", "/data/scenes.parquet", 0, opts)
    return {"tasks": store.n_shards(n_locations, shard_samples),
            "bytes_per_task": len(pickle.dumps((build_shard, args)))}


__all__ = ["BuildOptions", "build_shard", "graph_size", "make_client", "plan", "run_build",
           "StoreError"]
