"""PyTorch datasets over the SSL4EO Zarr store (layout in :mod:`pipeline.layout`).

Two datasets share one sample builder:

* :class:`ZarrPatchDataset`: map-style. One item = one location (a complete sample), read
  chunk by chunk (one inner chunk per (sample, season, modality)). Use it with any sampler,
  ``DistributedSampler`` included.
* :class:`ZarrShardStream`: iterable. Reads shards (one read per shard per modality) in a
  shuffled order, mixes samples through a shuffle buffer and splits them over ranks and
  DataLoader workers; by default (``even="pad"``) every rank gets the same number of samples
  (a few repeated when the count does not divide), as DDP needs, with ``even="none"`` every
  complete sample is served exactly once per epoch; the order is a function of ``seed`` and
  the epoch. Made for object storage, where a shard is one large GET instead of many small
  ones.

Items are dicts. Season modes (``seasons=``):

* an ``int`` k: ``image`` [C, H, W] from season k (samples without season k are skipped);
* ``"random"``: ``image`` [C, H, W] from one season drawn among those with data;
* ``"all"``: ``image`` [T, C, H, W], the seasons with data in time order (by default only
  samples with all four seasons are served, so that batches collate);
* ``"augment"``: ``views``, a list of ``num_views`` tensors [C, H, W], each from a season drawn
  independently among those with data (SSL4EO-S12's seasonal augmentation: two views of one
  location from two independently drawn seasons; ``num_views=3`` gives DINO's local-crop
  source as the third).

With ``stack=False`` each tensor above is a dict ``{modality: tensor}``; transforms then see the
modalities concatenated along the band axis (so crops and flips are shared) and the result is
split back. Metadata (``return_metadata=True``): ``sample`` (7-digit id), ``index`` (row in
the store), ``seasons`` (the season index of each returned time step or view), ``time``
(``{modality: acquisition time, int64 ns since the epoch}`` per returned season), ``lat``,
``lon`` and ``bands`` (band names, in channel order).

Values (``output="float32"``, the default) are float32. Normalisation: ``normalize=True``
or ``"store"`` uses the statistics in the store's root attributes
(:data:`~pipeline.layout.ATTR_STATS`), a dict gives them (``{"S2L2A": {"mean": [...], "std":
[...]}}``, or ``{"mean", "std"}`` for one modality; with ``stack=True`` a flat list over the
stacked bands also works), ``False`` returns stored values (S2 DN in the v1.1 +1000
convention, S1 dB). Nodata pixels (S2 ``0``, S1 ``NaN``) are set to ``fill_nodata`` (default
``0.0``, the band mean after normalisation; ``None`` keeps them).

``output="raw"`` returns the stored values untouched, in the stored dtype (S2 ``uint16`` DN,
2 bytes a pixel; S1 ``float32`` dB with ``NaN``): no cast, no normalisation, no nodata fill, no
transforms. :class:`StoreNormalize` (``StoreNormalize.from_store(dataset)``) then applies the
dataset's normalisation and nodata fill to a batch on whatever device the batch is on, with
results exactly equal to ``output="float32"``. Raw values of modalities with different dtypes
(S2 with S1) cannot share a tensor: use ``stack=False`` and let :class:`StoreNormalize` stack.

Fast path for training on a GPU: ``ZarrShardStream(..., output="raw", batch_size=B)`` through
``DataLoader(stream, batch_size=None, num_workers=...)``, then ``StoreNormalize`` (and batch
augmentations) on the GPU. The workers then only decode: each batch is one array, allocated in
shared memory, with every chunk decompressed straight into its place, so PyTorch's per-sample
collate (a copy of every sample into a fresh shared-memory block) and the float conversion
(twice the bytes) leave the workers. Per-sample CPU transforms (``transform=``) need the
default per-sample items.

Randomness (season draws and transforms from :mod:`pipeline.transforms`) is a function of
``(seed, epoch, sample index)``: an item is the same whichever worker or rank reads it. Call
``set_epoch(epoch)`` each epoch. ``seed=None`` draws from torch's global generator instead
(seeded per worker by the DataLoader), which also gives fresh draws with persistent workers.

The store is opened lazily, inside each worker, on first use; no zarr handle is pickled, so
both datasets work with ``multiprocessing_context="spawn"`` or ``"forkserver"`` (prefer those:
forking after zarr's I/O thread has started can deadlock).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from . import layout
from .errors import StoreError

log = logging.getLogger(__name__)

SeasonMode = int | Literal["all", "random", "augment"]
Normalize = bool | Literal["store"] | Mapping[str, Any]
Output = Literal["float32", "raw"]
Even = Literal["pad", "drop", "none"]

__all__ = [
    "CorruptSampleError",
    "StoreIndex",
    "StoreNormalize",
    "ZarrPatchDataset",
    "ZarrShardStream",
    "partition_shards",
    "read_store_index",
]


class CorruptSampleError(StoreError):
    """A sample's chunks cannot be read or decoded (a damaged or missing shard file)."""


# ------------------------------------------------------------------------------ store index
@dataclass(frozen=True)
class ModalityIndex:
    """What the loader needs to know about one modality group, read once at start-up."""

    name: str
    bands: tuple[str, ...]
    dtype: str
    shape: tuple[int, ...]  # (sample, time, band, y, x)
    shard_shape: tuple[int, ...]  # shard (or chunk, if unsharded) shape of ``bands``
    times: np.ndarray  # (sample, time) datetime64[ns], NaT where missing
    available: np.ndarray  # (sample, time) bool: a scene exists

    @property
    def shard_samples(self) -> int:
        return int(self.shard_shape[0])


@dataclass(frozen=True)
class StoreIndex:
    """The per-sample tables of a store, validated against :mod:`pipeline.layout`."""

    url: str
    sample_ids: np.ndarray  # (sample,) str
    status: np.ndarray  # (sample,) uint8
    lat: np.ndarray
    lon: np.ndarray
    modalities: dict[str, ModalityIndex]
    stats: dict[str, Any]
    #: the S2 offset convention the store records (``ssl4eo:conventions``) and its DN offset:
    #: stored S2 values are ``10000 * reflectance + s2_offset``
    convention: str = layout.S2_DEFAULT_CONVENTION
    s2_offset: int = layout.S2_OFFSET_CONVENTIONS[layout.S2_DEFAULT_CONVENTION]

    @property
    def n_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def complete(self) -> np.ndarray:
        return self.status == layout.STATUS_CODES["complete"]


def _display(url: Any) -> str:
    from .storage import redact

    return str(redact(os.fspath(url)))


def _open_store(url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None):
    from .storage import open_store

    return open_store(url, mode="r", storage_options=storage_options)


def _open_root(url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None):
    import zarr

    store = _open_store(url, storage_options)
    try:
        return zarr.open_group(store, mode="r", zarr_format=3)
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.NodeTypeValidationError) as exc:
        raise StoreError(
            f"no Zarr v3 store at {_display(url)!r} ({type(exc).__name__}: {exc}); check the "
            "path or URL, or build the store first with `ssl4eo build`"
        ) from exc


def _decoded_times(store: Any, group: str, n: int, ntime: int) -> tuple[np.ndarray, np.ndarray]:
    """Acquisition times (datetime64[ns], NaT where missing) and availability for one group.

    ``time_`` is CF-encoded by xarray; xarray decodes it. Falls back to ``file_id != ""``.
    """
    import xarray as xr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = xr.open_zarr(store, group=group, consolidated=None, chunks=None, zarr_format=3)
        if "time_" in ds.variables:
            times = np.asarray(ds["time_"].values).astype("datetime64[ns]")
            return times, ~np.isnat(times)
        if "file_id" in ds.variables:
            ids = np.asarray(ds["file_id"].values).astype(str)
            return np.full((n, ntime), np.datetime64("NaT"), "datetime64[ns]"), ids != ""
    return np.full((n, ntime), np.datetime64("NaT"), "datetime64[ns]"), np.ones((n, ntime), bool)


