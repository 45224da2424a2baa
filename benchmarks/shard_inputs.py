"""What one shard task reads from the scenes table, as the number of locations grows.

A build task needs the scenes-table rows of its own 64 locations (512 rows, a few MB of item
JSON), but the table holds every location's: about 8 kB of STAC item JSON per row, so some
16 GB at SSL4EO-S12's 251,079 locations. ``ssl4eo search`` writes it sorted by sample in row
groups of ``pipeline.layout.SCENES_ROW_GROUP`` rows and a task reads only the groups that
hold its samples (``pipeline.runner.read_shard_scenes``). This compares that with the layout
pyarrow writes by default (row groups of 1 Mi rows) read with a pushed-down filter, as the
build did before: per task, the seconds and the peak memory of reading one shard's rows.

The table is made of real Planetary Computer items (``../shared/data/stac``) when they are
there, else of synthetic items of the same size; every row gets the item of its modality.
Each read runs in its own process, so its peak memory (``VmHWM``; ``rss_before_read_mb`` is
what the imports took before the read) is its own. Prints one JSON object::

    python benchmarks/shard_inputs.py                    # 10,000 locations (80,000 rows)
    python benchmarks/shard_inputs.py --locations 100000
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _run_child import print_result, run_child  # noqa: E402 - benchmarks/, beside this script

SHARED_STAC = REPO.parent / "shared" / "data" / "stac"


def _items() -> dict[str, str]:
    """One item JSON per modality: real ones from ../shared when there, else padded stand-ins."""
    names = {"S2L2A": "sentinel-2-l2a_S2A_MSIL2A_20190101T000001_R116_T58UFE_20201007T214651.json",
             "S1RTC": "sentinel-1-rtc_S1A_IW_GRDH_1SDV_20240419T045839_20240419T045904_053498"
                      "_067DF2_rtc.json"}
    out = {}
    for modality, name in names.items():
        path = SHARED_STAC / name
        if path.exists():
            out[modality] = json.dumps(json.loads(path.read_text()), separators=(",", ":"))
        else:  # the real items' sizes: about 11.6 kB (S2 L2A) and 4.8 kB (S1 RTC)
            size = 11600 if modality == "S2L2A" else 4800
            out[modality] = json.dumps({"id": modality, "pad": "x" * size})
    return out


def make_tables(n_locations: int, folder: Path) -> dict:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import layout, search

    items = _items()
    samples = [f"{i:07d}" for i in range(n_locations)]
    rows = len(samples) * 8
    df = pd.DataFrame({
        "sample": [s for s in samples for _ in range(8)],
        "season": [k // 2 for _ in samples for k in range(8)],
        "modality": ["S1RTC", "S2L2A"] * (rows // 2),
        "window_start": "2021-03-01", "window_end": "2021-06-01", "status": "ok", "reason": "",
        "collection": "", "item_id": "", "datetime": "2021-04-01T10:00:00",
        "cloud_cover": 0.0, "item_json": "",
    })
    df["collection"] = df["modality"].map({"S1RTC": "sentinel-1-rtc", "S2L2A": "sentinel-2-l2a"})
    df = search.scenes_frame(df.to_dict("records"))  # the search's dtypes and order
    # one item per row, each its own text (as ids, dates, footprints and hrefs differ), so that
    # Parquet's dictionary encoding does not fold the column into one value
    df["item_json"] = [items[m].replace('"id":', f'"row":"{s}-{k}","id":', 1)
                       for k, (s, m) in enumerate(zip(df["sample"], df["modality"]))]
    grouped = search.write_scenes(df, folder / "grouped.parquet", {}, {"provider": "benchmark"})
    default = folder / "default.parquet"
    pq.write_table(pa.Table.from_pandas(df[list(layout.SCENE_COLUMNS)], preserve_index=False),
                   default)
    return {"rows": rows, "item_json_mb": round(df["item_json"].str.len().sum() / 1e6, 1),
            "grouped": grouped, "default": default,
            "file_mb": {k: round(p.stat().st_size / 1e6, 1)
                        for k, p in (("grouped", grouped), ("default", default))},
            "row_groups": {k: pq.ParquetFile(p).metadata.num_row_groups
                           for k, p in (("grouped", grouped), ("default", default))}}


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ``ru_maxrss``, not inherited from
    the parent that made the tables)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(args: argparse.Namespace) -> int:
    import pandas as pd

    from pipeline.runner import SHARD_SCENE_COLUMNS, read_shard_scenes

    ids = [f"{i:07d}" for i in range(args.first, args.first + 64)]
    before = _peak_rss_mb()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if args.mode == "grouped":
        df = read_shard_scenes(args.table, ids)
    else:  # the build's read before row groups: the whole table's groups, filter pushed down
        df = pd.read_parquet(args.table, filters=[("sample", "in", ids)],
                             columns=list(SHARD_SCENE_COLUMNS))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print_result({
        "seconds": time.perf_counter() - t0,
        "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        "peak_rss_mb": _peak_rss_mb(), "rss_before_read_mb": before,
        "rows": len(df)})
    return 0


def _measure(mode: str, table: Path, first: int) -> dict:
    return run_child(__file__, ["--mode", mode, "--table", str(table), "--first", str(first)],
                     mode)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--locations", type=int, default=10000,
                    help="locations in the scenes table (8 rows each: 4 seasons x S1, S2)")
    ap.add_argument("--repeat", type=int, default=3, help="reads per layout; the fastest is kept")
    ap.add_argument("--mode", choices=("grouped", "default"), help=argparse.SUPPRESS)
    ap.add_argument("--table", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode:
        return _child(args)

    with tempfile.TemporaryDirectory(prefix="ssl4eo-shard-inputs-") as tmp:
        tables = make_tables(args.locations, Path(tmp))
        first = (args.locations // 2) // 64 * 64  # a shard in the middle of the table
        runs = {mode: [_measure(mode, tables[mode], first) for _ in range(args.repeat)]
                for mode in ("grouped", "default")}
    best = {mode: min(rs, key=lambda r: r["cpu_s"]) for mode, rs in runs.items()}
    assert best["grouped"]["rows"] == best["default"]["rows"] == 64 * 8
    print(json.dumps({
        "benchmark": "shard_inputs",
        "locations": args.locations,
        "rows": tables["rows"],
        "item_json_mb": tables["item_json_mb"],
        "file_mb": tables["file_mb"],
        "row_groups": tables["row_groups"],
        "per_task_read": {mode: {k: round(v, 3) for k, v in r.items()} for mode, r in best.items()},
        "ratio_default_to_grouped_cpu": round(best["default"]["cpu_s"]
                                              / max(best["grouped"]["cpu_s"], 1e-9), 1),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
