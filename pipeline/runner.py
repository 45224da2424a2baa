"""The Dask side of the build: which cluster, one task per shard, retries, progress, resumption.

``run_build`` validates the inputs, writes the store template once (or reopens a compatible
store), then submits **one task per shard of locations** (``SHARD_SAMPLES`` = 64 by default) to
a Dask distributed cluster. A task's arguments are the store and the two tables (paths on a
LocalCluster; URLs on a cluster whose workers may not share this machine's disk, local tables
being published beside the store first: :func:`publish_inputs`), a shard number and the options
(a few hundred bytes, never a credential): it reads its own rows of the locations and scenes
tables, builds the stackstac cubes of its locations (signing hrefs there, just before
reading), and writes its whole shard. 250,000 locations are 3,907 tasks, so the graph stays small.

Clusters: a :class:`distributed.LocalCluster` sized to the machine by default (one worker
process per ``threads`` cores); ``scheduler="tcp://HOST:PORT"`` for an existing cluster;
``cluster="kubernetes"`` through :func:`pipeline.k8s.make_cluster` (dask-kubernetes).

Reliability:

* reads: GDAL retries HTTP 429/5xx and timeouts; a chunk whose read still fails for a transient
  reason (a truncated body, a reset, an empty reply) is read again by
  :class:`pipeline.cube.RetryingRioReader`, which also signs each href as it opens the file;
  a read refused with HTTP 401/403 (an expired token) makes it drop the signer's cached
  tokens, sign again and re-read (``sign_retries`` times).
* samples: a location whose reads still fail is recorded as ``failed`` with its reason (URLs
  without their query, so no token is ever logged or stored); nothing of it is written as
  data (its seasons stay nodata / NaT / ""), and ``retry_failed`` (``--retry-failed``) redoes
  the failed samples of an earlier run.
* tasks: a task that raises is retried by Dask (``retries``), also when its worker dies (the
  nanny restarts the worker process).
* the job: ``status`` is written after the data, so an interrupted run (even SIGKILL) leaves
  unfinished shards ``pending``, and a re-run does exactly those; the result is identical to
  an uninterrupted run (the writes are deterministic, and every chunk file is replaced
  atomically).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import layout
from .errors import StoreError, UserError
from .providers import redact_hrefs

log = logging.getLogger(__name__)

#: parquet key-value metadata key holding the table schema version (written by search/sample)
TABLE_VERSION_KEYS = (b"ssl4eo:schema_version", b"ssl4eo_schema_version", b"schema_version")


@dataclass(frozen=True)
class BuildOptions:
    """What a shard task needs besides its inputs (small; travels with each task)."""

    modalities: tuple[str, ...] = ()
    #: a provider profile name overriding the one the scenes table records (None: the table's)
    provider: str | None = None
    #: the provider profile the tasks read with, as data (:meth:`pipeline.providers.Provider.
    #: to_dict`); :func:`run_build` resolves it from ``provider`` or the scenes table
    profile: Mapping[str, Any] | None = None
    resampling: str = "bilinear"
    convention: str = layout.S2_DEFAULT_CONVENTION
    #: cubes (location, modality) a task reads at once (threads; each reads its assets in
    #: turn); None: sized from the latency the task measures on its first file
    #: (:func:`pipeline.cube.auto_read_threads`: 8 on loopback, 24 at 100 ms per request)
    read_threads: int | None = None
    shard_samples: int = layout.SHARD_SAMPLES
    env_overrides: Mapping[str, Any] = field(default_factory=dict)
    #: "package.module:function" of a custom href signer (private buckets, other token
    #: services; see :func:`pipeline.providers.load_signer`), imported inside each task; None:
    #: the provider's own (a SAS token on Planetary Computer, none elsewhere)
    signer: str | None = None
    #: times a location's modality is signed again and re-read after HTTP 401/403
    sign_retries: int = 2
    #: patch rule (S2 L2A): a season whose patch has more cloud than this, or less valid
    #: pixels than ``min_valid``, takes the clearest of the search's candidates
    #: (:func:`pipeline.cube.patch_choice`)
    max_patch_cloud: float = 0.05
    min_valid: float = 0.95


#: GDAL / environment option names whose values are credentials (never recorded)
_SECRET_OPTION = re.compile(
    r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|SAS|SIGNATURE|USERPWD|HEADER|AUTH|BEARER", re.I)


def _redact(obj: Any) -> Any:
    """A copy of a JSON-like value fit for the store's provenance: values under credential-like
    keys (``AWS_SECRET_ACCESS_KEY``, ``GDAL_HTTP_HEADERS``, ``token``...) masked, URLs without
    user:password@ and secret query values."""
    from . import storage

    if isinstance(obj, Mapping):
        return {k: "***" if _SECRET_OPTION.search(str(k)) and v not in (None, "") else _redact(v)
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_redact(v) for v in obj]
    if isinstance(obj, str) and "://" in obj:
        return storage.redact(obj)
    return obj


# ------------------------------------------------------------------------------------ inputs
def _table_version(schema) -> str | None:  # noqa: ANN001 - a pyarrow schema
    meta = schema.metadata or {}
    for key in TABLE_VERSION_KEYS:
        if key in meta:
            return meta[key].decode()
    return None


def _check_table(path: str | Path, what: str, columns: Sequence[str], made_by: str) -> str:
    """``path`` (a local path or an object-storage URL) after checking that it is a Parquet
    table with ``columns`` of this schema version; returns it as a string (local paths
    absolute)."""
    import pyarrow.parquet as pq

    from . import storage

    shown = storage.redact(str(path))
    storage.input_info(path, what, made_by)  # missing / refused: names the URL and the variables
    fs, where = storage.arrow_filesystem(path)
    try:
        schema = pq.read_schema(where, filesystem=fs)
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a parquet table"
        raise UserError(f"{what} {shown} is not a readable Parquet file "
                        f"({storage.redact(str(exc))}); re-create it with `{made_by}`") from exc
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise UserError(
            f"{what} {shown} lacks column(s) {missing} (has {schema.names}); it was written by "
            f"another version or another tool: re-create it with `{made_by}`"
        )
    version = _table_version(schema)
    if version is not None and version != layout.SCHEMA_VERSION:
        raise UserError(
            f"{what} {shown} has schema version {version}, this package reads "
            f"{layout.SCHEMA_VERSION}; re-create it with `{made_by}`"
        )
    return str(path) if storage.is_remote(path) else where


#: the locations table's columns the build reads
LOCATION_COLUMNS = ("sample", "lon", "lat", "epsg", "xmin", "ymin", "xmax", "ymax")


def read_locations(path: str | Path):  # -> pd.DataFrame
    """The locations table (only the columns the build needs), checked; a path or a URL."""
    return _load_locations(check_locations(path))


def _load_locations(path: str):  # -> pd.DataFrame
    """The locations table at ``path``, already checked (:func:`check_locations`)."""
    import pandas as pd

    from . import storage

    fs, where = storage.arrow_filesystem(path)
    df = pd.read_parquet(where, columns=list(LOCATION_COLUMNS), filesystem=fs)
    df["sample"] = df["sample"].astype(str)
    if df["sample"].duplicated().any():
        dup = df["sample"][df["sample"].duplicated()].iloc[0]
        raise UserError(f"locations table {storage.redact(str(path))} has sample {dup!r} more "
                        "than once; re-create it with `ssl4eo sample`")
    return df.reset_index(drop=True)


#: the scenes table's columns a shard task needs
SHARD_SCENE_COLUMNS = ("sample", "season", "modality", "status", "item_id", "item_json")
#: the columns it also reads when the table has them: the S2 runners-up for the patch-level
#: cloud choice (:func:`pipeline.cube.patch_choice`)
SHARD_OPTIONAL_COLUMNS = ("candidates",)


def check_locations(path: str | Path) -> str:
    return _check_table(path, "locations table", LOCATION_COLUMNS, "ssl4eo sample")


def check_scenes(path: str | Path) -> str:
    return _check_table(path, "scenes table", SHARD_SCENE_COLUMNS, "ssl4eo search")


def scene_row_groups(table: Any, samples: Iterable[str]) -> list[int]:
    """The row groups of the scenes table (a path or an open ``pyarrow.parquet.ParquetFile``)
    that can hold rows of ``samples``, from each group's min/max statistics of ``sample`` (a
    group without them is always read). The table is sorted by sample in groups of
    :data:`pipeline.layout.SCENES_ROW_GROUP` rows, so a shard's samples sit in one or two."""
    import bisect

    import pyarrow as pa
    import pyarrow.parquet as pq

    want = sorted(set(map(str, samples)))
    pf = table if isinstance(table, pq.ParquetFile) else _parquet_file(table)
    meta = pf.metadata
    schema = meta.schema.to_arrow_schema()
    col = schema.get_field_index("sample")
    if not pa.types.is_string(schema.field(col).type):  # text order is not the stats' order
        return list(range(meta.num_row_groups))
    groups = []
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(col).statistics
        if stats is None or not stats.has_min_max:
            groups.append(g)
            continue
        first = bisect.bisect_left(want, str(stats.min))
        if first < len(want) and want[first] <= str(stats.max):
            groups.append(g)
    return groups