def read_store_index(
    url: str | os.PathLike[str],
    modalities: Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
) -> StoreIndex:
    """Open the store at ``url``, check it against the layout and read its per-sample tables.

    Raises :class:`~pipeline.errors.StoreError` for a missing store, a wrong schema version,
    a missing modality group, or a group whose arrays do not match the layout.
    """
    import zarr

    shown = _display(url)
    root = _open_root(url, storage_options)
    attrs = dict(root.attrs)
    version = attrs.get(layout.ATTR_SCHEMA)
    if version is None:
        raise StoreError(
            f"store {shown!r} has no {layout.ATTR_SCHEMA!r} attribute, so it was not written by "
            "this pipeline (or its template was never finished); build it with `ssl4eo build`"
        )
    if str(version) != layout.SCHEMA_VERSION:
        raise StoreError(
            f"store {shown!r} has schema version {version!r} but this loader reads version "
            f"{layout.SCHEMA_VERSION!r}; rebuild the store with this version of the pipeline or "
            "install the version that wrote it"
        )
    groups = sorted(name for name, _ in root.groups())
    arrays = {name for name, _ in root.arrays()}
    if "status" not in arrays:
        raise StoreError(
            f"store {shown!r} has no root 'status' array, so no sample is known to be complete; "
            "finish or resume the build (`ssl4eo build` resumes)"
        )
    status = np.asarray(root["status"][:], dtype=np.uint8)
    n = len(status)
    index: dict[str, ModalityIndex] = {}
    sample_ids: np.ndarray | None = None
    lat = lon = None
    for m in modalities:
        if m not in groups:
            raise StoreError(
                f"store {shown!r} has no group {m!r} (it has: {', '.join(groups) or 'none'}); "
                f"choose modalities from those, or build {m} into the store"
            )
        g = root[m]
        members = {name for name, _ in g.arrays()}
        if "bands" not in members:
            raise StoreError(f"group {m!r} of store {shown!r} has no 'bands' array; rebuild it")
        arr = g["bands"]
        if arr.ndim != 5 or arr.shape[0] != n:
            raise StoreError(
                f"{m}/bands in store {shown!r} has shape {arr.shape}; the layout is (sample={n}, "
                "time, band, y, x): the store is incompatible with this loader"
            )
        names = (
            tuple(str(b) for b in g["band"][:]) if "band" in members else layout.BANDS.get(m, ())
        )
        if len(names) != arr.shape[2]:
            raise StoreError(
                f"{m}/bands in store {shown!r} has {arr.shape[2]} bands but {len(names)} band "
                "names; the store is incompatible with this loader"
            )
        ids = np.asarray(g["sample"][:]).astype(str) if "sample" in members else None
        if ids is not None:
            if sample_ids is None:
                sample_ids = ids
            elif not np.array_equal(ids, sample_ids):
                raise StoreError(
                    f"the sample coordinates of group {m!r} differ from {modalities[0]!r} in "
                    f"store {shown!r}; groups must share one sample axis"
                )
        if lat is None and {"center_lat", "center_lon"} <= members:
            lat = np.asarray(g["center_lat"][:], dtype=np.float64)
            lon = np.asarray(g["center_lon"][:], dtype=np.float64)
        times, avail = _decoded_times(root.store, m, n, arr.shape[1])
        shard_shape = tuple(arr.shards or arr.chunks)
        index[m] = ModalityIndex(
            name=m, bands=names, dtype=str(arr.dtype), shape=tuple(arr.shape),
            shard_shape=shard_shape, times=times, available=avail,
        )
    if sample_ids is None:
        sample_ids = np.array([layout.sample_id(i) for i in range(n)])
    if lat is None:
        lat = lon = np.full(n, np.nan)
    spatial = {mi.shape[3:] for mi in index.values()}
    if len(spatial) > 1:
        raise StoreError(
            f"modalities {list(modalities)} in store {shown!r} have different patch sizes "
            f"{sorted(spatial)}; they cannot be stacked"
        )
    del zarr
    return StoreIndex(
        url=os.fspath(url), sample_ids=sample_ids, status=status, lat=lat, lon=lon,
        modalities=index, stats=dict(attrs.get(layout.ATTR_STATS) or {}),
        **dict(zip(("convention", "s2_offset"), _convention(attrs, shown), strict=True)),
    )


def _convention(attrs: dict, shown: str) -> tuple[str, int]:
    try:
        return layout.recorded_convention(attrs)
    except ValueError as exc:
        raise StoreError(f"store {shown!r}: {exc}") from None


# -------------------------------------------------------------------------------- helpers
def _is_s1(modality: str, dtype: str) -> bool:
    return modality.startswith("S1") or np.dtype(dtype).kind == "f"


