"""An async COG reader (async-tiff + obstore) beside GDAL, for ``benchmarks/latency.py``.

The patches of ``benchmarks/build.py`` read without GDAL's HTTP layer: per asset, async-tiff
opens the file (one ranged GET for its header), fetches the internal tiles the patch's window
touches (all at once; obstore merges nothing, one GET per tile), and decodes them on its own
thread pool; every asset of every patch is in flight at once, up to ``in_flight``. The decoded
tiles are then warped onto the location's 10 m grid by the same ``WarpedVRT`` as the rasterio
loop (bilinear, nearest for SCL), over the tiles as an in-memory GeoTIFF, on as many threads as
the machine has cores: the network is async, the warp is GDAL's.

:func:`compare` checks the result against the rasterio loop's ``WarpedVRT`` reads (what the
build reads): the equality a reader must pass before the build could adopt it.

    python benchmarks/async_cog.py --check   # serves a demo catalog, compares every patch
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from build import patch_reads, warped_read  # noqa: E402 - benchmarks/, beside this script

#: the pixels beyond the window a bilinear warp may touch, plus one for GDAL's own rounding
MARGIN_PX = 2


class AsyncCogReader:
    """Reads patches of COGs over HTTP with async-tiff; one obstore client per host."""

    def __init__(self, in_flight: int, warp_threads: int | None = None) -> None:
        self.limit = asyncio.Semaphore(max(1, in_flight))
        self.warp_pool = ThreadPoolExecutor(warp_threads or os.cpu_count() or 1,
                                            thread_name_prefix="async-cog-warp")
        self._stores: dict[str, Any] = {}

    def _store(self, href: str) -> tuple[Any, str]:
        from obstore.store import HTTPStore

        parts = urllib.parse.urlsplit(href)
        base = f"{parts.scheme}://{parts.netloc}"
        if base not in self._stores:
            self._stores[base] = HTTPStore.from_url(
                base, client_options={"allow_http": parts.scheme == "http"})
        return self._stores[base], parts.path.lstrip("/")

    async def read(self, href: str, grid: Any, resampling: str) -> np.ndarray:
        """The asset warped onto ``grid``'s 264 x 264 pixels, as ``WarpedVRT.read(1)``."""
        from async_tiff import TIFF
        from rasterio.crs import CRS
        from rasterio.transform import Affine
        from rasterio.warp import transform_bounds

        async with self.limit:
            store, path = self._store(href)
            tiff = await TIFF.open(path, store=store, prefetch=65536)
            ifd = tiff.ifd(0)
            _, _, _, x0, y0, _ = ifd.model_tiepoint
            sx, sy, _ = ifd.model_pixel_scale
            transform = Affine(sx, 0.0, x0, 0.0, -sy, y0)
            crs = CRS.from_epsg(ifd.geo_key_directory.projected_type)
            left, bottom, right, top = transform_bounds(f"EPSG:{grid.epsg}", crs, *grid.bounds)
            c0 = max(0, math.floor((left - x0) / sx) - MARGIN_PX)
            c1 = min(ifd.image_width, math.ceil((right - x0) / sx) + MARGIN_PX)
            r0 = max(0, math.floor((y0 - top) / sy) - MARGIN_PX)
            r1 = min(ifd.image_height, math.ceil((y0 - bottom) / sy) + MARGIN_PX)
            tw, th = ifd.tile_width, ifd.tile_height
            xy = [(tx, ty) for ty in range(r0 // th, (r1 - 1) // th + 1)
                  for tx in range(c0 // tw, (c1 - 1) // tw + 1)]
            tiles = await tiff.fetch_tiles(xy, 0)
            where = [(t.x, t.y) for t in tiles]  # a decoded tile is consumed
            arrays = await asyncio.gather(*(t.decode() for t in tiles))
        # the touched tiles as one array, clipped to the image
        ty0, tx0 = r0 // th, c0 // tw
        rows = ((r1 - 1) // th + 1 - ty0) * th
        cols = ((c1 - 1) // tw + 1 - tx0) * tw
        first = np.asarray(arrays[0])
        mosaic = np.empty((rows, cols), first.dtype)
        for (tx, ty), arr in zip(where, arrays):
            a = np.asarray(arr)
            a = a[..., 0] if a.ndim == 3 else a
            y, x = (ty - ty0) * th, (tx - tx0) * tw
            mosaic[y:y + th, x:x + tw] = a
        oy, ox = ty0 * th, tx0 * tw
        mosaic = mosaic[:ifd.image_height - oy, :ifd.image_width - ox]
        nodata = float(ifd.gdal_nodata) if ifd.gdal_nodata is not None else None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.warp_pool, _warp, mosaic,
                                          transform @ Affine.translation(ox, oy), crs, nodata,
                                          grid, resampling)

    async def read_all(self, tasks: list[tuple[str, Any, str]]) -> list[np.ndarray]:
        return list(await asyncio.gather(*(self.read(*t) for t in tasks)))

    def close(self) -> None:
        self.warp_pool.shutdown()


def _warp(src: np.ndarray, transform: Any, crs: Any, nodata: float | None, grid: Any,
          resampling: str) -> np.ndarray:
    """``src`` (its transform, CRS and nodata) through the same ``WarpedVRT`` as the rasterio
    loop, from an uncompressed in-memory GeoTIFF (``rasterio.warp.reproject`` differs from a
    WarpedVRT on every pixel of a reprojected scene, by up to 75 DN: another warp set-up)."""
    from rasterio.enums import Resampling
    from rasterio.io import MemoryFile
    from rasterio.vrt import WarpedVRT

    from pipeline import layout

    n = layout.PATCH_PIXELS
    h, w = src.shape
    with MemoryFile() as mf:
        with mf.open(driver="GTiff", width=w, height=h, count=1, dtype=src.dtype, crs=crs,
                     transform=transform, nodata=nodata) as ds:
            ds.write(src, 1)
        with mf.open() as ds, WarpedVRT(ds, crs=f"EPSG:{grid.epsg}", transform=grid.transform,
                                        width=n, height=n,
                                        resampling=Resampling[resampling]) as vrt:
            return vrt.read(1)


def run_async_tiff(scenes: Path, locations: Path, threads: int) -> dict[str, Any]:
    """Every patch asset read at once (``4 * threads`` in flight, the build's I/O threads per
    cube thread); returns the number of reads (benchmarks/build.py's child protocol)."""
    tasks = patch_reads(scenes, locations)
    reader = AsyncCogReader(4 * max(1, threads))
    try:
        asyncio.run(reader.read_all(tasks))
    finally:
        reader.close()
    return {"reads": len(tasks), "in_flight": 4 * max(1, threads)}


def compare(tasks: list[tuple[str, Any, str]], in_flight: int = 32) -> dict[str, Any]:
    """How many of ``tasks`` the async reader returns exactly as GDAL's WarpedVRT does, and
    the largest difference of the others."""
    import rasterio

    from pipeline.cube import GDAL_HTTP_ENV

    reader = AsyncCogReader(in_flight)
    try:
        ours = asyncio.run(reader.read_all(tasks))
    finally:
        reader.close()
    same, worst = 0, 0.0
    with rasterio.Env(**GDAL_HTTP_ENV):
        for (href, grid, rs), a in zip(tasks, ours):
            b = warped_read(href, grid, rs)
            if np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                same += 1
            else:
                worst = max(worst, float(np.nanmax(np.abs(a.astype(np.float64) - b))))
    return {"reads": len(tasks), "identical": same, "max_abs_difference": worst}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="serve a demo catalog and compare every patch read with GDAL's")
    ap.add_argument("--num-locations", type=int, default=20, help="demo locations to cut")
    ap.add_argument("--catalog", type=Path, default=None,
                    help="an embedded catalog to serve (default: build the demo one)")
    args = ap.parse_args(argv)
    if not args.check:
        ap.print_help()
        return 0
    from pipeline.demo.serve import sample_and_search, served_catalog

    with tempfile.TemporaryDirectory(prefix="ssl4eo-async-cog-") as tmp:
        with served_catalog(tmp, args.catalog, profile="demo") as served:
            tables = sample_and_search(served.stac_url, Path(tmp),
                                       {"num_locations": args.num_locations})
            print(json.dumps(compare(patch_reads(tables["scenes"], tables["locations"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
