"""Build speed at network latency, and the HTTP requests a patch costs.

The patches of ``benchmarks/build.py`` (every chosen (location, season, modality) scene of the
demo locations, every band plus SCL, warped onto the location's 10 m UTM grid), read from the
COG server through :class:`pipeline.faults.FaultProxy` with no faults and ``latency_s`` only:
every request waits that long before it is forwarded (the proxy serves requests concurrently,
one thread each, so waits overlap as they would on object storage). At each latency, two
methods in turn, each in its own process (``benchmarks/build.py``'s children):

* ``pipeline``: ``ssl4eo build`` on one single-threaded Dask worker, writing the store;
* ``rasterio``: the direct loop, ``rasterio.open`` + ``WarpedVRT.read`` per asset, on as many
  threads as the pipeline has read threads (no store written);
* ``async_tiff``: an async COG reader beside GDAL's (``benchmarks/async_cog.py``: async-tiff
  + obstore fetch and decode the tiles each patch touches, every asset at once up to 4 per
  read thread, then the same ``WarpedVRT`` warp from memory; pixel-identical to the rasterio
  loop, ``python benchmarks/async_cog.py --check``; no store written).

Printed per method and latency: wall patches/s per core (the pipeline's build alone, not the
cluster's start; divided by the machine's cores, which both methods' read threads use),
CPU seconds, HTTP requests and bytes per patch as the COG server counted them, the most
requests in flight at once (waiting at the proxy; none at 0 ms, where nothing waits), and the
wall throughput's ratio to zero latency. ``min_requests_per_patch`` is computed from the
COGs themselves: per asset, one header read plus one request per internal tile the patch's
window touches (a one-pixel margin for bilinear resampling).

    python benchmarks/latency.py                                  # 0, 20 and 100 ms
    python benchmarks/latency.py --latencies-ms 0 50 --read-threads 8 32
    python benchmarks/latency.py --methods pipeline --latencies-ms 0 20   # an A/B round
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _run_child import run_child  # noqa: E402 - benchmarks/, beside this script
from faults import _proxied_scenes  # noqa: E402 - benchmarks/faults.py: hrefs to the proxy

BUILD = str(Path(__file__).resolve().parent / "build.py")
METHODS = ("pipeline", "rasterio", "async_tiff")


def min_requests(scenes: Path, locations: Path) -> tuple[int, int, int]:
    """``(patches, per_file, shared)``: the fewest HTTP requests that read every patch, from
    the COGs' tile layout. ``per_file``: per asset of a patch, one request for its header and
    one per internal tile the window touches (a one-pixel margin for bilinear resampling);
    ``shared``: the same with each file's header read once however many patches use it."""
    import rasterio
    from build import _assets, _work  # benchmarks/build.py
    from rasterio.warp import transform_bounds
    from rasterio.windows import from_bounds

    from pipeline.cube import GDAL_HTTP_ENV, Grid

    patches = tiles = headers = 0
    files: set[str] = set()
    with rasterio.Env(**GDAL_HTTP_ENV):
        for loc, m, items in _work(scenes, locations):
            grid = Grid.from_location(loc)
            for it in items:
                patches += 1
                for key in _assets(m):
                    href = it["assets"][key]["href"]
                    with rasterio.open(href) as src:
                        b = transform_bounds(f"EPSG:{grid.epsg}", src.crs, *grid.bounds)
                        w = from_bounds(*b, transform=src.transform)
                        bh, bw = src.block_shapes[0]
                        r0 = max(0, math.floor(w.row_off) - 1)
                        c0 = max(0, math.floor(w.col_off) - 1)
                        r1 = min(src.height, math.ceil(w.row_off + w.height) + 1)
                        c1 = min(src.width, math.ceil(w.col_off + w.width) + 1)
                        tiles += ((r1 - 1) // bh - r0 // bh + 1) * ((c1 - 1) // bw - c0 // bw + 1)
                    headers += 1
                    files.add(href)
    return patches, headers + tiles, len(files) + tiles


def _measure(mode: str, scenes: Path, locations: Path, threads: int, store: Path,
             shard_samples: int) -> dict:
    args = ["--mode", mode, "--scenes", str(scenes), "--locations", str(locations),
            "--threads", str(threads), "--store", str(store),
            "--shard-samples", str(shard_samples)]
    return run_child(BUILD, args, mode, env={**os.environ, "OMP_NUM_THREADS": "1"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalog", type=Path, default=None,
                    help="an embedded catalog to serve (default: build the demo one in a "
                    "temporary folder)")
    ap.add_argument("--num-locations", type=int, default=20,
                    help="demo locations to cut (default 20: about 160 patches)")
    ap.add_argument("--shard-samples", type=int, default=64,
                    help="samples per shard task of the pipeline (default 64, the build's "
                    "own: a task reads its shard's cubes concurrently, so small shards leave "
                    "fewer reads to overlap)")
    ap.add_argument("--latencies-ms", type=float, nargs="+", default=[0, 20, 100],
                    help="per-request latencies to measure, ms (default: 0 20 100)")
    ap.add_argument("--read-threads", type=int, nargs="+", default=[0],
                    help="read threads to run each method with; 0 (the default): the build's "
                    "own choice, sized from the latency each task measures "
                    "(pipeline.cube.auto_read_threads), and as many threads for the rasterio "
                    "loop at the proxy's latency; several values print one block each")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                    help="methods to measure (default: all three; the summary's comparison "
                    "with the rasterio loop needs rasterio)")
    args = ap.parse_args(argv)

    from pipeline.cube import auto_read_threads
    from pipeline.demo.serve import sample_and_search, served_catalog
    from pipeline.faults import FaultProxy

    threads_list = args.read_threads
    # both methods use every core (GDAL's warps release the GIL in the read threads): wall
    # throughput per core divides by the machine's cores
    cores = os.cpu_count() or 1
    result: dict = {"benchmark": "latency", "locations": args.num_locations,
                    "cores": os.cpu_count(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="ssl4eo-bench-latency-") as tmp:
        tmp = Path(tmp)
        with served_catalog(tmp, args.catalog, profile="demo") as served:
            tables = sample_and_search(served.stac_url, tmp, {"num_locations": args.num_locations})
            patches, per_file, shared = min_requests(tables["scenes"], tables["locations"])
            result["patches"] = patches
            result["shard_samples"] = args.shard_samples
            result["min_requests_per_patch"] = round(shared / patches, 2)
            result["min_requests_per_patch_headers_per_patch"] = round(per_file / patches, 2)
            for threads in threads_list:
                block: dict = {}
                for ms in args.latencies_ms:
                    with FaultProxy(served.asset_url, latency_s=ms / 1000) as proxy:
                        scenes = _proxied_scenes(tables["scenes"], served.asset_url, proxy.url,
                                                 tmp / f"scenes-{ms:g}.parquet")
                        for mode in args.methods:
                            n = threads
                            if mode != "pipeline" and not threads:
                                n = auto_read_threads(ms / 1000)
                            before = served.asset_stats()
                            proxy.reset_max_waiting()
                            r = _measure(mode, scenes, tables["locations"], n, tmp / "cube.zarr",
                                         args.shard_samples)
                            after = served.asset_stats()
                            pipe = mode == "pipeline"
                            cpu = r["worker_cpu_s"] if pipe else r["cpu_s"]
                            # the build's own wall time (not the cluster's start)
                            wall = r["build_wall_s"] if pipe else r["seconds"]
                            block.setdefault(mode, {})[f"{ms:g}ms"] = {
                                "wall_s": round(wall, 2),
                                "patches_per_s_per_core": round(patches / wall / cores, 2),
                                "cpu_s": round(cpu, 2),
                                "read_threads": n or "auto",
                                "requests_per_patch": round(
                                    (after["requests"] - before["requests"]) / patches, 2),
                                "bytes_per_patch": round(
                                    (after["bytes"] - before["bytes"]) / patches),
                                "max_requests_in_flight": proxy.stats.get("max_waiting", 0),
                            }
                for rows in block.values():
                    zero = rows.get("0ms")
                    for row in rows.values():
                        if zero:
                            row["ratio_to_0ms"] = round(row["patches_per_s_per_core"]
                                                        / zero["patches_per_s_per_core"], 3)
                result["runs"][f"read_threads_{threads or 'auto'}"] = block
    # the summary, for the first --read-threads value
    first = result["runs"][f"read_threads_{threads_list[0] or 'auto'}"]
    for mode in args.methods:
        rows = first[mode]
        summary = {f"ratio_{k}": v.get("ratio_to_0ms") for k, v in rows.items() if k != "0ms"}
        summary["requests_per_patch"] = rows[next(iter(rows))]["requests_per_patch"]
        summary["min_requests_per_patch"] = result["min_requests_per_patch"]
        summary["ahead_of_rasterio_at_every_latency"] = None
        result[mode] = summary
    for mode in args.methods:
        if mode == "rasterio" or "rasterio" not in first:
            del result[mode]["ahead_of_rasterio_at_every_latency"]
            continue
        result[mode]["ahead_of_rasterio_at_every_latency"] = all(
            first[mode][k]["patches_per_s_per_core"]
            > first["rasterio"][k]["patches_per_s_per_core"] for k in first[mode])
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