def _norm_from(
    normalize: Normalize, index: StoreIndex, modalities: Sequence[str], url: str
) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Per-modality (mean, 1/std) arrays shaped (C, 1, 1), or None for no normalisation."""
    if normalize is False:
        return None
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if normalize is True or normalize == "store":
        source: Mapping[str, Any] = index.stats
        for m in modalities:
            entry = source.get(m)
            if not entry or "mean" not in entry or "std" not in entry:
                raise StoreError(
                    f"store {url!r} has no band statistics for {m} in its "
                    f"{layout.ATTR_STATS!r} attribute; compute them when building the store, or "
                    "pass normalize={'<modality>': {'mean': [...], 'std': [...]}} or "
                    "normalize=False"
                )
            stat_bands = entry.get("bands")
            if stat_bands is not None and tuple(stat_bands) != index.modalities[m].bands:
                raise StoreError(
                    f"the statistics for {m} in store {url!r} are for bands {list(stat_bands)} "
                    f"but the store holds {list(index.modalities[m].bands)}; recompute them"
                )
    elif isinstance(normalize, Mapping):
        if "mean" in normalize and "std" in normalize:
            mean = np.asarray(normalize["mean"], dtype=np.float64).ravel()
            std = np.asarray(normalize["std"], dtype=np.float64).ravel()
            sizes = [len(index.modalities[m].bands) for m in modalities]
            if len(modalities) == 1 or len(mean) == sum(sizes):
                source, start = {}, 0
                for m, c in zip(modalities, sizes):
                    source[m] = {"mean": mean[start:start + c], "std": std[start:start + c]}
                    start += c
            else:
                raise ValueError(
                    f"normalize has {len(mean)} means for modalities {list(modalities)} with "
                    f"{sum(sizes)} bands in all; give one value per band or a dict per modality"
                )
        else:
            source = normalize
            for m in modalities:
                if m not in source:
                    raise ValueError(f"normalize has no entry for modality {m!r}")
    else:
        raise ValueError(f"normalize must be True, False, 'store' or a dict, not {normalize!r}")
    for m in modalities:
        c = len(index.modalities[m].bands)
        mean = np.asarray(source[m]["mean"], dtype=np.float32).ravel()
        std = np.asarray(source[m]["std"], dtype=np.float32).ravel()
        if mean.shape != (c,) or std.shape != (c,):
            raise ValueError(
                f"normalisation for {m} needs {c} means and stds, got {mean.size} and {std.size}"
            )
        if np.any(std <= 0) or not np.all(np.isfinite(std)):
            raise ValueError(f"normalisation for {m} has a non-positive or non-finite std: {std}")
        out[m] = (mean.reshape(c, 1, 1), (1.0 / std).reshape(c, 1, 1))
    return out


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFF for v in values]).generate_state(
        2, np.uint32
    ).view(np.uint64)[0] >> 1)


def partition_shards(counts: Sequence[int], order: Sequence[int], parts: int) -> list[list[int]]:
    """Split shards into ``parts`` lists with near-equal sample counts.

    Shards are taken in ``order`` and each goes to the part with the fewest samples so far
    (lowest part on ties), so every shard lands in exactly one part.
    """
    load = [0] * parts
    out: list[list[int]] = [[] for _ in range(parts)]
    for s in order:
        p = min(range(parts), key=lambda k: (load[k], k))
        out[p].append(int(s))
        load[p] += int(counts[s])
    return out


def _accepts_generator(transform: Any) -> bool:
    return bool(getattr(transform, "accepts_generator", False))


#: Largest read of consecutive samples in one zarr call for batches. zarr 3.1 decodes a
#: selection into a temporary of the selection's size within each shard before copying it
#: out; beyond glibc's largest mmap threshold (32 MiB) every such temporary is fresh memory,
#: whose page faults cost more than the fewer calls save.
_RUN_BYTES = 24 * 2**20


class _ShardReader:
    """Inner chunks of one sharded ``bands`` array, decoded straight into the caller's arrays.

    zarr 3.1 decodes every chunk into a buffer of its own, copies it into a temporary per shard
    and that into the output, around an event-loop round trip per call: for a 264 px S2 sample
    (four blosc chunks) ~12 ms of CPU, of which ~5 ms is decompression (``benchmarks/loader.py``
    ``fast_paths``: ``raw`` against ``raw-zarr``). For batches, where each chunk has a place in
    the batch array, this reader fetches the shard indexes (cached, crc32c checked) and
    the chunks' bytes through the array's own zarr store (``get_partial_values``, concurrent)
    and decompresses each chunk into its place. It takes only arrays laid out the way the
    pipeline writes them (Zarr v3 sharding; inner chunks of one sample and season with all
    bands and pixels; the ``bytes`` codec in this machine's byte order; at most one blosc or
    zstd compressor; index codecs ``bytes`` + ``crc32c``): :meth:`of` returns ``None`` for
    anything else, which zarr then reads. Missing shards and chunks read as the fill value, as
    in zarr.
    """

    MISSING = 2**64 - 1
    GROUP = 64  # chunks fetched per store call (bounds the compressed bytes held at once)

    def __init__(self, arr: Any, sharding: Any, compressor: str | None) -> None:
        from zarr.core.buffer import default_buffer_prototype

        self.store = arr.store_path.store
        self.prefix = arr.store_path.path
        self.metadata = arr.metadata
        self.shard_shape = tuple(int(v) for v in arr.shards)
        self.per_shard = tuple(
            int(s // c) for s, c in zip(self.shard_shape, sharding.chunk_shape)
        )
        self.index_nbytes = 16 * int(np.prod(self.per_shard)) + 4
        self.index_at_end = str(getattr(sharding.index_location, "value", "end")) == "end"
        self.dtype = np.dtype(arr.dtype)
        self.fill = np.asarray(arr.fill_value, dtype=self.dtype)
        self.chunk_shape = tuple(int(v) for v in sharding.chunk_shape[2:])
        self.chunk_nbytes = int(np.prod(self.chunk_shape)) * self.dtype.itemsize
        self.compressor = compressor
        if compressor == "blosc":
            from numcodecs import Blosc

            self._codec: Any = Blosc()
        elif compressor == "zstd":
            from numcodecs import Zstd

            self._codec = Zstd()
        self.prototype = default_buffer_prototype()
        self._index: dict[tuple[int, int], tuple[str, np.ndarray | None]] = {}

    @classmethod
    def of(cls, arr: Any) -> _ShardReader | None:
        import sys

        try:
            import google_crc32c  # noqa: F401 - what the reader needs, or zarr reads
            from zarr.abc.store import RangeByteRequest, SuffixByteRequest  # noqa: F401
            from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
            from zarr.core.sync import sync  # noqa: F401

            meta = arr.metadata
            codecs = tuple(getattr(meta, "codecs", ()))
            if getattr(meta, "zarr_format", None) != 3 or len(codecs) != 1:
                return None
            sh = codecs[0]
            if not isinstance(sh, ShardingCodec) or arr.shards is None or arr.ndim != 5:
                return None
            dtype = np.dtype(arr.dtype)
            if not dtype.isnative or dtype.hasobject or sys.byteorder != "little":
                return None

            def little(codec: Any) -> bool:
                endian = getattr(codec, "endian", None)
                return isinstance(codec, BytesCodec) and (
                    endian is None or getattr(endian, "value", endian) == "little"
                )

            inner = tuple(sh.codecs)
            if not inner or not little(inner[0]) or len(inner) > 2:
                return None
            compressor = None
            if len(inner) == 2:
                if isinstance(inner[1], BloscCodec):
                    compressor = "blosc"
                elif isinstance(inner[1], ZstdCodec):
                    compressor = "zstd"
                else:
                    return None
            index = tuple(sh.index_codecs)
            if len(index) != 2 or not little(index[0]) or not isinstance(index[1], Crc32cCodec):
                return None
            chunk = tuple(int(v) for v in sh.chunk_shape)
            full = tuple(int(v) for v in arr.shape[2:])
            if chunk[:2] != (1, 1) or chunk[2:] != full or tuple(arr.shards)[2:] != full:
                return None
            return cls(arr, sh, compressor)
        except Exception:  # noqa: BLE001 - an unknown layout or zarr version: zarr reads it
            return None

    def _key(self, shard: tuple[int, int]) -> str:
        key = self.metadata.encode_chunk_key((*shard, 0, 0, 0))
        return f"{self.prefix}/{key}" if self.prefix else key

    def _shard_index(self, shard: tuple[int, int]) -> tuple[str, np.ndarray | None]:
        """(key, (samples, times, 2) offsets and lengths), or (key, None) for a missing shard."""
        hit = self._index.get(shard)
        if hit is not None:
            return hit
        import google_crc32c
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest
        from zarr.core.sync import sync

        key = self._key(shard)
        n = self.index_nbytes
        rng = SuffixByteRequest(n) if self.index_at_end else RangeByteRequest(0, n)
        buf = sync(self.store.get(key, self.prototype, byte_range=rng))
        table = None
        if buf is not None:
            raw = buf.as_numpy_array().view(np.uint8)
            if raw.size != n:
                raise ValueError(f"shard index of {key} has {raw.size} bytes, expected {n}")
            crc = np.uint32(google_crc32c.value(raw[:-4].tobytes())).tobytes()
            if crc != raw[-4:].tobytes():
                raise ValueError(f"the shard index checksum of {key} does not match")
            table = raw[:-4].view("<u8").reshape(*self.per_shard[:2], 2)
        if len(self._index) >= 256:
            self._index.clear()
        self._index[shard] = (key, table)
        return key, table

    def _decode(self, data: np.ndarray, out: np.ndarray) -> None:
        dst = out.reshape(-1).view(np.uint8)
        if self.compressor == "blosc":  # the header has the size: decompress into place
            size = int.from_bytes(data[4:8].tobytes(), "little")
            if size != self.chunk_nbytes:
                raise ValueError(f"chunk decodes to {size} bytes, expected {self.chunk_nbytes}")
            self._codec.decode(data, out=dst)
            return
        if self.compressor == "zstd":  # numcodecs does not tell how much it wrote: copy
            data = np.frombuffer(self._codec.decode(data), np.uint8)
        if data.size != self.chunk_nbytes:
            raise ValueError(f"chunk has {data.size} bytes, expected {self.chunk_nbytes}")
        dst[:] = data

    def read(
        self, items: Sequence[tuple[int, int, np.ndarray]]
    ) -> list[tuple[int, int, Exception]]:
        """Decode chunk (row, season) into each C-contiguous ``out`` [C, H, W]; returns the
        (row, season, error) of the chunks that could not be read or decoded."""
        from zarr.abc.store import RangeByteRequest
        from zarr.core.sync import sync

        failed: list[tuple[int, int, Exception]] = []
        todo: list[tuple[int, int, np.ndarray, str, int, int]] = []
        s_rows, s_times = self.shard_shape[0], self.shard_shape[1]
        for row, t, out in items:
            if out.shape != self.chunk_shape or not out.flags.c_contiguous:
                raise ValueError(f"a chunk goes into a C-contiguous {self.chunk_shape} array")
            try:
                key, table = self._shard_index((row // s_rows, t // s_times))
            except Exception as exc:  # noqa: BLE001
                failed.append((row, t, exc))
                continue
            offset, length = (
                (self.MISSING, self.MISSING) if table is None
                else (int(v) for v in table[row % s_rows, t % s_times])
            )
            if offset == self.MISSING and length == self.MISSING:
                out[...] = self.fill
            else:
                todo.append((row, t, out, key, offset, length))
        for g in range(0, len(todo), self.GROUP):
            group = todo[g : g + self.GROUP]
            try:
                bufs = sync(self.store.get_partial_values(
                    self.prototype, [(k, RangeByteRequest(o, o + n)) for *_, k, o, n in group]
                ))
            except Exception as exc:  # noqa: BLE001
                failed += [(row, t, exc) for row, t, *_ in group]
                continue
            for (row, t, out, key, _, length), buf in zip(group, bufs):
                try:
                    if buf is None:
                        raise FileNotFoundError(f"{key} is missing")
                    data = buf.as_numpy_array().view(np.uint8)
                    if data.size != length:
                        raise ValueError(f"read {data.size} bytes of a {length}-byte chunk")
                    self._decode(data, out)
                except Exception as exc:  # noqa: BLE001
                    failed.append((row, t, exc))
        return failed


def _shared_empty(shape: tuple[int, ...], dtype: Any) -> tuple[torch.Tensor, np.ndarray]:
    """An uninitialised tensor and its numpy view; in shared memory in a DataLoader worker.

    A worker sends a tensor to the main process through shared memory: one allocated there
    from the start is sent as it is, where any other would be copied into a new block first
    (what the default collate does for every batch, as its own ``torch.stack`` output).
    """
    dtype = np.dtype(dtype)
    tdtype = torch.from_numpy(np.empty(0, dtype)).dtype
    if torch.utils.data.get_worker_info() is None:
        t = torch.empty(shape, dtype=tdtype)
    else:
        n = int(np.prod(shape, dtype=np.int64))
        storage = torch.UntypedStorage._new_shared(n * dtype.itemsize)
        t = torch.empty(0, dtype=tdtype).set_(storage, 0, shape)
    return t, t.numpy()


# ------------------------------------------------------------------------------- base class
class _StoreSamples:
    """Option handling, store index, lazy array handles and the item builder."""

    def __init__(
        self,
        store: str | os.PathLike[str],
        modalities: str | Sequence[str] = (layout.S2L2A,),
        stack: bool = True,
        seasons: SeasonMode = "all",
        num_views: int = 2,
        normalize: Normalize = True,
        transform: Callable | Sequence[Callable] | None = None,
        seed: int | None = 0,
        return_metadata: bool = True,
        *,
        min_seasons: int | None = None,
        fill_nodata: float | None = 0.0,
        storage_options: Mapping[str, Any] | None = None,
        output: Output = "float32",
    ) -> None:
        if output not in ("float32", "raw"):
            raise ValueError(f"output must be 'float32' or 'raw', not {output!r}")
        if output == "raw" and transform is not None:
            raise ValueError(
                "output='raw' returns stored values, which transforms cannot take: normalise the "
                "batch with StoreNormalize first and augment it there (on the GPU), or use "
                "output='float32' for per-sample transforms"
            )
        if isinstance(modalities, str):
            modalities = (modalities,)
        self.modalities = tuple(modalities)
        if not self.modalities:
            raise ValueError("modalities must name at least one modality group")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities {self.modalities} repeat a name")
        if isinstance(seasons, bool) or not (
            isinstance(seasons, int) or seasons in ("all", "random", "augment")
        ):
            raise ValueError(
                f"seasons must be an int season index, 'all', 'random' or 'augment', not "
                f"{seasons!r}"
            )
        if seasons == "augment" and num_views < 1:
            raise ValueError(f"num_views must be >= 1, not {num_views}")
        self.url = os.fspath(store)
        self.storage_options = dict(storage_options or {})
        self.stack = stack
        self.seasons = seasons
        self.num_views = int(num_views)
        self.transform = transform
        if isinstance(transform, Sequence) and not isinstance(transform, str | bytes):
            if seasons != "augment" or len(transform) != self.num_views:
                raise ValueError(
                    "a list of transforms is one per view: it needs seasons='augment' and "
                    f"num_views={len(transform)}"
                )
        self.seed = seed
        self.return_metadata = return_metadata
        self.fill_nodata = fill_nodata
        self.output = output
        self.epoch = 0

        self.index = read_store_index(self.url, self.modalities, self.storage_options)
        shown = _display(self.url)
        ntime = {mi.shape[1] for mi in self.index.modalities.values()}
        self.num_times = min(ntime)
        if isinstance(seasons, int) and not 0 <= seasons < self.num_times:
            raise ValueError(f"season {seasons} is out of range 0..{self.num_times - 1}")
        self._norm = _norm_from(normalize, self.index, self.modalities, shown)
        # a season is usable when every requested modality has a scene for it
        avail = np.ones((self.index.n_samples, self.num_times), dtype=bool)
        for mi in self.index.modalities.values():
            avail &= mi.available[:, : self.num_times]
        self._available = avail
        if min_seasons is None:
            min_seasons = self.num_times if seasons == "all" else 1
        self.min_seasons = int(min_seasons)
        ok = self.index.complete & (avail.sum(axis=1) >= max(self.min_seasons, 1))
        if isinstance(seasons, int):
            ok &= avail[:, seasons]
        self._eligible = np.flatnonzero(ok)
        if len(self._eligible) == 0:
            log.warning(
                "store %s has no sample to serve (%d complete of %d; season rule %r, "
                "min_seasons=%d)", shown, int(self.index.complete.sum()), self.index.n_samples,
                seasons, self.min_seasons,
            )
        self._channels = [len(self.index.modalities[m].bands) for m in self.modalities]
        self._arrays: dict[str, Any] | None = None
        dtypes = {m: np.dtype(self.index.modalities[m].dtype) for m in self.modalities}
        if output == "raw" and stack and len(set(dtypes.values())) > 1:
            raise ValueError(
                f"output='raw' cannot stack modalities stored with different dtypes "
                f"({', '.join(f'{m}: {d}' for m, d in dtypes.items())}); use stack=False and "
                "StoreNormalize.from_store(dataset, stack=True), which concatenates the "
                "normalised bands"
            )

    # -------------------------------------------------------------------- public properties
    @property
    def band_names(self) -> list[str]:
        """Band names in channel order (stacked: modalities in the order given)."""
        if self.stack or len(self.modalities) == 1:
            return [b for m in self.modalities for b in self.index.modalities[m].bands]
        return [f"{m}:{b}" for m in self.modalities for b in self.index.modalities[m].bands]

    @property
    def num_bands(self) -> int:
        """Number of channels of ``image`` / each view (sum over modalities); ``in_chans``."""
        return sum(self._channels)

    @property
    def patch_size(self) -> tuple[int, int]:
        """Stored (height, width) of a patch."""
        shape = next(iter(self.index.modalities.values())).shape
        return int(shape[3]), int(shape[4])

    @property
    def sample_ids(self) -> list[str]:
        """Ids of the samples served, in index order."""
        return [str(self.index.sample_ids[i]) for i in self._eligible]

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds season draws, transforms and (streaming) the order."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None  # never ship open zarr handles to workers
        if "_scratch" in state:
            state["_scratch"] = {}  # nor read buffers and shard readers
            state["_readers"] = None
        return state

    def _bands(self) -> dict[str, Any]:
        if self._arrays is None:
            import zarr

            store = _open_store(self.url, self.storage_options)
            root = zarr.open_group(store, mode="r", zarr_format=3)
            self._arrays = {m: root[f"{m}/bands"] for m in self.modalities}
        return self._arrays

    # ---------------------------------------------------------------------- randomness
    def _generators(
        self, i: int, epoch: int
    ) -> tuple[np.random.Generator, torch.Generator | None]:
        if self.seed is None:
            s = int(torch.randint(0, 2**62, (1,)).item())
            return np.random.default_rng(s), None
        s = _mix(self.seed, epoch, i)
        g = torch.Generator()
        g.manual_seed(s)
        return np.random.default_rng(s), g

    def _draw(self, i: int, rng: np.random.Generator) -> list[int]:
        have = np.flatnonzero(self._available[i])
        if isinstance(self.seasons, int):
            return [self.seasons]
        if self.seasons == "all":
            return [int(t) for t in have]
        if self.seasons == "random":
            return [int(rng.choice(have))]
        return [int(t) for t in rng.choice(have, size=self.num_views, replace=True)]

    # ------------------------------------------------------------------------- reading
    def _read_error(self, m: str, rows: Sequence[int], seasons: Any, exc: Exception) -> Exception:
        arr = self._arrays[m] if self._arrays else None
        ids = [str(self.index.sample_ids[r]) for r in rows]
        where = ""
        if arr is not None:
            shard = self.index.modalities[m].shard_shape
            keys = sorted({
                arr.metadata.encode_chunk_key((r // shard[0],) + (0,) * (arr.ndim - 1))
                for r in rows
            })
            where = f" (shard file {m}/bands/{', '.join(keys)})"
        what = f"sample {ids[0]}" if len(ids) == 1 else f"samples {', '.join(ids)}"
        return CorruptSampleError(
            f"cannot read {what} (store row {', '.join(map(str, rows))}), modality {m}, "
            f"season(s) {seasons}, from store {_display(self.url)!r}{where}: "
            f"{type(exc).__name__}: {exc}. The shard is damaged or missing: rebuild it (re-run "
            "`ssl4eo build`, which rewrites shards that are not complete) or restore the file"
        )

    def _read_sample(self, i: int, seasons: Sequence[int]) -> dict[str, np.ndarray]:
        """(len(seasons), C, H, W) stored values per modality for sample row ``i``.

        Contiguous seasons are one basic-slice read (the shard index is read once for all of
        them); others one read per season. Never an orthogonal (integer-list) selection: on
        sharded arrays zarr 3.1 takes ~25x longer for it (``benchmarks/loader.py``).
        """
        arrays = self._bands()
        out = {}
        unique = sorted(set(seasons))
        contiguous = unique[-1] - unique[0] + 1 == len(unique)
        for m in self.modalities:
            arr = arrays[m]
            try:
                if contiguous:
                    data = arr[i, unique[0] : unique[-1] + 1]
                else:
                    data = np.stack([arr[i, t] for t in unique])
            except Exception as exc:  # noqa: BLE001 - any decode/IO failure names the sample
                raise self._read_error(m, [i], unique, exc) from exc
            if list(seasons) != unique:
                pos = {t: k for k, t in enumerate(unique)}
                data = data[[pos[t] for t in seasons]]
            out[m] = data
        return out

    # ------------------------------------------------------------------------ building
    def _to_float(self, m: str, raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Stored values -> float32, normalised, nodata filled; written into ``out`` if given.

        One pass casts and centres (``np.subtract`` into float32), one scales; nodata is looked
        for with a single reduction first (a patch without nodata, the usual case, then costs no
        mask at all).
        """
        x = np.empty(raw.shape, np.float32) if out is None else out
        if self._norm is not None:
            mean, inv = self._norm[m]
            np.subtract(raw, mean, out=x)
            x *= inv
        else:
            x[...] = raw
        if self.fill_nodata is not None:
            if _is_s1(m, self.index.modalities[m].dtype):
                if np.isnan(raw.min()):  # min propagates NaN
                    x[np.isnan(raw)] = self.fill_nodata
            elif raw.min() == layout.S2_NODATA:
                x[raw == layout.S2_NODATA] = self.fill_nodata
        return x

    def _apply(self, x: torch.Tensor, transform: Callable | None, gen: torch.Generator | None):
        if transform is None:
            return x
        if gen is not None and _accepts_generator(transform):
            return transform(x, generator=gen)
        return transform(x)

    def _split(self, x: torch.Tensor, dim: int) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.stack:
            return x
        return dict(zip(self.modalities, torch.split(x, self._channels, dim=dim)))

    def _build(
        self, i: int, seasons: list[int], raw: dict[str, np.ndarray], gen: torch.Generator | None
    ) -> dict[str, Any]:
        if self.output == "raw":
            item = self._build_raw(seasons, raw)
        else:
            item = self._build_float(seasons, raw, gen)
        if self.return_metadata:
            item["sample"] = str(self.index.sample_ids[i])
            item["index"] = int(i)
            item["seasons"] = torch.tensor(seasons, dtype=torch.long)
            item["time"] = {
                m: torch.from_numpy(
                    self.index.modalities[m].times[i, seasons].astype("datetime64[ns]").view(
                        np.int64
                    ).copy()
                )
                for m in self.modalities
            }
            item["lat"] = float(self.index.lat[i])
            item["lon"] = float(self.index.lon[i])
            item["bands"] = self.band_names
        return item

    def _build_raw(self, seasons: list[int], raw: dict[str, np.ndarray]) -> dict[str, Any]:
        """Stored values as tensors (S, C, H, W) per modality, shaped like the float items."""
        if self.stack:
            arrays = [raw[m] for m in self.modalities]
            x = torch.from_numpy(
                arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=1)
            )

            def take(sel: Any) -> Any:
                return x[sel]
        else:
            xs = {m: torch.from_numpy(raw[m]) for m in self.modalities}

            def take(sel: Any) -> Any:
                return {m: t[sel] for m, t in xs.items()}

        if self.seasons == "augment":
            return {"views": [take(v) for v in range(len(seasons))]}
        if self.seasons == "all":
            return {"image": take(slice(None))}
        return {"image": take(0)}

    def _build_float(
        self, seasons: list[int], raw: dict[str, np.ndarray], gen: torch.Generator | None
    ) -> dict[str, Any]:
        # (S, sum C, H, W) float32: modalities concatenated along bands
        first = raw[self.modalities[0]]
        buf = np.empty((first.shape[0], sum(self._channels), *first.shape[2:]), np.float32)
        c0 = 0
        for m, c in zip(self.modalities, self._channels):
            self._to_float(m, raw[m], out=buf[:, c0 : c0 + c])
            c0 += c
        x = torch.from_numpy(buf)
        item: dict[str, Any] = {}
        if self.seasons == "augment":
            transforms = (
                list(self.transform)
                if isinstance(self.transform, Sequence)
                else [self.transform] * self.num_views
            )
            item["views"] = [
                self._split(self._apply(x[v], transforms[v], gen), 0)
                for v in range(len(seasons))
            ]
        elif self.seasons == "all":
            s, c, h, w = x.shape
            y = self._apply(x.reshape(s * c, h, w), self.transform, gen)  # shared spatial draw
            item["image"] = self._split(y.reshape(s, c, *y.shape[-2:]), 1)
        else:
            item["image"] = self._split(self._apply(x[0], self.transform, gen), 0)
        return item


