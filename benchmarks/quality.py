"""Patch-level cloud choice against the scene-level rule, on the demo catalog.

Serves the embedded catalog (profile ``demo``, synthetic scenes whose clouds show in SCL, as
``make demo`` builds it), samples and searches with the demo config (up to
``seasons.candidates`` S2 scenes per location and season, all under the scene-level cloud
limit), then, for each scene-level choice (the paper's ``most_recent``, the demo's ``least_cloudy``),
builds the same tables twice:

* ``scene_rule``: the paper's rule alone (``max_patch_cloud=1, min_valid=0``: the rule's
  scene is kept whatever its patch looks like);
* ``patch_rule``: the default patch rule (``max_patch_cloud=0.05, min_valid=0.95``).

Prints one JSON object with the S2 L2A patches' mean cloud fraction under each rule
(``patch_cloud_fraction``), their cloudy-or-invalid fraction, the seasons where a runner-up
was kept, and what the patch rule cost: ``extra_reads_per_patch`` (asset reads beyond the
scene rule's, per S2 patch: one SCL per runner-up judged, plus the winner's 13 assets) and the
asset server's extra HTTP requests per patch::

    python benchmarks/quality.py                     # 25 locations, the demo's sampling
    python benchmarks/quality.py --num-locations 40
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _build(tables: dict, store: Path, served, **rule) -> dict:  # noqa: ANN001
    from pipeline import store as zstore
    from pipeline.runner import BuildOptions, run_build

    before = served.asset_stats()
    t = time.perf_counter()
    run_build(tables["locations"], tables["scenes"], store,
              options=BuildOptions(shard_samples=8, **rule),
              client_options={"workers": 1, "threads": 2}, progress=False, overwrite=True)
    secs = time.perf_counter() - t
    after = served.asset_stats()
    q = zstore.quality_table(store)
    return {"q": q[q["modality"] == "S2L2A"].reset_index(drop=True), "seconds": secs,
            "requests": after["requests"] - before["requests"],
            "bytes": after["bytes"] - before["bytes"]}


def _search(stac_url: str, out: Path, num_locations: int, choice: str) -> dict:
    from pipeline.config import load_config
    from pipeline.sampling import sample, write_locations
    from pipeline.search import search_locations

    cfg = load_config("demo", overrides={"sampling": {"num_locations": num_locations},
                                         "seasons": {"choice": choice},
                                         "search": {"stac_url": stac_url}})
    out.mkdir(parents=True, exist_ok=True)
    locations = write_locations(sample(cfg.sampling, progress=False),
                                out / "locations.parquet", cfg)
    search_locations(locations, out / "scenes.parquet", cfg, progress=False)
    return {"locations": locations, "scenes": out / "scenes.parquet"}


def _compare(scene: dict, patch: dict) -> dict:
    from pipeline import layout

    s, p = scene["q"], patch["q"]
    assert list(s["sample"]) == list(p["sample"]) and list(s["season"]) == list(p["season"])
    n = len(p)
    runner_ups = int((p["candidate_rank"] > 0).sum())
    scl_reads = int((p["candidates_tried"] - 1).clip(lower=0).sum())
    full_reads = runner_ups * (len(layout.BANDS[layout.S2L2A]) + 1)

    def both(f) -> dict:  # noqa: ANN001
        return {"scene_rule": round(float(f(s)), 5), "patch_rule": round(float(f(p)), 5)}

    return {
        "s2_patches": n,
        "patch_cloud_fraction": both(lambda q: q["patch_cloud_fraction"].mean()),
        "patch_cloud_p90": both(lambda q: q["patch_cloud_fraction"].quantile(0.9)),
        "cloudy_or_invalid_fraction": both(
            lambda q: (q["patch_cloud_fraction"] + 1 - q["valid_fraction"]).mean()),
        "patches_over_5pct_cloud": both(lambda q: (q["patch_cloud_fraction"] > 0.05).sum()),
        "patches_judged_further": int((p["candidates_tried"] > 1).sum()),
        "runner_up_kept": runner_ups,
        "extra_reads_per_patch": round((scl_reads + full_reads) / max(n, 1), 4),
        "extra_scl_reads": scl_reads,
        "extra_full_reads": runner_ups,
        "extra_http_requests_per_patch": round(
            (patch["requests"] - scene["requests"]) / max(n, 1), 3),
        "bytes_ratio": round(patch["bytes"] / max(scene["bytes"], 1), 4),
        "build_seconds_ratio": round(patch["seconds"] / max(scene["seconds"], 1e-9), 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-locations", type=int, default=25,
                    help="locations to sample around the demo cities (default 25, the demo's)")
    ap.add_argument("--catalog", type=Path, default=None,
                    help="an embedded catalog directory to serve (default: build the demo one)")
    ap.add_argument("--choice", nargs="+", default=["most_recent", "least_cloudy"],
                    choices=("most_recent", "least_cloudy"),
                    help="scene-level rules to compare against (default both: the paper's "
                    "most_recent and the demo's least_cloudy)")
    args = ap.parse_args(argv)

    from pipeline.demo.serve import served_catalog

    results = {}
    with tempfile.TemporaryDirectory(prefix="ssl4eo-bench-quality-") as tmp:
        tmp = Path(tmp)
        with served_catalog(tmp, args.catalog, profile="demo") as served:
            for choice in args.choice:
                tables = _search(served.stac_url, tmp / choice, args.num_locations, choice)
                scene = _build(tables, tmp / choice / "scene.zarr", served,
                               max_patch_cloud=1.0, min_valid=0.0)
                patch = _build(tables, tmp / choice / "patch.zarr", served)
                results[choice] = _compare(scene, patch)
    first = results[args.choice[0]]
    out = {
        "benchmark": "quality",
        # the headline figures: the first rule compared (default: the paper's most_recent)
        "patch_cloud_fraction": first["patch_cloud_fraction"],
        "extra_reads_per_patch": first["extra_reads_per_patch"],
        "by_scene_rule": results,
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