def _parquet_file(path: str | Path):  # -> pq.ParquetFile
    """An open Parquet file at a local path or URL (remote: range reads through fsspec)."""
    import pyarrow.parquet as pq

    from . import storage

    fs, where = storage.arrow_filesystem(path)
    return pq.ParquetFile(where, filesystem=fs)


def read_shard_scenes(path: str | Path, samples: Sequence[str],
                      columns: Sequence[str] = SHARD_SCENE_COLUMNS):  # -> pd.DataFrame
    """The scenes table's rows of ``samples`` (``columns`` only, ``sample`` as str), reading
    only the row groups that can hold them (:func:`scene_row_groups`): at 250,000 locations the
    table holds some 16 GB of item JSON, of which a shard uses a few megabytes. ``path`` may be
    an object-storage URL: only the footer and those row groups are fetched."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pf = _parquet_file(path)  # the footer is read once, for the groups and the read
    have = set(pf.schema_arrow.names)
    # optional columns (a table from before they existed has none of them)
    columns = [c for c in columns if c in have or c not in SHARD_OPTIONAL_COLUMNS]
    table = pf.read_row_groups(scene_row_groups(pf, samples), columns=list(columns))
    table = table.filter(pc.is_in(table["sample"].cast(pa.string()),
                                  value_set=pa.array([str(s) for s in samples], pa.string())))
    df = table.to_pandas()
    df["sample"] = df["sample"].astype(str)
    return df


def scene_modalities(path: str | Path) -> list[str]:
    import pyarrow.parquet as pq

    from . import storage

    fs, where = storage.arrow_filesystem(path)
    mods = (pq.read_table(where, columns=["modality"], filesystem=fs).column("modality")
            .unique().to_pylist())
    return [m for m in layout.MODALITIES if m in mods]


# ------------------------------------------------------------------------ inputs that travel
def published_url(store_path: str, kind: str, sha256: str) -> str:
    """Where a build publishes a local input table for workers that cannot see the
    submitter's disk: beside the store, ``<store>.inputs/<kind>-<sha256[:16]>.parquet``
    (``s3://b/ssl4eo/cube.zarr`` -> ``s3://b/ssl4eo/cube.zarr.inputs/scenes-....parquet``).
    Named by content, so a re-run with the same table reuses the copy and a changed table never
    overwrites the one an earlier build read."""
    from . import storage

    return storage.join(str(store_path).rstrip("/") + ".inputs", f"{kind}-{sha256[:16]}.parquet")


def publish_inputs(tables: Mapping[str, str], store_path: str,
                   digests: Mapping[str, str]) -> dict[str, str]:
    """The table URLs the tasks get: a remote table as it is, a local one copied once beside
    the store (:func:`published_url`; skipped when a copy of that content is already there)."""
    from . import storage

    out = {}
    for kind, path in tables.items():
        if storage.is_remote(path):
            out[kind] = path
            continue
        url = published_url(store_path, kind, digests[kind])
        size = Path(path).stat().st_size
        try:
            there = storage.input_info(url, f"published {kind} table")["size"] == size
        except StoreError:
            there = False
        if not there:
            storage.upload_file(path, url)
            log.info("published %s -> %s (%.1f MB)", path, storage.redact(url), size / 1e6)
        out[kind] = url
    return out


def shard_task_args(store_path: str, tables: Mapping[str, str], shard: int,
                    options: BuildOptions) -> tuple[Any, ...]:
    """The arguments of one shard task (:func:`build_shard`): URLs or paths, the shard number
    and the options; never a credential (workers read theirs from their own environment)."""
    return (store_path, tables["locations"], tables["scenes"], shard, options)


def _needs_published_inputs(client: Any, client_options: Mapping[str, Any] | None) -> bool:
    """Whether the workers may not see the submitter's disk: an existing scheduler, a
    Kubernetes cluster, or a client that is not on a LocalCluster of this process."""
    if client is None:
        opts = dict(client_options or {})
        return bool(opts.get("scheduler")) or opts.get("cluster") == "kubernetes"
    from distributed import LocalCluster

    return not isinstance(getattr(client, "cluster", None), LocalCluster)


# -------------------------------------------------------------------------------- shard task
def build_shard(
    store_path: str,
    locations_path: str,
    scenes_path: str,
    shard: int,
    options: BuildOptions,
) -> dict[str, Any]:
    """Build and write one whole shard; the unit of work of a Dask task."""
    from . import cube, store

    t0 = time.perf_counter()
    s = options.shard_samples
    locs = read_locations(locations_path)
    rows = locs.iloc[shard * s:(shard + 1) * s]
    ids = list(rows["sample"])
    scenes = read_shard_scenes(scenes_path, ids, SHARD_SCENE_COLUMNS + SHARD_OPTIONAL_COLUMNS)
    ok = scenes[scenes["status"] == "ok"]
    provider = _provider(options, ok)
    arrays = {m: store.empty_shard(m, ids) for m in options.modalities}
    # each sample's share of the shard's band statistics, computed as it is placed (a sample
    # without data: the sums of its fill)
    empty_sums = {m: store.sample_sums(arrays[m]["bands"][0], m) for m in options.modalities}
    sums = {m: [empty_sums[m]] * len(ids) for m in options.modalities}
    status = np.full(len(ids), layout.STATUS_CODES["complete"], np.uint8)
    failure = [""] * len(ids)
    records = rows.to_dict("records")
    for i, loc in enumerate(records):
        grid = cube.Grid.from_location(loc)
        for m in options.modalities:
            a = arrays[m]
            a["center_lat"][i], a["center_lon"][i] = loc["lat"], loc["lon"]
            a["crs"][i] = grid.epsg
            a["x_"][i], a["y_"][i] = grid.x_centres(), grid.y_centres()
    # one cube (location, modality) per thread, each computed with dask's synchronous
    # scheduler: read_threads cubes at once, and each result is copied into the shard (and
    # dropped) as soon as it is in, so at most read_threads cubes are held besides the shard.
    # The cubes with the most assets to read start first, so that the shard does not wait for
    # a long S2 cube started last.
    scene_counts = ok.groupby(["sample", "modality"]).size().to_dict()
    jobs = sorted(((i, m) for i in range(len(records)) for m in options.modalities),
                  key=lambda j: -scene_counts.get((ids[j[0]], j[1]), 0) * _assets_per_scene(j[1]))
    # latency: a file's open is a HEAD and a header read, two round trips, then its tiles.
    # From cube.READ_POOL_LATENCY_S on each cube's files are read at once (cube.ReadPool, one
    # chunk per scene and asset), and more cubes are read at once (cube.auto_read_threads).
    # (Opening a cube's files at once before it read them in turn, as the build did first,
    # only added a second open per file once the ReadPool reads: benchmarks/latency.py,
    # README "The build at network latency".)
    latency_s = _probe_latency(ok, options, provider)
    threads = options.read_threads or cube.auto_read_threads(latency_s)
    at_once = latency_s >= cube.READ_POOL_LATENCY_S
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(max(1, threads),
                                                      thread_name_prefix="ssl4eo-cube"))
        # reads wait on the network, not the CPU: 4 per cube thread, at most 128
        readers = (stack.enter_context(cube.ReadPool(min(128, 4 * threads))) if at_once
                   else None)

        def read_and_place(i: int, m: str) -> None:
            # on the cube's thread: its copy into the shard (its own rows) and what its bands
            # add to the shard's statistics, while other cubes are still being read
            ds = _read_modality(records[i], ok, m, options, provider, readers)
            if ds is not None and status[i] != layout.STATUS_CODES["failed"]:
                _place(arrays[m], i, ds, m)
                sums[m][i] = store.sample_sums(arrays[m]["bands"][i], m)

        futures = {pool.submit(read_and_place, i, m): (i, m) for i, m in jobs}
        for fut in as_completed(futures):
            i, m = futures.pop(fut)
            try:
                fut.result()
            except Exception as exc:  # noqa: BLE001 - recorded per sample, never silent
                if status[i] != layout.STATUS_CODES["failed"]:
                    status[i] = layout.STATUS_CODES["failed"]
                    failure[i] = redact_hrefs(f"{type(exc).__name__}: {exc}")[: store.FAILURE_LEN]
                    log.warning("sample %s failed: %s", ids[i], failure[i])
    for i in np.flatnonzero(status == layout.STATUS_CODES["failed"]):
        for m in options.modalities:  # nothing of a failed sample is written as data
            fresh = store.empty_shard(m, [ids[i]])
            for k, v in fresh.items():
                if k not in ("center_lat", "center_lon", "crs", "x_", "y_"):
                    arrays[m][k][i] = v[0]
            sums[m][i] = empty_sums[m]
    n_scenes = int(sum((arrays[m]["file_id"] != "").sum() for m in options.modalities))
    store.write_shard_arrays(store_path, shard, ids, arrays, status, failure, shard_samples=s,
                             sums=sums)
    return {"shard": shard, "samples": len(ids), "scenes": n_scenes,
            "failed": int((status == layout.STATUS_CODES["failed"]).sum()),
            "seconds": time.perf_counter() - t0, "pid": os.getpid(),
            "latency_s": round(latency_s, 4), "read_threads": threads, "read_at_once": at_once}


#: per worker process, the latency measured per storage host (scheme and host of the hrefs)
_LATENCY_BY_HOST: dict[str, float] = {}


def _probe_latency(ok, options: BuildOptions, provider) -> float:  # noqa: ANN001
    """Seconds per HTTP request to the storage the shard reads, measured once per worker
    process and host: opening three files one after another (each a HEAD and a header read,
    two round trips; the fastest, as the first also pays for the first connection and a busy
    moment can delay any one). Later tasks reuse it (their files may already be in GDAL's
    cache, which would read as no latency at all). 0 with no scene. GDAL keeps what the opens
    fetched for the cubes that read those files."""
    import urllib.parse

    from . import cube

    if not len(ok):
        return 0.0
    row = ok.iloc[0]
    hrefs = cube.cube_hrefs(row["modality"], [row["item_json"]], provider)[:3]
    if not hrefs:
        return 0.0
    parts = urllib.parse.urlsplit(hrefs[0])
    host = f"{parts.scheme}://{parts.netloc}"
    if host not in _LATENCY_BY_HOST:
        env = {**provider.gdal_options(row["modality"]), **dict(options.env_overrides)}
        _LATENCY_BY_HOST[host] = min(cube.open_file(h, provider.signer(), env) / 2
                                     for h in hrefs)
    return _LATENCY_BY_HOST[host]


def _provider(options: BuildOptions, ok):  # noqa: ANN001 - -> providers.Provider
    """The provider profile a task reads and signs with: the one :func:`run_build` resolved
    (its custom signer imported here, in the task); a table from before profiles were recorded
    falls back to a guess from its hrefs."""
    from . import cube
    from .providers import load_signer, provider_from_dict

    if options.profile is not None:
        provider = provider_from_dict(options.profile)
    else:
        provider = cube.get_provider(options.provider or "auto", _first_hrefs(ok))
    if options.signer:
        provider = provider.with_signer(load_signer(options.signer))
    return provider


def _read_modality(loc: Mapping[str, Any], ok, modality: str, options: BuildOptions,  # noqa: ANN001
                   provider, readers=None):  # noqa: ANN001 - -> xr.Dataset | None
    """One location's computed cube of ``modality`` (None: no scene). The cube's reader signs
    each href as it opens the file, and after HTTP 401/403 (an expired token) drops the
    signer's cached tokens and signs again, ``options.sign_retries`` times
    (:class:`pipeline.cube.RetryingRioReader`); any other error is raised (and recorded).
    ``readers``: the task's :class:`pipeline.cube.ReadPool` (at latency), on whose threads
    the cube reads its files at once rather than one after another."""
    from . import cube

    rows = ok[(ok["sample"] == loc["sample"]) & (ok["modality"] == modality)]
    # computed in this thread (dask's synchronous scheduler, one GDAL environment): the shard
    # task computes read_threads cubes at once (build_shard). Computing the stackstac arrays,
    # not the xarray dataset, also keeps clear of dask 2026.8 dropping keys ("Missing
    # dependency") when several xarray datasets are computed in one dask.compute.
    cubes = cube.location_cubes(
        loc, ok, modalities=(modality,), provider=provider, resampling=options.resampling,
        convention=options.convention, env_overrides=options.env_overrides,
        sign_retries=options.sign_retries, compute=True, read_pool=readers,
    )
    ds = cubes.get(modality)
    if ds is not None and modality == layout.S2L2A:
        ds = cube.patch_choice(
            ds, rows, cube.Grid.from_location(loc), provider=provider,
            max_patch_cloud=options.max_patch_cloud, min_valid=options.min_valid,
            resampling=options.resampling, convention=options.convention,
            env_overrides=options.env_overrides, sign_retries=options.sign_retries,
            read_pool=readers)
    return ds


def resolve_profile(options: BuildOptions, scenes: str | Path,
                    config: Any = None) -> dict[str, Any] | None:
    """The provider profile the build reads with, as data: ``options.profile`` when set, else
    the profile ``options.provider`` names (a built-in or the config's ``providers:`` entry:
    ``--provider`` overrides only when given), else the one the scenes table recorded (what
    ``ssl4eo search`` used). None for a table written before profiles were recorded: the
    tasks then guess from the hrefs (Planetary Computer for Azure blob storage, else local)."""
    from . import providers
    from .sampling import table_metadata

    if options.profile is not None:
        return dict(providers.provider_from_dict(options.profile).to_dict())
    if options.provider and options.provider != "auto":
        cfg = config if isinstance(config, Mapping) else (
            config.to_dict() if hasattr(config, "to_dict") else {})
        profiles = cfg.get("providers") or {}
        prov = providers.get_provider(options.provider, profiles=profiles, need_url=False)
        return prov.to_dict()
    recorded = (table_metadata(scenes).get("info") or {}).get("profile")
    if recorded:
        where = f"the provider profile recorded in scenes table {scenes!s}"
        return providers.provider_from_dict(recorded, where=where).to_dict()
    log.warning("scenes table %s records no provider profile (written before profiles were "
                "recorded): guessing from its hrefs; pass --provider to choose", scenes)
    return None


def _assets_per_scene(modality: str) -> int:
    """Assets a cube reads per scene: its bands, and SCL for S2 L2A."""
    return len(layout.BANDS.get(modality, ())) + (modality == layout.S2L2A)


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
        # the quality table
        bands = ds["bands"].values[k]
        empty = ~np.isfinite(bands) | (bands == 0) if bands.dtype.kind == "f" else bands == 0
        a["zero_bands"][i, season] = int(empty.reshape(len(bands), -1).all(axis=1).sum())
        for name in ("dn_offset", "offset_rule", "patch_cloud_fraction", "candidates_tried",
                     "candidate_rank"):
            if name in a and name in ds.coords:
                a[name][i, season] = ds[name].values[k]
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
    from distributed import Client

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
    return Client(local_cluster(workers, threads, memory_limit=memory_limit))


#: Settings of the build's worker processes (the LocalCluster's here; the same as environment
#: variables in deploy/k8s/daskcluster.yaml). Measured with ``perf`` on the build benchmark:
#:
#: * malloc: Dask's default ``MALLOC_TRIM_THRESHOLD_=65536`` also pins glibc's mmap threshold at
#:   128 kB, so every patch-sized buffer (a 264 x 264 band is 139-279 kB; GDAL's warp buffers;
#:   an S2 cube of four seasons is 6.7 MB) was a fresh mmap, zero-filled page by page and
#:   unmapped again: 16 % of the worker's CPU in the kernel (page faults), against 5 % for
#:   plain rasterio reads. Buffers up to 8 MiB now come from the heap, and free heap above
#:   8 MiB is still given back: the kernel's share fell to 8-10 %, the worker's peak memory
#:   rose by about 80 MB.
#: * the event loop: Dask samples every task thread's stack every 10 ms on the worker's event
#:   loop, and checks every 20 ms that the loop is not blocked. The build's tasks last seconds:
#:   a profile sample every 100 ms still fills the dashboard's profile, and a check every 100
#:   ms still catches a blocked loop. The event loop's CPU fell from 0.7-1.2 s to 0.2 s per
#:   build of the demo.
#:
#: Variables already in the environment win over these (Dask's own rule).
WORKER_CONFIG: dict[str, Any] = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 8 * 2**20,
    "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 8 * 2**20,
    "distributed.worker.profile.interval": "100ms",
    "distributed.admin.tick.interval": "100ms",
}


def worker_environment() -> dict[str, str]:
    """:data:`WORKER_CONFIG` as the environment variables a worker started elsewhere needs
    (``dask worker`` on another machine, the Kubernetes manifests)."""
    prefix = "distributed.nanny.pre-spawn-environ."
    env = {}
    for key, value in WORKER_CONFIG.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
        else:
            name = "DASK_" + "__".join(part.replace("-", "_").upper() for part in key.split("."))
        env[name] = str(value)
    return env


def local_cluster(workers: int, threads: int = 1, *, memory_limit: str | None = None,
                  dashboard_address: str | None = ":0"):  # -> distributed.LocalCluster
    """A LocalCluster of ``workers`` processes x ``threads`` threads with the build's worker
    settings (:data:`WORKER_CONFIG`); ``dashboard_address=None`` starts no dashboard."""
    import dask
    from distributed import LocalCluster

    with dask.config.set(WORKER_CONFIG):  # read by each Nanny as it is made, here
        return LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                            memory_limit=memory_limit or "auto",
                            dashboard_address=dashboard_address)


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

    from . import storage, store

    options = options or BuildOptions()
    # tasks get an absolute local path, or the object-storage URL as it is
    store_path = (str(store_path) if storage.is_remote(store_path)
                  else str(storage.local_path(store_path).resolve()))
    # both tables checked (missing, refused, foreign) before anything is written or submitted
    locations = check_locations(locations)
    scenes = check_scenes(scenes)
    locs = _load_locations(locations)
    mods = tuple(options.modalities) or tuple(scene_modalities(scenes))
    if not mods:
        raise UserError(f"scenes table {storage.redact(scenes)} has no rows; run `ssl4eo "
                        "search` first")
    options = BuildOptions(**{**asdict(options), "modalities": mods,
                              "profile": resolve_profile(options, scenes, config)})
    if options.signer:  # fail here, not in every task, when it cannot be imported
        from .providers import load_signer

        load_signer(options.signer)
    if options.sign_retries < 0:
        raise UserError(f"sign_retries must be >= 0, got {options.sign_retries}")
    for loc in locs.head(1000).to_dict("records"):  # fail fast on a broken grid
        from .cube import Grid

        Grid.from_location(loc)
    if overwrite:
        store.remove_store(store_path)
    tables = {"locations": locations, "scenes": scenes}
    # local tables: hashed (provenance, and the published copy's name); remote ones are
    # identified by their ETag and size, not downloaded for a hash
    digests = {k: storage.file_sha256(v) for k, v in tables.items() if not storage.is_remote(v)}
    task_tables = dict(tables)
    if _needs_published_inputs(client, client_options):
        # the workers may not see this machine's disk: local tables go beside the store,
        # and tasks read them there (no credential travels: workers use their own)
        task_tables = publish_inputs(tables, store_path, digests)
    # provenance: GDAL options may hold credentials (e.g. AWS_SECRET_ACCESS_KEY, in the options
    # and in the config's build section) and URLs user:password@ or tokens: masked before they
    # are written into the store
    prov = store.provenance(_redact(config),
                            (options.profile or {}).get("name") or options.provider or "auto",
                            scenes, locations,
                            _redact(asdict(options)), digests=digests, task_tables=task_tables)
    created = store.create_store(store_path, list(locs["sample"]), mods, provenance=prov,
                                 shard_samples=options.shard_samples,
                                 convention=options.convention)
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
            from .dask_plugins import NoTaskProfiler

            # before any task: Dask's task profiler can deadlock a Python 3.11 worker
            client.register_plugin(NoTaskProfiler())
            if progress:
                print(f"ssl4eo build: {len(todo)} shard task(s); dashboard: "
                      f"{client.dashboard_link}", flush=True)
            futures = [
                client.submit(build_shard, *shard_task_args(store_path, task_tables, k, options),
                              retries=retries, pure=False,
                              key=f"ssl4eo-shard-{k}-{os.getpid()}-{time.time_ns()}")
                for k in todo
            ]
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(futures), unit="shard", desc="build")
            for fut in as_completed(futures):
                try:
                    results.append(fut.result())
                except UserError:
                    raise
                except OSError as exc:
                    full = getattr(exc, "errno", None) == errno.ENOSPC
                    raise StoreError(
                        f"writing the store {store_path} failed"
                        f"{' (no space left on the device)' if full else ''}: "
                        f"{type(exc).__name__}: {exc}. Shards already written are complete and "
                        "the unfinished ones are still pending: free space / fix the cause and "
                        "run the same command again to resume"
                    ) from exc
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
    if results:  # what the tasks measured of the storage, and how they read because of it
        lat = sorted(r.get("latency_s", 0.0) for r in results)
        out["reading"] = {"latency_s_median": lat[len(lat) // 2],
                          "read_threads": sorted({r.get("read_threads") for r in results}),
                          "read_at_once": sum(bool(r.get("read_at_once")) for r in results)}
    return out


def graph_size(n_locations: int, shard_samples: int = layout.SHARD_SAMPLES) -> dict[str, int]:
    """Tasks and pickled bytes per task a build of ``n_locations`` submits."""
    import pickle

    from . import store

    opts = BuildOptions(modalities=layout.MODALITIES)
    store_url = "s3://bucket/ssl4eo-s12/cube.zarr"
    args = shard_task_args(store_url, {k: published_url(store_url, k, "0" * 64)
                                       for k in ("locations", "scenes")}, 0, opts)
    return {"tasks": store.n_shards(n_locations, shard_samples),
            "bytes_per_task": len(pickle.dumps((build_shard, args)))}


__all__ = ["BuildOptions", "WORKER_CONFIG", "build_shard", "graph_size", "local_cluster",
           "make_client", "plan", "run_build", "worker_environment", "StoreError"]


# --------------------------------------------------------------------------------------- CLI
def _add_cluster_arguments(p: Any) -> None:
    g = p.add_argument_group("Dask cluster")
    g.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                   help="address of an existing Dask scheduler (default: start a LocalCluster). "
                   "Its workers need not see this machine's disk: local tables are copied beside "
                   "the store first, and the store must be object storage or a folder the "
                   "workers share; they use the credentials of their own environment. Start its "
                   "workers with "
                   f"{', '.join(f'{k}={v}' for k, v in worker_environment().items())} in their "
                   "environment, as the "
                   "local and Kubernetes workers have (pipeline.runner.WORKER_CONFIG)")
    g.add_argument("--cluster", choices=("local", "kubernetes"), default=None,
                   help="local (default): a LocalCluster sized to this machine; kubernetes: a "
                   "DaskCluster through the dask-kubernetes operator, from the same "
                   "specification as deploy/k8s/daskcluster.yaml")
    g.add_argument("--workers", type=int, default=None,
                   help="worker processes (local: default one per core; kubernetes: scale to "
                   "this many)")
    g.add_argument("--threads", type=int, default=None,
                   help="threads per local worker process (default 1: each task reads with "
                   "its own thread pool, see --read-threads)")
    g.add_argument("--memory-limit", default=None,
                   help="memory limit per local worker, e.g. 4GB (default: share of the RAM)")
    g.add_argument("--image", default=None,
                   help="kubernetes: container image of the scheduler and workers")
    g.add_argument("--namespace", default=None, help="kubernetes: namespace of the DaskCluster")


def _add_build_arguments(p: Any) -> None:
    g = p.add_argument_group("build")
    g.add_argument("--shard-samples", type=int, default=None,
                   help=f"samples per Zarr shard and per task (default {layout.SHARD_SAMPLES}); "
                   "fixed when the store is created")
    g.add_argument("--resampling", default=None,
                   choices=("nearest", "bilinear", "cubic", "average", "lanczos"),
                   help="resampling of the 20/60 m S2 bands (and S1) onto the 10 m grid "
                   "(default bilinear; SCL always nearest)")
    g.add_argument("--convention", choices=tuple(layout.S2_OFFSET_CONVENTIONS), default=None,
                   help="S2 offset convention stored: v1.1 = 10000*reflectance + 1000 (processing "
                   "baseline 04.00 and SSL4EO-S12 v1.1, default); v1 = 10000*reflectance")
    g.add_argument("--max-patch-cloud", type=float, default=None, metavar="FRACTION",
                   help="S2 L2A patch rule: a season whose patch (SCL) has more cloud than this "
                   "fraction takes the clearest of the search's candidate scenes (default 0.05; "
                   "1 keeps the scene-level choice)")
    g.add_argument("--min-valid", type=float, default=None, metavar="FRACTION",
                   help="S2 L2A patch rule: likewise for a patch with less valid pixels than "
                   "this fraction (default 0.95)")
    g.add_argument("--read-threads", type=int, default=None,
                   help="cubes (location x modality) read at once inside one task, each "
                   "reading its assets in turn (default: sized from the latency each task "
                   "measures on its first file, 8 on loopback, 24 at 100 ms per request)")
    g.add_argument("--provider", default=None,
                   help="provider profile to read with (asset keys, signing, offset rule, GDAL "
                   "options): planetary-computer, earth-search, local or one defined under the "
                   "config's 'providers:'. Default: the profile the scenes table recorded "
                   "(the one `ssl4eo search` used)")
    g.add_argument("--signer", default=None, metavar="MODULE:FUNCTION",
                   help="custom href signer for private buckets or other token services: the "
                   "import path of a function href -> signed href, imported on the workers "
                   "(credentials from their environment; a cache_clear() attribute, if any, "
                   "is called after HTTP 403 before signing again). Default: the provider's")
    g.add_argument("--retries", type=int, default=2,
                   help="Dask retries of a task that raised (default 2)")
    g.add_argument("--retry-failed", action="store_true",
                   help="also redo samples recorded as failed by an earlier run")
    g.add_argument("--overwrite", action="store_true",
                   help="delete an existing ssl4eo store at --store first (never anything else)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _build_settings(args: Any, cfg: Any) -> tuple[BuildOptions, dict[str, Any]]:
    """Build options: CLI flag > config file's ``build:`` section > defaults."""
    sect = dict((cfg.extra_sections or {}).get("build", {}) if cfg is not None else {})
    known = {f for f in BuildOptions.__dataclass_fields__}
    unknown = set(sect) - known - {"retries"}
    if unknown:
        raise UserError(f"unknown key(s) {sorted(unknown)} in the config's build section; "
                        f"known: {sorted(known | {'retries'})}")
    flags = {"shard_samples": args.shard_samples, "resampling": args.resampling,
             "convention": args.convention, "read_threads": args.read_threads,
             "provider": args.provider, "max_patch_cloud": args.max_patch_cloud,
             "min_valid": args.min_valid,
             "signer": args.signer}
    values = {k: v for k, v in sect.items() if k in known}
    values.update({k: v for k, v in flags.items() if v is not None})
    if "modalities" in values:
        values["modalities"] = tuple(values["modalities"])
    if values.get("shard_samples", 1) < 1:
        raise UserError("--shard-samples must be at least 1")
    client_options: dict[str, Any] = {
        "scheduler": args.scheduler, "cluster": args.cluster, "workers": args.workers,
        "threads": args.threads, "memory_limit": args.memory_limit,
    }
    if args.cluster == "kubernetes":
        client_options["cluster_options"] = {
            k: v for k, v in {"image": args.image, "namespace": args.namespace}.items() if v
        }
    return BuildOptions(**values), client_options


def _print_summary(out: Mapping[str, Any]) -> None:
    st = out["status"]
    print(f"store {out['store']}: {out['samples']} samples, {st.get('complete', 0)} complete, "
          f"{st.get('failed', 0)} failed, {st.get('pending', 0)} pending; "
          f"{out['stored_bytes'] / 1e6:.1f} MB ({out['bytes_per_sample'] / 1e6:.2f} MB/sample)")
    for m, g in out.get("groups", {}).items():
        print(f"  {m}: {g['scenes']} scenes, {g['missing_seasons']} seasons without a scene")
    for sample, reason in list(out.get("failures", {}).items())[:10]:
        print(f"  failed {sample}: {reason}")
    if len(out.get("failures", {})) > 10:
        print(f"  ... and {len(out['failures']) - 10} more failures (ssl4eo stats --json)")


def add_commands(subparsers: Any) -> None:
    """``ssl4eo build``, ``ssl4eo stats`` and ``ssl4eo run``."""
    from .config import add_config_arguments

    p = subparsers.add_parser(
        "build", help="build (or resume) the sharded Zarr store on Dask from a scenes table",
        description="Cut every location's seasonal S2/S1 cubes with stackstac and write them "
        "into one sharded Zarr v3 store, one Dask task per shard of locations. A re-run resumes: "
        "only shards with pending samples are done again.",
    )
    add_config_arguments(p)
    p.add_argument("--locations", "-l", required=True,
                   help="locations GeoParquet (ssl4eo sample): a path or an object-storage URL "
                   "(s3://, az://, gs://, https://)")
    p.add_argument("--scenes", "-s", required=True,
                   help="scenes Parquet (ssl4eo search): a path or a URL. With --scheduler or "
                   "--cluster kubernetes, whose workers may not see this machine's disk, local "
                   "tables are first copied beside the store (STORE.inputs/) and the tasks read "
                   "them there")
    p.add_argument("--store", required=True,
                   help="Zarr store to write: a local path (cube.zarr) or an object-storage URL "
                   "(s3://bucket/cube.zarr, az://container/cube.zarr; credentials from the "
                   "environment, e.g. AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL)")
    _add_cluster_arguments(p)
    _add_build_arguments(p)
    p.add_argument("--json", action="store_true", help="print the store summary as JSON")
    p.set_defaults(func=_cmd_build)

    s = subparsers.add_parser(
        "stats", help="completion, failures, size, band statistics and quality of a store",
        description="Summarise a store written by `ssl4eo build`: samples per status, failure "
        "reasons, stored bytes, per-band mean/std per modality (the loader's normalisation), "
        "and the quality table (patch cloud, candidates, empty bands, offset rules).",
    )
    s.add_argument("--store", required=True, help="Zarr store written by `ssl4eo build`")
    s.add_argument("--recompute", action="store_true",
                   help="recombine the band statistics from the shards and re-consolidate")
    s.add_argument("--plot", metavar="PNG", default=None,
                   help="also draw the band statistics (mean +- std per band) to this PNG")
    s.add_argument("--quality", metavar="CSV", default=None,
                   help="also write the quality table (a row per sample, season and modality: "
                   "chosen scene, candidates tried, patch cloud and valid fractions, all-empty "
                   "bands, offset rule) to this CSV (a path or an object-storage URL)")
    s.add_argument("--json", action="store_true", help="print everything as JSON")
    s.set_defaults(func=_cmd_stats)

    r = subparsers.add_parser(
        "run", help="sample, search, build and stats from one config, into one directory",
        description="The whole dataset pipeline: OUT/locations.parquet (sample), "
        "OUT/scenes.parquet (search), OUT/cube.zarr (build) and OUT/stats.json. Steps whose "
        "output exists are reused (--fresh redoes them); the build resumes.",
    )
    add_config_arguments(r)
    r.add_argument("--out", "-o", required=True,
                   help="output folder: a local path or an object-storage URL (s3://bucket/run, "
                   "az://container/run); the tables written there are what a re-run reuses, so "
                   "a Kubernetes job that is applied again resumes")
    r.add_argument("--store", default=None,
                   help="store path or object-storage URL (default OUT/cube.zarr)")
    r.add_argument("--stac-url", default=None, help="STAC API URL (default: the provider's)")
    r.add_argument("--num-locations", "-n", type=int, default=None, help="locations to draw")
    r.add_argument("--fresh", action="store_true",
                   help="redo sample and search even when their tables exist")
    _add_cluster_arguments(r)
    _add_build_arguments(r)
    r.set_defaults(func=_cmd_run)


def _cmd_build(args: Any) -> int:
    import json

    from .config import load_config

    cfg = load_config(args.preset, args.config) if (args.preset or args.config) else None
    options, client_options = _build_settings(args, cfg)
    out = run_build(args.locations, args.scenes, args.store, options=options,
                    client_options=client_options, retries=args.retries,
                    retry_failed=args.retry_failed, overwrite=args.overwrite,
                    config=cfg.to_dict() if cfg is not None else None,
                    progress=not args.no_progress)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        _print_summary(out)
    return 0 if out["status"].get("pending", 0) == 0 else 1


def _cmd_stats(args: Any) -> int:
    import json

    from . import store

    if args.recompute:
        store.finalize(args.store)
    out = store.summary(args.store)
    if args.plot:
        plot_band_stats(out["band_stats"], args.plot)
    if args.quality:
        from . import storage

        table = store.quality_table(args.store)
        if storage.is_remote(args.quality):
            import tempfile

            with tempfile.TemporaryDirectory(prefix="ssl4eo-quality-") as tmp:
                local = Path(tmp) / "quality.csv"
                table.to_csv(local, index=False)
                storage.upload_file(local, args.quality)
        else:
            table.to_csv(args.quality, index=False)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    _print_summary(out)
    for m, st in out["band_stats"].items():
        print(f"  {m} band statistics ({st.get('units', '')}):")
        for b, mu, sd in zip(st["bands"], st["mean"], st["std"], strict=True):
            print(f"    {b:>4}  mean {mu:10.2f}  std {sd:9.2f}")
    for m, q in out.get("quality", {}).items():
        print(f"  {m} quality ({q['seasons']} seasons with a scene):")
        if "patch_cloud_mean" in q:
            print(f"    patch cloud fraction: mean {q['patch_cloud_mean']:.4f}, "
                  f"90th percentile {q['patch_cloud_p90']:.4f}")
        if "valid_mean" in q:
            print(f"    valid fraction: mean {q['valid_mean']:.4f}")
        if "runner_up_taken" in q:
            print(f"    patch rule: runner-up kept in {q['runner_up_taken']} season(s), "
                  f"{q['candidates_tried_mean']:.2f} candidates judged per season")
        if "seasons_with_empty_band" in q:
            print(f"    seasons with an all-empty band: {q['seasons_with_empty_band']}")
        if q.get("offset_rules"):
            print("    offset rules: " + ", ".join(f"{k} {v}" for k, v in
                                                   q["offset_rules"].items()))
    if args.quality:
        print(f"quality table: {args.quality}")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def plot_band_stats(stats: Mapping[str, Any], path: str | Path) -> Path:
    """Bar charts of the per-band mean +- std of each modality, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods = [m for m in stats if stats[m].get("bands")]
    if not mods:
        raise StoreError("the store has no band statistics yet; finish the build first")
    fig, axes = plt.subplots(1, len(mods), figsize=(5 + 3 * len(mods), 3.6), squeeze=False)
    for ax, m in zip(axes[0], mods, strict=True):
        st = stats[m]
        x = np.arange(len(st["bands"]))
        ax.bar(x, st["mean"], yerr=st["std"], color="#4c72b0", capsize=3)
        ax.set_xticks(x, st["bands"], rotation=45)
        ax.set_title(f"{m}: band mean +- std")
        ax.set_ylabel(st.get("units", ""))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cmd_run(args: Any) -> int:
    from . import sampling, search, storage
    from .config import load_config

    cfg = load_config(args.preset, args.config, {
        "sampling": {"num_locations": args.num_locations},
        "search": {"stac_url": args.stac_url, "provider": args.provider},
    })
    out = str(args.out)
    if not storage.is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    locs_path = storage.join(out, "locations.parquet")
    scenes_path = storage.join(out, "scenes.parquet")
    store_path = args.store or storage.join(out, "cube.zarr")
    shown = storage.redact(out)
    progress = not args.no_progress
    if args.fresh or not storage.exists(locs_path):
        t0 = time.perf_counter()
        gdf = sampling.sample(cfg.sampling, progress=progress)
        sampling.write_locations(gdf, locs_path, cfg, {"seconds": round(time.perf_counter() - t0, 3)})
        print(f"[sample] {len(gdf)} locations -> {storage.redact(locs_path)}", flush=True)
    else:
        print(f"[sample] reusing {storage.redact(locs_path)} (--fresh to redraw)", flush=True)
    if args.fresh or not storage.exists(scenes_path):
        info = search.search_locations(locs_path, scenes_path, cfg, progress=progress)
        print(f"[search] {info.get('requests', '?')} requests -> {storage.redact(scenes_path)}",
              flush=True)
    else:
        print(f"[search] reusing {storage.redact(scenes_path)} (--fresh to search again)",
              flush=True)
    options, client_options = _build_settings(args, cfg)
    summary = run_build(locs_path, scenes_path, store_path, options=options,
                        client_options=client_options, retries=args.retries,
                        retry_failed=args.retry_failed, overwrite=args.overwrite,
                        config=cfg.to_dict(), progress=progress)
    _write_outputs(out, summary)
    _print_summary(summary)
    print(f"[stats] {storage.join(shown, 'stats.json')}")
    return 0 if summary["status"].get("pending", 0) == 0 else 1


def _write_outputs(out: str, summary: Mapping[str, Any]) -> None:
    """``stats.json`` and ``band_stats.png`` into the run folder (a path or a URL)."""
    import json
    import tempfile

    from . import storage

    with tempfile.TemporaryDirectory(prefix="ssl4eo-run-") as tmp:
        files = [Path(tmp) / "stats.json"]
        files[0].write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if summary["band_stats"]:
            files.append(plot_band_stats(summary["band_stats"], Path(tmp) / "band_stats.png"))
        for f in files:
            storage.upload_file(f, storage.join(out, f.name))
