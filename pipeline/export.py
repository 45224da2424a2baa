"""``ssl4eo export v1.1``: our store in SSL4EO-S12 v1.1's own file layout.

SSL4EO-S12 v1.1 (Blumenstiel et al. 2025, ``DLR-MF-DAS/SSL4EO-S12-v1.1``) ships one Zarr v2
``ZipStore`` file per 64 locations and modality, read by its loaders, TerraTorch and TerraMesh
with ``xr.open_zarr(path)`` (zarr 2.18). This module writes the same layout from a store built
by ``ssl4eo build``, so that code written for v1.1 reads our data unchanged::

    OUT/{split}/{MODALITY}/ssl4eos12_{split}_seasonal_data_{000001..}.zarr.zip
    OUT/splits/ssl4eos12_{split}.txt       one file name per line
    OUT/export.json                        store, convention, the samples of every file

In each file, as v1.1's README shows them: dims ``sample: 64, time: 4, band: C, y: 264,
x: 264``; coordinates ``sample`` (<U7), ``time`` (0..3), ``band``, ``y``/``x`` (pixel index);
variables ``bands`` (int16 for S2 in the +1000 convention, float16 dB for S1), ``cloud_mask``
(S2, uint8), ``center_lat``/``center_lon`` (float64), ``crs`` (int64 EPSG), ``file_id``,
``sample_id`` (``'0080717_0'``), ``time_`` (datetime64[ns]), ``x_``/``y_`` (float64 UTM pixel
centres). Timestamps are chunked separately (one chunk per sample and time), Blosc-compressed,
metadata consolidated; the zip entries are stored uncompressed, as zarr's ``ZipStore`` writes.

Where we differ, and say so in each file's attributes: ``file_id`` holds the STAC item id
(v1.1: the GEE index, which needs the granule's sensing time that STAC items do not carry);
S1 is the ``S1RTC`` group (gamma0 RTC in dB, not v1.1's GEE sigma0 ``S1GRD``); only complete
samples are exported, 64 per file in store order, the last file holding the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from . import layout
from .errors import StoreError, UserError

#: What v1.1 stores per modality: the ``bands`` dtype (S2 int16 per its README; L1C assumed
#: the same), and whether the group has a ``cloud_mask``.
V11_BANDS_DTYPE = {layout.S2L2A: "int16", layout.S2L1C: "int16", layout.S1RTC: "float16"}
#: Locations per file, as v1.1 ships them.
V11_FILE_SAMPLES = 64
#: The S2 offset convention v1.1 uses (DN = 10000 * reflectance + 1000).
V11_CONVENTION = "v1.1"
#: The variables of a v1.1 file, in its README's order (``cloud_mask`` only for S2).
V11_VARIABLES = ("bands", "center_lat", "center_lon", "cloud_mask", "crs", "file_id",
                 "sample_id", "time_", "x_", "y_")
MANIFEST = "export.json"


def file_name(split: str, k: int) -> str:
    """v1.1's name of the ``k``-th file (0-based) of a split."""
    return f"ssl4eos12_{split}_seasonal_data_{k + 1:06d}.zarr.zip"


def plan_files(samples: Sequence[str], per_file: int = V11_FILE_SAMPLES) -> list[list[str]]:
    """The samples of each exported file: consecutive runs of ``per_file``, the last one
    holding the rest."""
    samples = list(samples)
    return [samples[i:i + per_file] for i in range(0, len(samples), per_file)]


def to_v11_bands(bands: np.ndarray, modality: str, store_offset: int) -> np.ndarray:
    """Our stored ``bands`` in v1.1's dtype and convention.

    S2: valid (non-zero) DNs are moved to the +1000 convention when the store holds another
    one, then clipped to int16's range (DN 32767 is reflectance 3.18: saturated anyway); 0
    stays nodata. S1: float32 dB to float16 (NaN stays NaN)."""
    if modality.startswith("S1"):
        return bands.astype(np.float16)
    shift = layout.S2_OFFSET_CONVENTIONS[V11_CONVENTION] - int(store_offset)
    out = np.empty(bands.shape, np.int16)
    flat_in, flat_out = bands.reshape(-1, *bands.shape[-2:]), out.reshape(-1, *bands.shape[-2:])
    for i in range(flat_in.shape[0]):  # one image at a time: the int32 copy stays small
        img = flat_in[i].astype(np.int32)
        if shift:
            valid = img > 0
            img[valid] = np.maximum(img[valid] + shift, 1)
        np.clip(img, 0, np.iinfo(np.int16).max, out=img)
        flat_out[i] = img
    return out


