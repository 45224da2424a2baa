"""Reliability under injected faults: what a build meets, retries, loses, and whether it ends
where a fault-free build does.

Serves the test catalog itself (``pipeline.demo.catalog.build_catalog(profile="test")`` into a
temporary directory, ``pipeline.demo.serve.served_catalog``), samples and searches like
the tests' ``demo_tables`` (10 locations around the demo cities), then, with every asset read
through :class:`pipeline.faults.FaultProxy` in front of the asset server:

1. ``clean``: a build through the proxy with no faults (the reference store, and the number of
   requests a fault-free build makes);
2. ``faulty``: a build through the proxy injecting faults into ``--rate`` of the requests, of
   every kind (HTTP 500, 503, 429 with Retry-After, stalls past GDAL's read timeout, connection
   resets, truncated bodies), plus one asset that fails on every request for the whole run (a
   fault that does not clear): the samples that read it are recorded as failed;
3. ``retry_failed``: the faults cleared, the same build again with ``retry_failed=True`` (what
   ``ssl4eo build --retry-failed`` does): only the failed samples' shards are redone.

Prints one JSON object: faults injected by kind, the extra requests the retries made
(``retries``: requests of the faulty run minus those of the clean run), samples failed after the
faulty run (with their reasons), ``samples_lost`` (samples not complete at the end: must be 0),
and ``store_equals_clean`` (every variable of every group, and status / failure, equal)::

    python benchmarks/faults.py                  # rate 0.2, seed 11, 2 worker processes
    python benchmarks/faults.py --rate 0.3 --stall-s 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: the sampling of the tests' demo_tables (tests/conftest.py TEST_SAMPLING)
SAMPLING = {"num_locations": 10, "sigma_km": 1.2, "clip_km": 2.4, "seed": 3}


def _proxied_scenes(scenes: Path, old: str, new: str, out: Path) -> Path:
    """A copy of the scenes table whose hrefs point at the proxy (table metadata kept)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(scenes)
    df = table.to_pandas()
    df["item_json"] = df["item_json"].str.replace(old, new, regex=False)
    copy = pa.Table.from_pandas(df, schema=table.schema, preserve_index=False)
    pq.write_table(copy.replace_schema_metadata(table.schema.metadata), out)
    return out


def _permanent_fault(scenes: Path) -> tuple[str, list[str]]:
    """The URL path of one S2 asset (B04 of the last chosen S2 scene) and the samples using it."""
    import pandas as pd

    df = pd.read_parquet(scenes)
    ok = df[(df["status"] == "ok") & (df["modality"] == "S2L2A")]
    row = ok.iloc[-1]
    href = json.loads(row["item_json"])["assets"]["B04"]["href"]
    users = sorted(ok.loc[ok["item_id"] == row["item_id"], "sample"].astype(str))
    return urllib.parse.urlsplit(href).path, users


def _compare(a: Path, b: Path) -> list[str]:
    """Names of the variables that differ between two stores (empty: equal)."""
    import numpy as np
    import xarray as xr

    diff = []
    ra, rb = xr.open_zarr(a, consolidated=False), xr.open_zarr(b, consolidated=False)
    for name in ("sample", "status", "failure"):
        if not np.array_equal(ra[name].values, rb[name].values):
            diff.append(name)
    for group in ra.attrs.get("ssl4eo:modalities", []):
        ga = xr.open_zarr(a, group=group, consolidated=False)
        gb = xr.open_zarr(b, group=group, consolidated=False)
        for name in sorted(set(ga.data_vars) | set(gb.data_vars)):
            if name not in ga or name not in gb:
                diff.append(f"{group}/{name}")
                continue
            va, vb = ga[name].values, gb[name].values
            try:  # NaN == NaN and NaT == NaT here, as in the tests' assert_same_store
                assert va.dtype == vb.dtype
                np.testing.assert_array_equal(va, vb)
            except AssertionError:
                diff.append(f"{group}/{name}")
    return diff


