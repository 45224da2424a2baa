"""Small Zarr stores in the :mod:`pipeline.layout` layout, for the loader tests and benchmark.

One place that writes test stores, so that it can be swapped for the real writer
(``pipeline.store``) without touching the tests. The layout follows ``pipeline/layout.py``:
one group per modality written through xarray (``to_zarr(group=...)``, Zarr v3), ``bands``
sharded with one (sample, time) per inner chunk and ``shard_samples`` samples per shard, a root
``status`` array and the schema/statistics attributes on the root group.

Pixel values encode where they come from, so tests can check that the right sample and season
were served::

    S2:  DN = 1000 + 400 * time + 20 * band + (sample % 400)      (uint16; pixel (0, 0) = 0)
    S1:  dB = -10 - time - 0.5 * band - 0.01 * sample             (float32; pixel (0, 0) = NaN)
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline import layout

#: Band statistics written to the test stores (per band: mean = base + band, std = scale).
STAT_BASE = {layout.S2L2A: 1500.0, layout.S2L1C: 1600.0, layout.S1RTC: -14.0}
STAT_STD = {layout.S2L2A: 500.0, layout.S2L1C: 400.0, layout.S1RTC: 4.0}


def expected_value(modality: str, sample: int, time: int, band: int) -> float:
    """The value every valid pixel of (sample, time, band) holds in a test store."""
    if modality == layout.S1RTC:
        return float(np.float32(-10.0 - time - 0.5 * band - 0.01 * sample))
    return float(1000 + 400 * time + 20 * band + (sample % 400))


def store_stats(modality: str) -> dict[str, list]:
    """The statistics entry the test stores carry for ``modality``."""
    bands = list(layout.BANDS[modality])
    return {
        "mean": [STAT_BASE[modality] + b for b in range(len(bands))],
        "std": [STAT_STD[modality]] * len(bands),
        "bands": bands,
    }


def _bands_array(modality: str, n: int, size: int, missing: set[tuple[int, int]]) -> np.ndarray:
    nb = len(layout.BANDS[modality])
    s = np.arange(n)[:, None, None]
    t = np.arange(layout.NUM_SEASONS)[None, :, None]
    b = np.arange(nb)[None, None, :]
    if modality == layout.S1RTC:
        vals = (-10.0 - t - 0.5 * b - 0.01 * s).astype(np.float32)
        nodata: float = np.nan
        dtype = np.float32
    else:
        vals = 1000 + 400 * t + 20 * b + (s % 400)
        nodata = 0
        dtype = np.uint16
    arr = np.empty((n, layout.NUM_SEASONS, nb, size, size), dtype=dtype)
    arr[...] = vals.astype(dtype)[..., None, None]
    arr[..., 0, 0] = nodata
    for i, k in missing:
        arr[i, k] = nodata
    return arr


def write_store(
    path: str | Path,
    n_samples: int = 20,
    modalities: Sequence[str] = (layout.S2L2A,),
    *,
    size: int = 16,
    shard_samples: int = 4,
    status: Mapping[int, str] | None = None,
    missing: Mapping[str, Iterable[tuple[int, int]]] | None = None,
    schema_version: str = layout.SCHEMA_VERSION,
    stats: bool = True,
) -> Path:
    """Write a test store at ``path`` and return the path.

    ``status`` maps sample index to a :data:`~pipeline.layout.STATUS_CODES` name (others are
    ``complete``); ``missing`` maps a modality to the (sample, time) pairs without a scene
    (``time_`` NaT, ``file_id`` empty, pixels nodata).
    """
    import xarray as xr
    import zarr

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    status = dict(status or {})
    missing = {m: set(v) for m, v in (missing or {}).items()}
    ids = [layout.sample_id(i) for i in range(n_samples)]
    lat = np.linspace(-40.0, 50.0, n_samples)
    lon = np.linspace(-70.0, 120.0, n_samples)
    base = np.datetime64("2021-01-15T10:00:00", "ns")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fixed-length string dtypes are not in the v3 spec yet
        for m_i, modality in enumerate(modalities):
            miss = missing.get(modality, set())
            nb = len(layout.BANDS[modality])
            times = np.array(
                [
                    [base + np.timedelta64(90 * t + s + m_i, "D") for t in range(layout.NUM_SEASONS)]
                    for s in range(n_samples)
                ],
                dtype="datetime64[ns]",
            )
            file_id = np.array(
                [[f"{modality}_{s:07d}_{t}" for t in range(layout.NUM_SEASONS)]
                 for s in range(n_samples)],
                dtype="<U80",
            )
            for i, k in miss:
                times[i, k] = np.datetime64("NaT")
                file_id[i, k] = ""
            ds = xr.Dataset(
                {
                    "bands": (
                        ("sample", "time", "band", "y", "x"),
                        _bands_array(modality, n_samples, size, miss),
                    ),
                    "center_lat": (("sample",), lat),
                    "center_lon": (("sample",), lon),
                    "crs": (("sample",), np.full(n_samples, 32632, dtype=np.int32)),
                    "time_": (("sample", "time"), times),
                    "file_id": (("sample", "time"), file_id),
                },
                coords={
                    "sample": ids,
                    "time": np.arange(layout.NUM_SEASONS),
                    "band": list(layout.BANDS[modality]),
                    "y": np.arange(size),
                    "x": np.arange(size),
                },
            )
            ds.to_zarr(
                path,
                group=modality,
                zarr_format=3,
                mode="w" if m_i == 0 else "a",
                consolidated=False,
                encoding={
                    "bands": {
                        "chunks": (1, 1, nb, size, size),
                        "shards": (shard_samples, layout.NUM_SEASONS, nb, size, size),
                    }
                },
            )
        root = zarr.open_group(path, mode="a")
        codes = np.array(
            [layout.STATUS_CODES[status.get(i, "complete")] for i in range(n_samples)],
            dtype=np.uint8,
        )
        arr = root.create_array(
            "status", shape=(n_samples,), dtype="uint8", dimension_names=("sample",),
            overwrite=True,
        )
        arr[:] = codes
        attrs: dict = {
            layout.ATTR_SCHEMA: schema_version,
            layout.ATTR_CONVENTIONS: {
                "s2_offset_convention": layout.S2_DEFAULT_CONVENTION,
                "s2_offset": layout.S2_OFFSET_CONVENTIONS[layout.S2_DEFAULT_CONVENTION]},
        }
        if stats:
            attrs[layout.ATTR_STATS] = {m: store_stats(m) for m in modalities}
        root.attrs.update(attrs)
    return path


def shard_file(path: str | Path, modality: str, shard: int) -> Path:
    """The file of ``bands`` shard number ``shard`` (along the sample axis) in a local store."""
    return Path(path) / modality / "bands" / "c" / str(shard) / "0" / "0" / "0" / "0"