def _file_dataset(src, modality: str, idx: np.ndarray, store_offset: int,
                  store_path: str):  # -> xr.Dataset
    """One v1.1 file's dataset: the samples ``idx`` of the group ``src`` (an xr.Dataset)."""
    import xarray as xr

    # one contiguous read, then the complete samples in memory: zarr reads an index array
    # chunk by chunk, 40 x slower than the slice
    lo, hi = int(idx.min()), int(idx.max()) + 1
    wanted = [v for v in V11_VARIABLES if v in src.data_vars]  # not the quality table
    part = src[wanted].isel(sample=slice(lo, hi)).load().isel(sample=idx - lo)
    samples = np.asarray(part["sample"].values).astype("<U7")
    n_time = part.sizes["time"]
    coords = {"sample": samples, "time": np.arange(n_time, dtype=np.int64),
              "band": np.asarray(part["band"].values).astype(str),
              "y": np.arange(part.sizes["y"], dtype=np.int64),
              "x": np.arange(part.sizes["x"], dtype=np.int64)}
    sample_id = np.array([[f"{s}_{t}" for t in range(n_time)] for s in samples])
    file_id = np.asarray(part["file_id"].values).astype(str)
    data = {
        "bands": (("sample", "time", "band", "y", "x"),
                  to_v11_bands(np.asarray(part["bands"].values), modality, store_offset)),
        "center_lat": (("sample",), np.asarray(part["center_lat"].values, np.float64)),
        "center_lon": (("sample",), np.asarray(part["center_lon"].values, np.float64)),
        "crs": (("sample",), np.asarray(part["crs"].values).astype(np.int64)),
        "file_id": (("sample", "time"),
                    file_id.astype(f"<U{max([1, *(len(f) for f in file_id.ravel())])}")),
        "sample_id": (("sample", "time"), sample_id),
        "time_": (("sample", "time"), np.asarray(part["time_"].values).astype("datetime64[ns]")),
        "x_": (("sample", "x"), np.asarray(part["x_"].values, np.float64)),
        "y_": (("sample", "y"), np.asarray(part["y_"].values, np.float64)),
    }
    if "cloud_mask" in part:
        data["cloud_mask"] = (("sample", "time", "y", "x"),
                              np.asarray(part["cloud_mask"].values, np.uint8))
    ds = xr.Dataset({k: data[k] for k in V11_VARIABLES if k in data}, coords=coords)
    s1 = modality.startswith("S1")
    ds["bands"].attrs.update(
        units="dB" if s1 else "DN = 10000 * reflectance + 1000 (v1.1 convention)",
        nodata="NaN" if s1 else 0)
    if "cloud_mask" in ds:
        ds["cloud_mask"].attrs.update(flag_values=[0, 1, 255],
                                      flag_meanings="clear cloud unknown")
    ds.attrs.update({
        "title": f"SSL4EO-S12 v1.1 layout, {modality}",
        "source": "exported by `ssl4eo export v1.1` from an ssl4eo-stac store",
        "source_store": store_path,
        "s2_offset_convention": V11_CONVENTION if not s1 else "",
        "file_id": "STAC item id of each season's scene (v1.1 stores the GEE index)",
    })
    if s1:
        ds.attrs["s1_product"] = ("Sentinel-1 RTC gamma0 in dB (v1.1's S1GRD is GEE sigma0 "
                                  "GRD); NaN = nodata")
    return ds


def _encoding(ds) -> dict[str, dict[str, Any]]:
    from numcodecs import Blosc

    blosc = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)
    enc: dict[str, dict[str, Any]] = {}
    for name, var in ds.data_vars.items():
        enc[name] = {"compressors": (blosc,)}
        if name in ("bands", "cloud_mask"):  # one chunk per sample and timestamp
            enc[name]["chunks"] = (1, 1) + tuple(var.shape[2:])
        else:
            enc[name]["chunks"] = tuple(var.shape)
    enc["time_"].update(units="nanoseconds since 1970-01-01", calendar="proleptic_gregorian",
                        dtype="int64")
    return enc


def write_zip(ds, dest: str) -> None:
    """Write ``ds`` as a consolidated Zarr v2 store inside the zip file ``dest`` (a path or
    URL), one zip entry per key, atomically (readers never see half a file)."""
    from . import storage

    with tempfile.TemporaryDirectory(prefix="ssl4eo-export-") as tmp:
        tree = Path(tmp) / "store.zarr"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr 3 notes that consolidated v2 is not in spec
            ds.to_zarr(str(tree), zarr_format=2, consolidated=True, encoding=_encoding(ds),
                       mode="w")
        zpath = Path(tmp) / "file.zarr.zip"
        with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for f in sorted(tree.rglob("*")):
                if f.is_file():
                    zf.write(f, f.relative_to(tree).as_posix())
        storage.upload_file(zpath, dest)