# ---------------------------------------------------------------------------- map-style
class ZarrPatchDataset(_StoreSamples, Dataset):
    """Map-style dataset: item ``k`` is the k-th complete sample of the store.

    Parameters
    ----------
    store
        Local path or fsspec URL (``s3://``, ``az://``, ``gs://``, ``https://``) of the store.
    modalities
        Modality groups to read (``"S2L2A"``, ``"S2L1C"``, ``"S1RTC"``), in channel order.
    stack
        Concatenate modalities along the band axis (``True``) or return ``{modality: tensor}``.
    seasons
        ``int`` season index, ``"random"``, ``"all"`` or ``"augment"`` (see the module doc).
    num_views
        Views per item with ``seasons="augment"`` (2 for MoCo/SimCLR, 3 for DINO).
    normalize
        ``True``/``"store"`` (stored statistics), a dict of mean/std, or ``False``.
    transform
        Callable on [C, H, W] float tensors (``pipeline.transforms``, torchvision v2, ...);
        with ``"augment"``, one callable for all views or a list with one per view.
    seed
        Seed of season draws and transforms (with ``set_epoch``); ``None``: torch's RNG.
    return_metadata
        Add ``sample``, ``index``, ``seasons``, ``time``, ``lat``, ``lon``, ``bands``.
    min_seasons
        Serve only samples with at least this many seasons with data (default 4 for
        ``"all"``, else 1).
    fill_nodata
        Value for nodata pixels after normalisation (``None`` keeps them).
    storage_options
        fsspec options for remote stores (credentials come from the environment).
    output
        ``"float32"`` (default): normalised float32 items, ready for per-sample ``transform``.
        ``"raw"``: the stored values in the stored dtype (S2 ``uint16``, S1 ``float32`` with
        ``NaN``), half the bytes for S2 and no float work in the workers; normalise the batch
        with :class:`StoreNormalize` (on the GPU). No ``transform`` with ``"raw"``.
    """

    def __len__(self) -> int:
        return len(self._eligible)

    def __getitem__(self, k: int) -> dict[str, Any]:
        if not -len(self) <= k < len(self):
            raise IndexError(f"index {k} out of range for {len(self)} samples")
        i = int(self._eligible[k])
        rng, gen = self._generators(i, self.epoch)
        seasons = self._draw(i, rng)
        return self._build(i, seasons, self._read_sample(i, seasons), gen)

    def __repr__(self) -> str:
        return (
            f"ZarrPatchDataset({_display(self.url)!r}, modalities={self.modalities}, "
            f"seasons={self.seasons!r}, samples={len(self)}, bands={self.num_bands})"
        )


