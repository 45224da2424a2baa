"""Compression choice for the store: bytes per patch and (de)compression speed on real patches.

Usage: ``python benchmarks/compression.py [--repeat N]`` prints JSON, one entry per codec set.

S2: the 12 L2A bands of the two real Major-TOM cells in ../shared/data/real, cut to 264 x 264
patches on a 10 m UTM grid by the pipeline's own cube (so: resampled 20/60 m bands, the real
value distribution). S1: a real dB patch (pyroSAR, ../shared/data/real/s1_pyrosar). Each codec
set is applied as the inner-chunk pipeline of a sharded zarr v3 array, exactly as the store uses
it (one (sample, time) chunk of (1, 1, bands, 264, 264)).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"


def s2_patches() -> np.ndarray:
    from pipeline import cube, layout

    out = []
    cells = sorted((REAL / "majortom_s2l2a").glob("*/*/*"))
    for d in cells:
        import rasterio

        with rasterio.open(d / "B02.tif") as src:
            epsg = src.crs.to_epsg()
            left, bottom = src.bounds.left, src.bounds.bottom
        x0 = (left // 10 + 20) * 10
        y0 = (bottom // 10 + 20) * 10
        for k in range(2):
            grid = cube.Grid(epsg, (x0 + k * 2640, y0, x0 + (k + 1) * 2640, y0 + 2640))
            item = {
                "type": "Feature", "stac_version": "1.0.0", "id": d.name, "geometry": None,
                "links": [], "properties": {"datetime": "2022-01-01T00:00:00Z",
                                            "s2:processing_baseline": "04.00"},
                "assets": {b: {"href": str(d / f"{b}.tif")} for b in layout.BANDS["S2L2A"]},
            }
            ds = cube.s2_cube([item], grid, provider=cube.get_provider("local"))
            out.append(ds.bands.values[0])
    return np.stack(out)[:, None]  # (sample, time=1, band, y, x)


def s1_patches() -> np.ndarray:
    import rasterio
    from rasterio.windows import Window

    f = next((REAL / "s1_pyrosar").glob("*.tif"))
    with rasterio.open(f) as src:
        a = src.read(1, window=Window(0, 0, min(264, src.width), min(264, src.height)))
        nod = src.nodata
    a = a.astype(np.float32)
    a[a == nod] = np.nan
    p = np.full((2, 264, 264), np.nan, np.float32)
    p[:, : a.shape[0], : a.shape[1]] = a
    return p[None, None]


def codec_sets(dtype: np.dtype) -> dict[str, dict]:
    from zarr.codecs import BloscCodec, ZstdCodec
    from zarr.codecs.numcodecs import Delta

    sets = {
        "none": {"compressors": None},
        "zstd1": {"compressors": [ZstdCodec(level=1)]},
        "zstd3": {"compressors": [ZstdCodec(level=3)]},
        "zstd6": {"compressors": [ZstdCodec(level=6)]},
        "zstd9": {"compressors": [ZstdCodec(level=9)]},
        "blosc-lz4-shuffle": {"compressors": [BloscCodec(cname="lz4", clevel=5,
                                                         shuffle="shuffle")]},
        "blosc-lz4-bitshuffle": {"compressors": [BloscCodec(cname="lz4", clevel=5,
                                                            shuffle="bitshuffle")]},
        "blosc-zstd1-shuffle": {"compressors": [BloscCodec(cname="zstd", clevel=1,
                                                           shuffle="shuffle")]},
        "blosc-zstd2-shuffle": {"compressors": [BloscCodec(cname="zstd", clevel=2,
                                                           shuffle="shuffle")]},
        "blosc-zstd3-shuffle": {"compressors": [BloscCodec(cname="zstd", clevel=3,
                                                           shuffle="shuffle")]},
        "blosc-zstd3-bitshuffle": {"compressors": [BloscCodec(cname="zstd", clevel=3,
                                                              shuffle="bitshuffle")]},
    }
    if dtype.kind in "ui":
        sets["delta+blosc-zstd3-shuffle"] = {
            "filters": [Delta(dtype=str(dtype))],
            "compressors": [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
        }
    return sets


def measure(data: np.ndarray, repeat: int) -> dict[str, dict]:
    import zarr
    from zarr.storage import MemoryStore

    chunk = (1, 1, *data.shape[2:])
    out = {}
    for name, codecs in codec_sets(data.dtype).items():
        best_w = best_r = float("inf")
        for _ in range(repeat):
            store = MemoryStore()
            arr = zarr.create_array(store, shape=data.shape, dtype=data.dtype, chunks=chunk,
                                    shards=data.shape, fill_value=0, **codecs)
            t = time.perf_counter()
            arr[...] = data
            best_w = min(best_w, time.perf_counter() - t)
            t = time.perf_counter()
            back = arr[...]
            best_r = min(best_r, time.perf_counter() - t)
            assert np.array_equal(back, data, equal_nan=True)
        nbytes = sum(len(v.to_bytes()) for k, v in store._store_dict.items() if "c/" in k)
        patches = data.shape[0] * data.shape[1]
        out[name] = {
            "bytes_per_patch": nbytes / patches,
            "ratio": data.nbytes / nbytes,
            "write_MBps": data.nbytes / best_w / 1e6,
            "read_MBps": data.nbytes / best_r / 1e6,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="timing repetitions (best kept)")
    args = ap.parse_args()
    s2 = s2_patches()
    s1 = s1_patches()
    print(json.dumps({
        "S2L2A": {"patches": s2.shape[0], "raw_bytes_per_patch": s2[0, 0].nbytes,
                  "codecs": measure(s2, args.repeat)},
        "S1RTC": {"patches": s1.shape[0], "raw_bytes_per_patch": s1[0, 0].nbytes,
                  "codecs": measure(s1, args.repeat)},
    }, indent=1))


if __name__ == "__main__":
    main()
