"""The Zarr v3 store: template once, whole-shard writes, completion, statistics, provenance.

Layout (see :mod:`pipeline.layout`): one store; the root group holds ``sample`` (ids),
``status (sample,)`` uint8 (:data:`~pipeline.layout.STATUS_CODES`) and ``failure (sample,)``
(the reason a sample failed, "" otherwise); one group per modality (``S2L2A``, ``S2L1C``,
``S1RTC``) holds ``bands (sample, time, band, y, x)`` and the per-sample / per-scene variables.
``time`` is the season index 0..3 (chronological windows); a season without a scene is written
as nodata (S2 0, S1 NaN, cloud_mask 255) and marked ``time_ = NaT``, ``file_id = ""``,
``valid_fraction = NaN``: never as if it were data.

Chunks and shards: ``bands`` has one inner chunk per (sample, time), ``(1, 1, nbands, 264, 264)``,
inside shards of :data:`~pipeline.layout.SHARD_SAMPLES` samples x 4 seasons; every other
variable has one chunk per shard of samples. A writer task always writes whole shards
(``region={"sample": slice(k * 64, (k + 1) * 64)}``), so no two tasks ever touch one file;
``status`` is written last, so a task killed midway leaves its samples ``pending`` and a re-run
simply writes the shard again.

Compression (measured by ``benchmarks/compression.py`` on real 264 x 264 patches: two Major-TOM
S2 L2A cells cut by the cube, 12 bands; a real S1 dB patch; best of 3, one core, one run)::

    S2 uint16, 1,672,704 B raw/patch    bytes/patch  ratio  write MB/s  read MB/s
    zstd 1                                1,282,706   1.30        419        868
    zstd 3                                1,224,730   1.37        167        872
    zstd 9                                1,159,095   1.44         78        775
    blosc lz4 + shuffle                   1,156,170   1.45        411       1282
    blosc lz4 + bitshuffle                1,102,356   1.52        483       1222   <- chosen
    blosc zstd 1 + shuffle                1,031,942   1.62        310        876
    blosc zstd 2 + shuffle                1,003,553   1.67        337        962
    blosc zstd 3 + shuffle                  986,392   1.70        198        981
    blosc zstd 3 + bitshuffle             1,030,574   1.62        327        851
    delta + blosc zstd 3 + shuffle          903,744   1.85        185        501
    S1 float32 dB, 557,568 B raw/patch
    zstd 3                                  200,247   2.78        341        457
    blosc lz4 + shuffle                     370,006   1.51        285        431
    blosc lz4 + bitshuffle                  180,365   3.09        277        399   <- chosen
    blosc zstd 3 + bitshuffle               353,160   1.58        138        382

S2: blosc(lz4, bitshuffle) writes 1.4x and reads 1.3x as fast as blosc(zstd, 2, byte shuffle),
the smallest fast codec of the Zarr v3 core set, for 10 % more bytes. In the build it is the
cheaper side of that trade: compressing S2 with zstd cost 0.30 s of CPU per shard of 8 demo
samples against 0.13 s (``zarr`` alone, uncompressed: 0.11 s), about 4 % of the whole build's
CPU, and training reads the store many times over. A delta filter would save 8 % more but is
a numcodecs-only codec that other Zarr readers may not support, so it is not used. S1:
blosc(lz4, bitshuffle) is both the smallest and among the fastest. ``cloud_mask`` (uint8,
mostly constant) uses zstd 3.

Statistics: each shard task stores partial moments (count, mean, M2 per band over valid pixels:
S2 non-zero, S1 finite) in ``stats_partial (shard, band, moment)``; :func:`finalize` combines
them (Chan et al.) into :data:`~pipeline.layout.ATTR_STATS` and consolidates the metadata.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import layout
from .errors import StoreError

N = layout.PATCH_PIXELS
T = layout.NUM_SEASONS
FILE_ID_LEN = 80
FAILURE_LEN = 300
#: cloud_mask value where unknown (no SCL, missing season, nodata).
CLOUD_UNKNOWN = 255
MOMENTS = ("count", "mean", "m2")
#: int64 stored for NaT in ``time_`` (CF ``_FillValue``; xarray decodes it to NaT).
NAT_INT = np.iinfo(np.int64).min


@contextlib.contextmanager
def quiet():
    """Silence zarr's notes on fixed-length strings and consolidated metadata (both written on
    purpose: ``<U`` ids as in :mod:`pipeline.layout`; consolidated metadata for fast opens)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
        warnings.filterwarnings("ignore", message=".*Consolidated metadata is currently not.*")
        yield