def export_v11(store: str, out: str, *, split: str = "train",
               modalities: Sequence[str] | None = None, workers: int = 2,
               overwrite: bool = False, progress: bool = True,
               samples_per_file: int = V11_FILE_SAMPLES) -> dict[str, Any]:
    """Write the v1.1 layout of ``store`` under ``out``; returns the manifest.

    Files already there from an earlier export of the same samples are kept (a re-run
    finishes an interrupted export); another export's files need ``overwrite``."""
    import xarray as xr

    from . import storage
    from .store import _target, open_root, read_status

    root = open_root(store)
    groups = [m for m in layout.MODALITIES if m in root.group_keys()] if modalities is None \
        else list(modalities)
    missing = [m for m in groups if m not in root.group_keys()]
    if missing or not groups:
        raise StoreError(f"store {store} has no group(s) {missing or groups}; it has "
                         f"{sorted(root.group_keys())}: pass --modalities from those")
    _, offset = layout.recorded_convention(dict(root.attrs))
    status = read_status(store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sources = {m: xr.open_zarr(_target(store), group=m, zarr_format=3, chunks=None)
                   for m in groups}
    all_samples = np.asarray(sources[groups[0]]["sample"].values).astype(str)
    complete = np.flatnonzero(status == layout.STATUS_CODES["complete"])
    if not complete.size:
        raise StoreError(f"store {store} has no complete samples to export; finish the build "
                         "(`ssl4eo build` resumes) and export again")
    files = plan_files(list(complete), samples_per_file)
    manifest = {
        "format": f"SSL4EO-S12 v1.1 (Zarr v2 zip, {samples_per_file} samples per file)",
        "store": storage.redact(str(store)), "split": split, "modalities": groups,
        "s2_offset_convention": V11_CONVENTION, "store_s2_offset": offset,
        "files": [{"name": file_name(split, k),
                   "samples": [str(all_samples[i]) for i in idx]}
                  for k, idx in enumerate(files)],
    }
    manifest_url = storage.join(out, MANIFEST)
    if storage.exists(manifest_url) and not overwrite:
        fs, p = storage.filesystem(manifest_url)
        earlier = json.loads(fs.cat_file(p).decode())
        if earlier.get("files") != manifest["files"] or earlier.get("store") != manifest["store"]:
            raise UserError(f"{out} holds another export ({MANIFEST} lists other samples or "
                            "another store); pass --overwrite to replace it, or choose another "
                            "--out")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / MANIFEST
        local.write_text(json.dumps(manifest, indent=1))
        storage.upload_file(local, manifest_url)

    jobs = [(m, k, np.asarray(idx)) for m in groups for k, idx in enumerate(files)]

    def run(job) -> str:
        m, k, idx = job
        dest = storage.join(out, split, m, file_name(split, k))
        if storage.exists(dest) and not overwrite:
            return "kept"
        write_zip(_file_dataset(sources[m], m, idx, offset, manifest["store"]), dest)
        return "written"

    from tqdm.auto import tqdm

    counts = {"written": 0, "kept": 0}
    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        for result in tqdm(pool.map(run, jobs), total=len(jobs), unit="file", desc="export",
                           disable=not progress):
            counts[result] += 1
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / f"ssl4eos12_{split}.txt"
        local.write_text("".join(f"{f['name']}\n" for f in manifest["files"]))
        storage.upload_file(local, storage.join(out, "splits", local.name))
    return {**manifest, "files_written": counts["written"], "files_kept": counts["kept"],
            "samples": int(complete.size)}


# ------------------------------------------------------------------------------------ CLI
def add_commands(subparsers: Any) -> None:
    """``ssl4eo export``."""
    p = subparsers.add_parser(
        "export", help="write a store in another dataset's file layout (SSL4EO-S12 v1.1)",
        description="Write the complete samples of a store built by `ssl4eo build` in the file "
        "layout of another release, so that code written for it reads our data. `v1.1`: "
        "SSL4EO-S12 v1.1's Zarr v2 zip files of 64 samples per modality "
        "(OUT/SPLIT/MODALITY/ssl4eos12_SPLIT_seasonal_data_NNNNNN.zarr.zip), its variable "
        "names and dtypes (S2 int16 in the +1000 convention, S1 float16 dB) and sample_id; "
        "readable with zarr 2.18 as `xr.open_zarr(path)`, or with zarr 3 as "
        "`xr.open_zarr(zarr.storage.ZipStore(path, mode='r'))`. A re-run keeps the files "
        "already written.",
    )
    p.add_argument("format", choices=["v1.1"], help="the layout to write (v1.1: SSL4EO-S12 v1.1)")
    p.add_argument("--store", required=True,
                   help="Zarr store written by `ssl4eo build` (a path or an object-storage URL)")
    p.add_argument("--out", required=True,
                   help="directory (or object-storage URL) to write the files under")
    p.add_argument("--split", default="train",
                   help="split name in the file names and folders, as v1.1 uses them "
                   "(train or val; default: train)")
    p.add_argument("--modalities", nargs="+", default=None, metavar="GROUP",
                   choices=list(layout.MODALITIES),
                   help="groups to export (default: every group in the store)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="files written at once (threads; each holds one file's samples, about "
                   "450 MB for S2L2A; default: min(4, cores))")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files (and another export) already under --out")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    result = export_v11(args.store, args.out, split=args.split, modalities=args.modalities,
                        workers=args.workers, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        n = len(result["files"])
        print(f"exported {result['samples']} samples into {n} file(s) per modality "
              f"({', '.join(result['modalities'])}) under {args.out}: "
              f"{result['files_written']} written, {result['files_kept']} kept")
    return 0


__all__ = ["export_v11", "file_name", "plan_files", "to_v11_bands", "write_zip"]