def _build(locations: Path, scenes: Path, store: Path, workers: int, **kw) -> dict:
    from pipeline.runner import BuildOptions, run_build

    t0 = time.perf_counter()
    out = run_build(locations, scenes, store, options=BuildOptions(provider="local",
                                                                   shard_samples=2),
                    client_options={"workers": workers, "threads": 1}, progress=False, **kw)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=0.2, help="share of requests that meet a fault")
    ap.add_argument("--seed", type=int, default=11, help="seed of the fault draws")
    ap.add_argument("--stall-s", type=float, default=3.0,
                    help="how long a 'timeout' fault stalls before closing the connection")
    ap.add_argument("--workers", type=int, default=2, help="Dask worker processes")
    ap.add_argument("--catalog", type=Path, default=None,
                    help="an existing embedded catalog (default: build the test profile)")
    args = ap.parse_args(argv)

    from pipeline.demo.serve import sample_and_search, served_catalog
    from pipeline.faults import FAULT_KINDS, FaultProxy

    with tempfile.TemporaryDirectory(prefix="ssl4eo-faults-") as tmp_name:
        tmp = Path(tmp_name)
        with served_catalog(tmp, args.catalog, profile="test") as served:
            tables = sample_and_search(served.stac_url, tmp, SAMPLING)
            locations, scenes = tables["locations"], tables["scenes"]

            with FaultProxy(served.asset_url) as proxy:
                clean_scenes = _proxied_scenes(scenes, served.asset_url, proxy.url,
                                               tmp / "scenes-clean.parquet")
                clean = _build(locations, clean_scenes, tmp / "clean.zarr", args.workers)
                clean_requests = proxy.stats.get("requests", 0)

            with FaultProxy(served.asset_url, rate=args.rate, kinds=FAULT_KINDS,
                            timeout_s=args.stall_s, retry_after_s=1, seed=args.seed) as proxy:
                faulty_scenes = _proxied_scenes(scenes, served.asset_url, proxy.url,
                                                tmp / "scenes-faulty.parquet")
                dead, users = _permanent_fault(faulty_scenes)
                proxy.fail_always(dead)
                store = tmp / "faulty.zarr"
                first = _build(locations, faulty_scenes, store, args.workers)
                stats = proxy.stats
                proxy.clear()
                again = _build(locations, faulty_scenes, store, args.workers,
                               retry_failed=True)
                retry_requests = proxy.stats.get("requests", 0) - stats.get("requests", 0)
            diff = _compare(store, tmp / "clean.zarr")

    faults = {k.split(":", 1)[1]: v for k, v in sorted(stats.items()) if k.startswith("fault:")}
    result = {
        "locations": clean["samples"],
        "rate": args.rate,
        "kinds": list(FAULT_KINDS),
        "seed": args.seed,
        "requests_clean": clean_requests,
        "requests_faulty": stats.get("requests", 0),
        "faults_injected": faults,  # the permanent fault's 503s are counted under "503"
        "faults_total": sum(faults.values()),
        "permanent_fault": {"asset": dead, "samples": users},
        "retries": stats.get("requests", 0) - clean_requests,
        "faulty_run": {"seconds": first["seconds"], "status": first["status"],
                       "failures": first["failures"]},
        "retry_failed_run": {"seconds": again["seconds"], "shards_run": again["shards_run"],
                             "requests": retry_requests, "status": again["status"]},
        "clean_run": {"seconds": clean["seconds"], "status": clean["status"]},
        "failed_only_where_the_fault_never_cleared":
            sorted(first["failures"]) == sorted(users),
        "samples_lost": clean["samples"] - again["status"].get("complete", 0),
        "store_equals_clean": not diff,
        "differing_variables": diff,
    }
    print(json.dumps(result, indent=2))
    return 0 if result["samples_lost"] == 0 and not diff else 1


if __name__ == "__main__":
    sys.exit(main())
