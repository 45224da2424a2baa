"""A build whose workers cannot see the submitter's files, against the same build on a
LocalCluster.

Serves the test catalog (``pipeline.demo.catalog.build_catalog(profile="test")`` into a
temporary folder), samples and searches like the tests' ``demo_tables`` (10 locations), then:

1. ``local``: ``run_build`` on a LocalCluster of ``--workers`` processes, store on local disk;
2. ``remote``: ``run_build`` with ``--scheduler`` semantics against a ``dask scheduler`` and
   ``--workers`` ``dask worker`` processes each in its own mount namespace, in which the whole
   temporary folder (tables, catalog files, the local store) is covered by an empty tmpfs
   (:class:`pipeline.demo.isolated.IsolatedCluster`); the store and the published tables in a
   loopback S3 server (moto). ``--kill-worker`` kills one worker (SIGKILL, nanny included) once
   a shard is written and a task runs on it.

Prints one JSON object: ``identical_to_local`` (every chunk and shard object of the two stores
equal; only the root ``zarr.json`` with its provenance may differ), ``samples_lost`` (samples
not complete at the end of the remote build), ``workers_shared_disk`` (asked on every worker:
does it see the submitter's tables?), and the wall seconds of both builds with their ratio::

    python benchmarks/multimachine.py                 # 2 workers each
    python benchmarks/multimachine.py --kill-worker   # one worker dies mid-run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: the sampling of the tests' demo_tables (tests/conftest.py TEST_SAMPLING)
SAMPLING = {"num_locations": 10, "sigma_km": 1.2, "clip_km": 2.4, "seed": 3}
BUCKET = "ssl4eo-bench"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="worker processes of each cluster")
    ap.add_argument("--shard-samples", type=int, default=2, help="samples per shard (task)")
    ap.add_argument("--kill-worker", action="store_true",
                    help="kill one isolated worker mid-run (SIGKILL, nanny included)")
    ap.add_argument("--catalog", type=Path, default=None,
                    help="an existing embedded catalog (default: build the test profile)")
    args = ap.parse_args(argv)

    from pipeline import layout, storage
    from pipeline.demo.isolated import IsolatedCluster, differing_objects, s3_server
    from pipeline.demo.serve import sample_and_search, served_catalog
    from pipeline.runner import BuildOptions, run_build

    opts = BuildOptions(provider="local", shard_samples=args.shard_samples)
    with tempfile.TemporaryDirectory(prefix="ssl4eo-multi-") as tmp_name:
        tmp = Path(tmp_name)
        with served_catalog(tmp, args.catalog, profile="test") as served:
            tables = sample_and_search(served.stac_url, tmp, SAMPLING)
            t0 = time.perf_counter()
            run_build(tables["locations"], tables["scenes"], tmp / "local.zarr", options=opts,
                      client_options={"workers": args.workers, "threads": 1}, progress=False)
            local_s = time.perf_counter() - t0

            with s3_server(BUCKET), IsolatedCluster(args.workers, hidden=[tmp]) as cluster:
                seen = cluster.workers_see(tables["locations"])
                store = f"s3://{BUCKET}/cube.zarr"
                report: dict = {}
                stop = threading.Event()
                killer = None
                if args.kill_worker:  # once a shard is written and a task runs on worker-1
                    killer = threading.Thread(target=lambda: report.update(
                        cluster.kill_worker_mid_run(1, until=stop.is_set) or {}))
                    killer.start()
                t0 = time.perf_counter()
                try:
                    summary = run_build(tables["locations"], tables["scenes"], store,
                                        options=opts, client_options={"scheduler":
                                                                      cluster.address},
                                        progress=False)
                finally:
                    stop.set()
                    if killer is not None:
                        killer.join(60)
                remote_s = time.perf_counter() - t0
                differ = differing_objects(store, tmp / "local.zarr")
                published = [k for k in storage.filesystem(f"s3://{BUCKET}")[0].find(BUCKET)
                             if ".inputs/" in k]

    complete = summary["status"].get("complete", 0)
    result = {
        "locations": summary["samples"],
        "workers": args.workers,
        "shards": -(-summary["samples"] // args.shard_samples),
        "workers_shared_disk": any(seen.values()),
        "identical_to_local": differ in ([], ["zarr.json"]),
        "differing_objects": [k for k in differ if k != "zarr.json"],
        "samples_lost": summary["samples"] - complete,
        "status": summary["status"],
        "worker_killed": report or None,
        "published_tables": published,
        "wall_seconds": {"local_cluster": round(local_s, 2),
                         "isolated_workers_s3": round(remote_s, 2)},
        "wall_ratio_isolated_to_local": round(remote_s / local_s, 3),
        "status_codes": {v: k for k, v in layout.STATUS_CODES.items()},
    }
    print(json.dumps(result, indent=2))
    ok = (result["identical_to_local"] and result["samples_lost"] == 0
          and (bool(report) or not args.kill_worker))
    return 0 if ok and not result["workers_shared_disk"] else 1


if __name__ == "__main__":
    sys.exit(main())
