"""Loader throughput against the codec limit: is the PyTorch loader as fast as decoding allows?

Usage::

    python benchmarks/loader.py                           # a temporary store, S2L2A
    python benchmarks/loader.py --store demo-output/cube.zarr --modalities S2L2A S1RTC

Prints JSON with, for the same samples of one store:

* ``codec_limit``: one process reading and decoding every ``bands`` chunk of those samples with
  zarr directly (``zarr.open_array(...)[i, t]`` in a tight loop, nothing else): samples/s,
  decoded MB/s and CPU seconds. This is what one core can do at best.
  ``codec_limit_sample_reads`` is the same with one ``[i]`` read per sample (zarr then reads
  each shard index once for the sample's four chunks).
* ``in_process``: :class:`pipeline.loader.ZarrPatchDataset` and
  :class:`~pipeline.loader.ZarrShardStream` iterated in this process, no DataLoader: the
  loader's own cost per sample (read, cast to float32, normalise, nodata) against the limit.
* ``loaders``: both datasets through a ``torch.utils.data.DataLoader`` (``forkserver``,
  ``batch_size=16``, no augmentation; seasons and normalisation as given) with 1 and 2 worker
  processes: samples/s, decoded MB/s (the stored bytes behind the samples, comparable with the
  limit), ``per_worker_ratio`` = samples/s / (workers x limit samples/s) and ``cpu_ratio`` =
  limit CPU per sample / the workers' CPU per sample (psutil). The aim is at least 0.9 per
  worker. ``cpu_ratio`` is the figure to read on a busy machine, where wall-clock rates measure
  the neighbours as much as the loader.
* ``fast_paths``: the training fast path, :class:`~pipeline.loader.ZarrShardStream` with
  ``batch_size=--batch`` through ``DataLoader(batch_size=None)`` (ready batches, filled in place
  in shared memory: no per-sample collate), with ``output="raw"`` (stored uint16/float32 values,
  normalised later on the GPU by :class:`~pipeline.loader.StoreNormalize`) and with
  ``output="float32"`` (normalised in the workers), 1 and 2 workers; the same figures as
  ``loaders``. Batches of stores in the pipeline's layout are read by the loader's shard
  reader (each chunk decompressed into its place in the batch); ``raw-zarr`` is the raw path
  with every read through zarr instead (``"reads": "zarr"``), to show what that reader saves.
  ``in_process`` also has the raw batched stream alone, and
  ``store_normalize_cpu_ms_per_sample`` is what :class:`~pipeline.loader.StoreNormalize` costs
  on this CPU for one sample of a raw batch (the work the fast path moves to the GPU).

A "sample" is one location with every season the loader serves (``--seasons all``: the four
chunks per modality the limit loop decodes for it). Timing: every measurement is preceded by a
warm-up pass (page cache, imports, worker start-up: the loader runs with persistent workers and
only later epochs are timed), then the best of ``--repeat`` passes is kept. On a machine with
fewer cores than workers + 1 the 2-worker figures are bounded by the machine, not the loader;
``cpu_count`` is reported for that reason.

The temporary store is written by the pipeline's own writer (:func:`pipeline.store.create_store`
and :func:`~pipeline.store.write_shard_arrays`) with smooth synthetic fields plus sensor-like noise,
so that chunks compress about as much as real patches do (real S2 L2A patches: ratio ~1.7 with the
store's codec, see ``benchmarks/compression.py``); ``compression_ratio`` is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline import layout

MB = 1e6


# --------------------------------------------------------------------------------- the store
def _smooth_field(rng: np.random.Generator, size: int, coarse: int = 12) -> np.ndarray:
    """A smooth random field in 0..1 (bilinear upsampling of a coarse random grid)."""
    g = rng.random((coarse + 1, coarse + 1))
    t = np.linspace(0, coarse, size)
    i0 = np.minimum(t.astype(int), coarse - 1)
    f = t - i0
    rows = g[i0] * (1 - f)[:, None] + g[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f) + rows[:, i0 + 1] * f


def synthetic_bands(rng: np.random.Generator, modality: str, k: int) -> np.ndarray:
    """(k, T, bands, N, N) patches: per-location land cover fields, seasonal and band gains,
    pixel noise. S2: uint16 DN in the +1000 convention; S1: float32 dB."""
    n, t_ = layout.PATCH_PIXELS, layout.NUM_SEASONS
    nb = len(layout.BANDS[modality])
    s1 = modality.startswith("S1")
    out = np.empty((k, t_, nb, n, n), np.float32 if s1 else np.uint16)
    for s in range(k):
        cover = _smooth_field(rng, n, 8) * 0.7 + _smooth_field(rng, n, 40) * 0.3
        for t in range(t_):
            season = 0.8 + 0.4 * rng.random()
            for b in range(nb):
                gain = 0.5 + rng.random()
                if s1:
                    db = -22.0 + 14.0 * cover * gain + rng.normal(0.0, 1.5, (n, n))
                    out[s, t, b] = db.astype(np.float32)
                else:
                    refl = 0.02 + 0.3 * cover * gain * season
                    dn = 1000 + 10000 * refl + rng.normal(0.0, 25.0, (n, n))
                    out[s, t, b] = np.clip(dn, 1, 65535).astype(np.uint16)
    return out


def write_temp_store(path: Path, n_samples: int, modalities: list[str], shard: int,
                     seed: int = 0) -> Path:
    """A complete store written by the pipeline's writer (template, whole shards, finalize)."""
    from pipeline import store

    rng = np.random.default_rng(seed)
    ids = [layout.sample_id(i) for i in range(n_samples)]
    store.create_store(path, ids, modalities, provenance={"benchmark": "benchmarks/loader.py"},
                       shard_samples=shard)
    base = np.datetime64("2022-01-15T10:00:00", "ns")
    for k in range(store.n_shards(n_samples, shard)):
        sl = store.shard_slice(k, n_samples, shard)
        samples = ids[sl]
        arrays = {}
        for m in modalities:
            a = store.empty_shard(m, samples)
            a["bands"][...] = synthetic_bands(rng, m, len(samples))
            a["center_lat"][:] = 51.0 + 0.01 * np.arange(sl.start, sl.stop)
            a["center_lon"][:] = 12.0
            a["crs"][:] = 32632
            a["x_"][:] = 500005.0 + 10.0 * np.arange(layout.PATCH_PIXELS)
            a["y_"][:] = 5700005.0 - 10.0 * np.arange(layout.PATCH_PIXELS)
            a["time_"][:] = base + np.arange(layout.NUM_SEASONS) * np.timedelta64(90, "D")
            a["file_id"][:] = [[f"{m}_{s}_{t}" for t in range(layout.NUM_SEASONS)]
                               for s in samples]
            a["valid_fraction"][:] = 1.0
            if "cloud_mask" in a:
                a["cloud_mask"][:] = 0
                a["cloud_cover"][:] = 5.0
            arrays[m] = a
        status = np.full(len(samples), layout.STATUS_CODES["complete"], np.uint8)
        store.write_shard_arrays(path, k, samples, arrays, status, [""] * len(samples), shard)
    store.finalize(path)
    return path


