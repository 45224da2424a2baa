"""Sampling speed: ``ssl4eo sample``'s code for 250,000 locations on one core.

Uses the ``ssl4eo-s12`` preset (the 10,000 most populous cities, sigma 50 km, exact
non-overlap of the 2.64 km UTM boxes) unless flags say otherwise, pins the process to one CPU
and one thread per numerical library, and prints one JSON object::

    python benchmarks/sample.py                       # 250,000 locations
    python benchmarks/sample.py --num-locations 20000 --out /tmp/loc.parquet

``seconds`` covers everything ``ssl4eo sample`` does before writing (city list, drawing,
geodesic offsets, UTM boxes, R-tree and exact overlap checks); ``write_seconds`` the GeoParquet
write when ``--out`` is given.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "NUMEXPR_NUM_THREADS", "GDAL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="ssl4eo-s12", help="settings to start from")
    ap.add_argument("--num-locations", type=int, default=None,
                    help="locations to draw (default: the preset's, 250,000 for ssl4eo-s12)")
    ap.add_argument("--num-cities", type=int, default=None, help="most populous cities to use")
    ap.add_argument("--sigma-km", type=float, default=None, help="Gaussian sigma in km")
    ap.add_argument("--clip-km", type=float, default=None, help="truncate offsets beyond this")
    ap.add_argument("--seed", type=int, default=None, help="random seed")
    ap.add_argument("--cpu", type=int, default=None,
                    help="CPU to pin to (default: the first one this process may use)")
    ap.add_argument("--out", default=None, help="also write the GeoParquet table here")
    args = ap.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[0] if args.cpu is None else args.cpu
    os.sched_setaffinity(0, {cpu})

    import numpy as np

    from pipeline.config import load_config
    from pipeline.sampling import sample, write_locations

    cfg = load_config(args.preset, overrides={"sampling": {
        "num_locations": args.num_locations, "num_cities": args.num_cities,
        "sigma_km": args.sigma_km, "clip_km": args.clip_km, "seed": args.seed,
    }})
    s = cfg.sampling
    t0 = time.perf_counter()
    c0 = time.process_time()
    gdf = sample(s, progress=False)
    secs = time.perf_counter() - t0
    cpu_secs = time.process_time() - c0
    out = {
        "benchmark": "sample",
        "preset": cfg.preset,
        "num_locations": len(gdf),
        "num_cities": s.num_cities,
        "cities": s.cities,
        "sigma_km": s.sigma_km,
        "clip_km": s.clip_km,
        "seed": s.seed,
        "seconds": round(secs, 2),
        "cpu_seconds": round(cpu_secs, 2),
        "locations_per_s": round(len(gdf) / secs, 1),
        "utm_zones": int(gdf["epsg"].nunique()),
        "seed_cities_used": int(gdf["city"].nunique()),
        "pinned_cpu": cpu,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
    }
    if args.out:
        t1 = time.perf_counter()
        write_locations(gdf, args.out, cfg, {"seconds": round(secs, 3)})
        out["write_seconds"] = round(time.perf_counter() - t1, 2)
        out["out"] = str(args.out)
        out["file_mib"] = round(Path(args.out).stat().st_size / 2**20, 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