# ---------------------------------------------------------------------------- streaming
class ZarrShardStream(_StoreSamples, IterableDataset):
    """Iterable dataset that streams shards, shuffled, split over ranks and workers.

    Each epoch the shards that hold servable samples are put in an order drawn from
    ``(seed, epoch)`` (``shuffle=True``). How that order is split over ranks is ``even``:

    * ``"pad"`` (the default): the servable samples of the shards, in that order, form one
      sequence of ``N`` samples, padded by repeating it from its start to a multiple of the
      world size; rank ``r`` takes the ``r``-th contiguous piece of ``ceil(N / world)``
      samples (as ``DistributedSampler(drop_last=False)``). Every rank yields the same number
      of samples, every servable sample at least once per epoch over all ranks, and
      ``world * ceil(N / world) - N`` of them twice (never twice on one rank).
    * ``"drop"``: the sequence is cut to a multiple of the world size instead; every rank
      yields ``floor(N / world)`` samples, each sample at most once per epoch (the ``N % world``
      dropped ones are the end of that epoch's order).
    * ``"none"``: whole shards are split over ranks with near-equal sample counts
      (:func:`partition_shards`), and each rank's shards over its workers the same way: every
      servable sample exactly once per epoch, but ranks can get a few samples more or fewer than
      one another (a shard is never split), so ``torchrun`` training on it can hang on an
      uneven last step. For a single process or offline passes over the data.

    With ``world_size == 1`` nothing is padded or dropped: every sample exactly once. Equal
    counts are what DDP needs: every rank takes the same number of optimizer steps (and
    all-reduces). With ``"pad"``/``"drop"`` a rank's piece is split over its DataLoader workers
    in contiguous parts of ``np.array_split`` sizes, which are then the same on every rank, so
    ``DataLoader(stream, batch_size=B, num_workers=W)`` (each worker collates its own batches)
    also gives every rank the same number of batches: :meth:`num_batches`. A rank reads its
    piece shard by shard (at most two partial shards, at its ends), with one read per shard
    and modality of the rows it needs (all seasons, or only the fixed season), passes the
    samples through a shuffle buffer of ``buffer_size`` and yields items. :meth:`plan` gives
    the rows of every rank and worker, :meth:`rank_lengths` the counts, ``len()`` this rank's.

    ``rank``/``world_size`` default to ``torch.distributed`` when it is initialised, else 0/1
    (a copy sent to DataLoader workers, which have no process group, takes the sender's).
    The epoch: :meth:`set_epoch` sets it; a dataset copy also advances it by one after each
    full pass, so persistent workers move on to the next epoch by themselves.

    **Batches** (``batch_size=B``): the stream yields ready batches, to be used with
    ``DataLoader(stream, batch_size=None, ...)``; ``len()`` is then this rank's number of
    batches (``ceil(samples / B)``, the same on every rank unless ``even="none"``). This is the
    fast path for training: each batch is one array per output, allocated
    in shared memory when read in a DataLoader worker and filled in place (each chunk of a
    store in the pipeline's layout decompressed straight into its place by
    :class:`_ShardReader`; other stores through zarr, runs of consecutive store rows with one
    slice each), so there is no per-sample collate copy and no temporary per sample or shard.
    With ``output="raw"`` (see the module doc) the workers only decode, and
    :class:`StoreNormalize` normalises the batch on the GPU; ``output="float32"`` batches are
    normalised in the workers. The order: this rank's samples (the same split over ranks as
    above), grouped by shard, are taken in windows of whole groups holding at least
    ``buffer_size`` samples, the samples of a window are permuted (``shuffle=True``; the
    window holds row numbers, not data, so a large ``buffer_size`` costs no memory) and the
    sequence is cut into batches of ``B`` (the rank's last batch may be smaller); batch ``j``
    is read by DataLoader worker ``j % num_workers``, so the DataLoader yields the batches in
    that order whatever the number of workers: a function of ``(seed, epoch, rank)`` only.
    Each sample of the rank's piece is in exactly one of its batches. Within a batch, samples
    are in store order.
    Batch items have the collated form: ``image`` [B, C, H, W] (``"all"``: [B, T, C, H, W]),
    ``views`` a list of [B, C, H, W]; metadata ``sample`` (list), ``index``, ``seasons`` [B, S],
    ``time`` (``{modality: [B, S]}``), ``lat``, ``lon`` (tensors) and ``bands`` (one list for the
    batch). No ``transform`` with batches (augment the batch instead); ``seasons="all"`` needs
    every sample to have all seasons (``min_seasons`` at its default).

    When to use which: per-sample items (``batch_size=None``) for per-sample CPU transforms and
    ``DataLoader(batch_size=..)`` collation; ``batch_size`` with ``output="raw"`` and
    :class:`StoreNormalize` when a GPU consumes the batches and the workers' CPU is the limit.

    Other parameters are those of :class:`ZarrPatchDataset`.
    """

    def __init__(
        self,
        store: str | os.PathLike[str],
        modalities: str | Sequence[str] = (layout.S2L2A,),
        stack: bool = True,
        seasons: SeasonMode = "all",
        num_views: int = 2,
        normalize: Normalize = True,
        transform: Callable | Sequence[Callable] | None = None,
        seed: int | None = 0,
        return_metadata: bool = True,
        *,
        shuffle: bool = True,
        buffer_size: int = 256,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        min_seasons: int | None = None,
        fill_nodata: float | None = 0.0,
        storage_options: Mapping[str, Any] | None = None,
        output: Output = "float32",
        batch_size: int | None = None,
        even: Even = "pad",
    ) -> None:
        if even not in ("pad", "drop", "none"):
            raise ValueError(f"even must be 'pad', 'drop' or 'none', not {even!r}")
        super().__init__(
            store, modalities, stack, seasons, num_views, normalize, transform, seed,
            return_metadata, min_seasons=min_seasons, fill_nodata=fill_nodata,
            storage_options=storage_options, output=output,
        )
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, not {buffer_size}")
        if batch_size is not None:
            if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
                raise ValueError(f"batch_size must be a positive int or None, not {batch_size!r}")
            if transform is not None:
                raise ValueError(
                    "batch_size reads whole batches, which per-sample transforms cannot take: "
                    "augment the batch (on the GPU), or use batch_size=None with "
                    "DataLoader(batch_size=...)"
                )
            if seasons == "all" and self.min_seasons < self.num_times:
                raise ValueError(
                    f"seasons='all' with min_seasons={self.min_seasons} serves samples with "
                    f"fewer than {self.num_times} seasons, which cannot share a batch tensor; "
                    "use batch_size=None, or the default min_seasons"
                )
        self.batch_size = None if batch_size is None else int(batch_size)
        self._scratch: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}
        self._readers: dict[str, _ShardReader | None] | None = None
        self._direct_reads = True  # False: batches read through zarr only (benchmarks)
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:  # type: ignore[operator]
            raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
        self.shuffle = shuffle
        self.even = even
        self.buffer_size = int(buffer_size)
        self.epoch = int(epoch)
        self._passes = 0
        self.rank = rank
        self.world_size = world_size
        per = self.index.modalities[self.modalities[0]].shard_samples
        self.shard_samples = per
        n = self.index.n_samples
        shard_of = self._eligible // per
        self._shards = [
            (s * per, min((s + 1) * per, n), self._eligible[shard_of == s])
            for s in np.unique(shard_of)
        ]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._passes = 0

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if self.world_size is None and self._dist_world() is not None:
            # a DataLoader worker has no process group: give the copy this process's rank
            state["rank"], state["world_size"] = self._dist_world()
        return state

    @property
    def num_shards(self) -> int:
        """Shards that hold at least one servable sample."""
        return len(self._shards)

    @staticmethod
    def _dist_world() -> tuple[int, int] | None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return None

    def _world(self) -> tuple[int, int]:
        if self.world_size is not None:
            return int(self.rank), int(self.world_size)  # type: ignore[arg-type]
        return self._dist_world() or (0, 1)

    def _effective_epoch(self) -> int:
        return self.epoch + self._passes

    def _shard_order(self, epoch: int) -> np.ndarray:
        """Positions in the list of servable shards, in the order of ``epoch``."""
        order = np.arange(len(self._shards))
        if self.shuffle:
            order = np.random.default_rng(_mix(self.seed or 0, epoch, 0x5EED)).permutation(order)
        return order

    def _rows_of(self, shards: Sequence[int]) -> np.ndarray:
        rows = [self._shards[s][2] for s in shards]
        return np.concatenate(rows).astype(np.int64) if rows else np.empty(0, np.int64)

    def plan(self, epoch: int | None = None, num_workers: int = 1) -> list[list[np.ndarray]]:
        """Store rows per rank and DataLoader worker in ``epoch`` (default: the current one).

        ``plan(epoch, W)[r][w]`` are the rows that worker ``w`` of rank ``r`` reads, in reading
        order (before the shuffle buffer), grouped by shard. ``"pad"``/``"drop"``: the epoch's
        sequence (servable rows of the shards in the drawn order) padded cyclically or cut to a
        multiple of the world size, rank ``r`` its ``r``-th contiguous piece, split over the
        workers in contiguous ``np.array_split`` parts (so every rank's worker sizes are the
        same). ``"none"``: whole shards per rank and worker (:func:`partition_shards`).
        """
        epoch = self._effective_epoch() if epoch is None else epoch
        _, world = self._world()
        workers = max(int(num_workers), 1)
        order = self._shard_order(epoch)
        if self.even == "none":
            counts = [len(s[2]) for s in self._shards]
            return [
                [self._rows_of(w) for w in partition_shards(counts, shards, workers)]
                for shards in partition_shards(counts, order, world)
            ]
        seq = self._rows_of(order)
        n = len(seq)
        per = -(-n // world) if self.even == "pad" else n // world
        if per * world > n:
            seq = np.resize(seq, per * world)  # repeats the sequence from its start
        return [np.array_split(seq[r * per : (r + 1) * per], workers) for r in range(world)]

    def rank_lengths(self, epoch: int | None = None) -> list[int]:
        """Samples each rank yields in ``epoch`` (default: the current one); all equal unless
        ``even="none"`` (and ``world_size > 1``)."""
        return [sum(len(w) for w in workers) for workers in self.plan(epoch)]

    def __len__(self) -> int:
        """Samples this rank yields in the current epoch; batches with ``batch_size``."""
        rank, _ = self._world()
        n = self.rank_lengths()[rank]
        return n if self.batch_size is None else -(-n // self.batch_size)

    def num_batches(
        self,
        batch_size: int | None = None,
        num_workers: int = 0,
        *,
        drop_last: bool = False,
        epoch: int | None = None,
    ) -> int:
        """Batches this rank's ``DataLoader`` yields in ``epoch`` (default: the current one).

        Per-sample stream: ``DataLoader(stream, batch_size=batch_size, num_workers=..,
        drop_last=..)``, where every worker collates its own samples, so the count is the sum
        over workers of ``ceil(n_worker / batch_size)`` (``floor`` with ``drop_last``), not
        ``ceil(len() / batch_size)``; the same on every rank unless ``even="none"``. A stream
        made with ``batch_size`` yields batches itself (``DataLoader(batch_size=None)``): leave
        ``batch_size`` out; the count is ``len()`` of ``epoch``.
        """
        rank, _ = self._world()
        if self.batch_size is not None:
            if batch_size is not None:
                raise ValueError(
                    "this stream yields batches of its own batch_size; use it with "
                    "DataLoader(batch_size=None) and call num_batches() without batch_size"
                )
            return -(-self.rank_lengths(epoch)[rank] // self.batch_size)
        if batch_size is None or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, not {batch_size!r}")
        sizes = [len(w) for w in self.plan(epoch, num_workers)[rank]]
        if drop_last:
            return sum(n // batch_size for n in sizes)
        return sum(-(-n // batch_size) for n in sizes)

    def _runs(self, rows: np.ndarray) -> list[np.ndarray]:
        """``rows`` cut where the shard changes: one read each."""
        if len(rows) == 0:
            return []
        cuts = np.flatnonzero(np.diff(rows // self.shard_samples)) + 1
        return np.split(rows, cuts)

    def _read_shard(self, start: int, stop: int) -> dict[str, np.ndarray]:
        arrays = self._bands()
        out = {}
        for m in self.modalities:
            try:
                if isinstance(self.seasons, int):
                    out[m] = arrays[m][start:stop, self.seasons : self.seasons + 1]
                else:
                    out[m] = arrays[m][start:stop]
            except Exception as exc:  # noqa: BLE001
                bad = []
                for r in range(start, stop):  # find the samples that cannot be read
                    try:
                        arrays[m][r, 0 if not isinstance(self.seasons, int) else self.seasons]
                    except Exception:  # noqa: BLE001
                        bad.append(r)
                rows = [r for r in (bad or range(start, stop))]
                raise self._read_error(m, rows, "all", exc) from exc
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self._effective_epoch()
        self._passes += 1
        rank, _ = self._world()
        info = torch.utils.data.get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.batch_size is not None:
            batches = self.batch_plan(epoch)
            for j in range(wid, len(batches), nworkers):  # the DataLoader's round-robin order
                yield self._read_batch(batches[j], epoch)
            return
        mine = self.plan(epoch, nworkers)[rank][wid]
        rng = np.random.default_rng(_mix(self.seed or 0, epoch, rank, wid, 0xB0FF))
        buffer: list[tuple[int, dict[str, np.ndarray]]] = []
        for rows in self._runs(mine):  # the rows of one shard: one read of the range they span
            start, stop = int(rows.min()), int(rows.max()) + 1
            data = self._read_shard(start, stop)
            for i in rows:
                buffer.append((int(i), {m: data[m][i - start].copy() for m in data}))
                if len(buffer) >= self.buffer_size:
                    yield self._emit(buffer, rng, epoch)
            del data
        while buffer:
            yield self._emit(buffer, rng, epoch)

    # ---------------------------------------------------------------------------- batches
    def batch_plan(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's batches in ``epoch`` (default: the current one), as sorted store rows.

        The rank's rows (:meth:`plan`, grouped by shard) are taken in windows of whole groups
        holding at least ``buffer_size`` samples, each window is permuted (``shuffle=True``) and
        the sequence is cut into ``batch_size`` pieces: ``ceil(rank_lengths()[rank] /
        batch_size)`` batches. Needs ``batch_size``.
        """
        if self.batch_size is None:
            raise ValueError("batch_plan needs a stream made with batch_size")
        epoch = self._effective_epoch() if epoch is None else epoch
        rank, _ = self._world()
        rng = np.random.default_rng(_mix(self.seed or 0, epoch, rank, 0xBA7C))
        pieces: list[np.ndarray] = []
        window: list[np.ndarray] = []

        def flush() -> None:
            if window:
                rows = np.concatenate(window)
                pieces.append(rng.permutation(rows) if self.shuffle else rows)
                window.clear()

        held = 0
        for rows in self._runs(self.plan(epoch, 1)[rank][0]):
            window.append(rows)
            held += len(rows)
            if held >= self.buffer_size:
                flush()
                held = 0
        flush()
        order = np.concatenate(pieces) if pieces else np.empty(0, np.int64)
        b = self.batch_size
        return [np.sort(order[k : k + b]) for k in range(0, len(order), b)]

    def _scratch_array(self, m: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A reusable read buffer (warm pages) for stored values that are converted or copied."""
        key = (m, shape)
        buf = self._scratch.get(key)
        if buf is None:
            if len(self._scratch) > 2 * len(self.modalities):  # a last, smaller batch: keep few
                self._scratch.clear()
            buf = self._scratch[key] = np.empty(shape, dtype)
        return buf

    def _get(self, m: str, sel: tuple, out: np.ndarray, rows: Sequence[int], seasons: Any) -> None:
        """Read ``sel`` of modality ``m`` into the C-contiguous ``out`` (zarr fills it)."""
        from zarr.core.buffer import default_buffer_prototype

        arr = self._bands()[m]
        try:
            arr.get_basic_selection(
                sel, out=default_buffer_prototype().nd_buffer.from_numpy_array(out)
            )
        except Exception as exc:  # noqa: BLE001 - any decode/IO failure names the samples
            bad = []
            if len(rows) > 1:
                for r in rows:  # find the samples that cannot be read
                    try:
                        arr[(int(r),) + tuple(sel[1:])]
                    except Exception:  # noqa: BLE001
                        bad.append(int(r))
            raise self._read_error(m, bad or [int(r) for r in rows], seasons, exc) from exc

    def _reader(self, m: str) -> _ShardReader | None:
        if self._readers is None:
            arrays = self._bands()
            self._readers = {
                k: _ShardReader.of(arrays[k]) if self._direct_reads else None
                for k in self.modalities
            }
        return self._readers[m]

    def _fill(self, m: str, rows: np.ndarray, draws: list[list[int]], dst: np.ndarray) -> None:
        """Stored values of ``rows`` into ``dst``: (B, S, C, H, W), or (V, B, C, H, W) for
        ``"augment"``.

        Arrays in the pipeline's layout are read by :class:`_ShardReader`, each chunk
        decompressed into its place. Otherwise zarr reads: fixed seasons and ``"all"`` runs of
        consecutive rows with one slice each (at most ``_RUN_BYTES`` per read: zarr decodes a
        run into a temporary of its size first), ``"random"`` and ``"augment"`` one chunk per
        (sample, drawn season).
        """
        views = self.seasons == "augment"
        reader = self._reader(m)
        if reader is not None:
            items, copies = [], []
            for p, (i, seasons) in enumerate(zip(rows, draws)):
                done: dict[int, np.ndarray] = {}
                for s, t in enumerate(seasons):
                    slot = dst[s, p] if views else dst[p, s]
                    if t in done:
                        copies.append((slot, done[t]))
                    else:
                        items.append((int(i), int(t), slot))
                        done[t] = slot
            failed = reader.read(items)
            if failed:
                bad = sorted({r for r, _, _ in failed})
                seasons_bad = sorted({t for _, t, _ in failed})
                raise self._read_error(m, bad, seasons_bad, failed[0][2]) from failed[0][2]
            for slot, src in copies:
                slot[...] = src
            return
        if self.seasons == "all" or isinstance(self.seasons, int):
            t0 = self.seasons if isinstance(self.seasons, int) else 0
            t1 = t0 + dst.shape[1]
            cap = max(1, _RUN_BYTES // max(dst[0].nbytes, 1))
            p0 = 0
            while p0 < len(rows):
                p1 = p0 + 1
                while p1 < len(rows) and p1 - p0 < cap and rows[p1] == rows[p1 - 1] + 1:
                    p1 += 1
                sel = (slice(int(rows[p0]), int(rows[p1 - 1]) + 1), slice(t0, t1))
                self._get(m, sel, dst[p0:p1], rows[p0:p1], list(range(t0, t1)))
                p0 = p1
            return
        for p, (i, seasons) in enumerate(zip(rows, draws)):
            done: dict[int, np.ndarray] = {}
            for s, t in enumerate(seasons):
                slot = dst[s, p] if views else dst[p, s]
                if t in done:
                    slot[...] = done[t]
                else:
                    self._get(m, (int(i), t), slot, [int(i)], [t])
                    done[t] = slot

    def _read_batch(self, rows: np.ndarray, epoch: int) -> dict[str, Any]:
        """One batch: draws per sample (as in per-sample mode), reads, item in collated form."""
        draws = []
        for i in rows:
            rng, _ = self._generators(int(i), epoch)
            draws.append(self._draw(int(i), rng))
        b = len(rows)
        steps = len(draws[0]) if draws else 1
        views = self.seasons == "augment"
        lead = (steps, b) if views else (b, steps)
        h, w = self.patch_size
        raw = self.output == "raw"
        dtypes = {m: np.dtype(self.index.modalities[m].dtype) for m in self.modalities}
        outs: dict[str, tuple[torch.Tensor, np.ndarray]] = {}  # per modality (stack=False)
        if self.stack:
            dtype = dtypes[self.modalities[0]] if raw else np.dtype(np.float32)
            whole = _shared_empty((*lead, self.num_bands, h, w), dtype)
        c0 = 0
        for m, c in zip(self.modalities, self._channels):
            if self.stack:
                block = whole[1][..., c0 : c0 + c, :, :]
            else:
                outs[m] = _shared_empty((*lead, c, h, w), dtypes[m] if raw else np.float32)
                block = outs[m][1]
            if raw and block.flags.c_contiguous:
                self._fill(m, rows, draws, block)  # decoded into the batch itself
            else:
                tmp = self._scratch_array(m, (*lead, c, h, w), dtypes[m])
                self._fill(m, rows, draws, tmp)
                if raw:
                    block[...] = tmp
                else:
                    self._to_float(m, tmp, out=block)
            c0 += c

        def take(sel: Any) -> Any:
            if self.stack:
                return whole[0][sel]
            return {m: outs[m][0][sel] for m in self.modalities}

        item: dict[str, Any] = {}
        if views:
            item["views"] = [take(v) for v in range(steps)]
        elif self.seasons == "all":
            item["image"] = take(slice(None))
        else:
            item["image"] = take((slice(None), 0))
        if self.return_metadata:
            seasons = np.asarray(draws, dtype=np.int64).reshape(b, steps)
            item["sample"] = [str(self.index.sample_ids[i]) for i in rows]
            item["index"] = torch.as_tensor(np.asarray(rows, dtype=np.int64))
            item["seasons"] = torch.from_numpy(seasons)
            item["time"] = {
                m: torch.from_numpy(
                    self.index.modalities[m].times[np.asarray(rows)[:, None], seasons]
                    .astype("datetime64[ns]").view(np.int64)
                )
                for m in self.modalities
            }
            item["lat"] = torch.from_numpy(self.index.lat[rows].astype(np.float64))
            item["lon"] = torch.from_numpy(self.index.lon[rows].astype(np.float64))
            item["bands"] = self.band_names
        return item

    def _emit(
        self,
        buffer: list[tuple[int, dict[str, np.ndarray]]],
        rng: np.random.Generator,
        epoch: int,
    ) -> dict[str, Any]:
        k = int(rng.integers(len(buffer))) if self.shuffle else 0
        if self.shuffle:
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            i, raw = buffer.pop()
        else:
            i, raw = buffer.pop(0)
        item_rng, gen = self._generators(i, epoch)
        seasons = self._draw(i, item_rng)
        if isinstance(self.seasons, int):
            picked = {m: raw[m] for m in raw}  # the one season that was read
        elif seasons == list(range(seasons[0], seasons[0] + len(seasons))):
            picked = {m: raw[m][seasons[0] : seasons[0] + len(seasons)] for m in raw}  # a view
        else:
            picked = {m: raw[m][seasons] for m in raw}
        return self._build(i, seasons, picked, gen)

    def __repr__(self) -> str:
        return (
            f"ZarrShardStream({_display(self.url)!r}, modalities={self.modalities}, "
            f"seasons={self.seasons!r}, samples={len(self._eligible)}, shards={self.num_shards}, "
            f"even={self.even!r})"
        )


# ------------------------------------------------------------------------ normalisation
class StoreNormalize(torch.nn.Module):
    """The loader's normalisation as a module, for ``output="raw"`` batches on any device.

    ``forward`` casts stored values to float32, subtracts the band mean, multiplies by the
    inverse band std and sets nodata pixels (S2 ``0``, S1 ``NaN``, found in the stored values)
    to ``fill_nodata``: the same float32 operations in the same order as the datasets'
    ``output="float32"`` path, so the results are exactly equal. It runs where the batch is
    (``batch.to("cuda")`` first moves the work to the GPU; the statistics follow the batch).

    Build it with :meth:`from_store` from a dataset (its statistics, ``fill_nodata``, modalities
    and ``stack``) or from a store URL. ``forward`` takes:

    * a tensor [..., C, H, W] with the channels of all modalities in order (``stack=True``
      output, or one modality's output);
    * a dict ``{modality: tensor}`` (``stack=False`` output): normalised per modality, then
      concatenated along the band axis in modality order when ``stack=True``;
    * a list or tuple of those (``views``), or an item/batch dict: its ``image`` and ``views``
      are normalised, other entries are passed through.

    A new float32 tensor is returned; the input is not modified.
    """

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(
        self,
        modalities: Sequence[str],
        channels: Sequence[int],
        nodata: Sequence[Literal["zero", "nan"]],
        mean: Sequence[float] | np.ndarray | None = None,
        inv_std: Sequence[float] | np.ndarray | None = None,
        fill_nodata: float | None = 0.0,
        stack: bool = True,
    ) -> None:
        """``mean`` and ``inv_std`` (1/std, float32) over all channels, or both ``None`` (no
        normalisation); ``nodata`` per modality: ``"zero"`` (S2) or ``"nan"`` (S1)."""
        super().__init__()
        self.modalities = tuple(modalities)
        self.channels = tuple(int(c) for c in channels)
        self.nodata = tuple(nodata)
        if not (len(self.modalities) == len(self.channels) == len(self.nodata)):
            raise ValueError("modalities, channels and nodata need one entry per modality")
        if any(k not in ("zero", "nan") for k in self.nodata):
            raise ValueError(f"nodata entries are 'zero' or 'nan', not {self.nodata}")
        if (mean is None) != (inv_std is None):
            raise ValueError("give both mean and inv_std, or neither")
        total = sum(self.channels)
        self.normalized = mean is not None
        m = np.zeros(total, np.float32) if mean is None else np.asarray(mean, np.float32).ravel()
        s = np.ones(total, np.float32) if inv_std is None else np.asarray(inv_std, np.float32)
        s = s.ravel()
        if m.shape != (total,) or s.shape != (total,):
            raise ValueError(f"mean and inv_std need {total} values, got {m.size} and {s.size}")
        self.register_buffer("mean", torch.from_numpy(m.copy()), persistent=False)
        self.register_buffer("inv_std", torch.from_numpy(s.copy()), persistent=False)
        self.fill_nodata = None if fill_nodata is None else float(fill_nodata)
        self.stack = bool(stack)
        starts = np.concatenate([[0], np.cumsum(self.channels)]).astype(int)
        self._span = {
            mod: (int(starts[k]), int(starts[k + 1])) for k, mod in enumerate(self.modalities)
        }

    @classmethod
    def from_store(
        cls,
        source: _StoreSamples | str | os.PathLike[str],
        modalities: str | Sequence[str] | None = None,
        *,
        normalize: Normalize = True,
        fill_nodata: float | None = 0.0,
        stack: bool | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> StoreNormalize:
        """From a dataset (its normalisation, ``fill_nodata``, modalities; ``stack`` defaults
        to the dataset's) or from a store path/URL with ``modalities`` (default S2L2A),
        ``normalize`` and ``fill_nodata`` as the datasets take them (``stack`` default True)."""
        if isinstance(source, _StoreSamples):
            if modalities is not None:
                raise ValueError("modalities come from the dataset; do not pass them")
            mods = source.modalities
            index = source.index
            norm = source._norm
            fill = source.fill_nodata
            stack = source.stack if stack is None else stack
        else:
            if modalities is None:
                modalities = (layout.S2L2A,)
            mods = (modalities,) if isinstance(modalities, str) else tuple(modalities)
            url = os.fspath(source)
            index = read_store_index(url, mods, storage_options)
            norm = _norm_from(normalize, index, mods, _display(url))
            fill = fill_nodata
            stack = True if stack is None else stack
        channels = [len(index.modalities[m].bands) for m in mods]
        kinds = ["nan" if _is_s1(m, index.modalities[m].dtype) else "zero" for m in mods]
        mean = inv = None
        if norm is not None:
            mean = np.concatenate([norm[m][0].ravel() for m in mods])
            inv = np.concatenate([norm[m][1].ravel() for m in mods])
        return cls(mods, channels, kinds, mean, inv, fill, stack)

    def _normalize(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Normalise ``x`` [..., C, H, W] holding channels ``start:stop`` of the stacked order."""
        if x.ndim < 3 or x.shape[-3] != stop - start:
            raise ValueError(
                f"expected [..., {stop - start}, H, W] (channels of {self._names(start, stop)}), "
                f"got shape {tuple(x.shape)}"
            )
        y = x.to(torch.float32, copy=True)  # stored values are exact in float32
        masks = []  # nodata, found in the stored values (before normalisation)
        if self.fill_nodata is not None:
            for mod, kind in zip(self.modalities, self.nodata):
                a, b = self._span[mod]
                a, b = max(a, start) - start, min(b, stop) - start
                if a < b:
                    block = y[..., a:b, :, :]
                    masks.append((a, b, torch.isnan(block) if kind == "nan" else block == 0))
        if self.normalized:  # as the float32 path: (x - mean) in float32, then * (1 / std)
            y.sub_(self.mean[start:stop].to(y.device).view(-1, 1, 1))
            y.mul_(self.inv_std[start:stop].to(y.device).view(-1, 1, 1))
        for a, b, mask in masks:
            y[..., a:b, :, :].masked_fill_(mask, self.fill_nodata)
        return y

    def _names(self, start: int, stop: int) -> str:
        return ", ".join(m for m in self.modalities if self._span[m][0] < stop
                         and self._span[m][1] > start)

    def _tensor(self, x: torch.Tensor) -> torch.Tensor:
        total = sum(self.channels)
        if x.ndim >= 3 and x.shape[-3] == total:
            return self._normalize(x, 0, total)
        raise ValueError(
            f"expected [..., {total}, H, W] (the bands of {', '.join(self.modalities)}), got "
            f"shape {tuple(x.shape)}; pass a dict {{modality: tensor}} for single modalities"
        )

    def _modalities(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor | dict[str, Any]:
        out = {m: self._normalize(t, *self._span[m]) for m, t in x.items()}
        if not self.stack:
            return out
        missing = [m for m in self.modalities if m not in out]
        if missing:
            raise ValueError(f"stack=True needs every modality; missing {missing}")
        return torch.cat([out[m] for m in self.modalities], dim=-3)

    def forward(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return self._tensor(x)
        if isinstance(x, list | tuple):
            return type(x)(self.forward(v) for v in x)
        if isinstance(x, Mapping):
            if "image" in x or "views" in x:
                out = dict(x)
                for key in ("image", "views"):
                    if key in out:
                        out[key] = self.forward(out[key])
                return out
            unknown = [k for k in x if k not in self._span]
            if unknown:
                raise ValueError(
                    f"StoreNormalize for {list(self.modalities)} got a dict with keys "
                    f"{unknown}; pass a tensor, a {{modality: tensor}} dict or an item/batch"
                )
            return self._modalities(x)
        raise TypeError(f"StoreNormalize takes tensors, dicts or lists, not {type(x).__name__}")

    def extra_repr(self) -> str:
        return (
            f"modalities={list(self.modalities)}, channels={list(self.channels)}, "
            f"normalized={self.normalized}, fill_nodata={self.fill_nodata}, stack={self.stack}"
        )