def n_shards(n_samples: int, shard: int = layout.SHARD_SAMPLES) -> int:
    return -(-n_samples // shard)


def shard_slice(k: int, n_samples: int, shard: int = layout.SHARD_SAMPLES) -> slice:
    return slice(k * shard, min((k + 1) * shard, n_samples))


def bands_dtype(modality: str) -> np.dtype:
    return np.dtype("float32") if modality.startswith("S1") else np.dtype("uint16")


def bands_fill(modality: str) -> Any:
    return np.float32(np.nan) if modality.startswith("S1") else np.uint16(layout.S2_NODATA)


def _codecs(modality: str, var: str) -> dict[str, Any]:
    from zarr.codecs import BloscCodec, ZstdCodec

    if var == "bands":
        # S1 and S2 alike (the table above)
        return {"compressors": [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")]}
    return {"compressors": [ZstdCodec(level=3)]}


# ------------------------------------------------------------------------------------ checks
def _target(path: str | Path, mode: str = "r"):  # -> str | zarr Store
    """What zarr/xarray calls take for ``path``: the local path string, or a Zarr store object
    for an object-storage URL (``s3://``, ``az://``, ``gs://``) opened by
    :func:`pipeline.storage.open_store`."""
    from . import storage

    if storage.is_remote(path):
        return storage.open_store(path, mode="r" if mode == "r" else "a")
    return str(storage.local_path(path))


def _exists(path: str | Path) -> bool:
    from . import storage

    if storage.is_remote(path):
        fs, p = storage.filesystem(path)
        return bool(fs.exists(p)) and bool(fs.ls(p))
    lp = storage.local_path(path)
    return lp.exists() and (not lp.is_dir() or any(lp.iterdir()))


def _root_attrs(path: str | Path) -> dict | None:
    """The root ``zarr.json`` attributes, or None when there is none (or it is unreadable)."""
    from . import storage

    try:
        if storage.is_remote(path):
            fs, p = storage.filesystem(path)
            text = fs.cat_file(f"{p.rstrip('/')}/zarr.json").decode()
        else:
            text = (storage.local_path(path) / "zarr.json").read_text()
        return json.loads(text).get("attributes", {})
    except (OSError, ValueError, KeyError):
        return None


def _is_our_store(path: str | Path) -> bool:
    attrs = _root_attrs(path)
    return attrs is not None and layout.ATTR_SCHEMA in attrs


def check_writable(path: str | Path) -> None:
    """Raise :class:`StoreError` unless ``path`` can be created and written."""
    from . import storage

    if storage.is_remote(path):
        fs, p = storage.filesystem(path)
        probe = f"{p.rstrip('/')}/.ssl4eo-write-probe-{os.getpid()}"
        try:
            fs.pipe_file(probe, b"x")
            fs.rm_file(probe)
        except Exception as exc:  # noqa: BLE001 - s3fs/adlfs raise many kinds
            raise StoreError(
                f"cannot write the store at {storage.redact(str(path))}: {type(exc).__name__}: "
                f"{exc}; check the bucket, the credentials in the environment and the "
                "endpoint (AWS_ENDPOINT_URL)") from exc
        return
    path = storage.local_path(path)
    parent = path if path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    probe = parent / f".ssl4eo-write-probe-{os.getpid()}"
    try:
        if path.exists() and not path.is_dir():
            raise StoreError(
                f"store path {path} is a file, not a Zarr store; choose another --store path"
            )
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".ssl4eo-write-probe-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except PermissionError as exc:
        raise StoreError(
            f"cannot write the store at {path}: permission denied ({exc.strerror}); choose a "
            "--store path you can write, or fix the directory's permissions"
        ) from exc
    except OSError as exc:
        raise StoreError(f"cannot write the store at {path}: {exc}; choose another --store path"
                         ) from exc


def open_root(path: str | Path, mode: str = "r"):  # -> zarr.Group
    """The root group of an existing store made by this package (else :class:`StoreError`)."""
    import zarr

    if not _exists(path):
        raise StoreError(f"store {path} does not exist; build it with `ssl4eo build`")
    if not _is_our_store(path):
        raise StoreError(
            f"{path} is not an ssl4eo Zarr store (no zarr.json with {layout.ATTR_SCHEMA!r}); "
            "pass the path of a store written by `ssl4eo build`"
        )
    root = zarr.open_group(_target(path, mode), mode=mode, zarr_format=3)
    version = root.attrs.get(layout.ATTR_SCHEMA)
    if version != layout.SCHEMA_VERSION:
        raise StoreError(
            f"store {path} has schema version {version!r}, this package writes "
            f"{layout.SCHEMA_VERSION!r}; rebuild it into a new --store path"
        )
    return root


# ---------------------------------------------------------------------------------- template
def _template(modality: str, samples: np.ndarray, s: int,  # -> xr.Dataset
              convention: str = layout.S2_DEFAULT_CONVENTION):
    import dask.array as da
    import xarray as xr

    n = len(samples)
    bands = layout.BANDS[modality]
    nb = len(bands)

    def lazy(shape, dtype, chunks):
        return da.zeros(shape, dtype=dtype, chunks=chunks)

    vars_: dict[str, Any] = {
        "bands": (("sample", "time", "band", "y", "x"),
                  lazy((n, T, nb, N, N), bands_dtype(modality), (s, T, nb, N, N))),
        "center_lat": (("sample",), lazy((n,), "float64", (s,))),
        "center_lon": (("sample",), lazy((n,), "float64", (s,))),
        "crs": (("sample",), lazy((n,), "int32", (s,))),
        "x_": (("sample", "x"), lazy((n, N), "float64", (s, N))),
        "y_": (("sample", "y"), lazy((n, N), "float64", (s, N))),
        "time_": (("sample", "time"), lazy((n, T), "int64", (s, T))),
        "file_id": (("sample", "time"), lazy((n, T), f"<U{FILE_ID_LEN}", (s, T))),
        "cloud_cover": (("sample", "time"), lazy((n, T), "float32", (s, T))),
        "valid_fraction": (("sample", "time"), lazy((n, T), "float32", (s, T))),
        "zero_bands": (("sample", "time"), lazy((n, T), "uint8", (s, T))),
        "stats_partial": (("shard", "band", "moment"),
                          lazy((n_shards(n, s), nb, len(MOMENTS)), "float64", (1, nb, 3))),
    }
    if modality.startswith("S2"):
        vars_["cloud_mask"] = (("sample", "time", "y", "x"),
                               lazy((n, T, N, N), "uint8", (s, T, N, N)))
        vars_.update({
            "patch_cloud_fraction": (("sample", "time"), lazy((n, T), "float32", (s, T))),
            "candidates_tried": (("sample", "time"), lazy((n, T), "int8", (s, T))),
            "candidate_rank": (("sample", "time"), lazy((n, T), "int8", (s, T))),
            "dn_offset": (("sample", "time"), lazy((n, T), "int16", (s, T))),
            "offset_rule": (("sample", "time"), lazy((n, T), f"<U{OFFSET_RULE_LEN}", (s, T))),
        })
    ds = xr.Dataset(
        vars_,
        coords={"sample": samples.astype(f"<U{max(7, samples.dtype.itemsize // 4)}"),
                "time": np.arange(T, dtype=np.int8), "band": list(bands),
                "y": np.arange(N, dtype=np.int16), "x": np.arange(N, dtype=np.int16)},
    )
    ds.attrs.update(group_attrs(modality, convention))
    for name, attrs in variable_attrs(modality, convention).items():
        if name in ds:
            ds[name].attrs.update(attrs)
    return ds


def _encoding(modality: str, ds, s: int) -> dict[str, dict[str, Any]]:
    nb = len(layout.BANDS[modality])
    enc: dict[str, dict[str, Any]] = {}
    for name, var in ds.data_vars.items():
        chunks = var.data.chunksize
        e: dict[str, Any] = {"chunks": chunks, **_codecs(modality, name)}
        if name == "bands":
            e["chunks"] = (1, 1, nb, N, N)
            e["shards"] = (s, T, nb, N, N)
            e["fill_value"] = bands_fill(modality)
        elif name == "cloud_mask":
            e["chunks"] = (1, 1, N, N)
            e["shards"] = (s, T, N, N)
            e["fill_value"] = np.uint8(CLOUD_UNKNOWN)
        elif name == "time_":  # CF-encoded by hand: xarray cannot encode an all-NaT block
            e["_FillValue"] = NAT_INT
        elif name in ("cloud_cover", "valid_fraction", "center_lat", "center_lon", "x_", "y_",
                      "stats_partial", "patch_cloud_fraction"):
            e["_FillValue"] = np.nan
        enc[name] = e
    return enc


@quiet()
def create_store(
    path: str | Path,
    samples: Sequence[str],
    modalities: Sequence[str],
    *,
    provenance: Mapping[str, Any],
    shard_samples: int = layout.SHARD_SAMPLES,
    convention: str = layout.S2_DEFAULT_CONVENTION,
) -> bool:
    """Write the template once (or reuse a compatible existing store). Returns True if created.

    An existing store with other samples or modalities or another S2 offset ``convention``,
    or a path holding anything else, is an error: nothing there is touched.
    """
    import xarray as xr
    import zarr

    from . import storage

    samples_arr = np.asarray([str(s) for s in samples])
    fs, marker = _creating_marker(path)
    if fs.exists(marker):
        # an earlier create_store was killed midway (the marker is removed only once the
        # template is complete): what is at ``path`` is that half-written template, and no
        # shard can have been written into it yet, so it is removed and written again
        if _exists(path):
            rfs, rpath = storage.filesystem(path)
            rfs.rm(rpath, recursive=True)
        fs.rm_file(marker)
    if _exists(path):
        if not _is_our_store(path):
            raise StoreError(
                f"{path} already holds something that is not an ssl4eo store; refusing to write "
                "into it. Choose an empty or new --store path"
            )
        root = open_root(path)
        have = np.asarray(root["sample"][...]).astype(str)
        groups = set(root.group_keys())
        if not np.array_equal(have, samples_arr) or set(modalities) - groups:
            raise StoreError(
                f"store {path} was built for other locations or modalities ({len(have)} samples,"
                f" groups {sorted(groups)}) than this build ({len(samples_arr)} samples, "
                f"{sorted(modalities)}); use a new --store path (or --overwrite)"
            )
        have_conv = layout.recorded_convention(dict(root.attrs))[0]
        if have_conv != convention:
            raise StoreError(
                f"store {path} holds S2 values in the {have_conv} convention and this build "
                f"asks for {convention}; resume with --convention {have_conv}, or use a new "
                "--store path (or --overwrite)"
            )
        return False
    check_writable(path)
    fs.pipe_file(marker, b"ssl4eo store template being written; removed when it is complete\n")
    n = len(samples_arr)
    s = int(shard_samples)
    import dask.array as da

    root_ds = xr.Dataset(
        {"status": (("sample",), da.zeros((n,), dtype="uint8", chunks=(s,))),
         "failure": (("sample",), da.zeros((n,), dtype=f"<U{FAILURE_LEN}", chunks=(s,)))},
        coords={"sample": samples_arr},
    )
    root_ds.attrs.update({
        layout.ATTR_SCHEMA: layout.SCHEMA_VERSION,
        layout.ATTR_PROVENANCE: dict(provenance),
        layout.ATTR_CONVENTIONS: conventions(convention),
        layout.ATTR_STATS: {},
        "ssl4eo:modalities": list(modalities),
        "ssl4eo:shard_samples": s,
    })
    # attributes first, written by the same call as the arrays; status = 0 (pending) everywhere
    target = _target(path, "w")
    root_ds.to_zarr(target, mode="w", zarr_format=3, compute=False, consolidated=False,
                    encoding={"status": {"chunks": (s,), "fill_value": np.uint8(0)},
                              "failure": {"chunks": (s,)}})
    for m in modalities:
        ds = _template(m, samples_arr, s, convention)
        ds.to_zarr(target, group=m, mode="w", zarr_format=3, compute=False,
                   consolidated=False, encoding=_encoding(m, ds, s))
    zarr.consolidate_metadata(target, zarr_format=3)
    fs.rm_file(marker)
    return True


def _creating_marker(path: str | Path):  # -> (fsspec filesystem, marker path)
    """The file beside the store that says "template being written" (``cube.zarr`` ->
    ``cube.zarr.ssl4eo-creating``): outside the store, so that writing the root group (which
    clears the store) cannot remove it."""
    from . import storage

    fs, p = storage.filesystem(path)
    return fs, p.rstrip("/") + ".ssl4eo-creating"


def conventions(convention: str = layout.S2_DEFAULT_CONVENTION) -> dict[str, Any]:
    """The root group's ``ssl4eo:conventions``: what the values mean, with the S2 offset
    convention the build wrote (``--convention``)."""
    if convention not in layout.S2_OFFSET_CONVENTIONS:
        raise StoreError(f"unknown S2 offset convention {convention!r}: choose one of "
                         f"{', '.join(layout.S2_OFFSET_CONVENTIONS)}")
    return {
        "s2_offset_convention": convention,
        "s2_offset": layout.S2_OFFSET_CONVENTIONS[convention],
        "s2_nodata": layout.S2_NODATA,
        "s1_units": "dB", "s1_nodata": "NaN",
        "cloud_mask": {"0": "clear", "1": "cloud/shadow/cirrus (SCL 3, 8, 9, 10)",
                       "255": "unknown (no SCL, nodata or missing season)"},
        "time": "season index 0..3, chronological; time_ NaT / file_id '' where missing",
        "status": layout.STATUS_CODES,
    }


# --------------------------------------------------------------------------- self-description
#: What each group holds, in a sentence (the group's ``description`` attribute).
GROUP_DESCRIPTIONS = {
    layout.S2L2A: "Sentinel-2 Level-2A bottom-of-atmosphere reflectance, 12 bands",
    layout.S2L1C: "Sentinel-2 Level-1C top-of-atmosphere reflectance, 13 bands",
    layout.S1RTC: "Sentinel-1 radiometrically terrain corrected backscatter (gamma0), VV and VH",
}
#: Central wavelength of each Sentinel-2 band, nm (Sentinel-2A, ESA's spectral response).
S2_BAND_WAVELENGTH_NM = {
    "B01": 443, "B02": 490, "B03": 560, "B04": 665, "B05": 705, "B06": 740, "B07": 783,
    "B08": 842, "B8A": 865, "B09": 945, "B10": 1375, "B11": 1610, "B12": 2190,
}
_PATCH = (f"{N} x {N} px at {layout.PIXEL_SIZE_M:g} m on the location's UTM grid, one scene per "
          f"season ({T} seasons)")


def bands_units(modality: str, convention: str = layout.S2_DEFAULT_CONVENTION) -> str:
    """The ``units`` of a group's ``bands`` (and of its ``band_mean`` / ``band_std``)."""
    if modality.startswith("S1"):
        return "dB"
    return (f"DN = 10000 * reflectance + {layout.S2_OFFSET_CONVENTIONS[convention]} "
            f"({convention} convention)")


def group_attrs(modality: str, convention: str = layout.S2_DEFAULT_CONVENTION) -> dict:
    """A modality group's own attributes: what it holds, its units, nodata and convention, so
    that ``xr.open_zarr(store, group=...)`` describes itself without the root group."""
    bands = list(layout.BANDS[modality])
    attrs: dict[str, Any] = {
        "title": f"SSL4EO-S12 {modality} patches",
        "description": f"{GROUP_DESCRIPTIONS.get(modality, modality)}; {_PATCH}. "
                       "band_mean / band_std: per-band statistics over the valid pixels of "
                       "the complete samples (written when the build finishes).",
        "Conventions": "CF-1.10",
        "units": bands_units(modality, convention),
        "bands": bands,
    }
    if modality.startswith("S1"):
        attrs.update(nodata="NaN", polarisations=bands,
                     source="Sentinel-1 GRD, RTC gamma0 (linear) converted to 10*log10 dB")
    else:
        offset = layout.S2_OFFSET_CONVENTIONS[convention]
        attrs.update(
            nodata=layout.S2_NODATA, s2_offset_convention=convention, s2_offset=offset,
            reflectance=f"(DN - {offset}) / 10000 on valid (non-zero) pixels",
            band_wavelength_nm=[S2_BAND_WAVELENGTH_NM[b] for b in bands],
            band_native_gsd_m=[layout.S2_BAND_GSD[b] for b in bands],
        )
    return attrs


def variable_attrs(modality: str, convention: str = layout.S2_DEFAULT_CONVENTION) -> dict:
    """CF-style attributes (``long_name``, ``units``, ``standard_name`` where CF has one) of
    every variable of a modality group."""
    s1 = modality.startswith("S1")
    units = bands_units(modality, convention)
    bands: dict[str, Any] = {
        "long_name": GROUP_DESCRIPTIONS.get(modality, modality),
        "units": units, "nodata": (float("nan") if s1 else layout.S2_NODATA),
    }
    if not s1:
        bands["standard_name"] = ("toa_bidirectional_reflectance" if modality == layout.S2L1C
                                  else "surface_bidirectional_reflectance")
        bands["comment"] = ("stored as DN: reflectance = (DN - "
                            f"{layout.S2_OFFSET_CONVENTIONS[convention]}) / 10000; 0 = nodata")
    attrs: dict[str, dict[str, Any]] = {
        "bands": bands,
        "center_lat": {"long_name": "latitude of the patch centre", "units": "degrees_north",
                       "standard_name": "latitude"},
        "center_lon": {"long_name": "longitude of the patch centre", "units": "degrees_east",
                       "standard_name": "longitude"},
        "crs": {"long_name": "EPSG code of the patch's UTM grid"},
        "x_": {"long_name": "UTM easting of the pixel centres", "units": "m",
               "standard_name": "projection_x_coordinate"},
        "y_": {"long_name": "UTM northing of the pixel centres", "units": "m",
               "standard_name": "projection_y_coordinate"},
        # units and calendar: the CF encoding of time_ (int64), decoded to datetime64 by xarray
        "time_": {"long_name": "acquisition time of the season's scene", "standard_name": "time",
                  "description": "acquisition time; NaT where the season has no scene",
                  "units": "nanoseconds since 1970-01-01", "calendar": "proleptic_gregorian"},
        "file_id": {"long_name": "STAC item id of the season's scene",
                    "description": "STAC item id; empty where the season has no scene"},
        "cloud_cover": {"long_name": "scene-level cloud cover (eo:cloud_cover)",
                        "units": "percent"},
        "valid_fraction": {"long_name": "fraction of the patch with valid pixels", "units": "1"},
        "stats_partial": {"long_name": "per-shard partial moments of each band "
                                       "(count, mean, M2) over valid pixels"},
        "cloud_mask": {"long_name": "cloud, shadow or cirrus on the patch (from SCL)",
                       "flag_values": [0, 1, CLOUD_UNKNOWN],
                       "flag_meanings": "clear cloud unknown",
                       "scl_cloud_classes": list(layout.SCL_CLOUD_CLASSES)},
        "band_mean": {"long_name": "per-band mean over valid pixels", "units": units},
        "band_std": {"long_name": "per-band standard deviation over valid pixels",
                     "units": units},
        "band_count": {"long_name": "valid pixels counted per band", "units": "1"},
    }
    long_names = {"zero_bands": "number of bands empty on the whole patch",
                  "patch_cloud_fraction": "cloudy fraction of the patch (SCL)",
                  "candidates_tried": "candidate scenes judged on the patch",
                  "candidate_rank": "rank of the kept candidate",
                  "dn_offset": "DN offset of the chosen scene",
                  "offset_rule": "rule that decided dn_offset"}
    for name, text in QUALITY_DESCRIPTIONS.items():
        attrs[name] = {"long_name": long_names[name], "description": text}
    attrs["patch_cloud_fraction"]["units"] = "1"
    return attrs


# ------------------------------------------------------------------------------- shard write
#: the quality table: per sample and season, in every group (S2 groups have them all)
QUALITY_DESCRIPTIONS = {
    "zero_bands": "bands that are 0 (S2) or NaN (S1) on the whole patch of the chosen scene",
    "patch_cloud_fraction": "fraction of the patch that SCL marks cloud, shadow or cirrus, "
                            "for the chosen scene (NaN: no SCL, e.g. L1C)",
    "candidates_tried": "scenes judged on the patch (1: the scene-level rule's scene was "
                        "clear enough; 0: no scene)",
    "candidate_rank": "which of the search's candidates was kept (0: the scene-level rule's)",
    "dn_offset": "the scene's own DN offset before harmonisation (1000 or 0)",
    "offset_rule": "what decided dn_offset (pipeline.providers.s2_offset_rule)",
}
OFFSET_RULE_LEN = 40


def empty_shard(modality: str, samples: Sequence[str]) -> dict[str, np.ndarray]:
    """Numpy arrays for one shard filled with the nodata / missing markers."""
    k = len(samples)
    nb = len(layout.BANDS[modality])
    out = {
        "bands": np.full((k, T, nb, N, N), bands_fill(modality), bands_dtype(modality)),
        "center_lat": np.full(k, np.nan), "center_lon": np.full(k, np.nan),
        "crs": np.zeros(k, np.int32),
        "x_": np.full((k, N), np.nan), "y_": np.full((k, N), np.nan),
        "time_": np.full((k, T), np.datetime64("NaT", "ns")),
        "file_id": np.full((k, T), "", f"<U{FILE_ID_LEN}"),
        "cloud_cover": np.full((k, T), np.nan, np.float32),
        "valid_fraction": np.full((k, T), np.nan, np.float32),
        "zero_bands": np.zeros((k, T), np.uint8),
    }
    if modality.startswith("S2"):
        out["cloud_mask"] = np.full((k, T, N, N), CLOUD_UNKNOWN, np.uint8)
        out.update({
            "patch_cloud_fraction": np.full((k, T), np.nan, np.float32),
            "candidates_tried": np.zeros((k, T), np.int8),
            "candidate_rank": np.zeros((k, T), np.int8),
            "dn_offset": np.zeros((k, T), np.int16),
            "offset_rule": np.full((k, T), "", f"<U{OFFSET_RULE_LEN}"),
        })
    return out


def sample_sums(bands: np.ndarray, modality: str) -> np.ndarray:
    """What one sample's ``bands (..., band, y, x)`` adds to its shard's partial moments
    (:func:`partial_moments`), computed where the sample is read (the task's read threads)
    so that writing a shard only adds them up.

    S2 (uint16, 0 = nodata): ``(band, 3)`` count, sum and sum of squares of the non-zero pixels,
    exact in float64 for these integers (so they add up exactly, in any order). S1 (float32,
    NaN = nodata): ``(image, band, 3)`` count, mean and M2 of each (time) image's finite values,
    two-pass, which :func:`moments_from_sums` combines in sample order.

    One (time) image of a band at a time, so the float64 copies stay small (557 kB for
    264 x 264: in the cache and on the heap, instead of one 18 MB temporary per band of a
    shard).
    """
    nb = bands.shape[-3]
    images = bands.reshape((-1,) + bands.shape[-3:])
    if modality.startswith("S1"):
        parts = np.zeros((len(images), nb, 3))
        for k, image in enumerate(images):
            for b in range(nb):
                v = image[b][np.isfinite(image[b])].astype(np.float64)
                if v.size:
                    mean = v.mean()
                    d = v - mean
                    parts[k, b] = (v.size, mean, d @ d)
        return parts
    out = np.zeros((nb, 3))
    for b in range(nb):
        for image in images[:, b]:
            f = image.astype(np.float64).ravel()
            out[b] += (np.count_nonzero(image), f.sum(), f @ f)
    return out


def moments_from_sums(sums: Sequence[np.ndarray], modality: str) -> np.ndarray:
    """(band, 3) count, mean, M2 of a shard from its samples' :func:`sample_sums`, in sample
    order (S2: M2 = sum(x^2) - sum(x) * mean, a relative error near 1e-16 here; S1: the images'
    moments combined as :func:`combine_moments` does)."""
    if modality.startswith("S1"):
        count, mean, m2 = _combine(np.concatenate(list(sums)))  # (image, band, 3)
        return np.stack([count, mean, m2], axis=-1)
    n, total, squares = np.sum(sums, axis=0).T
    out = np.zeros((len(n), 3))
    for b in np.flatnonzero(n):
        mean = total[b] / n[b]
        out[b] = (n[b], mean, max(squares[b] - total[b] * mean, 0.0))
    return out


def partial_moments(bands: np.ndarray, modality: str) -> np.ndarray:
    """(band, 3) count, mean, M2 over valid pixels of ``bands (sample, ..., band, y, x)``
    (S2 non-zero, S1 finite): :func:`moments_from_sums` of each sample's :func:`sample_sums`."""
    return moments_from_sums([sample_sums(b, modality) for b in bands], modality)


def combine_moments(parts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine (shard, band, 3) partial moments: count, mean, std (population) per band."""
    count, mean, m2 = _combine(parts)
    std = np.sqrt(np.where(count > 0, m2 / np.where(count > 0, count, 1), np.nan))
    mean = np.where(count > 0, mean, np.nan)
    return count, mean, std


def _combine(parts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(part, band, 3) count, mean, M2 combined into count, mean, M2 per band (Chan et al.);
    parts with a non-finite value are left out."""
    nb = parts.shape[1]
    count = np.zeros(nb)
    mean = np.zeros(nb)
    m2 = np.zeros(nb)
    for p in parts:
        if not np.isfinite(p).all():
            continue
        n_b, mean_b, m2_b = p[:, 0], p[:, 1], p[:, 2]
        tot = count + n_b
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = mean_b - mean
            mean = np.where(tot > 0, mean + delta * n_b / np.where(tot > 0, tot, 1), 0.0)
            m2 = m2 + m2_b + delta**2 * count * n_b / np.where(tot > 0, tot, 1)
        count = tot
    return count, mean, m2


@quiet()
def write_shard_arrays(
    path: str | Path,
    shard: int,
    samples: Sequence[str],
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    status: np.ndarray,
    failure: Sequence[str],
    shard_samples: int = layout.SHARD_SAMPLES,
    sums: Mapping[str, Sequence[np.ndarray]] | None = None,
) -> None:
    """Write one whole shard: every modality group, then ``status``/``failure`` (last).
    ``sums``: per modality, each sample's :func:`sample_sums` when the task computed them
    while it read (else they are computed here from the bands).

    Straight through zarr into the template's arrays (whose dtypes and encodings
    :func:`create_store` fixed: ``time_`` as int64 nanoseconds, NaN / NaT as stored), a region
    of whole chunks and shards; the last shard of a store may be short, and only its own task
    writes it. (xarray's region writes did the same with 1.4x the CPU: 3.4 s against 2.4 s for
    four shards of the demo, partial moments included.)
    """
    import zarr

    root = zarr.open_group(_target(path, "r+"), mode="r+", zarr_format=3, use_consolidated=False)
    s0 = shard * shard_samples
    rows = slice(s0, s0 + len(samples))
    # every chunk is written, also one that holds only fill (a season without a scene): zarr
    # would otherwise compare each chunk with the fill value before writing it, 40 % of the
    # CPU of writing a shard of S2 bands. A fill-only chunk reads back as fill either way.
    write_all = {"write_empty_chunks": True}
    for modality, arrs in arrays.items():
        group = root[modality]
        for name, values in arrs.items():
            if name == "time_":
                values = np.asarray(values, "datetime64[ns]").view(np.int64)
            group[name].with_config(write_all)[rows] = values
        moments = (moments_from_sums(sums[modality], modality) if sums and modality in sums
                   else partial_moments(arrs["bands"], modality))
        group["stats_partial"][shard:shard + 1] = moments[None]
    root["failure"][rows] = np.asarray(failure, f"<U{FAILURE_LEN}")
    root["status"][rows] = np.asarray(status, np.uint8)


# ---------------------------------------------------------------------------------- finalize
def read_status(path: str | Path) -> np.ndarray:
    return np.asarray(open_root(path)["status"][...])


@quiet()
def finalize(path: str | Path) -> dict[str, Any]:
    """Band statistics from the shards' partial moments into the attributes; consolidate."""
    import zarr

    root = open_root(path, mode="r+")
    stats: dict[str, Any] = {}
    convention = layout.recorded_convention(dict(root.attrs))[0]
    for m in root.attrs.get("ssl4eo:modalities", []):
        parts = np.asarray(root[m]["stats_partial"][...])
        count, mean, std = combine_moments(parts)
        stats[m] = {"bands": list(layout.BANDS[m]), "mean": [float(v) for v in mean],
                    "std": [float(v) for v in std], "count": [int(c) for c in count],
                    "units": "dB" if m.startswith("S1") else
                    f"DN ({convention} offset convention)"}
        _describe_group(root[m], m, convention, count, mean, std)
    root.attrs[layout.ATTR_STATS] = stats
    zarr.consolidate_metadata(_target(path, "r+"), zarr_format=3)
    return stats


def _describe_group(group, modality: str, convention: str, count: np.ndarray,
                    mean: np.ndarray, std: np.ndarray) -> None:
    """The group's statistics as variables ``band_mean`` / ``band_std`` / ``band_count``
    ``(band,)`` and its attributes, written again by every finalize (a resumed build, or a
    store written before groups described themselves, ends with them too)."""
    var_attrs = variable_attrs(modality, convention)
    for name, values, dtype in (("band_mean", mean, "float64"), ("band_std", std, "float64"),
                                ("band_count", count, "int64")):
        arr = group.create_array(name, shape=(len(values),), dtype=dtype, chunks=(len(values),),
                                 dimension_names=["band"], overwrite=True,
                                 fill_value=(np.nan if dtype == "float64" else 0))
        arr[...] = np.asarray(values, dtype=dtype)
        arr.attrs.update(var_attrs[name])
    group.attrs.update(group_attrs(modality, convention))


def summary(path: str | Path) -> dict[str, Any]:
    """Counts per status, failures, stored bytes and statistics of a store."""
    root = open_root(path)
    status = np.asarray(root["status"][...])
    failure = np.asarray(root["failure"][...]).astype(str)
    codes = {v: k for k, v in layout.STATUS_CODES.items()}
    ids = np.asarray(root["sample"][...]).astype(str)
    counts = {codes[c]: int((status == c).sum()) for c in codes}
    size = stored_bytes(path)
    groups = {}
    for m in root.attrs.get("ssl4eo:modalities", []):
        fid = np.asarray(root[m]["file_id"][...]).astype(str)
        done = status == layout.STATUS_CODES["complete"]
        groups[m] = {"scenes": int((fid[done] != "").sum()),
                     "missing_seasons": int((fid[done] == "").sum())}
    return {
        "store": str(path), "samples": int(status.size), "status": counts,
        "failures": {str(s): str(r) for s, r in zip(ids, failure, strict=True) if r},
        "groups": groups, "stored_bytes": int(size),
        "bytes_per_sample": size / max(1, counts.get("complete", 0)),
        "band_stats": root.attrs.get(layout.ATTR_STATS, {}),
        "quality": quality_summary(path),
    }


def quality_table(path: str | Path):  # -> pd.DataFrame
    """The quality table: one row per (sample, season, modality) of the complete samples that
    have a scene: the chosen scene, the scene-level cloud cover, candidates tried and the rank
    kept, the patch's cloud and valid fractions, all-empty bands, the DN offset and its rule.
    Columns a store from before the quality table lacks are left out."""
    import pandas as pd

    root = open_root(path)
    status = np.asarray(root["status"][...])
    ids = np.asarray(root["sample"][...]).astype(str)
    done = status == layout.STATUS_CODES["complete"]
    frames = []
    for m in root.attrs.get("ssl4eo:modalities", []):
        g = root[m]
        fid = np.asarray(g["file_id"][...]).astype(str)
        have = done[:, None] & (fid != "")
        si, ti = np.nonzero(have)
        cols: dict[str, Any] = {"sample": ids[si], "season": ti.astype(np.int8),
                                "modality": m, "file_id": fid[si, ti]}
        for name in ("cloud_cover", "candidates_tried", "candidate_rank",
                     "patch_cloud_fraction", "valid_fraction", "zero_bands", "dn_offset",
                     "offset_rule"):
            if name in g:
                values = np.asarray(g[name][...])
                cols[name] = values[si, ti].astype(str) if values.dtype.kind == "U" else \
                    values[si, ti]
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def quality_summary(path: str | Path) -> dict[str, Any]:
    """The quality table per modality: seasons with a scene, mean and 90th percentile of the
    patch cloud fraction, seasons where the patch rule took a runner-up, mean candidates
    tried, seasons with an all-empty band, and the offset rules applied."""
    df = quality_table(path)
    out: dict[str, Any] = {}
    for m, sub in (df.groupby("modality") if len(df) else []):
        q: dict[str, Any] = {"seasons": int(len(sub))}
        if "patch_cloud_fraction" in sub and sub["patch_cloud_fraction"].notna().any():
            pcf = sub["patch_cloud_fraction"].dropna()
            q.update(patch_cloud_mean=round(float(pcf.mean()), 5),
                     patch_cloud_p90=round(float(pcf.quantile(0.9)), 5))
        if "valid_fraction" in sub:
            q["valid_mean"] = round(float(sub["valid_fraction"].mean()), 5)
        if "candidate_rank" in sub:
            q["runner_up_taken"] = int((sub["candidate_rank"] > 0).sum())
            q["candidates_tried_mean"] = round(float(sub["candidates_tried"].mean()), 3)
        if "zero_bands" in sub:
            q["seasons_with_empty_band"] = int((sub["zero_bands"] > 0).sum())
        if "offset_rule" in sub:
            q["offset_rules"] = {str(k): int(v) for k, v in
                                 sub["offset_rule"].value_counts().items() if k}
        out[str(m)] = q
    return out


def stored_bytes(path: str | Path) -> int:
    """Bytes the store takes (every object under it)."""
    from . import storage

    if storage.is_remote(path):
        fs, p = storage.filesystem(path)
        return int(fs.du(p))
    return sum(f.stat().st_size for f in storage.local_path(path).rglob("*") if f.is_file())


def _table_record(kind: str, path: str | Path, digests: Mapping[str, str] | None,
                  task_tables: Mapping[str, str] | None) -> dict[str, Any]:
    from . import storage

    rec: dict[str, Any] = {"path": storage.redact(str(path))}
    if storage.is_remote(path):
        info = storage.input_info(path, f"{kind} table")
        rec.update({k: v for k, v in info.items() if v is not None})
    else:
        rec["sha256"] = (digests or {}).get(kind) or storage.file_sha256(path)
    read_from = (task_tables or {}).get(kind)
    if read_from and read_from != str(path):
        rec["tasks_read"] = storage.redact(read_from)
    return rec


def provenance(config: Any, provider: str, scenes_path: str | Path,
               locations_path: str | Path, options: Mapping[str, Any], *,
               digests: Mapping[str, str] | None = None,
               task_tables: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The provenance record written into the root attributes: each input table's path or URL
    (redacted), its SHA-256 (local tables; ``digests`` when already computed) or its ETag and
    size (remote ones, which are not downloaded for a hash), and the URL the tasks read it
    from when it was published beside the store."""
    import importlib.metadata as md

    import rasterio

    versions = {}
    for pkg in ("stackstac", "rasterio", "zarr", "xarray", "dask", "distributed", "numpy",
                "numcodecs", "pystac"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    versions["gdal"] = rasterio.__gdal_version__
    from . import __version__

    versions["ssl4eo-pipeline"] = __version__
    return {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "provider": provider,
        "config": config,
        "options": dict(options),
        "scenes_table": _table_record("scenes", scenes_path, digests, task_tables),
        "locations_table": _table_record("locations", locations_path, digests, task_tables),
        "versions": versions,
    }


def remove_store(path: str | Path) -> None:
    """Delete a store made by this package (refuses anything else)."""
    from . import storage

    if _exists(path):
        if not _is_our_store(path):
            raise StoreError(f"{path} is not an ssl4eo store; refusing to delete it")
        if storage.is_remote(path):
            storage.remove_store(path)
        else:
            shutil.rmtree(storage.local_path(path))