# --------------------------------------------------------------------------------- measures
def served_rows(path: Path, modalities: list[str], seasons) -> np.ndarray:
    """Store rows of the samples the loader serves with these options (the limit decodes the
    same samples)."""
    import zarr

    from pipeline.loader import ZarrPatchDataset

    ds = ZarrPatchDataset(path, modalities, seasons=seasons, normalize=False)
    ids = np.asarray(zarr.open_group(str(path), mode="r")["sample"][:]).astype(str)
    return np.flatnonzero(np.isin(ids, ds.sample_ids))


def codec_limit(path: Path, modalities: list[str], rows: np.ndarray, repeat: int,
                per_sample: bool = False) -> dict:
    """Read and decode every ``bands`` chunk of ``rows`` with zarr, one process, tight loop:
    one ``[i, t]`` read per chunk, or (``per_sample``) one ``[i]`` read per sample and modality,
    which reads each shard index once for the sample's four chunks."""
    import zarr

    arrays = [zarr.open_array(str(path / m / "bands"), mode="r") for m in modalities]
    ntime = min(a.shape[1] for a in arrays)

    def one_pass() -> int:
        nbytes = 0
        for i in rows:
            for a in arrays:
                if per_sample:
                    nbytes += a[i, :ntime].nbytes
                else:
                    for t in range(ntime):
                        nbytes += a[i, t].nbytes
        return nbytes

    nbytes = one_pass()  # warm-up: page cache, codec set-up
    best = cpu = float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        one_pass()
        best = min(best, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return {"read": "[i]" if per_sample else "[i, t]", "samples": int(len(rows)),
            "seconds": round(best, 4), "cpu_seconds": round(cpu, 4),
            "samples_per_s": round(len(rows) / best, 2),
            "decoded_mb_per_s": round(nbytes / best / MB, 1),
            "decoded_bytes_per_sample": int(nbytes / len(rows))}


def _stack(modalities: list[str]) -> bool:
    """Raw values stack only when every modality is stored with one dtype (S2 with S2)."""
    return len({m.startswith("S1") for m in modalities}) == 1


def in_process_rate(kind: str, path: Path, modalities: list[str], args,
                    output: str = "float32", batched: bool = False) -> dict:
    """The dataset alone, in this process, no DataLoader: what the loader's own code costs
    per sample on top of decoding (the DataLoader adds collation into shared memory)."""
    from pipeline.loader import ZarrPatchDataset, ZarrShardStream

    common = dict(modalities=modalities, seasons=args.seasons, normalize=args.normalize,
                  transform=None, seed=0, return_metadata=False, output=output,
                  stack=output == "float32" or _stack(modalities))
    if kind == "ZarrPatchDataset":
        ds = ZarrPatchDataset(path, **common)

        def one_pass() -> int:
            return sum(1 for k in range(len(ds)) if ds[k] is not None)
    elif batched:
        ds = ZarrShardStream(path, **common, buffer_size=args.buffer, batch_size=args.batch)

        def one_pass() -> int:
            return sum(len(b["image"] if common["stack"] else b["image"][modalities[0]])
                       for b in ds)
    else:
        ds = ZarrShardStream(path, **common, buffer_size=args.buffer)

        def one_pass() -> int:
            return sum(1 for _ in ds)

    n = one_pass()  # warm-up
    best = cpu = float("inf")
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        one_pass()
        best = min(best, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    out = {"dataset": kind, "workers": 0, "samples": n, "seconds": round(best, 4),
           "samples_per_s": round(n / best, 2), "cpu_ms_per_sample": round(cpu / n * 1e3, 2)}
    if output != "float32" or batched:
        out.update(output=output, batch_size=args.batch if batched else None)
    return out


def normalize_cost(path: Path, modalities: list[str], args) -> float:
    """CPU ms per sample of :class:`~pipeline.loader.StoreNormalize` on raw batches, here on
    the CPU (on a GPU this is the work moved off the loader workers)."""
    import torch

    from pipeline.loader import StoreNormalize, ZarrShardStream

    ds = ZarrShardStream(path, modalities, seasons=args.seasons, normalize=args.normalize,
                         seed=0, return_metadata=False, output="raw", stack=_stack(modalities),
                         buffer_size=args.buffer, batch_size=args.batch)
    norm = StoreNormalize.from_store(ds, stack=True)
    batch = next(iter(ds))
    n = len(batch["image"] if ds.stack else batch["image"][modalities[0]])
    best = float("inf")
    with torch.no_grad():
        norm(batch)  # warm-up
        for _ in range(max(args.repeat, 2)):
            c0 = time.process_time()
            norm(batch)
            best = min(best, time.process_time() - c0)
    return round(best / n * 1e3, 2)


def _worker_cpu(loader) -> float | None:
    """CPU seconds used so far by the DataLoader's worker processes (psutil; None if unknown)."""
    try:
        import psutil

        procs = loader._iterator._workers  # persistent workers: one iterator for all epochs
        return sum(sum(psutil.Process(w.pid).cpu_times()[:2]) for w in procs)
    except Exception:  # noqa: BLE001 - a figure we can do without
        return None


def loader_rate(kind: str, path: Path, modalities: list[str], workers: int, args,
                bytes_per_sample: int, output: str = "float32", batched: bool = False,
                zarr_reads: bool = False) -> dict:
    """Samples/s of one dataset through a DataLoader (best epoch after the first: persistent
    workers, so start-up and imports are not timed), and the CPU the workers spent per sample.
    ``batched``: the stream yields ready batches (``batch_size=--batch`` on the stream,
    ``DataLoader(batch_size=None)``)."""
    from torch.utils.data import DataLoader

    from pipeline.loader import ZarrPatchDataset, ZarrShardStream

    stack = output == "float32" or _stack(modalities)
    common = dict(modalities=modalities, seasons=args.seasons, normalize=args.normalize,
                  transform=None, seed=0, return_metadata=False, output=output, stack=stack)
    if kind == "ZarrPatchDataset":
        ds = ZarrPatchDataset(path, **common)
        extra = {"shuffle": True, "batch_size": args.batch}
    elif batched:
        ds = ZarrShardStream(path, **common, buffer_size=args.buffer, batch_size=args.batch)
        ds._direct_reads = not zarr_reads
        extra = {"batch_size": None}
    else:
        ds = ZarrShardStream(path, **common, buffer_size=args.buffer)
        extra = {"batch_size": args.batch}
    n = len(ds) if not batched else sum(ds.rank_lengths())
    loader = DataLoader(ds, num_workers=workers, multiprocessing_context="forkserver",
                        persistent_workers=True, prefetch_factor=2, **extra)
    best = best_cpu = best_main = float("inf")
    for epoch in range(1 + args.repeat):
        ds.set_epoch(epoch)
        seen = 0
        cpu0 = _worker_cpu(loader)
        t0, m0 = time.perf_counter(), time.process_time()
        for batch in loader:
            image = batch["image"] if stack else batch["image"][modalities[0]]
            seen += image.shape[0]
        dt, dm = time.perf_counter() - t0, time.process_time() - m0
        cpu1 = _worker_cpu(loader)
        assert seen == n, f"{kind} served {seen} samples, expected {n}"
        if epoch > 0:  # epoch 0 starts the workers and warms the page cache
            best = min(best, dt)
            best_main = min(best_main, dm)
            if cpu0 is not None and cpu1 is not None:
                best_cpu = min(best_cpu, cpu1 - cpu0)
    del loader
    shape = tuple(image.shape[1:])
    if stack:
        out_bytes = image.element_size() * int(np.prod(shape))
    else:
        out_bytes = sum(t.element_size() * t[0].numel() for t in batch["image"].values())
    out = {"dataset": kind, "workers": workers, "samples": n, "seconds": round(best, 4),
           "samples_per_s": round(n / best, 2),
           "decoded_mb_per_s": round(n * bytes_per_sample / best / MB, 1),
           "output_mb_per_s": round(n * out_bytes / best / MB, 1),
           "item_shape": list(shape),
           "main_process_cpu_ms_per_sample": round(best_main / n * 1e3, 2)}
    if output != "float32" or batched:
        out.update(output=output, batch_size=args.batch, batched=batched,
                   item_dtype=str(image.dtype).replace("torch.", ""))
    if batched:
        out["reads"] = "zarr" if zarr_reads else "shard reader (zarr if not the layout)"
    if best_cpu < float("inf"):
        out["worker_cpu_ms_per_sample"] = round(best_cpu / n * 1e3, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=None,
                   help="an existing store (e.g. demo-output/cube.zarr); default: a temporary one")
    p.add_argument("--samples", type=int, default=96, help="samples in the temporary store")
    p.add_argument("--shard-samples", type=int, default=16, help="shard size of the temporary store")
    p.add_argument("--modalities", nargs="+", default=[layout.S2L2A])
    p.add_argument("--seasons", default="all", help="loader season mode: all, random, 0..3")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="normalise with the stored statistics (the training default)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--buffer", type=int, default=64, help="ZarrShardStream shuffle buffer")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--datasets", nargs="+", default=["ZarrPatchDataset", "ZarrShardStream"],
                   choices=["ZarrPatchDataset", "ZarrShardStream"])
    p.add_argument("--fast-paths", nargs="*", default=["raw", "float32", "raw-zarr"],
                   choices=["raw", "float32", "raw-zarr"],
                   help="outputs of the batched ZarrShardStream to measure (none: skip)")
    p.add_argument("--repeat", type=int, default=2, help="timed passes (best kept)")
    args = p.parse_args(argv)
    if args.seasons not in ("all", "random"):
        args.seasons = int(args.seasons)

    tmp = None
    try:
        if args.store is None:
            tmp = Path(tempfile.mkdtemp(prefix="ssl4eo-loader-bench-"))
            path = tmp / "cube.zarr"
            t0 = time.perf_counter()
            write_temp_store(path, args.samples, args.modalities, args.shard_samples)
            write_s = time.perf_counter() - t0
        else:
            path = args.store
            write_s = None
        rows = served_rows(path, args.modalities, args.seasons)
        if len(rows) == 0:
            print(f"store {path} has no sample to serve with seasons={args.seasons!r}",
                  file=sys.stderr)
            return 2
        import zarr

        from pipeline.store import stored_bytes

        raw = stored = 0
        for m in args.modalities:
            a = zarr.open_array(str(path / m / "bands"), mode="r")
            raw += int(np.prod(a.shape)) * a.dtype.itemsize
            stored += stored_bytes(path / m / "bands")
        limit = codec_limit(path, args.modalities, rows, args.repeat)
        limit_sample_reads = codec_limit(path, args.modalities, rows, args.repeat, True)
        # the limit decodes every season of a sample; "random" and a fixed season read one
        chunks = layout.NUM_SEASONS if args.seasons == "all" else 1
        limit_rate = limit["samples_per_s"] * layout.NUM_SEASONS / chunks
        per_sample = limit["decoded_bytes_per_sample"] * chunks // layout.NUM_SEASONS
        limit_cpu_ms = limit["cpu_seconds"] / len(rows) * 1e3 * chunks / layout.NUM_SEASONS
        loaders = []
        in_process = []
        for kind in args.datasets:
            r = in_process_rate(kind, path, args.modalities, args)
            r["ratio"] = round(r["samples_per_s"] / limit_rate, 3)
            r["cpu_ratio"] = round(limit_cpu_ms / r["cpu_ms_per_sample"], 3)
            in_process.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
        if "raw" in args.fast_paths:
            r = in_process_rate("ZarrShardStream", path, args.modalities, args, "raw", True)
            r["ratio"] = round(r["samples_per_s"] / limit_rate, 3)
            r["cpu_ratio"] = round(limit_cpu_ms / r["cpu_ms_per_sample"], 3)
            in_process.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
        limit_sample_cpu_ms = (limit_sample_reads["cpu_seconds"] / len(rows) * 1e3 * chunks
                               / layout.NUM_SEASONS)

        def rate(kind: str, w: int, output: str = "float32", batched: bool = False) -> dict:
            r = loader_rate(kind, path, args.modalities, w, args, per_sample,
                            output.removesuffix("-zarr"), batched, output.endswith("-zarr"))
            r["per_worker_ratio"] = round(r["samples_per_s"] / (w * limit_rate), 3)
            if "worker_cpu_ms_per_sample" in r:  # the same ratio in CPU time, robust to a
                # busy machine: the limit's CPU per sample over the workers' CPU per sample
                r["cpu_ratio"] = round(limit_cpu_ms / r["worker_cpu_ms_per_sample"], 3)
                r["cpu_ratio_vs_sample_reads"] = round(
                    limit_sample_cpu_ms / r["worker_cpu_ms_per_sample"], 3)
            r["per_worker_ratio_vs_sample_reads"] = round(
                r["samples_per_s"] / (w * limit_sample_reads["samples_per_s"]
                                      * layout.NUM_SEASONS / chunks), 3)
            print(json.dumps(r), file=sys.stderr, flush=True)
            return r

        for kind in args.datasets:
            for w in args.workers:
                loaders.append(rate(kind, w))
        fast_paths = [rate("ZarrShardStream", w, output, True)
                      for output in args.fast_paths for w in args.workers]
        out = {
            "store": str(args.store) if args.store else f"temporary ({args.samples} samples, "
            f"shards of {args.shard_samples})",
            "store_write_seconds": None if write_s is None else round(write_s, 2),
            "modalities": args.modalities,
            "seasons": args.seasons, "normalize": args.normalize, "batch_size": args.batch,
            "compression_ratio": round(raw / stored, 3) if stored else None,
            "limit_samples_per_s_in_loader_samples": round(limit_rate, 2),
            "codec_limit": limit,
            # the limit again after the loaders: how much the machine's load drifted meanwhile
            "codec_limit_cpu_ms_per_sample_start_end": [
                round(limit["cpu_seconds"] / len(rows) * 1e3, 2),
                round(codec_limit(path, args.modalities, rows, args.repeat)["cpu_seconds"]
                      / len(rows) * 1e3, 2)],
            "codec_limit_sample_reads": limit_sample_reads,
            "in_process": in_process,
            "loaders": loaders,
            "fast_paths": fast_paths,
            "store_normalize_cpu_ms_per_sample": (
                normalize_cost(path, args.modalities, args) if "raw" in args.fast_paths
                else None),
            "aim_per_worker_ratio": 0.9,
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        }
        print(json.dumps(out, indent=2))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
