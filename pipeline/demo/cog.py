"""Writing Cloud-Optimized GeoTIFFs the way Planetary Computer serves them.

PC's Sentinel-2 and Sentinel-1 RTC files are tiled COGs (512 x 512 blocks), deflate-compressed
with a predictor, with internal overviews. :func:`write_cog` writes one such file with GDAL's
``COG`` driver (through rasterio): the array goes to an in-memory GeoTIFF first, then
``CreateCopy`` lays it out as a COG (overviews before the full-resolution tiles, ghost header).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.crs import CRS
from rasterio.io import MemoryFile

#: Internal tile size of every COG (PC uses 512 x 512 blocks).
COG_BLOCKSIZE = 512

#: Creation options shared by every file (GDAL COG driver).
COG_OPTIONS: dict[str, str] = {
    "BLOCKSIZE": str(COG_BLOCKSIZE),
    "COMPRESS": "DEFLATE",
    "PREDICTOR": "YES",  # horizontal differencing for ints, floating-point predictor for floats
    "LEVEL": "6",
    "OVERVIEWS": "AUTO",  # halve until the overview fits in one block
    "BIGTIFF": "NO",
    "NUM_THREADS": "1",  # workers run in parallel processes already
}


def write_cog(
    path: Path,
    data: np.ndarray,
    transform: Affine,
    epsg: int,
    *,
    nodata: float | int | None = None,
    resampling: str = "average",
) -> None:
    """Write ``data`` (``(bands, rows, cols)`` or ``(rows, cols)``) as a COG at ``path``.

    ``resampling`` is the overview resampling (``average`` for reflectance and backscatter,
    ``nearest``/``mode`` for class maps such as SCL).
    """
    arr = data[None] if data.ndim == 2 else data
    count, height, width = arr.shape
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": arr.dtype.name,
        "crs": CRS.from_epsg(epsg),
        "transform": transform,
        "nodata": nodata,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with MemoryFile() as mem:
        with mem.open(**profile) as tmp:
            tmp.write(arr)
        with mem.open() as src:
            rasterio.shutil.copy(
                src,
                str(path),
                driver="COG",
                RESAMPLING=resampling.upper(),
                **COG_OPTIONS,
            )
